"""Tests for the KV cache (model/transformer.py) and the sampler (model/sampling.py).

Covers: cached decoding gives the logits of a full recomputation (prompts of different
lengths, list and scanned layers; rows at their own cache index, as continuous batching
decodes); the sampler's log-probabilities equal the trainer's
(`train.losses.token_log_probs` on a full forward pass); greedy determinism, temperature ->
0 and top-k = 1 match greedy, seeds reproduce; EOS stops a sequence; top-k / top-p filters
against numpy; bad prompts are refused; the sampler on an 8-device mesh matches one device.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import sharding as msharding
from model.sampling import (Sampler, SamplingConfig, filter_logits, pad_prompts,
                            token_logprobs)
from model.transformer import build_model, init_cache
from train.losses import token_log_probs

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17], [20]]


def _model(cfg, **overrides):
  model = build_model(cfg.replace(**overrides), seed=3)
  graphdef, state = nnx.split(model)
  return model, graphdef, nnx.to_pure_dict(state)


@pytest.mark.parametrize("overrides", [{}, {"scan_layers": True},
                                       {"fuse_projections": True, "tie_embeddings": True},
                                       {"sliding_window": 3}])  # Mistral's window
def test_cached_decoding_matches_full_recomputation(tiny_cfg, overrides):
  model, _, _ = _model(tiny_cfg, **overrides)
  cfg = SamplingConfig(max_new_tokens=6, prompt_bucket=4)
  prompt_tokens, lengths = pad_prompts(PROMPTS, cfg, tiny_cfg.max_seq_len)
  b, p = prompt_tokens.shape
  n = cfg.max_new_tokens
  forced = np.random.default_rng(0).integers(4, tiny_cfg.vocab_size, (b, n)).astype(np.int32)
  # Full forward of prompt + forced continuation, in the sampler's layout.
  slots = np.arange(p)
  real = slots[None] >= (p - lengths)[:, None]
  positions = np.where(real, slots[None] - (p - lengths)[:, None], 0)
  full_tokens = np.concatenate([prompt_tokens, forced], 1)
  full_pos = np.concatenate([positions, lengths[:, None] + np.arange(n)[None]], 1)
  full_seg = np.concatenate([real.astype(np.int32), np.ones((b, n), np.int32)], 1)
  ref = np.asarray(model(jnp.asarray(full_tokens), jnp.asarray(full_pos),
                         jnp.asarray(full_seg)))  # [B, P + N, V]
  # Cached: prefill, then one token at a time.
  kv_seg = np.concatenate([real.astype(np.int32), np.zeros((b, n), np.int32)], 1)
  cache = init_cache(model.cfg, b, p + n)
  h, cache = model.hidden(jnp.asarray(prompt_tokens), jnp.asarray(positions),
                          jnp.asarray(real.astype(np.int32)), cache=cache, cache_index=0,
                          kv_segment_ids=jnp.asarray(kv_seg))
  got = [np.asarray(model.logits(h))]
  for i in range(n - 1):
    kv_seg[:, p + i] = 1
    h, cache = model.hidden(jnp.asarray(forced[:, i:i + 1]),
                            jnp.asarray(lengths[:, None] + i), jnp.ones((b, 1), jnp.int32),
                            cache=cache, cache_index=p + i, kv_segment_ids=jnp.asarray(kv_seg))
    got.append(np.asarray(model.logits(h)))
  got = np.concatenate(got, 1)  # logits at slots 0 .. P + N - 2
  keep = full_seg[:, :p + n - 1] > 0  # padding slots compute nothing meaningful
  np.testing.assert_allclose(got[keep], ref[:, :p + n - 1][keep], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_per_row_cache_index_matches_full_recomputation(tiny_cfg, scan_layers):
  # Continuous batching (serve/engine.py): each row at its own length, right-padded.
  model, _, _ = _model(tiny_cfg, scan_layers=scan_layers)
  prompts = [[5, 6, 7], list(range(8, 18))]
  p = 12
  tokens = np.zeros((2, p), np.int32)
  for row, x in enumerate(prompts):
    tokens[row, :len(x)] = x
  ones = jnp.ones((2, p), jnp.int32)
  _, cache = model.hidden(jnp.asarray(tokens), jnp.broadcast_to(jnp.arange(p), (2, p)), ones,
                          cache=init_cache(model.cfg, 2, p + 4), cache_index=0,
                          kv_segment_ids=jnp.ones((2, p + 4), jnp.int32))
  lengths = np.array([len(x) for x in prompts], np.int32)
  nxt = np.array([[40], [41]], np.int32)  # one more token per row, at its own slot
  h, _ = model.hidden(jnp.asarray(nxt), jnp.asarray(lengths[:, None]),
                      jnp.ones((2, 1), jnp.int32), cache=cache, cache_index=jnp.asarray(lengths),
                      kv_segment_ids=jnp.ones((2, p + 4), jnp.int32))
  got = np.asarray(model.logits(h))[:, 0]
  for row, x in enumerate(prompts):
    ref = np.asarray(model(jnp.asarray([x + [int(nxt[row, 0])]])))[0, -1]
    np.testing.assert_allclose(got[row], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 20, 0.9),
                                                     (0.0, 0, 1.0)])
def test_sampler_logprobs_equal_the_trainers(tiny_cfg, temperature, top_k, top_p):
  model, graphdef, params = _model(tiny_cfg)
  cfg = SamplingConfig(max_new_tokens=10, temperature=temperature, top_k=top_k, top_p=top_p,
                       eos_ids=(3,), prompt_bucket=8)
  out = Sampler(graphdef, tiny_cfg).generate(params, PROMPTS, cfg, seed=4)
  n = out.response.shape[1]
  logits = model(jnp.asarray(out.tokens), jnp.asarray(out.positions),
                 jnp.asarray(out.segment_ids))[:, -n - 1:-1]
  ref = np.asarray(token_log_probs(logits / (temperature or 1.0), jnp.asarray(out.response)))
  mask = out.response_mask > 0
  assert mask.sum() > len(PROMPTS)  # several tokens were generated
  np.testing.assert_allclose(out.logprobs[mask], ref[mask], rtol=0, atol=2e-5)
  assert np.all(out.logprobs[~mask] == 0)
  np.testing.assert_allclose(np.asarray(token_logprobs(model, out, temperature)),
                             out.logprobs, atol=2e-5)


def test_greedy_temperature_to_zero_and_top_k_one_agree_and_seeds_reproduce(tiny_cfg):
  _, graphdef, params = _model(tiny_cfg)
  sampler = Sampler(graphdef, tiny_cfg)

  def run(seed, **kw):
    return sampler.generate(params, PROMPTS, SamplingConfig(max_new_tokens=8, **kw),
                            seed=seed).response

  greedy = run(0, temperature=0.0)
  np.testing.assert_array_equal(greedy, run(1, temperature=0.0))  # deterministic
  np.testing.assert_array_equal(greedy, run(2, temperature=1e-4))
  np.testing.assert_array_equal(greedy, run(3, temperature=1.0, top_k=1))
  sampled = run(5, temperature=1.0)
  np.testing.assert_array_equal(sampled, run(5, temperature=1.0))  # same seed
  assert not np.array_equal(sampled, run(6, temperature=1.0))  # another seed
  assert not np.array_equal(sampled, greedy)


def test_eos_stops_each_sequence_on_its_own(tiny_cfg):
  _, graphdef, params = _model(tiny_cfg)
  sampler = Sampler(graphdef, tiny_cfg)
  greedy = sampler.generate(params, PROMPTS, SamplingConfig(max_new_tokens=8,
                                                            temperature=0.0)).response
  eos = int(greedy[0, 2])  # make row 0's third token its end
  out = sampler.generate(params, PROMPTS, SamplingConfig(max_new_tokens=8, temperature=0.0,
                                                         eos_ids=(eos,), pad_id=0))
  for row in range(len(PROMPTS)):
    hits = np.flatnonzero(greedy[row] == eos)
    stop = hits[0] + 1 if hits.size else 8
    np.testing.assert_array_equal(out.response[row, :stop], greedy[row, :stop])
    assert out.response_mask[row].tolist() == [1] * stop + [0] * (8 - stop)
    assert np.all(out.response[row, stop:] == 0)
    assert out.finished[row] == bool(hits.size)
  assert out.response_mask[0].sum() == 3


def test_filters_keep_the_top_k_and_the_nucleus():
  logits = jnp.log(jnp.array([[0.05, 0.4, 0.1, 0.3, 0.15]]))
  top2 = np.isfinite(np.asarray(filter_logits(logits, 2, 1.0)))
  assert top2.tolist() == [[False, True, False, True, False]]
  # Sorted: 0.4, 0.3, 0.15, 0.1, 0.05; mass before each: 0, .4, .7, .85, .95.
  nucleus = np.isfinite(np.asarray(filter_logits(logits, 0, 0.75)))
  assert nucleus.tolist() == [[False, True, False, True, True]]
  assert np.isfinite(np.asarray(filter_logits(logits, 0, 1e-3))).sum() == 1


def test_bad_prompts_are_refused(tiny_cfg):
  cfg = SamplingConfig(max_new_tokens=8)
  with pytest.raises(ValueError, match=r"Prompt 1 has 60 tokens.*exceeds the model context "
                                       r"of 64"):
    pad_prompts([[1, 2], list(range(60))], cfg, 64)
  with pytest.raises(ValueError, match="Prompt 0 is empty"):
    pad_prompts([[]], cfg, 64)
  with pytest.raises(ValueError, match="top_p"):
    SamplingConfig(top_p=0.0)


def test_sharded_sampler_matches_one_device(tiny_cfg):
  from train.state import abstract_model, mesh_shardings
  mesh = msharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rules = msharding.DEFAULT_RULES
  _, graphdef, params = _model(tiny_cfg)
  _, _, logical = abstract_model(lambda c, r: build_model(c, seed=3), tiny_cfg)
  shardings = mesh_shardings(logical, mesh, rules)
  sharded_params = jax.device_put(params, shardings)
  prompts = PROMPTS + [[30, 31], [40, 41, 42, 43]] * 2 + [[50]]  # 8 rows: 4 per data shard
  cfg = SamplingConfig(max_new_tokens=6, temperature=0.8, top_k=30, prompt_bucket=8)
  ref = Sampler(graphdef, tiny_cfg).generate(params, prompts, cfg, seed=9)
  got = Sampler(graphdef, tiny_cfg, mesh, rules, shardings).generate(sharded_params, prompts,
                                                                     cfg, seed=9)
  np.testing.assert_array_equal(got.response, ref.response)
  np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=2e-5)
  leaf = sharded_params["blocks"][0]["mlp"]["w_gate"]
  assert leaf.sharding.spec == shardings["blocks"][0]["mlp"]["w_gate"].spec


def test_uncached_generation_gives_the_same_tokens_and_logprobs(tiny_cfg):
  _, graphdef, params = _model(tiny_cfg)
  sampler = Sampler(graphdef, tiny_cfg)
  cfg = SamplingConfig(max_new_tokens=6, temperature=0.9, top_p=0.95, eos_ids=(3,))
  cached = sampler.generate(params, PROMPTS, cfg, seed=2)
  uncached = sampler.generate(params, PROMPTS, dataclasses.replace(cfg, use_cache=False),
                              seed=2)
  np.testing.assert_array_equal(uncached.response, cached.response)
  np.testing.assert_array_equal(uncached.response_mask, cached.response_mask)
  np.testing.assert_allclose(uncached.logprobs, cached.logprobs, atol=2e-5)
