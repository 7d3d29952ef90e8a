"""Supervised fine-tuning (SFT) entry point: chat conversations, loss on assistant turns only.

  python -m train.sft --config=configs/sft/chat.py --workdir=runs/sft \
      --config.init_from=runs/english_bpe

SFT is the pretraining loop with other data: the same Trainer, step, checkpoint format and
`lm_loss` (a mean over tokens whose loss_mask is 1, which the SFT pipeline sets only on
assistant tokens and their end-of-turn marker). What differs:

- The model and tokenizer come from the `init_from` checkpoint (any stage). The chat markers
  (`data.chat.CHAT_MARKERS`) are appended to its tokenizer when missing; the vocabulary then
  grows and `model.layout.extend_vocab` appends embedding rows / output columns for the new
  ids, leaving every pretrained row as it was. The parent is recorded in the checkpoint.
- `config.model` holds only execution overrides of the parent's model config (dtype,
  remat policy, attention implementation); "" keeps the parent's value.
- Validation is the held-out conversations' response loss, evaluated once before the first
  step (the base model's figure) and then every `eval_every` steps; a few held-out prompts
  are answered with the sampler every `sample_every` steps and logged.
- Resuming in the same workdir continues the run (same tokenizer, exact data position).
"""

from __future__ import annotations

import json
import os
from typing import Any

from train.pretrain import write_config


def run(config: Any, workdir: str) -> dict[str, float]:
  """Fine-tunes per `config` in `workdir`; returns the final eval metrics (+ `base_loss`)."""
  import jax
  from data import sft_sources
  from data.sft_pipeline import build_sft_pipelines, format_stats
  from model import layout
  from train.losses import lm_loss
  from train.parent import setup_child
  from train.restore import InitAdapter
  from train.trainer import Trainer

  parent = setup_child(config, "a pretraining (or any stage's) workdir or checkpoint directory")
  if jax.process_index() == 0:
    write_config(config, workdir)
  tokenizer, template, model_cfg = parent.child_tokenizer, parent.template, parent.child_cfg
  parent_tok = parent.tokenizer
  adapter = InitAdapter(parent.execution_cfg,
                        lambda p: layout.extend_vocab(p, model_cfg.vocab_size, config.seed))
  examples, files = sft_sources.read_sft_sources(config.data.sources)
  train_convs, val_convs = sft_sources.split_examples(examples, config.data.val_fraction,
                                                     config.data.seed)
  train_iter, val_set, stats = build_sft_pipelines(
      config.data, template, global_batch_size=config.train.batch_size,
      process_index=jax.process_index(), process_count=jax.process_count(),
      conversations=(train_convs, val_convs))
  stats["skipped_records"] = sum(f.skipped for f in files)
  trainer = Trainer(config, workdir, model_cfg, lm_loss, tokenizer_bytes=tokenizer.to_bytes(),
                    tokenizer_fingerprint=tokenizer.fingerprint, init_adapter=adapter)
  if jax.process_index() == 0:
    print(f"SFT data: {format_stats(stats)}", flush=True)
    added = tokenizer.vocab_size - parent_tok.vocab_size
    print(f"Model: {model_cfg.num_params():,} parameters; vocabulary {parent_tok.vocab_size}"
          f" + {added} chat markers; mesh {dict(trainer.mesh.shape)}", flush=True)
  state, data_state = trainer.restore_or_init()
  resumed = data_state is not None
  if resumed:
    train_iter.set_state(data_state)
  trainer.data_state_fn = train_iter.get_state
  trainer.setup_throughput(config.train.batch_size * config.data.seq_len, config.data.seq_len)
  results: dict[str, float] = {}

  def evaluate(step: int, params: Any) -> dict[str, float]:
    metrics = trainer.evaluate(params, val_set(config.train.eval_batch_size))
    trainer.log_eval(step, metrics, f"response loss {metrics['loss']:.4f} | accuracy "
                     f"{metrics['accuracy']:.4f} | {int(metrics['tokens'])} tokens")
    return metrics

  if not resumed and int(jax.device_get(state.step)) == 0:
    results["base_loss"] = evaluate(0, state.params)["loss"]  # the starting model's figure

  def eval_hook(trainer: Trainer, step: int, state: Any) -> None:
    results.update(evaluate(step, state.params))

  trainer.add_hook(eval_hook, every=config.train.eval_every or config.train.num_steps)
  if config.sample_every:
    trainer.add_hook(_sample_hook(trainer, template, val_convs, config), config.sample_every)
  results.update(trainer.fit(state, iter(train_iter)))
  return results


def _sample_hook(trainer: Any, template: Any, val_convs: list, config: Any):
  """Answers a few held-out prompts with the sampler and logs them (samples.jsonl)."""
  import jax
  from eval.sample import respond
  from model.sampling import Sampler, SamplingConfig

  sampler = Sampler(trainer.graphdef, trainer.model_cfg, trainer.mesh, trainer.rules,
                    trainer.param_shardings)
  max_new = config.sample_max_new_tokens
  prompts = [c[:-1] for c in val_convs if c and c[-1]["role"] == "assistant"]
  prompts = [p for p in prompts
             if len(template.prompt_ids(p)) + max_new <= trainer.model_cfg.max_seq_len]
  prompts = prompts[:config.num_samples]
  if not prompts:
    raise ValueError(f"No held-out prompt is short enough to sample {max_new} tokens within "
                     f"the model context ({trainer.model_cfg.max_seq_len}); lower "
                     "config.sample_max_new_tokens or set config.sample_every=0")
  # respond() sets the end-of-turn / </s> stop ids and pads rows to the mesh's batch axes.
  scfg = SamplingConfig(max_new_tokens=max_new, temperature=0.0)

  def hook(trainer: Any, step: int, state: Any) -> None:
    replies = respond(sampler, state.params, template, prompts, scfg)
    if jax.process_index() != 0:
      return
    with open(os.path.join(trainer.workdir, "samples.jsonl"), "a") as f:
      for i, (prompt, reply) in enumerate(zip(prompts, replies)):
        record = {"step": step,
                  "prompt": template.tokenizer.decode(template.prompt_ids(prompt).tolist()),
                  "response": reply["response"], "ended": reply["ended"]}
        f.write(json.dumps(record) + "\n")
        if i < 2:
          print(f"sample step {step}: {record['prompt'][-80:]!r} -> "
                f"{reply['response'][:160]!r}", flush=True)
  return hook


if __name__ == "__main__":
  from train import entry
  entry.launch(run)
