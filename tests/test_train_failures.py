"""Failures found by probing (issue 16), each reproduced in-process on the tiny model.

1  a step whose update goes NaN (loss still finite) must not be saved;
2  a cut-off last line of metrics.jsonl must not stop a resume, and a restart from scratch
   must not log steps twice;
6  a refused resume must not overwrite the existing run's config.json (nothing written);
7  a failed checkpoint save stops the run at that step with one clear error;
9  a symlinked step folder must not kill the run when it is pruned.
"""

from __future__ import annotations

import errno
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from conftest import random_lm_batch, tiny_run_config
from train import checkpoint as ckpt_lib
from train.checkpoint import Checkpointer
from train.losses import lm_loss
from train.loop import NonFiniteError
from train.trainer import Trainer

BATCH, SEQ = 8, 16


def _trainer(workdir, cfg, loss_fn=lm_loss, **train):
  config = tiny_run_config(**{"log_every": 1, "checkpoint_every": 1, **train})
  with config.unlocked():
    config.mesh.shape.data = 2
  return Trainer(config, str(workdir), cfg, loss_fn, devices=jax.devices()[:2])


def _batches(cfg, seed=0, **extra):
  rng = np.random.default_rng(seed)
  step = 0
  while True:
    step += 1
    batch = random_lm_batch(rng, BATCH, SEQ, cfg.vocab_size)
    yield {**batch, **{k: np.full((BATCH,), float(f(step)), np.float32)
                       for k, f in extra.items()}}


def _nan_gradient_loss(model, batch, rng):
  """lm_loss whose value stays finite but whose gradient is NaN on a `poison` batch:
  d/dx sqrt(0 * x) = 0 * inf. (The double `where` keeps the other batches' gradients
  finite.)"""
  loss, aux = lm_loss(model, {k: v for k, v in batch.items() if k != "poison"}, rng)
  poison = jnp.any(batch["poison"] > 0)
  x = jnp.sum(jax.tree.leaves(nnx.state(model))[0])
  inner = jnp.where(poison, 0.0 * x, 1.0)
  return loss + jnp.where(poison, jnp.sqrt(inner), 0.0), aux


def test_1_an_update_that_goes_nan_is_never_saved(tmp_path, tiny_cfg):
  trainer = _trainer(tmp_path / "run", tiny_cfg, _nan_gradient_loss, num_steps=6,
                     keep_checkpoints=2)
  state, _ = trainer.restore_or_init()
  with pytest.raises(NonFiniteError, match=r"Step 3 is not finite .*parameters after the "
                                           r"update finite: no") as err:
    trainer.train(state, _batches(tiny_cfg, poison=lambda s: s == 3))
  trainer.close()
  assert "loss 4." in str(err.value) or "loss 5." in str(err.value)  # the loss was finite
  ckpt = Checkpointer(str(tmp_path / "run" / "checkpoints"))
  assert ckpt.all_steps() == [1, 2]  # step 3 (NaN parameters) was not written
  restored = ckpt.restore(trainer.abstract_state.params, {
      "opt_state": trainer.abstract_state.opt_state, "step": trainer.abstract_state.step,
      "rng": trainer.abstract_state.rng})
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored["params"]))


def test_2_a_cut_off_metrics_line_and_a_restart_from_scratch(tmp_path, tiny_cfg):
  workdir = tmp_path / "run"
  trainer = _trainer(workdir, tiny_cfg, num_steps=2)
  state, _ = trainer.restore_or_init()
  trainer.fit(state, _batches(tiny_cfg))
  with open(workdir / "metrics.jsonl", "a") as f:
    f.write('{"step": 3, "train/lo')  # a crash (or a full disk) mid-line
  trainer = _trainer(workdir, tiny_cfg, num_steps=4)
  state, _ = trainer.restore_or_init()  # resumes at step 2
  trainer.fit(state, _batches(tiny_cfg, seed=1))
  steps = [json.loads(line)["step"] for line in open(workdir / "metrics.jsonl")]
  assert steps == [1, 2, 3, 4]
  # A restart from scratch (no checkpoint survived) re-does every step: logged once each.
  shutil.rmtree(workdir / "checkpoints")
  trainer = _trainer(workdir, tiny_cfg, num_steps=3)
  state, _ = trainer.restore_or_init()
  trainer.fit(state, _batches(tiny_cfg))
  steps = [json.loads(line)["step"] for line in open(workdir / "metrics.jsonl")]
  assert steps == [1, 2, 3]


def test_7_a_failed_save_stops_the_run_at_that_step(tmp_path, tiny_cfg, monkeypatch):
  workdir = tmp_path / "run"
  trainer = _trainer(workdir, tiny_cfg, num_steps=8, async_checkpoint=True)
  state, _ = trainer.restore_or_init()
  calls = []
  original = ocp.PyTreeCheckpointHandler.async_save

  async def disk_full(self, directory, *args, **kwargs):
    calls.append(str(directory))
    if "/3.orbax" in str(directory):
      raise OSError(errno.ENOSPC, "No space left on device")
    return await original(self, directory, *args, **kwargs)

  monkeypatch.setattr(ocp.PyTreeCheckpointHandler, "async_save", disk_full)
  with pytest.raises(ckpt_lib.CheckpointSaveError, match=r"No space left on device"):
    trainer.fit(state, _batches(tiny_cfg))
  steps = [json.loads(line)["step"] for line in open(workdir / "metrics.jsonl")]
  assert max(steps) == 3  # stopped at the failed save, not steps later
  assert Checkpointer(str(workdir / "checkpoints")).all_steps() == [1, 2]


def test_9_a_symlinked_step_is_pruned_by_removing_the_link(tmp_path, tiny_cfg):
  other = tmp_path / "other"
  trainer = _trainer(other, tiny_cfg, num_steps=2)
  state, _ = trainer.restore_or_init()
  trainer.fit(state, _batches(tiny_cfg))
  run = tmp_path / "run"
  trainer = _trainer(run, tiny_cfg, num_steps=1)
  state, _ = trainer.restore_or_init()
  trainer.fit(state, _batches(tiny_cfg))
  os.symlink(other / "checkpoints" / "2", run / "checkpoints" / "2")
  trainer = _trainer(run, tiny_cfg, num_steps=5, keep_checkpoints=2)
  state, _ = trainer.restore_or_init()
  assert int(state.step) == 2
  trainer.fit(state, _batches(tiny_cfg))
  assert sorted(os.listdir(run / "checkpoints")) == ["4", "5"]
  assert sorted(os.listdir(other / "checkpoints")) == ["1", "2"]  # the other run is intact
