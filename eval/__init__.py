"""eval package.

loading: restores any checkpoint of the shared format (language model or reward model)
  onto a mesh with its tokenizer.
sample: responses, batches of prompts and interactive chat from a checkpoint
  (`python -m eval.sample --checkpoint=runs/sft --prompt="Name three colors."`).
run: the evaluation harness's command line and report (`python -m eval.run
  --checkpoint=runs/sft --tasks=all_lm`); lm_tasks: its language-model task runners
  (multiple choice, perplexity, gsm8k).
lm_eval_adapter: the lm-evaluation-harness model "lmlife" over the scorer and sampler
  (`python -m eval.lm_eval --model lmlife --model_args checkpoint=runs/sft ...`, lm-eval's
  CLI with the model registered); lm_eval_tasks: offline task YAMLs over the shared files;
  lm_eval_run: lm-eval tasks inside eval.run (`--tasks=lm_eval:<name>`).
reward: reward-model accuracy on preference pairs with a bootstrap interval and the
  length baselines (`python -m eval.reward --checkpoint=runs/rm`).
"""
