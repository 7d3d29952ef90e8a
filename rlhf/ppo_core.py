"""The PPO-for-LLM math as pure functions: KL estimators, per-token rewards, GAE, whitening,
the clipped policy and value losses, and the adaptive KL controller.

Shapes: B rollouts x N response tokens; `mask` [B, N] is 1 on response tokens up to and
including the end-of-turn token (a response is a prefix of the N slots: mask 1...1 0...0).
Everything is float32 and masked, so padding after a finished response never counts.

Conventions (see ../shared/anchors/rlhf.md, section 1):
- KL per token in the reward, estimators of KL(pi || ref) from samples of pi, with
  log r = ref_logp - logp: k1 = -log r (unbiased, default), k2 = (log r)^2 / 2,
  k3 = (r - 1) - log r (unbiased, always >= 0; "low_var_kl").
- rewards_t = -kl_coef * kl_t, plus the reward-model score at the last response token.
- GAE(gamma, lambda) over response tokens; the value after the last token is 0.
- Policy loss: PPO clip, -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A), token mean.
- Value loss: 0.5 * max((V - R)^2, (V_clipped - R)^2), V_clipped = V_old + clip(V - V_old,
  -eps_v, eps_v) (the N+ / TRL form).
- approx KL between old and new policy: mean of (log ratio)^2 / 2 (k2), as TRL logs it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from train.losses import masked_mean

KL_ESTIMATORS = ("k1", "k2", "k3")


def masked_var(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Population variance of x over the masked entries."""
  mean = masked_mean(x, mask)
  return masked_mean((x - mean) ** 2, mask)


def whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True, eps: float = 1e-8
           ) -> jax.Array:
  """(x - mean) / std over the masked entries (mean kept if not shift_mean); 0 off-mask."""
  mean, var = masked_mean(x, mask), masked_var(x, mask)
  out = (x - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    out = out + mean
  return out * mask


def kl_estimate(logp: jax.Array, ref_logp: jax.Array, estimator: str = "k1") -> jax.Array:
  """Per-token estimate of KL(pi || ref) from log-probs of tokens sampled from pi."""
  log_ratio = ref_logp - logp  # log r, r = ref / pi
  if estimator == "k1":
    return -log_ratio
  if estimator == "k2":
    return 0.5 * log_ratio ** 2
  if estimator == "k3":
    return jnp.expm1(log_ratio) - log_ratio
  raise ValueError(f"Unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def last_index(mask: jax.Array) -> jax.Array:
  """Index [B] of each row's last masked token (0 for an empty row)."""
  return jnp.maximum(jnp.sum(mask.astype(jnp.int32), axis=1) - 1, 0)


def token_rewards(scores: jax.Array, logp: jax.Array, ref_logp: jax.Array, mask: jax.Array,
                  kl_coef: float | jax.Array, estimator: str = "k1"
                  ) -> tuple[jax.Array, jax.Array]:
  """Per-token rewards [B, N] (KL penalty + score at the last token) and the KL [B, N]."""
  kl = kl_estimate(logp, ref_logp, estimator) * mask
  rewards = -kl_coef * kl
  end = jax.nn.one_hot(last_index(mask), mask.shape[1], dtype=rewards.dtype)
  return rewards + end * scores[:, None] * (jnp.sum(mask, 1, keepdims=True) > 0), kl


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float, lam: float
        ) -> tuple[jax.Array, jax.Array]:
  """Generalised advantage estimates and returns [B, N] (masked; V after the end = 0)."""
  mask = mask.astype(jnp.float32)
  next_values = jnp.concatenate([values[:, 1:] * mask[:, 1:],
                                 jnp.zeros_like(values[:, :1])], axis=1)
  deltas = (rewards + gamma * next_values - values) * mask
  next_mask = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)

  def step(carry, xs):
    delta, m_next = xs
    adv = delta + gamma * lam * carry * m_next
    return adv, adv

  _, adv = jax.lax.scan(step, jnp.zeros_like(values[:, 0]), (deltas.T, next_mask.T),
                        reverse=True)
  adv = adv.T * mask
  return adv, (adv + values) * mask


def policy_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array,
                clip: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """PPO clipped surrogate (token mean) and its diagnostics."""
  log_ratio = (logp - old_logp) * mask
  ratio = jnp.exp(log_ratio)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
  loss = masked_mean(jnp.maximum(unclipped, clipped), mask)
  return loss, {
      "clipfrac": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
      "approxkl": masked_mean(0.5 * log_ratio ** 2, mask),
      "ratio_mean": masked_mean(ratio, mask),
      "ratio_var": masked_var(ratio, mask),
      "ratio_max_dev": jnp.max(jnp.abs(ratio - 1.0) * mask),
  }


def value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array,
               clip: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Clipped value loss (token mean) and its diagnostics."""
  clipped_values = old_values + jnp.clip(values - old_values, -clip, clip)
  unclipped_err, clipped_err = (values - returns) ** 2, (clipped_values - returns) ** 2
  loss = 0.5 * masked_mean(jnp.maximum(unclipped_err, clipped_err), mask)
  return loss, {
      "clipfrac": masked_mean((clipped_err > unclipped_err).astype(jnp.float32), mask),
      "vpred_mean": masked_mean(values, mask),
      "explained_variance": explained_variance(values, returns, mask),
  }


def explained_variance(values: jax.Array, returns: jax.Array, mask: jax.Array) -> jax.Array:
  """1 - Var(returns - values) / Var(returns) over the masked tokens."""
  return 1.0 - masked_var(returns - values, mask) / jnp.maximum(masked_var(returns, mask),
                                                                  1e-8)


@dataclasses.dataclass
class KLController:
  """Fixed KL coefficient, or Ziegler et al.'s adaptive one when `target` is set.

  Adaptive: after each rollout batch of `n` episodes with mean KL `kl`,
  coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon.
  """
  value: float
  target: float | None = None
  horizon: int = 10_000

  def update(self, kl: float, n: int) -> float:
    if self.target:
      error = min(max(kl / self.target - 1.0, -0.2), 0.2)
      self.value *= 1.0 + error * n / self.horizon
    return self.value
