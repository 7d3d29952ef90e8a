"""Loss functions of the form `loss_fn(model, batch, rng) -> (loss, aux)`.

`lm_loss` is next-token cross-entropy on an LM batch (DESIGN.md batch contract:
tokens, targets, positions, segment_ids, loss_mask; all [B, T]). The loss is the mean over
tokens with loss_mask > 0, so packed rows, padding and (in SFT) prompt tokens contribute
nothing. `aux["weight"]` is the number of target tokens, so the Trainer's eval reports the
exact per-token mean over a whole split.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
  """Mean of x over the entries where mask is 1 (0 when there are none)."""
  mask = mask.astype(jnp.float32)
  return jnp.sum(x * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def token_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log p(target) per position, [B, T], from float32 logits [B, T, V]."""
  logz = jax.nn.logsumexp(logits, axis=-1)
  return jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - logz


def lm_loss(model: nnx.Module, batch: Mapping[str, jax.Array], rng: jax.Array
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Masked next-token cross-entropy; aux has accuracy and the token count (`weight`)."""
  del rng  # no dropout in this model
  logits = model(batch["tokens"], batch["positions"], batch["segment_ids"])  # [B, T, V]
  mask = batch["loss_mask"].astype(jnp.float32)
  nll = -token_log_probs(logits, batch["targets"])
  correct = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)
  return masked_mean(nll, mask), {"accuracy": masked_mean(correct, mask),
                                  "weight": jnp.sum(mask)}
