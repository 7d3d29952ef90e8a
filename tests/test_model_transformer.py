"""Tests for model/transformer.py and model/layers.py on the tiny preset (float32).

Covers causality, packed-document isolation (segment ids + restarting positions), agreement of
the two attention implementations, of the scanned and the list layer layouts and of remat
policies, GQA and RoPE against direct references, and parameter counting.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.attention import reference_mask, xla_attention
from model.config import ModelConfig
from model.layers import apply_rope, rope_tables
from model.transformer import Transformer, build_model, count_params

T = 24  # row length of every forward batch here (one compiled shape per model variant)


def _forward(model):
  """Jitted logits(params, tokens, positions, segment_ids) of `model`'s graph."""
  graphdef, _ = nnx.split(model)

  @jax.jit
  def fwd(params, tokens, positions, segment_ids):
    m = nnx.merge(graphdef, params)
    return m(tokens, positions, segment_ids)
  return fwd


def _params(model):
  return nnx.to_pure_dict(nnx.state(model))


def _stack_blocks(list_params, num_layers):
  """List-layout params -> scan layout (block params stacked on a leading layers axis)."""
  blocks = [list_params["blocks"][i] for i in range(num_layers)]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
  return {**list_params, "blocks": stacked}


def _unpacked(tokens):
  b, t = tokens.shape
  return (np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
          np.ones((b, t), np.int32))


# Three documents packed into one row of T=24 slots: lengths 10, 7, 5, then 2 padding slots.
DOC_LENGTHS = (10, 7, 5)


def _packed_batch(vocab, seed=0):
  """Row 0: docs packed with restarting positions and segment ids 1..3 (padding 0).

  Rows 1..3: each doc alone at the start of a row (positions 0..T-1, one segment), followed
  by unrelated tokens. Returns (tokens, positions, segment_ids, docs).
  """
  rng = np.random.default_rng(seed)
  docs = [rng.integers(0, vocab, n).astype(np.int32) for n in DOC_LENGTHS]
  tokens = rng.integers(0, vocab, (1 + len(docs), T)).astype(np.int32)
  positions, segments = _unpacked(tokens)
  start = 0
  for i, doc in enumerate(docs):
    n = len(doc)
    tokens[0, start:start + n] = doc
    positions[0, start:start + n] = np.arange(n)
    segments[0, start:start + n] = i + 1
    tokens[1 + i, :n] = doc
    start += n
  positions[0, start:] = np.arange(T - start)
  segments[0, start:] = 0  # padding
  return tokens, positions, segments, docs


@pytest.fixture(scope="module")
def tiny_fwd(tiny_model):
  model, params = tiny_model
  return _forward(model), params


@pytest.fixture(scope="module")
def tiny_scan(tiny_cfg, tiny_model):
  """The scan-layers model carrying the tiny model's parameters (stacked)."""
  model = nnx.eval_shape(lambda: Transformer(tiny_cfg.replace(scan_layers=True),
                                             nnx.Rngs(params=0)))
  params = _stack_blocks(tiny_model[1], tiny_cfg.num_layers)
  return _forward(model), params


@pytest.mark.parametrize("layout", ["list", "scan"])
def test_changing_a_future_token_never_changes_earlier_logits(tiny_cfg, tiny_fwd, tiny_scan,
                                                              layout):
  fwd, params = tiny_fwd if layout == "list" else tiny_scan
  rng = np.random.default_rng(1)
  base = rng.integers(0, tiny_cfg.vocab_size, T).astype(np.int32)
  changed_at = [0, 5, 12, 23]
  tokens = np.stack([base] + [base.copy() for _ in changed_at])
  for row, t in enumerate(changed_at, start=1):
    tokens[row, t] = (base[t] + 1 + row) % tiny_cfg.vocab_size
  logits = np.asarray(fwd(params, tokens, *_unpacked(tokens)))
  for row, t in enumerate(changed_at, start=1):
    np.testing.assert_allclose(logits[row, :t], logits[0, :t], rtol=0, atol=1e-6,
                               err_msg=f"changing token {t} changed earlier logits")
    # The change is visible from position t on (the comparison above is not vacuous).
    assert np.abs(logits[row, t] - logits[0, t]).max() > 1e-4


def test_packed_documents_match_each_document_alone(tiny_cfg, tiny_fwd):
  fwd, params = tiny_fwd
  tokens, positions, segments, docs = _packed_batch(tiny_cfg.vocab_size)
  logits = np.asarray(fwd(params, tokens, positions, segments))
  start = 0
  for i, doc in enumerate(docs):
    n = len(doc)
    np.testing.assert_allclose(logits[0, start:start + n], logits[1 + i, :n], rtol=0,
                               atol=1e-5, err_msg=f"document {i} sees other documents")
    start += n

  # Without segment ids the later documents attend to the earlier ones: the check above
  # would have caught a mask that ignores segments.
  one_segment = np.where(segments[:1] > 0, 1, 0)
  leaky = np.asarray(fwd(params, tokens[:1], positions[:1], one_segment))
  n0, n1 = DOC_LENGTHS[:2]
  assert np.abs(leaky[0, n0:n0 + n1] - logits[2, :n1]).max() > 1e-4


def test_chunked_attention_model_matches_xla(tiny_cfg, tiny_fwd, tiny_model):
  # Chunks of 5 over packed rows of T = 24: several query and key chunks, the last partial.
  fwd, params = tiny_fwd
  cfg = tiny_cfg.replace(attention_impl="chunked", attention_block_size=5)
  model_dp = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(params=0)))
  tokens, positions, segments, _ = _packed_batch(tiny_cfg.vocab_size, seed=2)
  ref = np.asarray(fwd(params, tokens, positions, segments))
  out = np.asarray(_forward(model_dp)(params, tokens, positions, segments))
  np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)


def test_scan_layers_compute_the_same_function_as_a_list(tiny_cfg, tiny_fwd, tiny_scan):
  tokens, positions, segments, _ = _packed_batch(tiny_cfg.vocab_size, seed=3)
  ref = np.asarray(tiny_fwd[0](tiny_fwd[1], tokens, positions, segments))
  out = np.asarray(tiny_scan[0](tiny_scan[1], tokens, positions, segments))
  np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)


def test_scan_init_has_stacked_layout_of_the_same_shapes(tiny_cfg):
  list_shapes = jax.tree.map(lambda x: x.shape, _params(nnx.eval_shape(
      lambda: Transformer(tiny_cfg, nnx.Rngs(params=0)))))
  scan_shapes = jax.tree.map(lambda x: x.shape, _params(nnx.eval_shape(
      lambda: Transformer(tiny_cfg.replace(scan_layers=True), nnx.Rngs(params=0)))))
  for path, shape in jax.tree_util.tree_leaves_with_path(scan_shapes["blocks"],
                                                         is_leaf=lambda x: isinstance(x, tuple)):
    per_layer = list_shapes["blocks"][0]
    for key in path:
      per_layer = per_layer[key.key]
    assert shape == (tiny_cfg.num_layers, *per_layer), path


def test_scanned_rematerialised_blocks_give_the_same_loss_and_gradients(tiny_cfg, tiny_model):
  # The big presets run scan_layers + remat "dots_no_batch": same loss and gradients as the
  # plain list of blocks without remat (gradients stacked for comparison).
  from train.losses import lm_loss
  _, params = tiny_model
  rng = np.random.default_rng(4)
  tokens = rng.integers(0, tiny_cfg.vocab_size, (2, T + 1)).astype(np.int32)
  positions, segments = _unpacked(tokens[:, :-1])
  batch = dict(tokens=tokens[:, :-1], targets=tokens[:, 1:], positions=positions,
               segment_ids=segments, loss_mask=np.ones((2, T), np.float32))

  def loss_and_grads(cfg, p):
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(params=0))))
    fn = lambda p: lm_loss(nnx.merge(graphdef, p), batch, None)[0]
    return jax.jit(jax.value_and_grad(fn))(p)

  loss, grads = loss_and_grads(tiny_cfg, params)
  loss_r, grads_r = loss_and_grads(
      tiny_cfg.replace(scan_layers=True, remat_policy="dots_no_batch"),
      _stack_blocks(params, tiny_cfg.num_layers))
  assert abs(float(loss) - math.log(tiny_cfg.vocab_size)) < 0.1  # ~uniform at init
  np.testing.assert_allclose(float(loss_r), float(loss), rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-8),
               grads_r, _stack_blocks(grads, tiny_cfg.num_layers))


def test_gqa_attention_matches_repeated_kv_reference():
  rng = np.random.default_rng(5)
  b, t, n, k, d = 2, 6, 4, 2, 8
  q = rng.normal(size=(b, t, n, d)).astype(np.float32)
  kk = rng.normal(size=(b, t, k, d)).astype(np.float32)
  v = rng.normal(size=(b, t, k, d)).astype(np.float32)
  segments = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]], np.int32)
  out = np.asarray(xla_attention(q, kk, v, reference_mask(segments, segments)))

  ref = np.zeros_like(q)
  for bi in range(b):
    for h in range(n):
      kv = h // (n // k)  # query head h uses kv head h // G
      for i in range(t):
        allowed = [j for j in range(i + 1) if segments[bi, j] == segments[bi, i]]
        s = np.array([q[bi, i, h] @ kk[bi, j, kv] / math.sqrt(d) for j in allowed])
        p = np.exp(s - s.max())
        p /= p.sum()
        ref[bi, i, h] = sum(pj * v[bi, j, kv] for pj, j in zip(p, allowed))
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
  rng = np.random.default_rng(6)
  d = 16
  q = rng.normal(size=(1, 1, 1, d)).astype(np.float32)
  k = rng.normal(size=(1, 1, 1, d)).astype(np.float32)

  def score(m, n):
    cq, sq = rope_tables(jnp.array([[m]]), d, 10000.0)
    ck, sk = rope_tables(jnp.array([[n]]), d, 10000.0)
    return float(jnp.sum(apply_rope(q, cq, sq) * apply_rope(k, ck, sk)))

  assert score(7, 3) == pytest.approx(score(104, 100), abs=1e-4)
  assert score(3, 3) == pytest.approx(float(np.sum(q * k)), abs=1e-5)  # no rotation at 0 lag
  assert abs(score(7, 3) - score(9, 3)) > 1e-3  # a different lag gives a different score
  # Rotation preserves norms.
  c, s = rope_tables(jnp.array([[37]]), d, 10000.0)
  assert float(jnp.linalg.norm(apply_rope(q, c, s))) == pytest.approx(
      float(np.linalg.norm(q)), rel=1e-5)



def test_rope_matches_hugging_face_rotate_half_formula():
  # transformers' Llama: q * cos + rotate_half(q) * sin with cos/sin = cat(freqs, freqs) and
  # rotate_half(x) = cat(-x2, x1); written out here in numpy, independently of apply_rope.
  rng = np.random.default_rng(7)
  b, t, h, d, theta = 2, 5, 3, 8, 10000.0
  x = rng.normal(size=(b, t, h, d)).astype(np.float32)
  positions = rng.integers(0, 50, size=(b, t))
  inv_freq = 1.0 / theta ** (np.arange(0, d, 2) / d)
  freqs = positions[..., None] * inv_freq  # [B, T, D/2]
  emb = np.concatenate([freqs, freqs], -1)[:, :, None, :]
  rotate_half = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1)
  ref = x * np.cos(emb) + rotate_half * np.sin(emb)
  cos, sin = rope_tables(jnp.asarray(positions), d, theta)
  np.testing.assert_allclose(np.asarray(apply_rope(jnp.asarray(x), cos, sin)), ref,
                             rtol=1e-5, atol=1e-5)

@pytest.mark.parametrize("overrides", [
    {}, {"tie_embeddings": True}, {"scan_layers": True}, {"head_dim": 32, "num_kv_heads": 1},
    {"qkv_bias": True, "fuse_projections": True}, {"qk_norm": True, "scan_layers": True},
])
def test_num_params_matches_the_built_model(tiny_cfg, overrides):
  cfg = tiny_cfg.replace(**overrides)
  model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(params=0)))
  state = nnx.state(model)
  assert count_params(state) == cfg.num_params()
  embed = cfg.vocab_size * cfg.embed_dim
  assert cfg.num_params(include_embedding=False) == cfg.num_params() - embed
  assert ("lm_head" in _params(model)) == (not cfg.tie_embeddings)


def test_tied_embeddings_project_with_the_embedding_table(tiny_cfg):
  cfg = tiny_cfg.replace(tie_embeddings=True, num_layers=1)
  model = build_model(cfg, seed=1)
  h = jnp.asarray(np.random.default_rng(7).normal(size=(1, 3, cfg.embed_dim)), jnp.float32)
  np.testing.assert_allclose(np.asarray(model.logits(h)),
                             np.asarray(h) @ np.asarray(model.embedding[...]).T, atol=1e-5)


@pytest.mark.parametrize("field,value", [
    ("num_kv_heads", 3), ("num_heads", 6), ("attention_impl", "flash"),
    ("remat_policy", "some"), ("dtype", "float16"), ("embed_dim", 0), ("head_dim", 15),
])
def test_invalid_model_config_names_the_field(field, value):
  with pytest.raises(ValueError, match=f"ModelConfig.{field}"):
    ModelConfig.preset("tiny", **{field: value})


def test_unknown_fields_and_presets_are_rejected():
  with pytest.raises(ValueError, match="num_layer"):
    ModelConfig.from_dict({"num_layer": 2})
  with pytest.raises(ValueError, match="tinyy"):
    ModelConfig.preset("tinyy")
  with pytest.raises(ValueError, match="vocab_size"):
    Transformer(ModelConfig.preset("tiny", vocab_size=0), nnx.Rngs(params=0))
  cfg = ModelConfig.preset("tiny")
  assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("scan", [False, True])
def test_fused_layout_computes_the_same_function(tiny_cfg, scan):
  from model.layout import fuse_params, unfuse_params
  cfg = tiny_cfg.replace(scan_layers=scan)
  unfused_model = Transformer(cfg, nnx.Rngs(params=0))
  params = _params(unfused_model)
  fused_cfg = cfg.replace(fuse_projections=True)
  fused = nnx.eval_shape(lambda: Transformer(fused_cfg, nnx.Rngs(params=0)))
  fused_params = fuse_params(params, fused_cfg)
  assert jax.tree.map(lambda x: x.shape, fused_params) == \
      jax.tree.map(lambda x: x.shape, _params(fused))  # the fused model's own layout
  attn = fused_params["blocks"]["attn"] if scan else fused_params["blocks"][0]["attn"]
  assert "wqkv" in attn and "wq" not in attn
  tokens, positions, segments, _ = _packed_batch(cfg.vocab_size, seed=8)
  np.testing.assert_allclose(
      np.asarray(_forward(fused)(fused_params, tokens, positions, segments)),
      np.asarray(_forward(unfused_model)(params, tokens, positions, segments)),
      rtol=0, atol=1e-5)
  # And back: the round trip is exact.
  jax.tree.map(np.testing.assert_array_equal, unfuse_params(fused_params, fused_cfg), params)


def test_bfloat16_compute_stays_close_to_float32(tiny_cfg, tiny_fwd):
  fwd, params = tiny_fwd
  bf16 = nnx.eval_shape(lambda: Transformer(tiny_cfg.replace(dtype="bfloat16"),
                                            nnx.Rngs(params=0)))
  tokens, positions, segments, _ = _packed_batch(tiny_cfg.vocab_size, seed=9)
  ref = np.asarray(fwd(params, tokens, positions, segments))
  out = np.asarray(_forward(bf16)(params, tokens, positions, segments))
  assert out.dtype == np.float32  # logits are float32 whatever the compute dtype
  assert np.isfinite(out).all()
  scale = np.abs(ref).max()
  assert np.abs(out - ref).max() < 0.05 * scale  # bf16 has ~3 significant digits
  assert np.abs(out - ref).max() > 0  # and it really ran in bf16
