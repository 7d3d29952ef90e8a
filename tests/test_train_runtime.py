"""The sharded-apply runtime and compile-once guarantees (train/runtime.py, train/trainer.py).

Every jitted program of a run is compiled once per shape: the train step over a whole run,
the eval step over a whole split, and `Runtime.apply` over any number of rows (padded to one
batch shape) and across Runtimes of the same model structure.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from conftest import random_lm_batch, tiny_run_config
from model import sharding as msharding
from model.transformer import build_model
from train.losses import lm_loss
from train.runtime import Runtime
from train.state import abstract_model, mesh_shardings
from train.trainer import Trainer
from model.transformer import Transformer


def _last_logits(model, batch):
  """A per-row function of the model: the logits at each row's last slot [B, V]."""
  return model(batch["tokens"], batch["positions"], batch["segment_ids"])[:, -1]


def test_apply_equals_the_model_and_compiles_once(tiny_cfg):
  model = build_model(tiny_cfg, seed=0)
  params = nnx.to_pure_dict(nnx.state(model))
  rows = random_lm_batch(np.random.default_rng(0), 11, 16, tiny_cfg.vocab_size)
  want = np.asarray(_last_logits(model, rows))
  graphdef, _, logical = abstract_model(Transformer, tiny_cfg)
  rules = msharding.normalize_rules(None)
  mesh = msharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 1}, jax.devices()[:4])
  runtime = Runtime(mesh, rules, graphdef, mesh_shardings(logical, mesh, rules))
  placed = jax.device_put(params, runtime.param_shardings)
  got = runtime.apply(_last_logits, placed, rows, batch_size=3)  # 3 -> 4 rows a batch
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  assert runtime.padded_batch_size(3) == 4 and got.shape == want.shape
  # Other row counts and a second Runtime of the same structure reuse the program.
  again = Runtime(mesh, rules, graphdef, runtime.param_shardings)
  again.apply(_last_logits, placed, {k: v[:5] for k, v in rows.items()}, batch_size=3)
  assert runtime.compile_count(_last_logits) == again.compile_count(_last_logits) == 1


def test_train_and_eval_steps_compile_once_over_a_run(tmp_path, tiny_cfg):
  config = tiny_run_config(num_steps=6, log_every=2, checkpoint_every=3)
  with config.unlocked():
    config.mesh.shape.data = 2
  trainer = Trainer(config, str(tmp_path / "run"), tiny_cfg, lm_loss, devices=jax.devices()[:2])
  rng = np.random.default_rng(1)
  batches = iter(lambda: random_lm_batch(rng, 8, 16, tiny_cfg.vocab_size), None)
  trainer.add_hook(lambda step, state: trainer.evaluate(state.params, [next(batches)] * 2), 2)
  state, _ = trainer.restore_or_init()
  trainer.fit(state, batches)
  assert trainer.compile_counts() == {"step": 1, "steps": 0, "eval": 1}
