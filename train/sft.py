"""Supervised fine-tuning (SFT) stage: chat conversations, loss on assistant turns only.

  python -m train.sft --config=configs/sft/chat.py --workdir=runs/sft \
      --config.init_from=runs/english_bpe

SFT is the pretraining loop with other data: the same driver, Trainer, step, checkpoint
format and `lm_loss` (a mean over tokens whose loss_mask is 1, which the SFT pipeline sets
only on assistant tokens and their end-of-turn marker). What differs:

- The model and tokenizer come from the `init_from` checkpoint (any stage). The chat markers
  (`data.chat.CHAT_MARKERS`) are appended to its tokenizer when missing; the vocabulary then
  grows and `model.layout.extend_vocab` appends embedding rows / output columns for the new
  ids (under jit, on the sharded parameters), leaving every pretrained row as it was. The
  parent is recorded in the checkpoint.
- `config.model` holds only execution overrides of the parent's model config (dtype,
  remat policy, attention implementation); "" keeps the parent's value.
- Validation is the held-out conversations' response loss, evaluated once before the first
  step (the base model's figure, `base_loss`) and then every `eval_every` steps; a few
  held-out prompts are answered with the sampler every `sample_every` steps and logged.
- Resuming in the same workdir continues the run (same tokenizer, exact data position).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax

from data import sft_sources
from data.sft_pipeline import build_sft_pipelines, format_stats
from model.config import ModelConfig
from model.sampling import Sampler, SamplingConfig, respond
from train import entry
from train.loop import Hook
from train.parent import setup_child
from train.pretrain import programs
from train.stage import Run, Stage, evaluate_on
from train.trainer import Trainer


def build(config: Any, workdir: str) -> Run:
  """Parent, conversations, pipelines and the Trainer of an SFT run."""
  parent = setup_child(config, "a pretraining (or any stage's) workdir or checkpoint directory")
  tokenizer, template, model_cfg = parent.child_tokenizer, parent.template, parent.child_cfg
  examples, files = sft_sources.read_sft_sources(config.data.sources)
  train_convs, val_convs = sft_sources.split_examples(examples, config.data.val_fraction,
                                                     config.data.seed)
  train_iter, val_set, stats = build_sft_pipelines(
      config.data, template, global_batch_size=config.train.batch_size,
      process_index=jax.process_index(), process_count=jax.process_count(),
      conversations=(train_convs, val_convs))
  stats["skipped_records"] = sum(f.skipped for f in files)
  (program,) = programs(config, model_cfg)
  trainer = Trainer(config, workdir, model_cfg, program.loss_fn,
                    tokenizer_bytes=tokenizer.to_bytes(),
                    tokenizer_fingerprint=tokenizer.fingerprint,
                    init_adapter=parent.lm_adapter(config.seed))
  hooks = []
  if config.sample_every:
    hooks.append(Hook(config.sample_every, sample_hook(trainer, template, val_convs, config)))
  added = tokenizer.vocab_size - parent.tokenizer.vocab_size
  return Run(
      trainers=[trainer], train_iter=train_iter,
      evaluate=evaluate_on(trainer, val_set, config.train.eval_batch_size),
      summary=lambda m: (f"response loss {m['loss']:.4f} | accuracy {m['accuracy']:.4f} | "
                         f"{int(m['tokens'])} tokens"),
      tokens_per_step=config.train.batch_size * config.data.seq_len,
      seq_len=config.data.seq_len, eval_at_start="base_loss", hooks=hooks,
      stats=stats, info=[f"SFT data: {format_stats(stats)}",
            f"Model: {model_cfg.num_params():,} parameters; vocabulary "
            f"{parent.tokenizer.vocab_size} + {added} chat markers; mesh "
            f"{dict(trainer.mesh.shape)}"])


def sample_hook(trainer: Trainer, template: Any, val_convs: list, config: Any
                ) -> Callable[[int, Any], None]:
  """Answers a few held-out prompts with the sampler and logs them (samples.jsonl)."""
  model_cfg: ModelConfig = trainer.model_cfg
  sampler = Sampler(trainer.graphdef, model_cfg, trainer.mesh, trainer.rules,
                    trainer.param_shardings)
  max_new = config.sample_max_new_tokens
  prompts = [c[:-1] for c in val_convs if c and c[-1]["role"] == "assistant"]
  prompts = [p for p in prompts
             if len(template.prompt_ids(p)) + max_new <= model_cfg.max_seq_len]
  prompts = prompts[:config.num_samples]
  if not prompts:
    raise ValueError(f"No held-out prompt is short enough to sample {max_new} tokens within "
                     f"the model context ({model_cfg.max_seq_len}); lower "
                     "config.sample_max_new_tokens or set config.sample_every=0")
  # respond() sets the end-of-turn / </s> stop ids and pads rows to the mesh's batch axes.
  scfg = SamplingConfig(max_new_tokens=max_new, temperature=0.0)

  def hook(step: int, state: Any) -> None:
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


STAGE = Stage("sft", programs=programs, build=build)

if __name__ == "__main__":
  entry.launch(STAGE)
