"""DPO math as pure functions: sequence log-probabilities of responses and the DPO / IPO losses.

With pi_c = log pi(chosen | prompt), pi_r = log pi(rejected | prompt) (sums over response
tokens, `<|end|>` included) and ref_c, ref_r the same under the frozen reference:

  logits = (pi_c - ref_c) - (pi_r - ref_r)
  sigmoid: -(1 - eps) log sigmoid(beta * logits) - eps log sigmoid(-beta * logits)
           (eps = label smoothing, the conservative DPO of Mitchell 2023; eps = 0 is DPO)
  ipo:     (logits - 1 / (2 beta))^2                        (Azar et al. 2023)

The implicit rewards are beta * (pi - ref); their accuracy (chosen > rejected) and margin are
what TRL logs as rewards/accuracies and rewards/margins (here `reward_accuracy` and
`reward_margin`: one level of names under `train/` and `eval/`). At initialisation (pi = ref) the
sigmoid loss is log 2 whatever the data.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOSS_TYPES = ("sigmoid", "ipo")


def response_logps(logits: jax.Array, tokens: jax.Array, response_start: jax.Array,
                   end: jax.Array) -> jax.Array:
  """Sum of log p(token) over each row's response tokens [start, end] (inclusive) -> [B].

  logits [B, T, V] float32 from the model on `tokens` [B, T]; the logits at t predict t + 1.
  """
  logz = jax.nn.logsumexp(logits[:, :-1], axis=-1)  # [B, T-1]
  target = tokens[:, 1:]
  logp = jnp.take_along_axis(logits[:, :-1], target[..., None], axis=-1)[..., 0] - logz
  j = jnp.arange(1, tokens.shape[1])[None, :]  # index of each target token
  mask = (j >= response_start[:, None]) & (j <= end[:, None])
  return jnp.sum(jnp.where(mask, logp, 0.0), axis=1)


def dpo_loss(policy_chosen: jax.Array, policy_rejected: jax.Array, ref_chosen: jax.Array,
             ref_rejected: jax.Array, beta: float, label_smoothing: float = 0.0,
             loss_type: str = "sigmoid") -> tuple[jax.Array, dict[str, jax.Array]]:
  """Per-pair DPO (or IPO) losses [B] and per-pair implicit-reward diagnostics."""
  chosen_reward = beta * (policy_chosen - ref_chosen)
  rejected_reward = beta * (policy_rejected - ref_rejected)
  logits = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
  if loss_type == "sigmoid":
    losses = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * logits)
              - label_smoothing * jax.nn.log_sigmoid(-beta * logits))
  elif loss_type == "ipo":
    losses = (logits - 1.0 / (2.0 * beta)) ** 2
  else:
    raise ValueError(f"Unknown DPO loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
  diff = chosen_reward - rejected_reward
  return losses, {
      "reward_chosen": chosen_reward, "reward_rejected": rejected_reward,
      "reward_margin": diff, "reward_accuracy": (diff > 0) + 0.5 * (diff == 0),
      "logp_chosen": policy_chosen, "logp_rejected": policy_rejected,
  }
