"""Reward-model entry point: a scalar head on an SFT trunk, trained on preference pairs.

  python -m rlhf.reward --config=configs/reward/hh.py --workdir=runs/rm \
      --config.init_from=runs/sft

The Trainer, step, checkpoint format and data plumbing are the other stages'; what is
particular here:

- Model: `model.heads.RewardModel`, the `init_from` checkpoint's trunk (any stage: an SFT,
  pretraining or reward-model checkpoint) without its output projection, plus a freshly
  initialised scalar head (a reward-model parent keeps its head). The chat markers are added
  to a parent tokenizer that lacks them, as in SFT.
- Loss (`reward_loss`): Bradley-Terry, `-log sigmoid(r_chosen - r_rejected - margin)`,
  averaged over the real pairs of the batch, where margin = `config.reward.margin` + the
  pair's own margin from the data (0 unless given); plus the optional centering term
  `center_coef * mean((r_chosen + r_rejected)^2)` (TRL's `center_rewards_coefficient`,
  which keeps scores near 0 without changing their differences).
- Metrics: `accuracy` (r_chosen > r_rejected; a tie counts 1/2), `margin` (mean
  r_chosen - r_rejected), `chosen_mean`, `rejected_mean`, `score_std`; eval averages them
  exactly over the validation pairs (weight = number of pairs).
- After the last step the mean and std of the validation pairs' scores (both responses)
  go into the checkpoint metadata as `reward_norm`, so PPO can normalise rewards
  (ORLHF keeps its eval-set statistics the same way; LMHP normalises on its reference
  policy's samples).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data.preference_pipeline import build_preference_pipelines, format_stats
from model import layout
from model.config import ModelConfig
from model.heads import RewardModel, score_head_params
from model.transformer import Transformer
from train import entry
from train.losses import masked_mean
from train.parent import Parent, setup_child
from train.restore import InitAdapter
from train.stage import Program, Run, Stage, evaluate_on
from train.trainer import Trainer


def bradley_terry(chosen: jax.Array, rejected: jax.Array, margin: jax.Array | float = 0.0
                  ) -> jax.Array:
  """Per-pair loss -log sigmoid(chosen - rejected - margin), float32 [B]."""
  return -jax.nn.log_sigmoid(chosen - rejected - margin)


def flatten_pairs(batch: Mapping[str, jax.Array], keys: tuple[str, ...]) -> list[jax.Array]:
  """`batch[k]` [B, 2, ...] -> [2B, ...] for each key: row 2i chosen, 2i + 1 rejected, so a
  data-parallel shard still holds whole pairs (the reshape moves no data)."""
  return [batch[k].reshape(-1, *batch[k].shape[2:]) for k in keys]


def pair_scores(model: nnx.Module, batch: Mapping[str, jax.Array]) -> jax.Array:
  """Scores [B, 2] (chosen, rejected) of a preference batch ([B, 2, T] arrays)."""
  scores = model.score(*flatten_pairs(batch, ("tokens", "positions", "segment_ids",
                                              "score_index")))
  return scores.reshape(-1, 2)


def reward_loss(model: nnx.Module, batch: Mapping[str, jax.Array], rng: jax.Array, *,
                margin: float = 0.0, center_coef: float = 0.0
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Bradley-Terry loss on a preference batch; aux has the RM metrics (module doc)."""
  del rng  # no dropout
  scores = pair_scores(model, batch)
  chosen, rejected = scores[:, 0], scores[:, 1]
  mask = batch["pair_mask"].astype(jnp.float32)
  pairs = jnp.sum(mask)
  mean = lambda x: masked_mean(x, mask)
  loss = mean(bradley_terry(chosen, rejected, margin + batch["margin"]))
  if center_coef:
    loss = loss + center_coef * mean((chosen + rejected) ** 2)
  diff = chosen - rejected
  score_mean = mean(chosen + rejected) / 2
  score_sq_mean = mean(chosen ** 2 + rejected ** 2) / 2
  return loss, {
      "accuracy": mean((diff > 0) + 0.5 * (diff == 0)),
      "margin": mean(diff),
      "chosen_mean": mean(chosen),
      "rejected_mean": mean(rejected),
      "score_mean": score_mean,
      "score_sq_mean": score_sq_mean,
      "score_std": jnp.sqrt(jnp.maximum(score_sq_mean - score_mean ** 2, 0.0)),
      "weight": pairs,
  }


def reward_model_adapter(parent: Parent, seed: int) -> InitAdapter:
  """InitAdapter mapping a parent checkpoint (LM or reward model) to a RewardModel (run under
  jit on the sharded parameters)."""
  is_rm = parent.meta.get("model_class") == RewardModel.__name__
  model_cfg = parent.child_cfg

  def adapt(params: dict) -> dict:
    trunk = dict(params["trunk"] if is_rm else params)
    trunk.pop("lm_head", None)  # the scalar model has no output projection
    trunk = layout.extend_vocab(trunk, model_cfg.vocab_size, seed)
    head = params["head"] if is_rm else score_head_params(model_cfg, seed)
    return {"trunk": trunk, "head": head}

  return InitAdapter(parent.execution_cfg, adapt,
                     parent_factory=RewardModel if is_rm else Transformer)


def norm_from_eval(metrics: Mapping[str, float]) -> dict[str, float]:
  """`reward_norm` metadata from eval metrics (exact means over the validation pairs)."""
  mean = metrics["score_mean"]
  std = math.sqrt(max(metrics["score_sq_mean"] - mean ** 2, 0.0))
  return {"mean": mean, "std": std, "set": "validation pairs, chosen and rejected",
          "num_scores": int(2 * metrics["tokens"])}


def preference_batch(b: int, t: int, dpo: bool = False) -> dict[str, jax.ShapeDtypeStruct]:
  """The preference batch contract (data/preference_pipeline.py): pairs [B, 2, T]; DPO's
  rows also carry the reference log-probabilities `ref_logp` [B, 2]."""
  spec = jax.ShapeDtypeStruct
  out = {**{k: spec((b, 2, t), np.int32) for k in ("tokens", "positions", "segment_ids")},
         "score_index": spec((b, 2), np.int32), "response_start": spec((b, 2), np.int32),
         "margin": spec((b,), np.float32), "pair_mask": spec((b,), np.float32)}
  if dpo:
    out["ref_logp"] = spec((b, 2), np.float32)
  return out


def programs(config: Any, model_cfg: ModelConfig) -> list[Program]:
  """One trainer: a RewardModel with the Bradley-Terry loss on preference batches."""
  del model_cfg
  loss = functools.partial(reward_loss, margin=config.reward.margin,
                           center_coef=config.reward.center_coef)
  b = config.train.batch_size // config.train.grad_accum_steps
  return [Program("train", config, RewardModel, loss,
                  preference_batch(b, config.data.seq_len))]


def build(config: Any, workdir: str) -> Run:
  """The parent, the preference pipelines and a Trainer for a RewardModel whose init maps
  the parent's params (`reward_model_adapter`)."""
  parent = setup_child(config, "an SFT (or pretraining) workdir or checkpoint directory")
  train_iter, val_set, stats, _ = build_preference_pipelines(
      config.data, parent.template, global_batch_size=config.train.batch_size,
      process_index=jax.process_index(), process_count=jax.process_count())
  (program,) = programs(config, parent.child_cfg)
  tokenizer = parent.child_tokenizer
  trainer = Trainer(config, workdir, parent.child_cfg, program.loss_fn,
                    model_factory=RewardModel, tokenizer_bytes=tokenizer.to_bytes(),
                    tokenizer_fingerprint=tokenizer.fingerprint,
                    init_adapter=reward_model_adapter(parent, config.seed))

  def on_eval(step: int, metrics: dict[str, float]) -> None:
    if step == trainer.num_steps:  # before the final save: normalisation for PPO
      trainer.extra_metadata["reward_norm"] = norm_from_eval(metrics)

  def finish(results: dict[str, float]) -> dict[str, float]:
    norm = trainer.extra_metadata.get("reward_norm", {})
    return {**results, **{f"norm_{k}": v for k, v in norm.items() if k in ("mean", "std")}}

  num_params = sum(x.size for x in jax.tree.leaves(trainer.abstract_state.params))
  return Run(
      trainers=[trainer], train_iter=train_iter,
      evaluate=evaluate_on(trainer, val_set, config.train.eval_batch_size),
      summary=lambda m: (f"accuracy {m['accuracy']:.4f} | loss {m['loss']:.4f} | margin "
                         f"{m['margin']:.3f} | chosen {m['chosen_mean']:.3f} | rejected "
                         f"{m['rejected_mean']:.3f} | {int(m['tokens'])} pairs"),
      # Both sides of every pair are processed: 2 x batch x seq_len token slots per step.
      tokens_per_step=2 * config.train.batch_size * config.data.seq_len,
      seq_len=config.data.seq_len, output_projection=False, on_eval=on_eval, finish=finish,
      stats=stats, info=[format_stats(stats),
            f"Model: {num_params:,} parameters (trunk without output projection + scalar "
            f"head); mesh {dict(trainer.mesh.shape)}"])


STAGE = Stage("reward", programs=programs, build=build)

if __name__ == "__main__":
  entry.launch(STAGE)
