"""Conversions between the two parameter layouts of `ModelConfig.fuse_projections`.

  fuse_params(params, cfg)    separate wq/wk/wv and w_gate/w_up -> wqkv and w_gate_up
  unfuse_params(params, cfg)  the reverse
  extend_vocab(params, new_vocab_size, seed)  append embedding rows / output columns

`params` is a pure dict (as the Trainer and checkpoints hold it), with either layer layout
(a dict of blocks, or scanned blocks with a leading `layers` axis): only the last axes are
touched. Arrays may be numpy or JAX. The fused query/key/value matrix is grouped per kv
head, `wqkv[e, k, :G]` = the G query heads n = k * G + g that share kv head k, then that
head's key and value, so `wq[e, n] == wqkv[e, n // G, n % G]`. Query/key/value biases
(`qkv_bias`) are grouped the same way: `bq[n] == bqkv[n // G, n % G]`, `bk[k] == bqkv[k, G]`.
Per-head q/k norms (`qk_norm`) have one layout and pass through.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from model.config import ModelConfig


def _xp(x: Any):
  """numpy for numpy arrays, jax.numpy otherwise (keeps arrays where they are)."""
  return np if isinstance(x, np.ndarray) else jnp


def _map_blocks(params: dict, fn) -> dict:
  """Applies fn(name, sub_dict) -> sub_dict to every "attn" / "mlp" dict, recursively."""
  out = {}
  for key, value in params.items():
    if isinstance(value, dict):
      value = fn(key, _map_blocks(value, fn)) if key in ("attn", "mlp") else \
          _map_blocks(value, fn)
    out[key] = value
  return out


def fuse_params(params: dict, cfg: ModelConfig) -> dict:
  """Unfused -> fused layout (see the module docstring)."""
  k = cfg.num_kv_heads

  def fuse(name: str, p: dict) -> dict:
    p = dict(p)
    if name == "attn" and "wq" in p:
      wq, wk, wv = p.pop("wq"), p.pop("wk"), p.pop("wv")
      xp = _xp(wq)
      e, n, d = wq.shape[-3:]
      wq = wq.reshape(*wq.shape[:-3], e, k, n // k, d)
      p["wqkv"] = xp.concatenate([wq, wk[..., None, :], wv[..., None, :]], axis=-2)
    if name == "attn" and "bq" in p:
      bq, bk, bv = p.pop("bq"), p.pop("bk"), p.pop("bv")
      n, d = bq.shape[-2:]
      bq = bq.reshape(*bq.shape[:-2], k, n // k, d)
      p["bqkv"] = _xp(bq).concatenate([bq, bk[..., None, :], bv[..., None, :]], axis=-2)
    if name == "mlp" and "w_gate" in p:
      gate, up = p.pop("w_gate"), p.pop("w_up")
      p["w_gate_up"] = _xp(gate).stack([gate, up], axis=-2)
    return p

  return _map_blocks(params, fuse)


def unfuse_params(params: dict, cfg: ModelConfig) -> dict:
  """Fused -> unfused layout (see the module docstring)."""
  g = cfg.num_heads // cfg.num_kv_heads

  def unfuse(name: str, p: dict) -> dict:
    p = dict(p)
    if name == "attn" and "wqkv" in p:
      w = p.pop("wqkv")  # [..., E, K, G + 2, D]
      e, kh, _, d = w.shape[-4:]
      p["wq"] = w[..., :g, :].reshape(*w.shape[:-4], e, kh * g, d)
      p["wk"], p["wv"] = w[..., g, :], w[..., g + 1, :]
    if name == "attn" and "bqkv" in p:
      b = p.pop("bqkv")  # [..., K, G + 2, D]
      kh, _, d = b.shape[-3:]
      p["bq"] = b[..., :g, :].reshape(*b.shape[:-3], kh * g, d)
      p["bk"], p["bv"] = b[..., g, :], b[..., g + 1, :]
    if name == "mlp" and "w_gate_up" in p:
      w = p.pop("w_gate_up")  # [..., E, 2, F]
      p["w_gate"], p["w_up"] = w[..., 0, :], w[..., 1, :]
    return p

  return _map_blocks(params, unfuse)


def extend_vocab(params: dict, new_vocab_size: int, seed: int = 0) -> dict:
  """Grows the vocabulary to `new_vocab_size`, leaving every existing row untouched.

  New tokens (e.g. chat markers appended to a pretrained tokenizer) get the mean of the
  existing embeddings (and output columns) plus seeded noise of 1% of their per-dimension
  std: close to an "average" token, so the pretrained model's predictions barely move,
  yet distinct from each other, so the new markers can be told apart from the first step.
  """
  old = params["embedding"].shape[0]
  if new_vocab_size == old:
    return params
  if new_vocab_size < old:
    raise ValueError(f"Cannot shrink the vocabulary from {old} to {new_vocab_size}")
  # jax.numpy throughout: stages run this under jit on sharded arrays (no host gather).
  keys = jax.random.split(jax.random.key(seed))

  def grow(table: Any, axis: int, key: jax.Array) -> Any:
    t = jnp.asarray(table, jnp.float32)
    mean, std = t.mean(axis=axis, keepdims=True), t.std(axis=axis, keepdims=True)
    shape = list(t.shape)
    shape[axis] = new_vocab_size - old
    extra = mean + 0.01 * std * jax.random.normal(key, shape, jnp.float32)
    return jnp.concatenate([t, extra], axis=axis).astype(table.dtype)

  out = dict(params)
  out["embedding"] = grow(params["embedding"], 0, keys[0])  # [V, E]
  if "lm_head" in params:
    out["lm_head"] = grow(params["lm_head"], 1, keys[1])  # [E, V]
  return out
