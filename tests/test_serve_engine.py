"""Tests for the continuous-batching engine (serve/engine.py, serve/engine_step.py).

Covers: greedy outputs equal model/sampling.py's offline Sampler (tokens and log-probs),
alone and with requests of mixed lengths joining mid-flight; a sampled request does not
depend on its batch mates and its log-probabilities are log softmax(logits / T) of a full
forward pass; stop ids, max_tokens, cancellation (running and queued), top log-probs;
compilation once per bucket; bad requests refused; drain / no-drain stop; a failed device
call ends its requests with "error" and the engine serves on; the per-row filters and
argmax against their references; the engine on an 8-device mesh equals one device.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import sharding as msharding
from model.sampling import Sampler, SamplingConfig, filter_logits
from model.transformer import build_model
from serve import engine_step
from serve.engine import Engine, Finished, GenerationParams, TokenEvent, buckets
from serve.engine_requests import key_data

PROMPTS = [[5, 6, 7], list(range(8, 18)), [20], list(range(30, 47)), [40, 41], [60] * 9]
GREEDY = GenerationParams(max_tokens=10, temperature=0.0, logprobs=True)
SAMPLED = GenerationParams(max_tokens=10, temperature=0.8, top_k=20, top_p=0.9, seed=7,
                           logprobs=True)
TIMEOUT = 120  # seconds: a hung scheduler fails the test instead of blocking the suite
# One engine shape for every test: the programs compile once (the session's persistent
# compilation cache serves the engines built after the first).
SHAPE = dict(slots=4, max_len=32, prompt_bucket=8, steps_per_sync=4)


@pytest.fixture(scope="module")
def tiny(tiny_cfg):
  model = build_model(tiny_cfg, seed=3)
  graphdef, state = nnx.split(model)
  return model, graphdef, nnx.to_pure_dict(state)


@pytest.fixture(scope="module")
def engine(tiny, tiny_cfg):
  """4 slots for 6 prompts: later requests join while others decode."""
  _, graphdef, params = tiny
  eng = Engine(graphdef, params, tiny_cfg, **SHAPE).start()
  yield eng
  eng.stop()


def _run(eng, prompts, params):
  handles = [eng.submit(p, params[i] if isinstance(params, list) else params)
             for i, p in enumerate(prompts)]
  return [h.result(timeout=TIMEOUT) for h in handles]


def _tokens(result):
  return [e.token for e in result[0]]


def test_greedy_equals_the_offline_sampler_alone_and_batched(engine, tiny, tiny_cfg):
  _, graphdef, params = tiny
  ref = Sampler(graphdef, tiny_cfg).generate(
      params, PROMPTS, SamplingConfig(max_new_tokens=10, temperature=0.0, prompt_bucket=8))
  together = _run(engine, PROMPTS, GREEDY)  # 6 requests, 4 slots
  alone = [_run(engine, [p], GREEDY)[0] for p in PROMPTS[:3]]
  for i, (events, fin) in enumerate(together):
    assert _tokens((events, fin)) == ref.response[i].tolist(), i
    np.testing.assert_allclose([e.logprob for e in events], ref.logprobs[i], atol=2e-5)
    assert fin == Finished("length", len(PROMPTS[i]), 10)
  for i, result in enumerate(alone):
    assert _tokens(result) == _tokens(together[i])
  # The same stream in batches: a list per wake-up, the Finished last.
  batches = list(engine.submit(PROMPTS[1], GREEDY).event_batches(timeout=TIMEOUT))
  flat = [e for batch in batches for e in batch]
  assert [e.token for e in flat[:-1]] == _tokens(together[1])
  assert flat[-1] == together[1][1] and len(batches) < len(flat)


def test_scanned_layers_engine_equals_the_offline_sampler(tiny_cfg):
  cfg = tiny_cfg.replace(scan_layers=True)  # the stacked [L, B, K, S, D] cache
  graphdef, state = nnx.split(build_model(cfg, seed=3))
  params = nnx.to_pure_dict(state)
  prompts = [[5, 6, 7], [20], list(range(8, 18))]
  ref = Sampler(graphdef, cfg).generate(
      params, prompts, SamplingConfig(max_new_tokens=6, temperature=0.0, prompt_bucket=8))
  eng = Engine(graphdef, params, cfg, slots=2, max_len=16, prompt_bucket=8,
               steps_per_sync=4).start()
  got = _run(eng, prompts, GenerationParams(max_tokens=6, temperature=0.0))
  eng.stop()
  assert [_tokens(r) for r in got] == ref.response.tolist()


def test_requests_joining_mid_flight_do_not_change_a_greedy_one(engine):
  first = engine.submit(PROMPTS[3], GenerationParams(max_tokens=14, temperature=0.0))
  events = first.events(timeout=TIMEOUT)
  head = [next(events).token for _ in range(3)]  # it is decoding now
  others = [engine.submit(p, SAMPLED if i % 2 else GREEDY) for i, p in enumerate(PROMPTS)]
  rest = [e.token for e in events if isinstance(e, TokenEvent)]
  for h in others:
    h.result(timeout=TIMEOUT)
  alone = _run(engine, [PROMPTS[3]], GenerationParams(max_tokens=14, temperature=0.0))[0]
  assert head + rest == _tokens(alone)


def test_sampled_requests_are_their_own_and_logprobs_are_the_models(engine, tiny):
  model = tiny[0]
  mates = [GREEDY, GenerationParams(max_tokens=10, temperature=1.0, seed=1)] * 2
  alone = _run(engine, [PROMPTS[1]], SAMPLED)[0]
  batched = _run(engine, [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[4]],
                 [mates[0], SAMPLED, mates[1], mates[2]])[1]
  assert _tokens(alone) == _tokens(batched)
  np.testing.assert_allclose([e.logprob for e in alone[0]], [e.logprob for e in batched[0]],
                             atol=1e-6)
  other_seed = _run(engine, [PROMPTS[1]], GenerationParams(
      max_tokens=10, temperature=0.8, top_k=20, top_p=0.9, seed=8))[0]
  assert _tokens(other_seed) != _tokens(alone)
  # log softmax(logits / T) of each drawn token, from one forward pass over the sequence.
  prompt, out = PROMPTS[1], _tokens(alone)
  seq = jnp.asarray([prompt + out])
  logits = model(seq)[0, len(prompt) - 1:-1] / SAMPLED.temperature
  want = jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(out)[:, None], -1)[:, 0]
  np.testing.assert_allclose([e.logprob for e in alone[0]], want, atol=2e-5)


def test_stop_ids_max_tokens_and_top_logprobs(engine):
  greedy = _tokens(_run(engine, [PROMPTS[1]], GREEDY)[0])
  stop = greedy[2]
  first_hit = greedy.index(stop)
  events, fin = _run(engine, [PROMPTS[1]], GenerationParams(
      max_tokens=10, temperature=0.0, stop_ids=(999, stop)))[0]
  assert [e.token for e in events] == greedy[:first_hit + 1]
  assert fin.reason == "stop" and fin.completion_tokens == first_hit + 1
  assert all(e.logprob is None and e.top_logprobs is None for e in events)
  events, fin = _run(engine, [PROMPTS[1]], GenerationParams(max_tokens=1, temperature=0.0))[0]
  assert len(events) == 1 and fin.reason == "length"
  events, _ = _run(engine, [PROMPTS[1]], GenerationParams(max_tokens=4, temperature=0.0,
                                                          top_logprobs=5))[0]
  for e in events:
    ids, values = zip(*e.top_logprobs)
    assert len(ids) == 5 and list(values) == sorted(values, reverse=True)
    assert ids[0] == e.token and values[0] == pytest.approx(e.logprob, abs=1e-6)


def test_cancel_frees_the_slot_and_skips_queued_requests(engine):
  long = GenerationParams(max_tokens=25, temperature=0.0)
  running = [engine.submit([1, 2, i], long) for i in range(4)]  # all 4 slots
  queued = engine.submit([4, 5], long)
  queued.cancel()
  events = running[0].events(timeout=TIMEOUT)
  next(events)
  running[0].cancel()
  rest = list(events)
  assert rest[-1].reason == "cancelled" and rest[-1].completion_tokens < 25
  assert queued.result(timeout=TIMEOUT)[1] == Finished("cancelled", 2, 0)
  for h in running[1:]:
    assert h.result(timeout=TIMEOUT)[1].reason == "length"
  assert engine.slots_in_use == 0 and engine.queue_depth == 0


def test_compiled_once_per_bucket(tiny, tiny_cfg):
  _, graphdef, params = tiny
  eng = Engine(graphdef, params, tiny_cfg, **SHAPE)
  assert eng.prompt_buckets == [8, 16, 32] and eng.cache_buckets == [8, 16, 24, 32]
  # 1 or 4 (= slots) prompts per prefill call, at most 32 prompt tokens per call.
  assert eng.prefill_shapes == [(1, 8), (4, 8), (1, 16), (1, 32)]
  eng.warmup()
  assert eng.compilations() == {"prefill": 4, "decode": 4}
  eng.start()
  mix = [GREEDY, SAMPLED, GenerationParams(max_tokens=5, temperature=1.5, top_p=0.5,
                                           top_logprobs=3, stop_ids=(1, 2, 3))]
  _run(eng, [[1], list(range(9)), list(range(17))] * 2, mix * 2)
  assert eng.compilations() == {"prefill": 4, "decode": 4}
  eng.stop()


def test_bad_requests_are_refused(engine, tiny_cfg):
  with pytest.raises(ValueError, match="empty"):
    engine.submit([], GREEDY)
  with pytest.raises(ValueError, match="exceeds the context of 32"):
    engine.submit(list(range(23)), GREEDY)
  with pytest.raises(ValueError, match="0..127"):
    engine.submit([tiny_cfg.vocab_size], GREEDY)
  for bad in [dict(max_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-1),
              dict(top_logprobs=21), dict(stop_ids=tuple(range(17)))]:
    with pytest.raises(ValueError):
      GenerationParams(**bad)


def test_stop_drains_or_cancels_and_reports_steps(tiny, tiny_cfg):
  _, graphdef, params = tiny
  seen = []
  eng = Engine(graphdef, params, tiny_cfg, **SHAPE,
               on_step=lambda n, s: seen.append(n)).start()
  handles = [eng.submit(p, GREEDY) for p in PROMPTS]
  eng.stop(drain=True)
  assert all(h.done and h.result()[1].reason == "length" for h in handles)
  assert sum(seen) == 10 * len(PROMPTS)
  with pytest.raises(RuntimeError, match="stopping"):
    eng.submit([1], GREEDY)
  eng = Engine(graphdef, params, tiny_cfg, **SHAPE).start()
  handles = [eng.submit(p, GenerationParams(max_tokens=15, temperature=0.0))
             for p in PROMPTS * 3]
  next(handles[0].events(timeout=TIMEOUT))  # decoding
  eng.stop(drain=False)
  reasons = [h.result(timeout=TIMEOUT)[1].reason for h in handles]
  assert reasons[-1] == "cancelled" and set(reasons) <= {"cancelled", "length"}


def test_a_failed_device_call_ends_its_requests_and_the_engine_serves_on(engine):
  before = _tokens(_run(engine, [PROMPTS[0]], GREEDY)[0])
  programs = engine._programs  # pylint: disable=protected-access
  decode, calls = programs.decode, []

  def failing(*args, **kwargs):
    if not calls:
      calls.append(1)
      raise RuntimeError("device lost")
    return decode(*args, **kwargs)

  programs.decode = failing
  try:
    failed = _run(engine, PROMPTS[:2], GREEDY)
  finally:
    programs.decode = decode
  assert [fin.reason for _, fin in failed] == ["error", "error"]
  assert "device lost" in failed[0][1].error
  assert _tokens(_run(engine, [PROMPTS[0]], GREEDY)[0]) == before  # a fresh cache


def test_row_filters_and_argmax_match_their_references():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(4, 300)) * 3, jnp.float32)
  params = [(0, 1.0), (5, 1.0), (0, 0.6), (7, 0.3)]
  got = engine_step.filter_rows(logits, jnp.asarray([k for k, _ in params]),
                                jnp.asarray([p for _, p in params], jnp.float32))
  for row, (k, p) in enumerate(params):
    want = filter_logits(logits[row:row + 1], k, p)[0]
    np.testing.assert_array_equal(np.isfinite(got[row]), np.isfinite(want))
  for v in (7, 300, 8192):
    x = jnp.asarray(rng.integers(0, 5, size=(3, v)), jnp.float32)  # many ties
    np.testing.assert_array_equal(engine_step.argmax(x), jnp.argmax(x, -1))
  assert buckets(16, 512, fine=True) == [16, 32, 48, 64, 96, 128, 192, 256, 384, 512]
  # Seeds are 64-bit: jax.random.key(seed) for 32-bit seeds, distinct keys beyond.
  np.testing.assert_array_equal(key_data(7), jax.random.key_data(jax.random.key(7)))
  assert key_data(5).tolist() != key_data(2**32 + 5).tolist()


def test_sharded_engine_matches_one_device(engine, tiny, tiny_cfg):
  from train.state import abstract_model, mesh_shardings
  mesh = msharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  _, graphdef, params = tiny
  _, _, logical = abstract_model(lambda c, r: build_model(c, seed=3), tiny_cfg)
  shardings = mesh_shardings(logical, mesh, msharding.DEFAULT_RULES)
  prompts, mix = [[5, 6, 7], [20], [40, 41], [60] * 5, [9, 8]], [GREEDY, SAMPLED] * 3
  ref = _run(engine, prompts, mix)  # short prompts: few buckets to compile on the mesh
  sharded = Engine(graphdef, jax.device_put(params, shardings), tiny_cfg, mesh=mesh,
                   rules=msharding.DEFAULT_RULES, param_shardings=shardings, **SHAPE).start()
  got = _run(sharded, prompts, mix)
  sharded.stop()
  for (ref_events, ref_fin), (events, fin) in zip(ref, got):
    assert [e.token for e in events] == [e.token for e in ref_events]
    np.testing.assert_allclose([e.logprob for e in events], [e.logprob for e in ref_events],
                               atol=2e-5)
    assert fin == ref_fin
  cache = sharded._programs.cache  # pylint: disable=protected-access
  assert cache.k[0].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), "tensor",
                                                                None, None)
