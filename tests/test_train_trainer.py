"""Tests for train/trainer.py, train/state.py and train/loop.py in-process, on 8 fake CPU devices.

Covers: parameters and Adam moments sharded as the logical rules declare; the sharded step
(data=2, fsdp=2, tensor=2) agreeing with a single-device Trainer and with a plain
`jax.value_and_grad` reference; gradient accumulation; clear errors for bad batch / mesh
sizes; a non-finite loss stopping the run without saving that state.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from conftest import random_lm_batch, tiny_run_config
from train.checkpoint import Checkpointer
from train.loop import NonFiniteError
from train.losses import lm_loss, token_log_probs
from train.trainer import Trainer

BATCH, SEQ = 8, 16


def _trainer(tmp_path, model_cfg, mesh, devices=None, loss_fn=lm_loss, name="run",
             flatten_update=False, **train):
  config = tiny_run_config(batch_size=BATCH, **train)
  config.optim.warmup_steps = 0  # the first step already moves the parameters
  config.optim.flatten_update = flatten_update
  config.mesh.shape.update(dict(zip(("data", "fsdp", "tensor"), mesh)))
  return Trainer(config, str(tmp_path / name), model_cfg, loss_fn, devices=devices)


def _host(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def _adam_state(opt_state):
  """The ScaleByAdamState inside chain(clip_by_global_norm, adamw)."""
  return opt_state[1][0]


def _flat_adam_mu(opt_state, like):
  """The first moment of the flattened update (one vector), unravelled into `like`'s tree."""
  from jax.flatten_util import ravel_pytree
  _, unravel = ravel_pytree(like)
  return unravel(jnp.asarray(opt_state[0][1].mu))


def _assert_adam_params_close(params, want, mu, atol=1e-5):
  """Compares parameters after one Adam step, leaving out near-zero gradients.

  The first Adam update is lr * g / (|g| + eps): for |g| within ~10 eps of 0 it amplifies
  last-bit differences of g (legitimately different reduction orders) into up to lr; the
  rest is compared to 1% of lr (1e-3).
  """
  def check(a, b, m):
    keep = np.abs(np.asarray(m)) > 1e-8  # mu = (1 - b1) * g
    np.testing.assert_allclose(np.asarray(a)[keep], np.asarray(b)[keep], rtol=0, atol=atol)
  jax.tree.map(check, params, want, mu)


@pytest.fixture(scope="module")
def batch(tiny_cfg):
  return random_lm_batch(np.random.default_rng(0), BATCH, SEQ, tiny_cfg.vocab_size)


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory, tiny_cfg, batch):
  """Trainer on all 8 devices with mesh data=2, fsdp=2, tensor=2: init state and one step."""
  trainer = _trainer(tmp_path_factory.mktemp("sharded"), tiny_cfg, (2, 2, 2))
  state = trainer.init_state()
  init = _host(state)  # the step donates `state`
  with trainer.mesh_context():
    new_state, metrics = trainer.step(state, trainer.to_global(batch))
    jax.block_until_ready(new_state)
  return trainer, init, new_state, _host(metrics)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, tiny_cfg, batch):
  """The same on one device (mesh 1x1x1 over jax.devices()[:1])."""
  trainer = _trainer(tmp_path_factory.mktemp("single"), tiny_cfg, (1, 1, 1),
                     devices=jax.devices()[:1])
  state = trainer.init_state()
  init = _host(state)
  with trainer.mesh_context():
    new_state, metrics = trainer.step(state, trainer.to_global(batch))
    jax.block_until_ready(new_state)
  return trainer, init, _host(new_state), _host(metrics)


def test_params_and_adam_moments_are_sharded_by_the_rules(sharded_run):
  trainer, _, state, _ = sharded_run
  adam = _adam_state(state.opt_state)
  # (logical axes) -> mesh spec, and the per-device shard shape, for a few parameters.
  expected = {
      ("blocks", 0, "attn", "wq"): (P("fsdp", "tensor", None), (32, 2, 16)),  # embed,heads,hd
      ("blocks", 1, "attn", "wk"): (P("fsdp", "tensor", None), (32, 1, 16)),  # kv_heads
      ("blocks", 0, "attn", "wo"): (P("tensor", None, "fsdp"), (2, 16, 32)),
      ("blocks", 1, "mlp", "w_down"): (P("tensor", "fsdp"), (64, 32)),       # mlp, embed
      ("blocks", 0, "attn_norm", "scale"): (P("fsdp"), (32,)),
      ("embedding",): (P("tensor", "fsdp"), (64, 32)),                       # vocab, embed
      ("lm_head",): (P("fsdp", "tensor"), (32, 64)),
  }
  for path, (spec, shard_shape) in expected.items():
    for tree in (state.params, adam.mu, adam.nu):
      leaf = tree
      for key in path:
        leaf = leaf[key]
      assert leaf.sharding.spec == spec, path
      assert leaf.sharding.mesh.shape == {"data": 2, "fsdp": 2, "tensor": 2}
      assert {s.data.shape for s in leaf.addressable_shards} == {shard_shape}, path
      assert len(leaf.addressable_shards) == 8
  assert adam.count.sharding.spec == P()
  assert state.step.sharding.spec == P()


def test_scan_layout_shards_with_a_replicated_layers_axis(tmp_path, tiny_cfg):
  trainer = _trainer(tmp_path, tiny_cfg.replace(scan_layers=True), (2, 2, 2))
  specs = jax.tree.map(lambda s: s.spec, trainer.state_shardings.params)
  assert specs["blocks"]["attn"]["wq"] == P(None, "fsdp", "tensor", None)
  assert specs["blocks"]["mlp_norm"]["scale"] == P(None, "fsdp")
  mu = _adam_state(trainer.abstract_state.opt_state).mu
  assert mu["blocks"]["mlp"]["w_gate"].sharding.spec == P(None, "fsdp", "tensor")


def test_sharded_init_equals_single_device_init(sharded_run, single_run):
  jax.tree.map(np.testing.assert_array_equal, sharded_run[1].params, single_run[1].params)


def test_sharded_step_matches_single_device_step(sharded_run, single_run):
  _, _, sharded_state, sharded_metrics = sharded_run
  _, _, single_state, single_metrics = single_run
  for name in ("train/loss", "train/grad_norm", "train/accuracy", "train/lr"):
    np.testing.assert_allclose(sharded_metrics[name], single_metrics[name], rtol=1e-5,
                               err_msg=name)
  # After one Adam step, mu = (1 - b1) * clipped gradient: this compares gradients.
  sharded = _host(_adam_state(sharded_state.opt_state).mu)
  single = _adam_state(single_state.opt_state).mu
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-9),
               sharded, single)
  _assert_adam_params_close(_host(sharded_state.params), single_state.params, single)


def test_step_matches_a_plain_value_and_grad_reference(single_run, batch):
  trainer, init, state, metrics = single_run
  graphdef = trainer.graphdef

  def loss(params):
    return lm_loss(nnx.merge(graphdef, params), batch, None)[0]

  ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss))(init.params)
  norm = float(jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(ref_grads))))
  assert metrics["train/loss"] == pytest.approx(float(ref_loss), rel=1e-5)
  assert metrics["train/grad_norm"] == pytest.approx(norm, rel=1e-4)
  clip = min(1.0, trainer.config.optim.grad_clip / norm)
  b1 = trainer.config.optim.b1
  jax.tree.map(lambda m, g: np.testing.assert_allclose(m, (1 - b1) * clip * np.asarray(g),
                                                       rtol=1e-4, atol=1e-9),
               _adam_state(state.opt_state).mu, ref_grads)
  assert int(state.step) == 1
  # AdamW's first step in closed form: bias-corrected moments are g and g^2, so the update is
  # lr * (g / (|g| + eps) + wd * p), with weight decay on matrices only (not norm scales).
  opt = trainer.config.optim
  assert metrics["train/lr"] == pytest.approx(opt.lr)

  def expected(path, p, g):
    g = clip * np.asarray(g, np.float64)
    decay = opt.weight_decay if p.ndim >= 2 else 0.0
    return p - opt.lr * (g / (np.abs(g) + opt.eps) + decay * p)

  want = jax.tree_util.tree_map_with_path(expected, init.params, ref_grads)
  _assert_adam_params_close(state.params, want, _adam_state(state.opt_state).mu)


def test_flattened_update_is_refused_on_a_sharded_mesh(tmp_path, tiny_cfg):
  with pytest.raises(ValueError, match="flatten_update"):
    _trainer(tmp_path, tiny_cfg, (1, 2, 1), devices=jax.devices()[:2], flatten_update=True)


def test_evaluate_is_the_exact_token_mean_over_all_batches(single_run, tiny_cfg):
  trainer, init, _, _ = single_run
  rng = np.random.default_rng(3)
  batches = [random_lm_batch(rng, BATCH, SEQ, tiny_cfg.vocab_size) for _ in range(2)]
  batches[1]["loss_mask"][:, SEQ // 4:] = 0.0  # e.g. padding rows of the last eval batch
  batches[1]["loss_mask"][0] = 0.0
  metrics = trainer.evaluate(init.params, batches)

  graphdef = trainer.graphdef
  per_token = jax.jit(lambda p, b: -token_log_probs(
      nnx.merge(graphdef, p)(b["tokens"], b["positions"], b["segment_ids"]), b["targets"]))
  nll = np.concatenate([np.asarray(per_token(init.params, b)).ravel() for b in batches])
  mask = np.concatenate([b["loss_mask"].ravel() for b in batches])
  assert metrics["tokens"] == mask.sum() == BATCH * SEQ + (BATCH - 1) * (SEQ // 4)
  assert metrics["loss"] == pytest.approx(float((nll * mask).sum() / mask.sum()), rel=1e-5)


def test_batch_not_divisible_by_data_parallel_size_names_both(tmp_path, tiny_cfg):
  config = tiny_run_config(batch_size=3)
  config.mesh.shape.update(data=2, fsdp=1, tensor=1)
  with pytest.raises(ValueError, match=r"Global batch 3 .*data-parallel size 2"):
    Trainer(config, str(tmp_path), tiny_cfg, lm_loss, devices=jax.devices()[:2])
  config = tiny_run_config(batch_size=6, grad_accum_steps=4)
  with pytest.raises(ValueError, match=r"batch_size=6 .*grad_accum_steps=4"):
    Trainer(config, str(tmp_path), tiny_cfg, lm_loss, devices=jax.devices()[:2])


def test_eval_batch_not_divisible_by_data_parallel_size_is_refused_up_front(tmp_path, tiny_cfg):
  # The train batch (12) splits over 6 devices but the eval batch (64) does not: that must be
  # an error when the run starts, not at the first evaluation hours later.
  config = tiny_run_config(batch_size=12, eval_batch_size=64)
  config.mesh.shape.update(data=6, fsdp=1, tensor=1)
  with pytest.raises(ValueError, match=r"eval_batch_size") as err:
    Trainer(config, str(tmp_path), tiny_cfg, lm_loss, devices=jax.devices()[:6])
  assert "64" in str(err.value) and "6" in str(err.value)


def test_mesh_that_does_not_match_the_devices_is_refused(tmp_path, tiny_cfg):
  config = tiny_run_config()
  config.mesh.shape.update(data=3, fsdp=1, tensor=1)
  with pytest.raises(ValueError, match=r"needs 3 devices but 8 are available"):
    Trainer(config, str(tmp_path), tiny_cfg, lm_loss)


def _poisoned_lm_loss(model, batch, rng):
  """lm_loss, made NaN on a batch whose `poison` entries are set (adds exactly 0 otherwise)."""
  loss, aux = lm_loss(model, {k: v for k, v in batch.items() if k != "poison"}, rng)
  return loss + jnp.where(jnp.any(batch["poison"] > 0), jnp.nan, 0.0), aux


def _with_poison(batch, poisoned):
  return {**batch, "poison": np.full((BATCH,), 1.0 if poisoned else 0.0, np.float32)}


@pytest.fixture(scope="module")
def accum_trainer(tmp_path_factory, tiny_cfg):
  """data=2 over 2 devices, two micro-batches per step, the flattened optimizer update (one
  replicated vector: only valid without fsdp/tensor) and the poisonable loss. One compile
  serves the accumulation, flattened-update and non-finite-loss tests."""
  return _trainer(tmp_path_factory.mktemp("accum"), tiny_cfg, (2, 1, 1),
                  devices=jax.devices()[:2], loss_fn=_poisoned_lm_loss, grad_accum_steps=2,
                  flatten_update=True, num_steps=8, checkpoint_every=2, log_every=1)


def test_accumulated_flattened_step_matches_the_plain_full_batch_step(accum_trainer, batch,
                                                                      single_run):
  # Two micro-batches of 4 rows: every row has the same token count, so the mean of the
  # micro-batch means is the full-batch mean, and so are the gradients (grad_norm is computed
  # from the accumulated gradients). The flattened update is the same AdamW math.
  trainer = accum_trainer
  state = trainer.init_state()
  with trainer.mesh_context():
    state, metrics = trainer.step(state, trainer.to_global(_with_poison(batch, False)))
    jax.block_until_ready(state)
  metrics = _host(metrics)
  _, _, ref_state, ref_metrics = single_run
  assert metrics["train/loss"] == pytest.approx(float(ref_metrics["train/loss"]), rel=1e-5)
  assert metrics["train/grad_norm"] == pytest.approx(float(ref_metrics["train/grad_norm"]),
                                                     rel=1e-4)
  ref_mu = _adam_state(ref_state.opt_state).mu
  mu = _host(_flat_adam_mu(state.opt_state, ref_mu))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-9), mu, ref_mu)
  _assert_adam_params_close(_host(state.params), ref_state.params, ref_mu)


def test_non_finite_loss_stops_the_run_without_saving_that_state(accum_trainer, tiny_cfg):
  trainer = accum_trainer
  rng = np.random.default_rng(1)

  def batches():
    for step in range(1, 100):
      yield _with_poison(random_lm_batch(rng, BATCH, SEQ, tiny_cfg.vocab_size), step == 5)

  with pytest.raises(NonFiniteError, match=r"Step 5 is not finite \(loss nan") as err:
    trainer.train(trainer.init_state(), batches())
  assert err.value.args[0].rstrip().endswith("resume from that checkpoint.")
  assert f"{trainer.checkpointer.directory}/4" in str(err.value)
  trainer.close()
  # Steps 2 and 4 were saved; the NaN state (step 5) and anything after it were not.
  assert Checkpointer(str(trainer.checkpointer.directory)).all_steps() == [2, 4]
  with open(os.path.join(trainer.workdir, "metrics.jsonl")) as f:
    logged = [json.loads(line)["step"] for line in f]
  assert max(logged) == 4


def _recording_dispatch(trainer):
  """Wraps trainer.dispatch to record the number of steps of every call."""
  calls = []
  dispatch = trainer.dispatch

  def recorded(state, batch, num_steps):
    calls.append(num_steps)
    return dispatch(state, batch, num_steps)

  trainer.dispatch = recorded
  return calls


def test_several_steps_per_call_train_exactly_like_one_step_per_call(tmp_path, tiny_cfg):
  # Calls end on multiples of steps_per_call (3) and on every log step (4) and the last
  # step (10): 1-3, 4, 5-6, 7-8, 9, 10. The run is the same as one step per call: same
  # logged interval means and same final parameters.
  def run(name, steps_per_call):
    trainer = _trainer(tmp_path, tiny_cfg, (2, 1, 1), devices=jax.devices()[:2], name=name,
                       num_steps=10, log_every=4, steps_per_call=steps_per_call)
    calls = _recording_dispatch(trainer)
    rng = np.random.default_rng(3)
    batches = iter(lambda: random_lm_batch(rng, BATCH, SEQ, tiny_cfg.vocab_size), None)
    state = trainer.train(trainer.init_state(), batches)
    trainer.close()
    with open(os.path.join(trainer.workdir, "metrics.jsonl")) as f:
      logged = {r["step"]: r["train/loss"] for r in map(json.loads, f)}
    return calls, logged, _host(state.params), int(state.step)

  calls, logged, params, step = run("three", 3)
  ref_calls, ref_logged, ref_params, ref_step = run("one", 1)
  assert calls == [3, 1, 2, 2, 1, 1]
  assert ref_calls == [1] * 10
  assert step == ref_step == 10
  assert sorted(logged) == sorted(ref_logged) == [4, 8, 10]
  for s in logged:
    assert logged[s] == pytest.approx(ref_logged[s], rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               params, ref_params)


def test_non_finite_loss_inside_a_multi_step_call_names_its_step(tmp_path, tiny_cfg):
  trainer = _trainer(tmp_path, tiny_cfg, (2, 1, 1), devices=jax.devices()[:2],
                     loss_fn=_poisoned_lm_loss, num_steps=12, log_every=100,
                     checkpoint_every=4, steps_per_call=4)
  calls = _recording_dispatch(trainer)
  rng = np.random.default_rng(1)
  batches = (_with_poison(random_lm_batch(rng, BATCH, SEQ, tiny_cfg.vocab_size), step == 6)
             for step in range(1, 100))
  with pytest.raises(NonFiniteError, match=r"Step 6 is not finite"):
    trainer.train(trainer.init_state(), batches)
  trainer.close()
  assert calls == [4, 4]  # steps 5-8 ran as one call; the NaN was found in it
  assert Checkpointer(str(trainer.checkpointer.directory)).all_steps() == [4]
