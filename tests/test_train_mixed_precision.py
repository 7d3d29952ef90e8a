"""Mixed precision (train/optim.py `with_master_weights`): bf16 parameters and compute with a
float32 master copy in the optimizer state.

Checked: the bf16 parameters are exactly the master rounded after every step; updates below
half a bf16 ulp accumulate in the master instead of being lost; the master is sharded like
its parameter; and a short run of the tiny model in bf16 + master reaches the float32 run's
loss (same data, same init) within bf16 rounding.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import random_lm_batch, tiny_run_config
from train.losses import lm_loss
from train.optim import MasterState, with_master_weights
from train.trainer import Trainer

STEPS, BATCH, SEQ = 25, 8, 16


def test_params_are_the_rounded_master_and_small_updates_accumulate():
  params = {"w": jnp.ones((4,), jnp.bfloat16)}
  tx = with_master_weights(optax.sgd(1e-3))  # each step moves w by 1e-3 < ulp(1)/2 = 2^-8/2
  state = tx.init(params)
  assert state.master["w"].dtype == jnp.float32
  plain, plain_state = dict(params), optax.sgd(1e-3).init(params)
  for _ in range(20):
    grads = {"w": jnp.ones((4,), jnp.bfloat16)}
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    assert params["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(params["w"]),
                                  np.asarray(state.master["w"].astype(jnp.bfloat16)))
    u, plain_state = optax.sgd(1e-3).update(grads, plain_state, plain)
    plain = optax.apply_updates(plain, u)
  # 20 steps of 1e-3: the master holds 0.98; bf16 rounds it to 0.98046875. Plain bf16 SGD
  # rounds every single step back to 1.0 and never moves.
  np.testing.assert_allclose(np.asarray(state.master["w"]), 0.98, rtol=1e-6)
  assert float(params["w"][0]) == pytest.approx(0.98, abs=2 ** -8)
  assert float(plain["w"][0]) == 1.0


def _run(tmp_path, tiny_cfg, batch, name, **precision):
  config = tiny_run_config(batch_size=BATCH)
  config.optim.update(dict(warmup_steps=0, lr=3e-3, master_dtype=precision.pop("master", "")))
  config.mesh.shape.update(dict(data=2, fsdp=2, tensor=1))
  cfg = tiny_cfg.replace(**precision)
  trainer = Trainer(config, str(tmp_path / name), cfg, lm_loss, devices=jax.devices()[:4])
  state = trainer.init_state()
  losses = []
  with trainer.mesh_context():
    for _ in range(STEPS):
      state, metrics = trainer.step(state, trainer.to_global(batch))
      losses.append(float(metrics["train/loss"]))
  return trainer, state, np.asarray(losses)


def test_bf16_with_master_weights_matches_the_float32_loss(tmp_path, tiny_cfg):
  batch = random_lm_batch(np.random.default_rng(0), BATCH, SEQ, tiny_cfg.vocab_size)
  _, _, f32 = _run(tmp_path, tiny_cfg, batch, "f32")
  trainer, state, bf16 = _run(tmp_path, tiny_cfg, batch, "bf16", dtype="bfloat16",
                              param_dtype="bfloat16", master="float32")
  # The runs learn (memorising one batch) and agree to bf16 rounding all along.
  assert f32[-1] < f32[0] - 0.5, f32
  np.testing.assert_allclose(bf16, f32, rtol=0.02)
  # The optimizer state holds a float32 master, sharded like its bf16 parameter.
  master_state = state.opt_state
  assert isinstance(master_state, MasterState)
  wq, master_wq = state.params["blocks"][0]["attn"]["wq"], master_state.master["blocks"][0][
      "attn"]["wq"]
  assert wq.dtype == jnp.bfloat16 and master_wq.dtype == jnp.float32
  assert master_wq.sharding.spec == wq.sharding.spec
  np.testing.assert_array_equal(np.asarray(master_wq.astype(jnp.bfloat16)), np.asarray(wq))
