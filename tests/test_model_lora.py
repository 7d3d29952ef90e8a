"""Tests for model/lora.py: a fresh adapter (B = 0) changes nothing, the adapted forward
equals the closed form x W + (alpha / r) x A B and the merged plain model, in every
projection / layer layout and on every path (logits, hidden states for heads, cached
decoding), and bad targets are refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import lora
from model.config import ModelConfig
from model.heads import RewardModel
from model.transformer import Transformer, init_cache

LAYOUTS = [(False, False), (False, True), (True, False), (True, True)]


def _random_adapters(params, seed=1):
  """Adapter leaves replaced by random values (B = 0 would hide every mistake)."""
  key = jax.random.key(seed)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  leaves = []
  for i, (path, x) in enumerate(flat):
    keys = [getattr(k, "key", k) for k in path]
    leaves.append(0.2 * jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
                  if lora.is_adapter_path(keys) else x)
  return jax.tree_util.tree_unflatten(treedef, leaves)


def _model(cfg, params):
  return nnx.merge(nnx.split(Transformer(cfg, nnx.Rngs(params=0)))[0], params)


@pytest.mark.parametrize("scan,fuse", LAYOUTS)
def test_fresh_adapters_change_nothing_and_merge_equals_the_adapted_model(scan, fuse):
  cfg = ModelConfig.preset("tiny", scan_layers=scan, fuse_projections=fuse, lora_rank=4,
                           lora_alpha=8.0)
  params = nnx.to_pure_dict(nnx.state(Transformer(cfg, nnx.Rngs(params=0))))
  plain_cfg = cfg.replace(lora_rank=0)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 12)), jnp.int32)
  base = _model(plain_cfg, lora.base_params(params))(tokens)
  np.testing.assert_array_equal(_model(cfg, params)(tokens), base)
  adapted_params = _random_adapters(params)
  adapted = _model(cfg, adapted_params)(tokens)
  assert float(jnp.abs(adapted - base).max()) > 1e-2  # the adapters do something
  merged = lora.merge(adapted_params, cfg)
  assert not lora.adapter_params(merged)
  np.testing.assert_allclose(_model(plain_cfg, merged)(tokens), adapted, atol=2e-5)


def test_adapted_projection_is_the_closed_form():
  """One layer's query projection: wq' = wq + (alpha / r) A B, written out with numpy."""
  cfg = ModelConfig.preset("tiny", lora_rank=2, lora_alpha=6.0, lora_targets="q")
  params = _random_adapters(nnx.to_pure_dict(nnx.state(Transformer(cfg, nnx.Rngs(params=0)))))
  merged = lora.merge(params, cfg)
  attn = jax.device_get(params["blocks"][0]["attn"])
  a, b = np.asarray(attn["lora_q"]["a"], np.float64), np.asarray(attn["lora_q"]["b"], np.float64)
  want = np.asarray(attn["wq"], np.float64) + 3.0 * np.einsum("er,rnd->end", a, b)
  np.testing.assert_allclose(merged["blocks"][0]["attn"]["wq"], want, rtol=1e-5, atol=1e-6)
  assert set(attn) == {"wq", "wk", "wv", "wo", "lora_q"}  # only the requested target
  np.testing.assert_array_equal(merged["blocks"][0]["attn"]["wk"], attn["wk"])


@pytest.mark.parametrize("scan", [False, True])
def test_adapters_apply_on_the_heads_and_the_decoding_paths(scan):
  cfg = ModelConfig.preset("tiny", scan_layers=scan, lora_rank=4)
  plain_cfg = cfg.replace(lora_rank=0)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 128, (2, 10)), jnp.int32)
  # Reward/value model: scores of the adapted model == scores of the merged one.
  rm = RewardModel(cfg, nnx.Rngs(params=0))
  graphdef, state = nnx.split(rm)
  params = _random_adapters(nnx.to_pure_dict(state))
  merged_rm = nnx.merge(nnx.split(RewardModel(plain_cfg, nnx.Rngs(params=0)))[0],
                        lora.merge(params, cfg))
  np.testing.assert_allclose(nnx.merge(graphdef, params).values(tokens),
                             merged_rm.values(tokens), atol=2e-5)
  # Cached decoding (prefill of the whole row) == the merged model's logits.
  lm = Transformer(cfg, nnx.Rngs(params=0))
  graphdef, state = nnx.split(lm)
  params = _random_adapters(nnx.to_pure_dict(state))
  model = nnx.merge(graphdef, params)
  seg = jnp.ones_like(tokens)
  h, _ = model.hidden(tokens, None, seg, cache=init_cache(cfg, 2, 16), cache_index=0,
                      kv_segment_ids=jnp.pad(seg, ((0, 0), (0, 6))))
  want = _model(plain_cfg, lora.merge(params, cfg))(tokens)
  np.testing.assert_allclose(model.logits(h), want, atol=2e-5)


def test_partition_combine_zero_adapters_and_targets():
  cfg = ModelConfig.preset("tiny", lora_rank=4)
  rm = nnx.to_pure_dict(nnx.state(RewardModel(cfg, nnx.Rngs(params=0))))
  trained, frozen = lora.partition(rm)
  assert set(trained) == {"trunk", "head"} and "head" not in frozen
  assert all(k.startswith("lora_") for k in trained["trunk"]["blocks"][0]["attn"])
  assert jax.tree.structure(lora.combine(trained, frozen)) == jax.tree.structure(rm)
  noisy = _random_adapters(rm)
  zeroed = lora.zero_adapters(noisy)
  np.testing.assert_array_equal(zeroed["trunk"]["embedding"], rm["trunk"]["embedding"])
  np.testing.assert_array_equal(zeroed["trunk"]["blocks"][0]["mlp"]["lora_up"]["a"],
                                noisy["trunk"]["blocks"][0]["mlp"]["lora_up"]["a"])
  assert float(jnp.abs(zeroed["trunk"]["blocks"][0]["mlp"]["lora_up"]["b"]).max()) == 0
  assert lora.parse_targets("attn") == ("q", "k", "v", "o")
  assert lora.parse_targets(["down", "q", "mlp"]) == ("q", "gate", "up", "down")
  with pytest.raises(ValueError, match="unknown target 'qkv'"):
    lora.parse_targets("qkv")
  with pytest.raises(ValueError, match="lora_targets"):
    ModelConfig.preset("tiny", lora_rank=4, lora_targets="")


def test_export_merge_hook_merges_or_refuses():
  from train.hf_export import merged_model
  cfg = ModelConfig.preset("tiny", lora_rank=4)
  params = _random_adapters(nnx.to_pure_dict(nnx.state(Transformer(cfg, nnx.Rngs(params=0)))))
  with pytest.raises(ValueError, match="export with --merge"):
    merged_model(cfg, params, False, "ckpt/3")
  plain_cfg, merged = merged_model(cfg, params, True, "ckpt/3")
  assert plain_cfg.lora_rank == 0 and not lora.adapter_params(merged)
  tokens = jnp.arange(8)[None]
  np.testing.assert_allclose(_model(plain_cfg, merged)(tokens), _model(cfg, params)(tokens),
                             atol=2e-5)
