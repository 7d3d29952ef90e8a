"""Attention kernels behind one interface: `attend(q, k, v, q_segment_ids, kv_segment_ids, ...)`.

Callers pass segment ids, never a dense mask; each kernel expresses the mask its own way and
the dense [B, T, S] mask is built only inside the XLA reference. Kernels (`KERNELS`):

  xla      reference: einsum scores in float32, softmax, einsum. Also the decode kernel
           (queries over a KV cache), whatever `impl` says: there T is a few tokens.
  chunked  online softmax over query and key/value chunks (`model/chunked_attention.py`):
           O(T * chunk) memory, exact to float32 rounding; any backend, meant for long
           contexts on CPU.
  cudnn    `jax.nn.dot_product_attention(implementation="cudnn")`: cuDNN flash attention on
           GPU. Causal and the window go to cuDNN as is_causal / local_window_size; packed
           segments have no segment-id input in that public API (jax 0.10.2), so they go in
           as a boolean mask (cuDNN adds it as a bias: O(T * S) memory for the bias, the
           softmax stays fused). Without segment ids (one document per row) no mask is built.
  splash   Pallas splash attention on TPU (`jax.experimental.pallas.ops.tpu.
           splash_attention`): CausalMask or LocalMask plus SegmentIds, block-sparse, GQA
           native. Under a mesh it runs inside `shard_map` over batch and heads.
  auto     cudnn on GPU, splash on TPU, on CPU xla up to AUTO_CHUNKED_MIN_LEN key slots and
           chunked beyond (measured in benchmarks/attention_kernels.py).

A kernel whose constraints do not hold (backend, dtype, head dim, lengths) falls back to
xla (cudnn) or chunked/xla (splash), and the fallback is logged once with its reason, e.g.
"attention: cudnn (fallback to xla: backend is cpu, cuDNN needs a GPU)".

Mask rules shared by every kernel, for query i at slot q_offset + i and key slot j:
same segment; causal: j <= slot; window W: slot - j < W. Segment 0 is padding in training
(it attends within itself, so no softmax row is empty). With `cache_index` (decode) slots
with kv segment 0 are empty and never attended, and every query also sees its own slot
(so padding queries have a non-empty row).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from absl import logging
from flax.core import spmd

from model.chunked_attention import MaskSpec, block_visible, chunked_attention
from model.sharding import DEFAULT_RULES, logical_to_spec

KERNELS = ("xla", "chunked", "cudnn", "splash")
IMPLS = KERNELS + ("auto",)
# CPU: from 1024 key slots on, chunked is faster than xla too (benchmarks/attention_kernels.py).
AUTO_CHUNKED_MIN_LEN = 1024
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


class Options(NamedTuple):
  """Static switches of `attend` (a model reads them from its ModelConfig)."""
  impl: str = "xla"
  block_size: int = 512  # chunked: chunk rows/slots; splash: block_q / block_kv
  interpret: bool = False  # splash: Pallas interpret mode (runs the kernel on CPU; tests)


_logged: set[str] = set()


def _log_once(message: str, fallback: bool) -> None:
  if message not in _logged:
    _logged.add(message)
    (logging.warning if fallback else logging.info)(message)


def reference_mask(q_seg: jax.Array, kv_seg: jax.Array, *, causal: bool = True,
                   q_offset: jax.Array | int = 0, window: int | None = None,
                   cache: bool = False) -> jax.Array:
  """The dense mask [B, T, S] (True = may attend) of the rules in the module docstring.

  `q_offset`: the slot of the first query, an int or per row ([B], continuous batching).
  """
  spec = MaskSpec(causal, window, cache, 0, 0)
  q_pos = jnp.asarray(q_offset)[..., None] + jnp.arange(q_seg.shape[1])  # [T] or [B, T]
  return block_visible(q_pos, jnp.arange(kv_seg.shape[1]), q_seg, kv_seg, spec)


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                  heads_first: bool = False) -> jax.Array:
  """Reference attention. q [B,T,N,D], k/v [B,S,K,D], mask [B,T,S] -> [B,T,N,D].

  `heads_first`: k/v are [B,K,S,D], the KV cache's layout (heads before slots, so decoding
  never transposes the whole cache, which it would every layer and every token in
  [B,S,K,D]). The math is the same.
  """
  b, t, n, d = q.shape
  kh = k.shape[1 if heads_first else 2]
  kv = "bksd" if heads_first else "bskd"
  q = q.reshape(b, t, kh, n // kh, d)  # [B, T, K, G, D]
  scores = jnp.einsum(f"btkgd,{kv}->bkgts", q, k).astype(jnp.float32) / math.sqrt(d)
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)  # [B, K, G, T, S]
  out = jnp.einsum(f"bkgts,{kv}->btkgd", probs, v)
  return out.reshape(b, t, n, v.shape[-1])


def _ones(x: jax.Array) -> jax.Array:
  return jnp.ones(x.shape[:2], jnp.int32)


def _xla(q, k, v, q_seg, kv_seg, *, causal, window, opts):
  del opts
  q_seg = _ones(q) if q_seg is None else q_seg
  kv_seg = _ones(k) if kv_seg is None else kv_seg
  return xla_attention(q, k, v, reference_mask(q_seg, kv_seg, causal=causal, window=window))


def _chunked(q, k, v, q_seg, kv_seg, *, causal, window, opts):
  q_seg = _ones(q) if q_seg is None else q_seg
  kv_seg = _ones(k) if kv_seg is None else kv_seg
  return chunked_attention(q, k, v, q_seg, kv_seg, causal=causal, window=window,
                           chunk_size=opts.block_size)


def _cudnn(q, k, v, q_seg, kv_seg, *, causal, window, opts):
  del opts
  mask = None
  if q_seg is not None:
    mask = (q_seg[:, :, None] == kv_seg[:, None, :])[:, None]  # [B, 1, T, S]
  return jax.nn.dot_product_attention(
      q, k, v, mask=mask, is_causal=causal, implementation="cudnn",
      local_window_size=None if window is None else (window - 1, 0))


def _splash_one_shard(q, k, v, q_seg, kv_seg, *, causal, window, opts):
  """Splash on unsharded (per-device) arrays: vmapped over the batch."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa  # Pallas: TPU-only import

  t, n, s = q.shape[1], q.shape[2], k.shape[1]
  if window is not None:
    head_mask = sa.LocalMask((t, s), (window - 1, 0), offset=0)
  elif causal:
    head_mask = sa.CausalMask((t, s))
  else:
    head_mask = sa.FullMask((t, s))
  bq, bkv = min(opts.block_size, t), min(opts.block_size, s)
  blocks = sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                         block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq,
                         block_kv_dq=bkv)
  kernel = sa.make_splash_mha(sa.MultiHeadMask([head_mask] * n), block_sizes=blocks,
                              head_shards=1, q_seq_shards=1, interpret=opts.interpret)
  q = q / math.sqrt(q.shape[-1])  # splash does not scale the scores
  heads = lambda x: jnp.swapaxes(x, 0, 1)  # [T, N, D] -> [N, T, D]

  def one(q, k, v, q_seg, kv_seg):
    segments = None if q_seg is None else sa.SegmentIds(q_seg, kv_seg)
    return heads(kernel(heads(q), heads(k), heads(v), segment_ids=segments))

  return jax.vmap(one)(q, k, v, q_seg, kv_seg)


def _splash(q, k, v, q_seg, kv_seg, *, causal, window, opts):
  fn = lambda *a: _splash_one_shard(*a, causal=causal, window=window, opts=opts)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn(q, k, v, q_seg, kv_seg)
  # A Pallas call is opaque to the partitioner: run it per device over batch and heads.
  rules = spmd.get_logical_axis_rules() or DEFAULT_RULES
  spec = lambda *names: logical_to_spec(names, rules)
  qs, kvs = spec("batch", "length", "heads", "head_dim"), spec("batch", "length", "kv_heads",
                                                               "head_dim")
  segs = None if q_seg is None else spec("batch", "length")
  return jax.shard_map(fn, mesh=mesh, in_specs=(qs, kvs, kvs, segs, segs), out_specs=qs,
                       check_vma=False)(q, k, v, q_seg, kv_seg)


_KERNEL_FNS = {"xla": _xla, "chunked": _chunked, "cudnn": _cudnn, "splash": _splash}


def _cudnn_blocker(backend: str, dtype, head_dim: int) -> str | None:
  if backend != "gpu":
    return f"backend is {backend}, cuDNN needs a GPU"
  if jnp.dtype(dtype) not in [jnp.dtype(d) for d in CUDNN_DTYPES]:
    return f"dtype {jnp.dtype(dtype).name}, cuDNN flash attention needs bfloat16 or float16"
  if head_dim % 8 or head_dim > 256:
    return f"head_dim {head_dim}, cuDNN needs a multiple of 8 up to 128 (256 on Hopper)"
  return None


def _splash_blocker(backend: str, opts: Options, lengths: tuple[int, int] | None
                    ) -> str | None:
  if backend != "tpu" and not opts.interpret:
    return f"backend is {backend}, splash attention is a TPU (Mosaic) kernel"
  if opts.block_size % 128:
    return f"block_size {opts.block_size} is not a multiple of 128"
  if lengths is not None:
    for name, n in zip(("query", "key"), lengths):
      if n % min(opts.block_size, n) or n % 128:
        return f"{name} length {n} is not a multiple of 128 and of the block size"
  return None


def select_kernel(opts: Options, *, backend: str, dtype, head_dim: int,
                  lengths: tuple[int, int] | None = None) -> tuple[str, str | None]:
  """(kernel that runs, why it is not the requested one or None) for `opts.impl`.

  `lengths` = (T, S) when known (at trace time); at model build it is None and only the
  static constraints (backend, dtype, head dim) are checked.
  """
  impl = opts.impl
  if impl == "auto":
    impl = {"gpu": "cudnn", "tpu": "splash"}.get(backend, "chunked")
    if impl == "chunked" and lengths is not None and lengths[1] < AUTO_CHUNKED_MIN_LEN:
      impl = "xla"
  if impl == "cudnn":
    reason = _cudnn_blocker(backend, dtype, head_dim)
    return ("xla", reason) if reason else ("cudnn", None)
  if impl == "splash":
    reason = _splash_blocker(backend, opts, lengths)
    if reason:
      long = lengths is None or lengths[1] >= AUTO_CHUNKED_MIN_LEN
      return ("chunked" if long else "xla"), reason
    return "splash", None
  if impl not in KERNELS:
    raise ValueError(f"attention impl {impl!r}: expected one of {IMPLS}")
  return impl, None


def describe(opts: Options, *, dtype, head_dim: int, seq_len: int | None = None,
             backend: str | None = None) -> str:
  """One line for the startup log, e.g. "attention: cudnn (fallback to xla: backend is cpu,
  cuDNN needs a GPU)". With `seq_len` (training rows) the length rules are checked too;
  a different length at trace time (eval, decoding prefill) is logged when it changes the
  kernel."""
  backend = backend or jax.default_backend()
  lengths = None if not seq_len else (seq_len, seq_len)
  kernel, reason = select_kernel(opts, backend=backend, dtype=dtype, head_dim=head_dim,
                                 lengths=lengths)
  return _message(opts.impl, kernel, reason, f"on {backend}")


def _message(impl: str, kernel: str, reason: str | None, context: str) -> str:
  if kernel == impl:
    return f"attention: {kernel}"
  why = f"fallback to {kernel}: {reason}" if reason else f"selects {kernel} {context}"
  return f"attention: {impl} ({why})"


def attend(q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array | None = None,
           kv_segment_ids: jax.Array | None = None, *, causal: bool = True,
           window: int | None = None, cache_index: jax.Array | int | None = None,
           opts: Options = Options()) -> jax.Array:
  """Scaled dot-product attention with grouped-query heads; -> [B, T, N, D].

  Args:
    q: queries [B, T, N, D].
    k, v: keys and values [B, S, K, D] (K divides N), or with `cache_index` a KV cache in
      heads-first layout [B, K, S, D].
    q_segment_ids, kv_segment_ids: [B, T] and [B, S] int ids (None: one document per row;
      required with a cache). kv defaults to the query ids in self-attention.
    causal: queries see only keys at or before their own slot.
    window: sliding-window (local) attention: a query sees its `window` most recent slots.
    cache_index: decoding: the queries sit at cache slots [cache_index, cache_index + T)
      (an int, or [B] per-row slots: each row of a continuous batch at its own length);
      always the xla kernel, with the decode mask rules of the module docstring.
    opts: which kernel (`Options.impl`) and its block size.

  Raises:
    ValueError: a window without causal, or a cache without segment ids.
  """
  if window is not None and (not causal or window < 1):
    raise ValueError(f"attention window={window}: needs causal attention and window >= 1")
  if cache_index is not None:
    if q_segment_ids is None or kv_segment_ids is None:
      raise ValueError("attend with cache_index needs q_segment_ids and kv_segment_ids")
    mask = reference_mask(q_segment_ids, kv_segment_ids, causal=True, q_offset=cache_index,
                          window=window, cache=True)
    return xla_attention(q, k, v, mask, heads_first=True)
  if kv_segment_ids is None:
    kv_segment_ids = q_segment_ids
  kernel, reason = select_kernel(opts, backend=jax.default_backend(), dtype=q.dtype,
                                 head_dim=q.shape[-1], lengths=(q.shape[1], k.shape[1]))
  if kernel != opts.impl:
    _log_once(_message(opts.impl, kernel, reason, f"for {k.shape[1]} key slots"),
              fallback=reason is not None)
  if kernel == "cudnn":
    try:  # jax's own checks (cuDNN present and its version, per-GPU head_dim limit) raise
      return _cudnn(q, k, v, q_segment_ids, kv_segment_ids, causal=causal, window=window,
                    opts=opts)
    except (NotImplementedError, RuntimeError) as e:
      _log_once(f"attention: cudnn (fallback to xla: {e})", fallback=True)
      kernel = "xla"
  return _KERNEL_FNS[kernel](q, k, v, q_segment_ids, kv_segment_ids, causal=causal,
                             window=window, opts=opts)
