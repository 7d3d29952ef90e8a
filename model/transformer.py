"""The decoder-only transformer (`Transformer`) and its pure apply helpers.

    tokens [B, T] -> embed -> N x Block (pre-norm attention + SwiGLU) -> RMSNorm -> logits [B, T, V]

Blocks are either a Python list (`scan_layers=False`, easiest to read and debug) or one
`Block` whose parameters carry a leading `layers` axis and run under `lax.scan`
(`scan_layers=True`: one compiled block, so compile time does not grow with depth). Both
layouts compute the same function.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from model.config import ModelConfig
from model.layers import Block, RMSNorm, rope_tables
from model.sharding import constrain

ACTIVATION = ("batch", "length", None)  # residual stream sharding: batch only
# KV cache [L, B, K, S, D]: batch over the data axes, kv heads over tensor, like the weights.
CACHE_AXES = ("layers", "batch", "kv_heads", None, "head_dim")


class KVCache(NamedTuple):
  """Keys and values of every layer for S slots, heads before slots.

  With scanned layers k and v are stacked arrays [L, B, K, S, D] (the scan carries them);
  otherwise tuples of L arrays [B, K, S, D], so no step ever copies a layer out of a stack.
  """
  k: jax.Array | tuple[jax.Array, ...]
  v: jax.Array | tuple[jax.Array, ...]


def init_cache(cfg: ModelConfig, batch: int, length: int) -> KVCache:
  """An empty (zero) cache of `length` slots in the compute dtype."""
  shape = (batch, cfg.num_kv_heads, length, cfg.resolved_head_dim)
  if cfg.scan_layers:
    zeros = jnp.zeros((cfg.num_layers, *shape), jnp.dtype(cfg.dtype))
    return KVCache(constrain(zeros, CACHE_AXES), constrain(zeros, CACHE_AXES))
  layers = tuple(constrain(jnp.zeros(shape, jnp.dtype(cfg.dtype)), CACHE_AXES[1:])
                 for _ in range(cfg.num_layers))
  return KVCache(layers, layers)


def remat_policy(name: str) -> Callable | None:
  """Maps a config name to a `jax.checkpoint` policy (None = no rematerialisation)."""
  return {
      "none": None,
      "full": jax.checkpoint_policies.nothing_saveable,
      "dots": jax.checkpoint_policies.dots_saveable,
      "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  }[name]


class Transformer(nnx.Module):
  """Decoder-only language model.

  Call with `tokens` [B, T] and optionally `positions` [B, T] (default 0..T-1) and
  `segment_ids` [B, T] (default all 1: one document per row). Returns float32 logits
  [B, T, V]. `hidden()` returns the final normalised hidden states [B, T, E] for heads.
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, *, lm_head: bool = True):
    """Builds the parameters; `lm_head=False` leaves out the (untied) output projection
    (a trunk under a scalar head, `model.heads.RewardModel`, never produces logits)."""
    if cfg.vocab_size <= 0:
      raise ValueError("ModelConfig.vocab_size must be set (> 0) before building a model")
    self.cfg = cfg
    pd = jnp.dtype(cfg.param_dtype)
    self.embedding = nnx.Param(
        nnx.initializers.normal(cfg.init_std)(rngs.params(), (cfg.vocab_size, cfg.embed_dim), pd),
        out_sharding=("vocab", "embed"))
    if cfg.scan_layers:
      @nnx.split_rngs(splits=cfg.num_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def make_blocks(rngs: nnx.Rngs) -> Block:
        return Block(cfg, rngs)
      self.blocks = make_blocks(rngs)
    else:
      self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.embed_dim, cfg)
    if lm_head and not cfg.tie_embeddings:
      self.lm_head = nnx.Param(
          nnx.initializers.normal(cfg.init_std)(rngs.params(), (cfg.embed_dim, cfg.vocab_size),
                                                pd),
          out_sharding=("embed", "vocab"))

  def embed(self, tokens: jax.Array) -> jax.Array:
    dt = jnp.dtype(self.cfg.dtype)
    table = self.embedding[...].astype(dt)
    if self.cfg.one_hot_embed:
      return jax.nn.one_hot(tokens, self.cfg.vocab_size, dtype=dt) @ table  # [B, T, E]
    return jnp.take(table, tokens, axis=0)

  def hidden(self, tokens: jax.Array, positions: jax.Array | None = None,
             segment_ids: jax.Array | None = None, *, cache: KVCache | None = None,
             cache_index: jax.Array | int = 0, kv_segment_ids: jax.Array | None = None):
    """Final normalised hidden states [B, T, E] (compute dtype).

    With `cache` (decoding): the T tokens occupy cache slots [cache_index, cache_index + T)
    (`cache_index` an int, or [B] when every row sits at its own slot: continuous batching),
    `kv_segment_ids` [B, S] gives the segment of every slot (0 = empty; it must already
    include these T tokens), and the result is (hidden states, updated cache).
    """
    cfg = self.cfg
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    if segment_ids is None and cache is not None:
      segment_ids = jnp.ones_like(tokens)
    cos, sin = rope_tables(positions, cfg.resolved_head_dim, cfg.rope_theta, cfg)  # [B,T,D/2]
    # Segment ids, not a mask: each attention kernel builds its own (model/attention.py).
    # None (no ids given) = one document per row, which lets cuDNN skip the mask entirely.
    segments = (segment_ids, segment_ids if cache is None else kv_segment_ids)
    x = constrain(self.embed(tokens), ACTIVATION)

    def run_block(block: Block, x: jax.Array, kv=None):
      if kv is None:
        return constrain(block(x, cos, sin, segments), ACTIVATION)
      x, kv = block(x, cos, sin, segments, kv, cache_index)
      return constrain(x, ACTIVATION), kv

    if cfg.remat_policy != "none" and cache is None:  # decoding keeps no activations
      run_block = nnx.remat(run_block, policy=remat_policy(cfg.remat_policy))
    if cfg.scan_layers:
      graphdef, stacked = nnx.split(self.blocks)
      if cache is None:
        x, _ = jax.lax.scan(lambda x, s: (run_block(nnx.merge(graphdef, s), x), None),
                            x, stacked)
      else:  # the whole cache is carried and updated in place, layer by layer
        def body(carry, xs):
          x, k, v = carry
          layer_state, layer = xs
          x, (k, v) = run_block(nnx.merge(graphdef, layer_state), x, (k, v, layer))
          return (x, k, v), None

        (x, k, v), _ = jax.lax.scan(body, (x, cache.k, cache.v),
                                    (stacked, jnp.arange(cfg.num_layers)))
        cache = KVCache(k, v)
    elif cache is None:
      for block in self.blocks:
        x = run_block(block, x)
    else:
      ks, vs = [], []
      for block, k, v in zip(self.blocks, cache.k, cache.v):
        x, (k, v) = run_block(block, x, (k, v, None))
        ks.append(constrain(k, CACHE_AXES[1:]))
        vs.append(constrain(v, CACHE_AXES[1:]))
      cache = KVCache(tuple(ks), tuple(vs))
    h = self.final_norm(x)
    if cache is not None and cfg.scan_layers:
      cache = KVCache(constrain(cache.k, CACHE_AXES), constrain(cache.v, CACHE_AXES))
    return h if cache is None else (h, cache)

  def logits(self, h: jax.Array) -> jax.Array:
    """Projects hidden states [B, T, E] to float32 logits [B, T, V]."""
    dt = h.dtype
    if not self.cfg.tie_embeddings and not hasattr(self, "lm_head"):
      raise ValueError("This transformer was built with lm_head=False (a scalar-head trunk); "
                       "it has no output projection")
    if self.cfg.tie_embeddings:
      out = jnp.einsum("bte,ve->btv", h, self.embedding[...].astype(dt))
    else:
      out = h @ self.lm_head[...].astype(dt)
    return out.astype(jnp.float32)

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
    return self.logits(self.hidden(tokens, positions, segment_ids))


def build_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
  """Builds a model on the default device (tests and tools; the Trainer uses sharded init)."""
  return Transformer(cfg, nnx.Rngs(params=seed))


def count_params(state: nnx.State) -> int:
  return sum(x.size for x in jax.tree.leaves(state))
