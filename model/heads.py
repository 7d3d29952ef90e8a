"""Scalar heads on the transformer trunk: the reward model and PPO's value model.

    tokens [B, T] -> Transformer.hidden -> h [B, T, E] -> ScalarHead -> values [B, T]
                                                       -> at score_index -> scores [B]

`RewardModel` is one class for both uses: the reward model reads one score per sequence
at an explicit index (the response's end-of-turn token, computed from the data, never
"the last position" or a padding-side convention), and the value model reads `values`,
one per token. A value model initialised from a reward-model checkpoint therefore has
exactly the same parameter tree.

Decisions:
- The trunk is a `Transformer` without its output projection (`lm_head=False`): a scalar
  model never produces logits, and the 4096 x 256 projection would be a fifth of a small
  model's parameters for nothing.
- The head is a linear layer with bias, kernel std 1/sqrt(E + 1) (the N+ reward model's
  init, `summarize_from_feedback_details` reward.py), bias 0, computed in float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from model.config import ModelConfig
from model.transformer import Transformer


class ScalarHead(nnx.Module):
  """h [..., E] -> float32 [...]: one linear unit with bias."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    pd = jnp.dtype(cfg.param_dtype)
    std = 1.0 / math.sqrt(cfg.embed_dim + 1)
    self.kernel = nnx.Param(nnx.initializers.normal(std)(rngs.params(), (cfg.embed_dim, 1), pd),
                            out_sharding=("embed", None))
    self.bias = nnx.Param(jnp.zeros((1,), pd), out_sharding=(None,))

  def __call__(self, h: jax.Array) -> jax.Array:
    out = h.astype(jnp.float32) @ self.kernel[...].astype(jnp.float32)  # [..., 1]
    return out[..., 0] + self.bias[...].astype(jnp.float32)[0]


def gather_positions(h: jax.Array, index: jax.Array) -> jax.Array:
  """h [B, T, E] at one position per row, index int [B] -> [B, E]."""
  return jnp.take_along_axis(h, index[:, None, None].astype(jnp.int32), axis=1)[:, 0]


class RewardModel(nnx.Module):
  """A transformer trunk with a scalar head: scores (reward model) or values (critic)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.trunk = Transformer(cfg, rngs, lm_head=False)
    self.head = ScalarHead(cfg, rngs)

  def values(self, tokens: jax.Array, positions: jax.Array | None = None,
             segment_ids: jax.Array | None = None) -> jax.Array:
    """Per-token scalars [B, T] (float32): PPO's value estimates."""
    return self.head(self.trunk.hidden(tokens, positions, segment_ids))

  def score(self, tokens: jax.Array, positions: jax.Array | None, segment_ids: jax.Array | None,
            score_index: jax.Array) -> jax.Array:
    """One scalar per sequence [B] (float32), read at `score_index` [B]."""
    h = self.trunk.hidden(tokens, positions, segment_ids)  # [B, T, E]
    return self.head(gather_positions(h, score_index))

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
    return self.values(tokens, positions, segment_ids)


def score_head_params(cfg: ModelConfig, seed: int) -> dict:
  """Freshly initialised head params (pure dict of arrays), for init_from an LM trunk."""
  return nnx.to_pure_dict(nnx.state(ScalarHead(cfg, nnx.Rngs(params=seed))))
