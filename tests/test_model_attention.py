"""Attention kernels (model/attention.py) against a plain numpy loop and against each other.

The numpy loop applies the documented mask rules query by query, so it is independent of
every kernel's mask construction. What this CPU can run: xla, chunked, splash in Pallas
interpret mode; cudnn only as its logged fallback.
"""

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import attention
from model.attention import Options, attend, describe, select_kernel
from model.config import ModelConfig
from model.sharding import DEFAULT_RULES, make_mesh


def _naive(q, k, v, q_seg, kv_seg, *, causal=True, window=None, q_offset=0, cache=False):
  """softmax(q k / sqrt(d)) v over the allowed keys, one query at a time (float64)."""
  b, t, n, d = q.shape
  s, kh = k.shape[1], k.shape[2]
  out = np.zeros((b, t, n, v.shape[-1]))
  for bi in range(b):
    for i in range(t):
      slot = q_offset + i
      allowed = []
      for j in range(s):
        ok = q_seg[bi, i] == kv_seg[bi, j]
        ok = ok and (not causal or j <= slot) and (window is None or slot - j < window)
        if cache:
          ok = (ok and kv_seg[bi, j] != 0) or j == slot
        if ok:
          allowed.append(j)
      for h in range(n):
        kv = h // (n // kh)
        sc = np.array([q[bi, i, h] @ k[bi, j, kv] for j in allowed], np.float64) / math.sqrt(d)
        p = np.exp(sc - sc.max())
        out[bi, i, h] = (p / p.sum()) @ v[bi, allowed, kv]
  return out


def _inputs(b=2, t=24, n=4, kh=2, d=8, seed=0):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(b, t, n, d)).astype(np.float32)
  k = rng.normal(size=(b, t, kh, d)).astype(np.float32)
  v = rng.normal(size=(b, t, kh, d)).astype(np.float32)
  # Row 0: three packed documents then padding (segment 0); row 1: one document.
  lengths = [t // 3, t // 4, t // 3]
  row0 = np.concatenate([np.full(n_, i + 1) for i, n_ in enumerate(lengths)])
  row0 = np.pad(row0, (0, t - len(row0)))
  seg = np.stack([row0, np.ones(t)])[:b].astype(np.int32)
  return q, k, v, seg


@pytest.mark.parametrize("chunk", [3, 7, 8, 24, 64])
def test_chunked_matches_naive_on_packed_gqa_rows(chunk):
  q, k, v, seg = _inputs()
  out = attend(q, k, v, seg, seg, opts=Options("chunked", block_size=chunk))
  np.testing.assert_allclose(np.asarray(out), _naive(q, k, v, seg, seg), atol=2e-5)


def test_xla_reference_matches_naive_and_chunked_matches_xla_without_segments():
  q, k, v, seg = _inputs(seed=1)
  ones = np.ones_like(seg)
  ref = np.asarray(attend(q, k, v, seg, seg))
  np.testing.assert_allclose(ref, _naive(q, k, v, seg, seg), atol=2e-5)
  free = np.asarray(attend(q, k, v, opts=Options("chunked", block_size=5)))
  np.testing.assert_allclose(free, _naive(q, k, v, ones, ones), atol=2e-5)


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_sliding_window_matches_naive(impl):
  q, k, v, seg = _inputs(seed=2)
  out = attend(q, k, v, seg, seg, window=5, opts=Options(impl, block_size=4))
  np.testing.assert_allclose(np.asarray(out), _naive(q, k, v, seg, seg, window=5), atol=2e-5)
  # The window changes the result (a rule that ignored it would pass the check above only
  # if the window never mattered).
  assert np.abs(np.asarray(out) - _naive(q, k, v, seg, seg)).max() > 1e-3


def test_chunked_gradients_match_the_reference():
  q, k, v, seg = _inputs(seed=3)
  cot = np.random.default_rng(4).normal(size=q.shape).astype(np.float32)

  def loss(impl):
    opts = Options(impl, block_size=5)
    return lambda q, k, v: jnp.sum(attend(q, k, v, seg, seg, opts=opts) * cot)

  ref = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
  out = jax.jit(jax.grad(loss("chunked"), argnums=(0, 1, 2)))(q, k, v)
  for r, o, name in zip(ref, out, "qkv"):
    assert np.abs(np.asarray(r)).max() > 1e-2, name  # a real gradient, not all zeros
    np.testing.assert_allclose(np.asarray(o), np.asarray(r), atol=2e-5, err_msg=name)


def test_decode_over_a_heads_first_cache_follows_the_cache_rules():
  # Cache of 12 slots; 3 new queries at slots 5..7; slots 8.. are empty (segment 0);
  # row 1's second query is padding (segment 0): it sees only its own slot.
  rng = np.random.default_rng(5)
  b, t, s, n, kh, d = 2, 3, 12, 4, 2, 8
  q = rng.normal(size=(b, t, n, d)).astype(np.float32)
  k = rng.normal(size=(b, s, kh, d)).astype(np.float32)
  v = rng.normal(size=(b, s, kh, d)).astype(np.float32)
  kv_seg = np.array([[1] * 8 + [0] * 4, [2] * 5 + [2, 0, 2] + [0] * 4], np.int32)
  q_seg = np.array([[1, 1, 1], [2, 0, 2]], np.int32)
  heads_first = lambda x: np.swapaxes(x, 1, 2)  # [B, K, S, D], the cache layout
  out = attend(q, heads_first(k), heads_first(v), q_seg, kv_seg, cache_index=5,
               opts=Options("chunked"))  # decoding always runs the reference kernel
  ref = _naive(q, k, v, q_seg, kv_seg, q_offset=5, cache=True)
  np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5)
  np.testing.assert_allclose(np.asarray(out)[1, 1], np.repeat(v[1, 6], 2, axis=0), atol=1e-6)


def test_cudnn_on_cpu_falls_back_to_xla_and_logs_it_once(caplog):
  q, k, v, seg = _inputs(seed=6)
  attention._logged.clear()
  with caplog.at_level(logging.WARNING):
    out = attend(q, k, v, seg, seg, opts=Options("cudnn"))
    attend(q, k, v, seg, seg, opts=Options("cudnn"))
  lines = [r.getMessage() for r in caplog.records if "attention: cudnn" in r.getMessage()]
  assert lines == ["attention: cudnn (fallback to xla: backend is cpu, cuDNN needs a GPU)"]
  np.testing.assert_allclose(np.asarray(out), _naive(q, k, v, seg, seg), atol=2e-5)


def test_kernel_selection_per_backend_and_constraint():
  bf16 = jnp.bfloat16
  pick = lambda impl, backend, **kw: select_kernel(Options(impl), backend=backend, **kw)
  assert pick("auto", "gpu", dtype=bf16, head_dim=128) == ("cudnn", None)
  assert pick("auto", "tpu", dtype=bf16, head_dim=128) == ("splash", None)
  assert pick("auto", "cpu", dtype=bf16, head_dim=64, lengths=(256, 256)) == ("xla", None)
  assert pick("auto", "cpu", dtype=bf16, head_dim=64, lengths=(8192, 8192)) == ("chunked", None)
  kernel, why = pick("cudnn", "gpu", dtype=jnp.float32, head_dim=64)
  assert kernel == "xla" and "float32" in why
  kernel, why = pick("cudnn", "gpu", dtype=bf16, head_dim=12)
  assert kernel == "xla" and "head_dim 12" in why
  kernel, why = pick("splash", "tpu", dtype=bf16, head_dim=64, lengths=(200, 200))
  assert kernel == "xla" and "200" in why
  assert describe(Options("cudnn"), dtype=bf16, head_dim=64, backend="cpu") == (
      "attention: cudnn (fallback to xla: backend is cpu, cuDNN needs a GPU)")
  assert describe(Options("auto"), dtype=bf16, head_dim=64, backend="gpu") == (
      "attention: auto (selects cudnn on gpu)")
  assert describe(Options("xla"), dtype=bf16, head_dim=64, backend="cpu") == "attention: xla"


@pytest.mark.parametrize("window", [None, 96])
def test_splash_in_interpret_mode_matches_naive(window):
  q, k, v, seg = _inputs(b=1, t=256, n=4, kh=2, d=16, seed=7)
  opts = Options("splash", block_size=128, interpret=True)
  out = attend(q, k, v, seg, seg, window=window, opts=opts)
  np.testing.assert_allclose(np.asarray(out), _naive(q, k, v, seg, seg, window=window),
                             atol=1e-4)


def test_splash_interpret_gradients_match_the_reference():
  q, k, v, seg = _inputs(b=1, t=256, n=2, kh=1, d=16, seed=8)
  cot = np.random.default_rng(9).normal(size=q.shape).astype(np.float32)

  def loss(opts):
    return lambda q, k, v: jnp.sum(attend(q, k, v, seg, seg, opts=opts) * cot)

  ref = jax.grad(loss(Options("xla")), argnums=(0, 1, 2))(q, k, v)
  out = jax.grad(loss(Options("splash", block_size=128, interpret=True)), argnums=(0, 1, 2))(
      q, k, v)
  for r, o, name in zip(ref, out, "qkv"):
    np.testing.assert_allclose(np.asarray(o), np.asarray(r), atol=1e-4, err_msg=name)


def test_dot_product_is_refused_with_a_migration_hint_and_read_as_xla_from_saved_configs():
  with pytest.raises(ValueError, match="ModelConfig.attention_impl.*'cudnn'.*'splash'"):
    ModelConfig(vocab_size=128, attention_impl="dot_product")
  saved = {**ModelConfig.preset("tiny").to_dict(), "attention_impl": "dot_product"}
  del saved["attention_block_size"]  # a checkpoint from before the field existed
  assert ModelConfig.from_dict(saved).attention_impl == "xla"


def test_splash_under_a_mesh_runs_per_shard_and_matches_naive():
  # Batch over data x fsdp (4) and heads over tensor (2): the kernel runs inside shard_map.
  q, k, v, seg = _inputs(b=4, t=128, n=4, kh=2, d=16, seed=10)
  seg = np.concatenate([seg, seg[::-1]])[:4]
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  opts = Options("splash", block_size=128, interpret=True)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(DEFAULT_RULES):
    out = jax.jit(lambda *a: attend(*a, opts=opts))(q, k, v, seg, seg)
    whole = jax.jit(lambda *a: attend(*a, opts=opts))(q, k, v)  # no segment ids
  np.testing.assert_allclose(np.asarray(out), _naive(q, k, v, seg, seg), atol=1e-4)
  ones = np.ones_like(seg)
  np.testing.assert_allclose(np.asarray(whole), _naive(q, k, v, ones, ones), atol=1e-4)
