"""PPO's rollout batch: the prompt set, the functions that score a rollout, and the policy
and value losses on it.

Prompts are the preference data's prompts (`data.preferences`: for HH, everything up to the
final `Assistant:` turn), split exactly as the reward model's run split them (its
`val_fraction` and `seed`), so PPO trains on the reward model's training prompts and is
evaluated on prompts neither model saw. Each prompt is rendered with the chat template
(ending with `<|assistant|>`); prompts longer than `max_prompt_tokens` are dropped and
counted (cutting a conversation's start would change what is being answered).

Sequence layout of a rollout (the sampler's): [B, L] with L = P + N, prompts left-padded to
P = max_prompt_tokens, the response in the last N slots (`response_mask` [B, N] is 1 up to
and including the end-of-turn token). The logits at slot t predict slot t + 1, so the
response's log-probs and values are read at slots [P - 1, L - 1).
"""

from __future__ import annotations

import json
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data.preferences import read_sources, split_pairs
from rlhf import ppo_core
from train import flops as flops_lib
from train.losses import masked_mean, token_log_probs


class PromptSet(NamedTuple):
  """Token ids of distinct prompts (train and held-out) and the count of dropped ones."""
  train: list[np.ndarray]
  val: list[np.ndarray]
  too_long: int


def build_prompt_set(data_cfg: Any, template: Any, max_prompt_tokens: int) -> PromptSet:
  """Distinct prompts of the preference sources, split by prompt like the reward model's.

  Raises:
    ValueError: No training prompt fits `max_prompt_tokens` (the message names the limit).
  """
  pairs, _ = read_sources(data_cfg.sources, data_cfg.tfds_data_dir)
  train_pairs, val_pairs, _ = split_pairs(pairs, data_cfg.val_fraction, data_cfg.seed)
  too_long = 0
  out = []
  for split in (train_pairs, val_pairs):
    ids, seen = [], set()
    for pair in split:
      if pair.key in seen:
        continue
      seen.add(pair.key)
      tokens = template.prompt_ids(list(pair.prompt))
      if len(tokens) > max_prompt_tokens:
        too_long += 1
      else:
        ids.append(tokens)
    out.append(ids)
  if not out[0]:
    raise ValueError(f"Empty prompt set: no training prompt of {data_cfg.sources} fits "
                     f"ppo.max_prompt_tokens={max_prompt_tokens} ({too_long} too long)")
  return PromptSet(out[0], out[1], too_long)


def response_logps(model: nnx.Module, batch: Mapping[str, jax.Array], temperature: float
                   ) -> tuple[jax.Array, jax.Array]:
  """Log-probs [B, N] of the response tokens under softmax(logits / T), and the entropy
  [B, N] of that distribution at each response slot."""
  n = batch["response_mask"].shape[1]
  tokens = batch["tokens"]
  logits = model(tokens, batch["positions"], batch["segment_ids"])[:, -n - 1:-1] / temperature
  logp = token_log_probs(logits, tokens[:, -n:])
  probs = jax.nn.softmax(logits, axis=-1)
  entropy = jax.nn.logsumexp(logits, axis=-1) - jnp.sum(probs * logits, axis=-1)
  return logp, entropy


def response_values(model: nnx.Module, batch: Mapping[str, jax.Array]) -> jax.Array:
  """Value estimates [B, N] at the slots where each response token is chosen."""
  n = batch["response_mask"].shape[1]
  return model.values(batch["tokens"], batch["positions"], batch["segment_ids"])[:, -n - 1:-1]


def end_scores(model: nnx.Module, batch: Mapping[str, jax.Array]) -> jax.Array:
  """Reward-model scores [B] read at each response's last token (its `<|end|>` if it has one)."""
  n = batch["response_mask"].shape[1]
  length = jnp.sum(batch["response_mask"].astype(jnp.int32), axis=1)
  index = batch["tokens"].shape[1] - n + length - 1
  return model.score(batch["tokens"], batch["positions"], batch["segment_ids"], index)


def response_ids(response: np.ndarray, response_mask: np.ndarray, ended: np.ndarray
                 ) -> list[list[int]]:
  """Each response's generated tokens [B, N] as a list, without its end-of-turn token."""
  lengths = np.asarray(response_mask).sum(1).astype(int) - np.asarray(ended).astype(int)
  return [row[:n].tolist() for row, n in zip(np.asarray(response), lengths)]


def distinct_n(responses: list[list[int]], n: int = 2) -> float:
  """Distinct-n: distinct n-grams / total n-grams over all responses (0 if none)."""
  grams = [tuple(r[i:i + n]) for r in responses for i in range(len(r) - n + 1)]
  return len(set(grams)) / len(grams) if grams else 0.0


def policy_loss_fn(model: nnx.Module, batch: Mapping[str, jax.Array], rng: jax.Array, *,
                   temperature: float, clip: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """PPO's clipped surrogate on a minibatch of rollout rows."""
  del rng
  mask = batch["response_mask"].astype(jnp.float32)
  logp, entropy = response_logps(model, batch, temperature)
  loss, aux = ppo_core.policy_loss(logp, batch["old_logp"], batch["advantages"], mask, clip)
  return loss, {**aux, "entropy": masked_mean(entropy, mask)}


def value_loss_fn(model: nnx.Module, batch: Mapping[str, jax.Array], rng: jax.Array, *,
                  clip: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The clipped value loss on a minibatch of rollout rows."""
  del rng
  mask = batch["response_mask"].astype(jnp.float32)
  values = response_values(model, batch)
  return ppo_core.value_loss(values, batch["old_values"], batch["returns"], mask, clip)


def advantages(scores, logp, ref_logp, values, mask, kl_coef, *, estimator, gamma, lam,
               whiten):
  """Rewards, KL, advantages and returns of one rollout batch.

  Small [rollout_batch, max_new_tokens] arrays once per iteration (an iteration takes
  seconds), so this runs eagerly: jit stays in the Trainer.
  """
  rewards, kl = ppo_core.token_rewards(scores, logp, ref_logp, mask, kl_coef, estimator)
  adv, returns = ppo_core.gae(rewards, values, mask, gamma, lam)
  if whiten:
    adv = ppo_core.whiten(adv, mask)
  return rewards, kl, adv, returns


def plot_history(metrics_path: str, out_path: str) -> None:
  """Score, KL and entropy per iteration (from metrics.jsonl) as a PNG."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  with open(metrics_path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  keys = ("ppo/score", "ppo/kl", "ppo/entropy")
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
  for ax, key in zip(axes, keys):
    ax.plot([r["step"] for r in records if key in r], [r[key] for r in records if key in r])
    ax.set_title(key)
    ax.set_xlabel("iteration")
  fig.tight_layout()
  fig.savefig(out_path, dpi=100)
  plt.close(fig)


def phase_throughput(m: Mapping[str, float], mask: np.ndarray, ppo_cfg: Any, policy_cfg: Any,
                     value_cfg: Any, peak_flops: float) -> dict[str, float]:
  """Tokens/s and MFU of an iteration's rollout, scoring and update phases (model FLOPs:
  forward passes for rollout and scoring, forward + backward for the update)."""
  p = ppo_cfg
  seq = p.max_prompt_tokens + p.max_new_tokens
  rows, generated = p.rollout_batch_size, float(mask.sum())
  fwd = flops_lib.flops_per_token(policy_cfg, seq, training=False)
  fwd_v = flops_lib.flops_per_token(value_cfg, seq, training=False, output_projection=False)
  train = (flops_lib.flops_per_token(policy_cfg, seq) + flops_lib.flops_per_token(
      value_cfg, seq, output_projection=False)) * rows * seq
  scoring = (2 * fwd + 2 * fwd_v) * rows * seq
  update_steps = m["ppo/minibatch_steps"] / (p.epochs * p.minibatches)
  peak = peak_flops or 1.0
  return {
      "time/rollout_tokens_per_sec": generated / m["time/rollout_s"],
      "time/scoring_tokens_per_sec": rows * seq / m["time/scoring_s"],
      "time/update_tokens_per_sec": rows * seq * p.epochs * update_steps / m["time/update_s"],
      "time/rollout_mfu": fwd * generated / m["time/rollout_s"] / peak,
      "time/scoring_mfu": scoring / m["time/scoring_s"] / peak,
      "time/update_mfu": train * p.epochs * update_steps / m["time/update_s"] / peak,
  }
