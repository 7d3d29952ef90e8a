"""DPO entry point: the SFT policy trained directly on preference pairs against a frozen
reference (the SFT model itself).

  python -m rlhf.dpo --config=configs/dpo/hh.py --workdir=runs/dpo --config.init_from=runs/sft

The same Trainer, step and checkpoint format as every stage; the model is the `init_from`
language model (chat markers added if missing). The loss (`rlhf/dpo_core.py`): sigmoid DPO
with β and optional label smoothing, or IPO, on the summed log-probabilities of each
response's tokens and its `<|end|>`.

Decision: the reference log-probabilities are computed once, before training, with the
`init_from` parameters (which is what the reference is), and stored next to the pairs'
tokens (`PreferenceRows.ref_logps`), so each training step runs one model (the policy), not
two: half the forward FLOPs of keeping the reference in memory (TRL's
`precompute_ref_log_probs`). Resume recomputes them from the same checkpoint. The pass
runs on the sharded-apply runtime (train/runtime.py), so it works with several processes.
Metrics (TRL's `rewards/*` and `logps/*`, one level under `train/` and `eval/`):
`reward_chosen`, `reward_rejected`, `reward_margin`, `reward_accuracy` (the implicit reward
β·(log π − log π_ref)), `logp_chosen`, `logp_rejected`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from data.preference_pipeline import (PreferenceRows, build_preference_rows, format_stats,
                                      preference_pipelines)
from data.row_pipeline import RowValidationSet
from model.config import ModelConfig
from model.transformer import Transformer
from rlhf.dpo_core import dpo_loss, response_logps
from rlhf.reward import flatten_pairs, preference_batch
from train import entry
from train.losses import masked_mean
from train.parent import setup_child
from train.stage import Program, Run, Stage, evaluate_on
from train.trainer import Trainer


def pair_logps(model: nnx.Module, batch: Mapping[str, jax.Array]) -> jax.Array:
  """Response log-probabilities [B, 2] (chosen, rejected) of a preference batch."""
  tokens, positions, segment_ids, start, end = flatten_pairs(
      batch, ("tokens", "positions", "segment_ids", "response_start", "score_index"))
  logits = model(tokens, positions, segment_ids)
  return response_logps(logits, tokens, start, end).reshape(-1, 2)


def dpo_loss_fn(model: nnx.Module, batch: Mapping[str, jax.Array], rng: jax.Array, *,
                beta: float, label_smoothing: float = 0.0, loss_type: str = "sigmoid"
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean DPO loss over the real pairs of a batch carrying `ref_logp`; aux = TRL's metrics."""
  del rng
  logps, ref = pair_logps(model, batch), batch["ref_logp"]
  losses, per_pair = dpo_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], beta,
                              label_smoothing, loss_type)
  mask = batch["pair_mask"].astype(jnp.float32)
  pairs = jnp.sum(mask)
  mean = lambda x: masked_mean(x, mask)
  return mean(losses), {**{k: mean(v) for k, v in per_pair.items()}, "weight": pairs}


def with_reference(trainer: Trainer, ref_params: Any, rows: PreferenceRows,
                   batch_size: int) -> PreferenceRows:
  """`rows` with `ref_logps` from the reference parameters (one forward pass per pair, every
  row on every process: the output is replicated, nothing is gathered on a host)."""
  if not rows.num_rows:
    return rows
  out = trainer.runtime.apply_batches(pair_logps, ref_params,
                                      RowValidationSet(rows)(batch_size))
  return dataclasses.replace(rows, ref_logps=out[:rows.num_rows].astype("float32"))


def programs(config: Any, model_cfg: ModelConfig) -> list[Program]:
  """One trainer: the policy (a Transformer) with the DPO loss on preference batches that
  carry the reference log-probabilities."""
  del model_cfg
  loss = functools.partial(dpo_loss_fn, beta=config.dpo.beta,
                           label_smoothing=config.dpo.label_smoothing,
                           loss_type=config.dpo.loss_type)
  b = config.train.batch_size // config.train.grad_accum_steps
  return [Program("train", config, Transformer, loss,
                  preference_batch(b, config.data.seq_len, dpo=True))]


def build(config: Any, workdir: str) -> Run:
  """The parent, the Trainer, the pairs with their reference log-probabilities (computed
  from the `init_from` parameters) and the pipelines of a DPO run."""
  parent = setup_child(config, "an SFT workdir or checkpoint directory (the reference)")
  model_cfg = parent.child_cfg
  (program,) = programs(config, model_cfg)
  tokenizer = parent.child_tokenizer
  trainer = Trainer(config, workdir, model_cfg, program.loss_fn,
                    tokenizer_bytes=tokenizer.to_bytes(),
                    tokenizer_fingerprint=tokenizer.fingerprint,
                    init_adapter=parent.lm_adapter(config.seed))
  train_rows, val_rows, stats, _ = build_preference_rows(config.data, parent.template)
  ref_params, _ = trainer.load_init_params()
  eval_batch = config.train.eval_batch_size
  train_rows = with_reference(trainer, ref_params, train_rows, eval_batch)
  val_rows = with_reference(trainer, ref_params, val_rows, eval_batch)
  del ref_params
  stats["reference_pairs"] = train_rows.num_rows + val_rows.num_rows
  train_iter, val_set = preference_pipelines(
      train_rows, val_rows, config.data, parent.template,
      global_batch_size=config.train.batch_size, process_index=jax.process_index(),
      process_count=jax.process_count())
  return Run(
      trainers=[trainer], train_iter=train_iter,
      evaluate=evaluate_on(trainer, val_set, eval_batch),
      summary=lambda m: (f"loss {m['loss']:.4f} | implicit-reward accuracy "
                         f"{m['reward_accuracy']:.4f} | margin {m['reward_margin']:.3f} | "
                         f"{int(m['tokens'])} pairs"),
      tokens_per_step=2 * config.train.batch_size * config.data.seq_len,
      seq_len=config.data.seq_len,
      stats=stats, info=[format_stats(stats),
            f"Model: {model_cfg.num_params():,} parameters; reference log-probs of "
            f"{stats['reference_pairs']} pairs computed; mesh {dict(trainer.mesh.shape)}"])


STAGE = Stage("dpo", programs=programs, build=build)

if __name__ == "__main__":
  entry.launch(STAGE)
