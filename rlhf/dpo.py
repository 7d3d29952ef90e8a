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
`precompute_ref_log_probs`). Resume recomputes them from the same checkpoint.
Metrics (TRL's names): `rewards/chosen`, `rewards/rejected`, `rewards/margins`,
`rewards/accuracies` (the implicit reward β·(log π − log π_ref)), `logps/chosen`,
`logps/rejected`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf.dpo_core import dpo_loss, response_logps
from rlhf.reward import flatten_pairs
from train.losses import masked_mean
from train.pretrain import write_config


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


def with_reference(trainer: Any, ref_params: Any, rows: Any, batch_size: int) -> Any:
  """`rows` with `ref_logps` from the reference parameters (one forward pass per pair)."""
  from data.row_pipeline import RowValidationSet
  if jax.process_count() > 1:  # predict() gathers rows on one host
    raise NotImplementedError("DPO's reference precompute runs in one process; multi-host "
                              "DPO needs per-host row gathering (not built yet)")
  if not rows.num_rows:
    return rows
  out = trainer.predict(pair_logps, ref_params, RowValidationSet(rows)(batch_size))
  return dataclasses.replace(rows, ref_logps=out[:rows.num_rows].astype("float32"))


def build(config: Any, workdir: str):
  """(trainer, train pipeline, validation set, data stats) of a DPO run, with the reference
  log-probabilities already computed from the `init_from` parameters."""
  from data.preference_pipeline import build_preference_rows, preference_pipelines
  from model import layout
  from train.parent import setup_child
  from train.restore import InitAdapter
  from train.trainer import Trainer

  parent = setup_child(config, "an SFT workdir or checkpoint directory (the reference)")
  model_cfg = parent.child_cfg
  adapter = InitAdapter(parent.execution_cfg,
                        lambda p: layout.extend_vocab(p, model_cfg.vocab_size, config.seed))
  loss_fn = functools.partial(dpo_loss_fn, beta=config.dpo.beta,
                              label_smoothing=config.dpo.label_smoothing,
                              loss_type=config.dpo.loss_type)
  tokenizer = parent.child_tokenizer
  trainer = Trainer(config, workdir, model_cfg, loss_fn, tokenizer_bytes=tokenizer.to_bytes(),
                    tokenizer_fingerprint=tokenizer.fingerprint, init_adapter=adapter)
  train_rows, val_rows, stats, _ = build_preference_rows(config.data, parent.template)
  ref_params, _ = trainer.load_init_params()
  eval_batch = config.train.eval_batch_size
  train_rows = with_reference(trainer, ref_params, train_rows, eval_batch)
  val_rows = with_reference(trainer, ref_params, val_rows, eval_batch)
  stats["reference_pairs"] = train_rows.num_rows + val_rows.num_rows
  train_iter, val_set = preference_pipelines(
      train_rows, val_rows, config.data, parent.template,
      global_batch_size=config.train.batch_size, process_index=jax.process_index(),
      process_count=jax.process_count())
  return trainer, train_iter, val_set, stats


def run(config: Any, workdir: str) -> dict[str, float]:
  """Trains with DPO per `config` in `workdir`; returns the final eval metrics."""
  from data.preference_pipeline import format_stats

  if jax.process_index() == 0:
    write_config(config, workdir)
  trainer, train_iter, val_set, stats = build(config, workdir)
  eval_batch = config.train.eval_batch_size
  if jax.process_index() == 0:
    print(format_stats(stats), flush=True)
    print(f"Model: {trainer.model_cfg.num_params():,} parameters; reference log-probs of "
          f"{stats['reference_pairs']} pairs computed; mesh {dict(trainer.mesh.shape)}",
          flush=True)
  state, data_state = trainer.restore_or_init()
  if data_state is not None:
    train_iter.set_state(data_state)
  trainer.data_state_fn = train_iter.get_state
  trainer.setup_throughput(2 * config.train.batch_size * config.data.seq_len,
                           config.data.seq_len)
  results: dict[str, float] = {}

  def evaluate(trainer: Any, step: int, state: Any) -> None:
    metrics = trainer.evaluate(state.params, val_set(eval_batch))
    results.update(metrics)
    trainer.log_eval(step, metrics, f"loss {metrics['loss']:.4f} | implicit-reward accuracy "
                     f"{metrics['rewards/accuracies']:.4f} | margin "
                     f"{metrics['rewards/margins']:.3f} | {int(metrics['tokens'])} pairs")

  trainer.add_hook(evaluate, every=config.train.eval_every or config.train.num_steps)
  results.update(trainer.fit(state, iter(train_iter)))
  return results


if __name__ == "__main__":
  from train import entry
  entry.launch(run)
