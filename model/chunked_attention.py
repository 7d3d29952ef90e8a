"""Memory-efficient attention for long contexts on any backend: online softmax over chunks.

The "chunked" kernel of `model/attention.py`. Queries are cut into chunks of `q_chunk`
rows and keys/values into chunks of `kv_chunk` slots; each query chunk walks the key chunks
with `lax.scan`, keeping a running max `m`, normaliser `l` and output accumulator
(FlashAttention's online softmax, Dao et al. 2022). No [T, S] array is ever formed: the
largest temporary is one [B, K, G, q_chunk, kv_chunk] score block.

The backward pass is a `jax.custom_vjp` that recomputes score blocks from the saved
log-sum-exp instead of letting autodiff keep every block of the scan (which would store
O(T * S) residuals again): one pass accumulates dq over key chunks, a second accumulates
dk and dv over query chunks (FlashAttention-2's split).

Blocks that the mask hides entirely (above the causal diagonal, outside the window) are
skipped with `lax.cond`, so causal attention does about half the work of the full square.
Lengths need not divide the chunk sizes: inputs are padded with segment ids that match
nothing, and padded rows are cut off the result.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from model.sharding import constrain

# Under a mesh, chunks keep the activations' sharding (batch, kv heads); without these
# constraints the partitioner reshards the chunked copies and replicates whole activations.
_AXES = {5: ("batch", None, "kv_heads", None, None), 4: ("batch", None, "kv_heads", None),
         2: ("batch", None)}

# Padding segment ids: a padded query matches no key and a padded key matches no query.
_PAD_Q, _PAD_KV = -1, -2


class MaskSpec(NamedTuple):
  """Static description of the mask (hashable: it is a custom_vjp static argument)."""
  causal: bool
  window: int | None
  cache: bool  # decode semantics: kv segment 0 = empty slot, every query sees its own slot
  q_chunk: int
  kv_chunk: int


def block_visible(q_pos: jax.Array, kv_pos: jax.Array, q_seg: jax.Array, kv_seg: jax.Array,
                  spec: MaskSpec) -> jax.Array:
  """Which (query, key) pairs may attend: [B, Tq] x [B, Sk] -> bool [B, Tq, Sk].

  q_pos [Tq] (or [B, Tq]: per-row offsets, continuous-batching decode) and kv_pos [Sk] are
  absolute slots; the rules are `model.attention`'s.
  """
  ok = q_seg[:, :, None] == kv_seg[:, None, :]
  rel = q_pos[..., :, None] - kv_pos  # [Tq, Sk] or [B, Tq, Sk]
  rel = rel[None] if rel.ndim == 2 else rel
  if spec.causal:
    ok &= rel >= 0
  if spec.window is not None:
    ok &= rel < spec.window
  if spec.cache:
    ok = (ok & (kv_seg != 0)[:, None, :]) | (rel == 0)
  return ok


def _maybe_visible(q_pos: jax.Array, kv_pos: jax.Array, spec: MaskSpec) -> jax.Array:
  """False only when position rules alone hide the whole block (then it is skipped)."""
  if spec.cache:
    return jnp.asarray(True)  # the own-slot rule makes position-only skipping unsafe
  out = jnp.asarray(True)
  if spec.causal:
    out &= kv_pos[0] <= q_pos[-1]
  if spec.window is not None:
    out &= q_pos[0] - kv_pos[-1] < spec.window
  return out


def _pad_to(x: jax.Array, axis: int, multiple: int, value) -> jax.Array:
  pad = -x.shape[axis] % multiple
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def _chunks(x: jax.Array, axis: int, size: int) -> jax.Array:
  """Splits `axis` into chunks of `size` and moves the chunk index to the front."""
  shape = x.shape[:axis] + (x.shape[axis] // size, size) + x.shape[axis + 1:]
  out = jnp.moveaxis(x.reshape(shape), axis, 0)
  if axis == 1 and x.ndim in _AXES:  # [B, L, ...] -> [n, B, c, ...]
    out = constrain(out, (None, *_AXES[x.ndim][:1], None, *_AXES[x.ndim][2:]))
  return out


def _scores(qi, kj, qpos_i, kpos_j, qseg_i, kseg_j, spec):
  """Masked scaled scores of one block: qi [B,cq,K,G,D], kj [B,ck,K,D] -> [B,K,G,cq,ck]."""
  s = jnp.einsum("bqkgd,bskd->bkgqs", qi, kj, preferred_element_type=jnp.float32)
  s = s / math.sqrt(qi.shape[-1])
  ok = block_visible(qpos_i, kpos_j, qseg_i, kseg_j, spec)[:, None, None]
  return jnp.where(ok, s, -jnp.inf)


def _forward(q, k, v, q_seg, kv_seg, q_pos, kv_pos, spec):
  """Padded inputs -> (out [B,T,K,G,D] in v's dtype, lse [B,K,G,T] float32)."""
  qc, qsegc, qposc = (_chunks(q, 1, spec.q_chunk), _chunks(q_seg, 1, spec.q_chunk),
                      _chunks(q_pos, 0, spec.q_chunk))
  kc, vc, ksegc, kposc = (_chunks(k, 1, spec.kv_chunk), _chunks(v, 1, spec.kv_chunk),
                          _chunks(kv_seg, 1, spec.kv_chunk), _chunks(kv_pos, 0, spec.kv_chunk))

  def q_block(args):
    qi, qseg_i, qpos_i = args
    b, cq, kh, g, _ = qi.shape

    def kv_step(carry, xs):
      kj, vj, kseg_j, kpos_j = xs

      def update(carry):
        m, l, acc = carry
        s = _scores(qi, kj, qpos_i, kpos_j, qseg_i, kseg_j, spec)
        m_new = jnp.maximum(m, s.max(-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # all -inf so far: no NaN
        p = jnp.exp(s - m_safe[..., None])
        alpha = jnp.exp(m - m_safe)
        pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(vj.dtype), vj,
                        preferred_element_type=jnp.float32)
        return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

      visible = _maybe_visible(qpos_i, kpos_j, spec)
      return jax.lax.cond(visible, update, lambda c: c, carry), None

    init = (jnp.full((b, kh, g, cq), -jnp.inf, jnp.float32),
            jnp.zeros((b, kh, g, cq), jnp.float32),
            jnp.zeros((b, kh, g, cq, v.shape[-1]), jnp.float32))
    (m, l, acc), _ = jax.lax.scan(kv_step, init, (kc, vc, ksegc, kposc))
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]  # fully masked (padded) rows -> 0
    lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), jnp.inf)
    return jnp.einsum("bkgqd->bqkgd", out).astype(v.dtype), lse

  out, lse = jax.lax.map(q_block, (qc, qsegc, qposc))  # [nq, B, cq, ...], [nq, B, K, G, cq]
  out = constrain(jnp.moveaxis(out, 0, 1).reshape(q.shape[:-1] + (v.shape[-1],)), _AXES[5])
  lse = jnp.moveaxis(lse, 0, 3).reshape(lse.shape[1:4] + (-1,))
  return out, lse


def _probs(qi, kj, qpos_i, kpos_j, qseg_i, kseg_j, lse_i, spec):
  """Recomputed softmax probabilities of one block from the saved log-sum-exp."""
  s = _scores(qi, kj, qpos_i, kpos_j, qseg_i, kseg_j, spec)
  return jnp.exp(s - lse_i[..., None])  # masked: exp(-inf) = 0; padded rows: lse = inf


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _attention(q, k, v, q_seg, kv_seg, q_pos, kv_pos, spec):
  return _forward(q, k, v, q_seg, kv_seg, q_pos, kv_pos, spec)[0]


def _attention_fwd(q, k, v, q_seg, kv_seg, q_pos, kv_pos, spec):
  out, lse = _forward(q, k, v, q_seg, kv_seg, q_pos, kv_pos, spec)
  return out, (q, k, v, q_seg, kv_seg, q_pos, kv_pos, out, lse)


def _attention_bwd(spec, res, dout):
  q, k, v, q_seg, kv_seg, q_pos, kv_pos, out, lse = res
  scale = 1.0 / math.sqrt(q.shape[-1])
  # delta_i = sum_d dout * out: the softmax Jacobian's row term, [B, K, G, T].
  delta = jnp.einsum("bqkgd,bqkgd->bkgq", dout.astype(jnp.float32), out.astype(jnp.float32))
  cq, ck = spec.q_chunk, spec.kv_chunk
  q_side = (_chunks(q, 1, cq), _chunks(dout, 1, cq), _chunks(q_seg, 1, cq), _chunks(q_pos, 0, cq),
            _chunks(lse, 3, cq), _chunks(delta, 3, cq))
  kv_side = (_chunks(k, 1, ck), _chunks(v, 1, ck), _chunks(kv_seg, 1, ck), _chunks(kv_pos, 0, ck))

  def block_grads(qb, kb):
    """(p, ds) of one block: probabilities and score gradients [B, K, G, cq, ck]."""
    qi, doi, qseg_i, qpos_i, lse_i, delta_i = qb
    kj, vj, kseg_j, kpos_j = kb
    p = _probs(qi, kj, qpos_i, kpos_j, qseg_i, kseg_j, lse_i, spec)
    dp = jnp.einsum("bqkgd,bskd->bkgqs", doi, vj, preferred_element_type=jnp.float32)
    return p, p * (dp - delta_i[..., None])

  def dq_block(qb):
    def step(dq, kb):
      def add(dq):
        _, ds = block_grads(qb, kb)
        return dq + jnp.einsum("bkgqs,bskd->bqkgd", ds, kb[0].astype(jnp.float32)) * scale
      return jax.lax.cond(_maybe_visible(qb[3], kb[3], spec), add, lambda d: d, dq), None
    dq, _ = jax.lax.scan(step, jnp.zeros(qb[0].shape, jnp.float32), kv_side)
    return dq

  def dkv_block(kb):
    def step(carry, qb):
      def add(carry):
        dk, dv = carry
        p, ds = block_grads(qb, kb)
        dv = dv + jnp.einsum("bkgqs,bqkgd->bskd", p, qb[1].astype(jnp.float32))
        dk = dk + jnp.einsum("bkgqs,bqkgd->bskd", ds, qb[0].astype(jnp.float32)) * scale
        return dk, dv
      return jax.lax.cond(_maybe_visible(qb[3], kb[3], spec), add, lambda c: c, carry), None
    zeros = (jnp.zeros(kb[0].shape, jnp.float32), jnp.zeros(kb[1].shape, jnp.float32))
    (dk, dv), _ = jax.lax.scan(step, zeros, q_side)
    return dk, dv

  dq = jax.lax.map(dq_block, q_side)  # [nq, B, cq, K, G, D]
  dk, dv = jax.lax.map(dkv_block, kv_side)  # [nk, B, ck, K, D]
  def unchunk(x, like):  # [n, B, c, ...] -> like's [B, L, ...], dtype and sharding
    x = jnp.moveaxis(x, 0, 1).reshape(like.shape).astype(like.dtype)
    return constrain(x, _AXES[like.ndim])

  return unchunk(dq, q), unchunk(dk, k), unchunk(dv, v), None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array,
                      kv_segment_ids: jax.Array, *, causal: bool = True,
                      q_offset: jax.Array | int = 0, window: int | None = None,
                      cache: bool = False, chunk_size: int = 512) -> jax.Array:
  """Attention without materialising [T, S]: q [B,T,N,D], k/v [B,S,K,D] -> [B,T,N,D].

  Args:
    q, k, v: queries, keys, values (K divides N: grouped-query attention).
    q_segment_ids, kv_segment_ids: [B, T], [B, S] int segment ids.
    causal: query at slot q_offset + i sees keys at slots <= its own.
    q_offset: slot of the first query (decode over a cache; 0 for self-attention).
    window: if set, a query sees only the `window` most recent slots, itself included.
    cache: decode semantics (see `model.attention.attend`).
    chunk_size: rows per query chunk and slots per key/value chunk (clipped to the
      lengths); the peak temporary is one [B, N, chunk, chunk] float32 block.
  """
  b, t, n, d = q.shape
  s, kh = k.shape[1], k.shape[2]
  spec = MaskSpec(causal, window, cache, min(chunk_size, t), min(chunk_size, s))
  qg = _pad_to(q.reshape(b, t, kh, n // kh, d), 1, spec.q_chunk, 0)  # [B, Tp, K, G, D]
  kp, vp = _pad_to(k, 1, spec.kv_chunk, 0), _pad_to(v, 1, spec.kv_chunk, 0)
  q_seg = _pad_to(q_segment_ids.astype(jnp.int32), 1, spec.q_chunk, _PAD_Q)
  kv_seg = _pad_to(kv_segment_ids.astype(jnp.int32), 1, spec.kv_chunk, _PAD_KV)
  q_pos = q_offset + jnp.arange(qg.shape[1], dtype=jnp.int32)
  kv_pos = jnp.arange(kp.shape[1], dtype=jnp.int32)
  out = _attention(qg, kp, vp, q_seg, kv_seg, q_pos, kv_pos, spec)
  return constrain(out[:, :t].reshape(b, t, n, v.shape[-1]), ("batch", None, "heads", None))
