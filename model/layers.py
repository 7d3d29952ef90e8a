"""Transformer building blocks: RMSNorm, rotary embeddings, GQA attention, SwiGLU MLP.

The attention kernel itself (reference, chunked, cuDNN, splash) sits behind
`model.attention.attend`, which takes segment ids; `Attention` only projects and caches.

Shape letters used in comments and einsums:
  B batch, T query length, S key length, E embed, N query heads, K kv heads,
  G = N // K query heads per kv head, D head dim, F mlp hidden, V vocab.

Every parameter is created with logical axis names (`out_sharding=`); `model/sharding.py`
maps them to mesh axes.
"""

from __future__ import annotations

import math

import jax
import flax
import jax.numpy as jnp
from flax import nnx

from model import lora
from model.attention import Options, attend
from model.config import ModelConfig

# Shardings are applied by the Trainer's jitted init (eval_shape -> specs -> out_shardings),
# never eagerly at Variable creation, so the same module code runs with or without a mesh.
# The global flag, not `nnx.use_eager_sharding(False)`: that one is a thread-local context,
# so a model built on another thread (the server's hot swap) would shard eagerly again.
flax.config.update("flax_always_shard_variable", False)


def _normal(std: float):
  return nnx.initializers.normal(stddev=std)


def _param(rngs: nnx.Rngs, init, shape, dtype, names) -> nnx.Param:
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names)


class RMSNorm(nnx.Module):
  """Root-mean-square norm with a learned scale (no bias, no mean subtraction).

  `axis_name` is the logical name of the normalised dimension: "embed" for the residual
  stream, "head_dim" for Qwen3's per-head query/key norms.
  """

  def __init__(self, dim: int, cfg: ModelConfig, axis_name: str = "embed"):
    self.eps = cfg.norm_eps
    self.scale = nnx.Param(jnp.ones((dim,), jnp.dtype(cfg.param_dtype)),
                           out_sharding=(axis_name,))

  def __call__(self, x: jax.Array) -> jax.Array:
    # Statistics in float32 even for bf16 activations: the mean of squares underflows otherwise.
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def llama3_inv_freq(inv_freq: jax.Array, factor: float, low_freq_factor: float,
                    high_freq_factor: float, original_max_len: int) -> jax.Array:
  """Llama 3.1's rescaled rotary frequencies (transformers' `_compute_llama3_parameters`).

  Wavelengths shorter than original_max_len / high_freq_factor keep their frequency, longer
  than original_max_len / low_freq_factor are divided by `factor`, and those in between
  interpolate smoothly. Same float32 operations and comparisons as transformers.
  """
  low_freq_wavelen = original_max_len / low_freq_factor
  high_freq_wavelen = original_max_len / high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
  smooth = (original_max_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
  return jnp.where(medium, smoothed, scaled)


def rope_tables(positions: jax.Array, head_dim: int, theta: float,
                cfg: ModelConfig | None = None) -> tuple[jax.Array, jax.Array]:
  """cos/sin tables for rotary embeddings at integer `positions` [B, T] -> two [B, T, D/2].

  `cfg` (optional) brings its rope scaling (`rope_scaling_type`); without it, plain RoPE.
  """
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  if cfg is not None and cfg.rope_scaling_type == "llama3":
    inv_freq = llama3_inv_freq(inv_freq, cfg.rope_scaling_factor,
                               cfg.rope_scaling_low_freq_factor,
                               cfg.rope_scaling_high_freq_factor,
                               cfg.rope_scaling_original_max_len)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates pairs (i, i + D/2) of `x` [B, T, H, D] ("rotate half", the Llama/HF layout).

  out = [x1 cos - x2 sin, x2 cos + x1 sin] for x = [x1, x2], written as
  x * [cos, cos] + roll(x, D/2) * [-sin, sin]: the same products and sums, but one
  elementwise fusion instead of split + concatenate (whose backward pass is pad + add).
  """
  out_dtype = x.dtype
  x = x.astype(jnp.float32)
  cos = jnp.concatenate([cos, cos], axis=-1)[:, :, None, :]  # [B, T, 1, D]
  sin = jnp.concatenate([-sin, sin], axis=-1)[:, :, None, :]
  return (x * cos + jnp.roll(x, x.shape[-1] // 2, axis=-1) * sin).astype(out_dtype)


# (query segment ids [B, T], key/value segment ids [B, S]); (None, None) = one document.
Segments = tuple[jax.Array | None, jax.Array | None]


def attention_options(cfg: ModelConfig) -> Options:
  """The attention kernel switches of a model config."""
  return Options(impl=cfg.attention_impl, block_size=cfg.attention_block_size)


def write_cache(cache: jax.Array, new: jax.Array, cache_index: jax.Array | int,
                layer: jax.Array | int | None) -> jax.Array:
  """Writes `new` [B, K, T, D] into `cache` [B, K, S, D] (or a stacked [L, B, K, S, D] at
  `layer`) at slots [cache_index, cache_index + T).

  A scalar index is one `dynamic_update_slice` for the whole batch; a [B] index (every row
  at its own length, continuous batching) is a per-row one, vmapped into a scatter that
  touches only the new slots.
  """
  if jnp.ndim(cache_index) == 0:
    start = (0, 0, cache_index, 0)
    if layer is not None:  # stacked cache: write into this layer's slice
      new, start = new[None], (layer, *start)
    return jax.lax.dynamic_update_slice(cache, new, start)
  if layer is None:
    row = lambda c, n, i: jax.lax.dynamic_update_slice(c, n, (0, i, 0))  # c [K, S, D]
    return jax.vmap(row)(cache, new, cache_index)
  row = lambda c, n, i: jax.lax.dynamic_update_slice(c, n[None], (layer, 0, i, 0))  # [L,K,S,D]
  return jax.vmap(row, in_axes=(1, 0, 0), out_axes=1)(cache, new, cache_index)


class Attention(nnx.Module):
  """Multi-head attention with grouped-query heads and rotary position embeddings."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    e, n, k, d = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
    pd = jnp.dtype(cfg.param_dtype)
    init, out_init = _normal(cfg.init_std), _normal(cfg.init_std / math.sqrt(2 * cfg.num_layers))
    self.cfg = cfg
    if cfg.fuse_projections:
      # One matrix per kv head group: its G query heads, then its key, then its value.
      # Query head n = k * G + g is wqkv[:, k, g]; the same head order as wq's.
      self.wqkv = _param(rngs, init, (e, k, n // k + 2, d), pd,
                         ("embed", "kv_heads", None, "head_dim"))
      if cfg.qkv_bias:  # grouped like wqkv's last three axes
        self.bqkv = _param(rngs, nnx.initializers.zeros, (k, n // k + 2, d), pd,
                           ("kv_heads", None, "head_dim"))
    else:
      self.wq = _param(rngs, init, (e, n, d), pd, ("embed", "heads", "head_dim"))
      self.wk = _param(rngs, init, (e, k, d), pd, ("embed", "kv_heads", "head_dim"))
      self.wv = _param(rngs, init, (e, k, d), pd, ("embed", "kv_heads", "head_dim"))
      if cfg.qkv_bias:
        self.bq = _param(rngs, nnx.initializers.zeros, (n, d), pd, ("heads", "head_dim"))
        self.bk = _param(rngs, nnx.initializers.zeros, (k, d), pd, ("kv_heads", "head_dim"))
        self.bv = _param(rngs, nnx.initializers.zeros, (k, d), pd, ("kv_heads", "head_dim"))
    if cfg.qk_norm:  # Qwen3: one [D] scale shared by all heads, applied before RoPE
      self.q_norm = RMSNorm(d, cfg, "head_dim")
      self.k_norm = RMSNorm(d, cfg, "head_dim")
    self.wo = _param(rngs, out_init, (n, d, e), pd, ("heads", "head_dim", "embed"))
    lora.add_adapters(self, cfg, "attn", {
        "q": ((e,), (n, d), ("embed",), ("heads", "head_dim")),
        "k": ((e,), (k, d), ("embed",), ("kv_heads", "head_dim")),
        "v": ((e,), (k, d), ("embed",), ("kv_heads", "head_dim")),
        "o": ((n, d), (e,), ("heads", "head_dim"), ("embed",))}, rngs)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segments: Segments,
               kv_cache: tuple[jax.Array, jax.Array, jax.Array | int] | None = None,
               cache_index: jax.Array | int = 0):
    """Attention over `x` [B, T, E]; returns [B, T, E].

    `segments` = (query ids [B, T], key ids [B, S]) or (None, None) for one document per
    row; the kernel (`cfg.attention_impl`) turns them into its own mask (`model.attention`).
    With `kv_cache` = (k, v, layer): this call's keys/values are written at slots
    [cache_index, cache_index + T) (in place: only the new slots are written; `cache_index`
    is an int or [B], each row's own slot in a continuous batch), queries
    attend to all S slots (key ids: 0 = empty slot), and the result is (output, (updated
    k, updated v)). k and v are this layer's cache [B, K, S, D] (layer None) or the whole
    stacked cache [L, B, K, S, D] with this layer's index (scanned layers).
    """
    dt = x.dtype
    if self.cfg.fuse_projections:
      b, t, _ = x.shape
      qkv = jnp.einsum("bte,ekhd->btkhd", x, self.wqkv[...].astype(dt))  # [B,T,K,G+2,D]
      if self.cfg.qkv_bias:
        qkv = qkv + self.bqkv[...].astype(dt)
      g = qkv.shape[3] - 2
      q = qkv[:, :, :, :g].reshape(b, t, -1, qkv.shape[-1])  # [B, T, N, D]
      k, v = qkv[:, :, :, g], qkv[:, :, :, g + 1]  # [B, T, K, D]
    else:
      q = jnp.einsum("bte,end->btnd", x, self.wq[...].astype(dt))
      k = jnp.einsum("bte,ekd->btkd", x, self.wk[...].astype(dt))
      v = jnp.einsum("bte,ekd->btkd", x, self.wv[...].astype(dt))
      if self.cfg.qkv_bias:
        q = q + self.bq[...].astype(dt)
        k = k + self.bk[...].astype(dt)
        v = v + self.bv[...].astype(dt)
    q, k, v = (lora.adapt(self, t, x, y) for t, y in (("q", q), ("k", k), ("v", v)))
    if self.cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    window = self.cfg.sliding_window or None  # Mistral: the W most recent slots
    if kv_cache is not None:
      k_all, v_all, layer = kv_cache
      k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # new slots [B, K, T, D]
      k_all = write_cache(k_all, k.astype(k_all.dtype), cache_index, layer)
      v_all = write_cache(v_all, v.astype(v_all.dtype), cache_index, layer)
      kv_cache = (k_all, v_all)
      if layer is not None:
        k_all = jax.lax.dynamic_index_in_dim(k_all, layer, 0, keepdims=False)
        v_all = jax.lax.dynamic_index_in_dim(v_all, layer, 0, keepdims=False)
      out = attend(q, k_all.astype(dt), v_all.astype(dt), *segments, window=window,
                   cache_index=cache_index)
    else:
      out = attend(q, k, v, *segments, window=window,
                   opts=attention_options(self.cfg))  # [B, T, N, D]
    # One contraction over N * D in the weights' own layout: as an einsum over (n, d),
    # XLA:CPU transposed wo to [D, N, E] on every decode step.
    b, t, n, d = out.shape
    wo = self.wo[...].astype(dt).reshape(n * d, -1)  # [N * D, E]
    out = lora.adapt(self, "o", out, (out.reshape(b, t, n * d) @ wo))
    return out if kv_cache is None else (out, kv_cache)


class MLP(nnx.Module):
  """SwiGLU feed-forward: down(silu(x @ gate) * (x @ up))."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.fuse = cfg.fuse_projections
    e, f = cfg.embed_dim, cfg.mlp_dim
    pd = jnp.dtype(cfg.param_dtype)
    init, out_init = _normal(cfg.init_std), _normal(cfg.init_std / math.sqrt(2 * cfg.num_layers))
    if self.fuse:  # [E, 2, F]: gate then up
      self.w_gate_up = _param(rngs, init, (e, 2, f), pd, ("embed", None, "mlp"))
    else:
      self.w_gate = _param(rngs, init, (e, f), pd, ("embed", "mlp"))
      self.w_up = _param(rngs, init, (e, f), pd, ("embed", "mlp"))
    self.w_down = _param(rngs, out_init, (f, e), pd, ("mlp", "embed"))
    lora.add_adapters(self, cfg, "mlp", {
        "gate": ((e,), (f,), ("embed",), ("mlp",)), "up": ((e,), (f,), ("embed",), ("mlp",)),
        "down": ((f,), (e,), ("mlp",), ("embed",))}, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    dt = x.dtype
    if self.fuse:
      h = jnp.einsum("bte,esf->btsf", x, self.w_gate_up[...].astype(dt))  # [B, T, 2, F]
      gate, up = h[:, :, 0], h[:, :, 1]
    else:
      gate = x @ self.w_gate[...].astype(dt)  # [B, T, F]
      up = x @ self.w_up[...].astype(dt)
    gate, up = lora.adapt(self, "gate", x, gate), lora.adapt(self, "up", x, up)
    h = jax.nn.silu(gate) * up
    return lora.adapt(self, "down", h, h @ self.w_down[...].astype(dt))


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.embed_dim, cfg)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = RMSNorm(cfg.embed_dim, cfg)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segments: Segments,
               kv_cache: tuple[jax.Array, jax.Array, jax.Array | int] | None = None,
               cache_index: jax.Array | int = 0):
    """[B, T, E] -> [B, T, E]; with `kv_cache`, -> (output, updated (k, v)) (see Attention)."""
    if kv_cache is None:
      x = x + self.attn(self.attn_norm(x), cos, sin, segments)
      return x + self.mlp(self.mlp_norm(x))
    a, kv_cache = self.attn(self.attn_norm(x), cos, sin, segments, kv_cache, cache_index)
    x = x + a
    return x + self.mlp(self.mlp_norm(x)), kv_cache
