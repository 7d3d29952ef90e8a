"""Benchmark: nanoGPT's CPU baby GPT (configs/pretrain/shakespeare_char.py), full run.

  python benchmarks/pretrain_shakespeare.py [--workdir=/tmp/bench] [--config.train.num_steps=2000]

Trains the config from scratch (2000 iterations), evaluates on the WHOLE validation split at
the end, and prints: validation loss, wall time, steady-state tokens/s, step time split into
data wait and compute, MFU against a matmul peak measured on this machine in this run, and a
breakdown of the step (forward, backward, optimizer update) timed separately on the same
shapes. The last line is one JSON object with at least the keys
val_loss, iters, wall_s, tokens_per_sec, data_wait_frac, mfu.

Reference (measured on a machine of the CI kind, 2 cores, back to back twice; issue 16):
nanoGPT's baby GPT (eager PyTorch, CPU) ran at 23.4k and 24.2k tokens/s with val loss 1.886
at iteration 2000. An earlier note's 13.5k was measured on a busier machine and is stale.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

import xla_profile  # benchmarks/xla_profile.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", os.path.join(REPO, "configs/pretrain/shakespeare_char.py"),
    "Run config.", lock_config=True)
flags.DEFINE_string("workdir", "", "Run directory (default: a fresh temporary one).")
flags.DEFINE_integer("breakdown_steps", 30, "Steps timed per component in the breakdown.")

NANOGPT_TOKENS_PER_SEC = 24_000  # nanoGPT on these machines (module docstring)


def step_breakdown(config, steps: int) -> dict[str, float]:
  """Times forward, forward+backward and the full train step on the benchmark's shapes."""
  import jax
  import numpy as np
  from model.config import ModelConfig
  from train.losses import lm_loss
  from train.trainer import Trainer

  model_cfg = ModelConfig.from_dict({**config.model.to_dict(), "vocab_size": 69})
  tmp = tempfile.mkdtemp()
  trainer = Trainer(config, tmp, model_cfg, lm_loss)
  state = trainer.init_state()
  b, t = config.train.batch_size, config.data.seq_len
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 69, (b, t)).astype(np.int32)
  batch = trainer.to_global({"tokens": tokens, "targets": tokens,
                             "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
                             "segment_ids": np.ones((b, t), np.int32),
                             "loss_mask": np.ones((b, t), np.float32)})
  key = jax.random.key(0)

  def loss(params):
    return trainer.steps.loss(params, batch, key)[0]

  fns = {"forward": jax.jit(loss), "forward_backward": jax.jit(jax.grad(loss))}
  out = {}
  with trainer.mesh_context():
    for name, fn in fns.items():
      jax.block_until_ready(fn(state.params))
      t0 = time.perf_counter()
      for _ in range(steps):
        jax.block_until_ready(fn(state.params))
      out[f"{name}_ms"] = (time.perf_counter() - t0) / steps * 1000
    state, m = trainer.step(state, batch)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
      state, m = trainer.step(state, batch)
      jax.block_until_ready(m)
    out["train_step_ms"] = (time.perf_counter() - t0) / steps * 1000

    def profiled_steps():
      nonlocal state
      for _ in range(10):
        state, m = trainer.step(state, batch)
      jax.block_until_ready(m)
    out.update(xla_profile.with_profile(profiled_steps, 10, jax.device_count()))
  out["backward_ms"] = out["forward_backward_ms"] - out["forward_ms"]
  out["optimizer_ms"] = out["train_step_ms"] - out["forward_backward_ms"]
  trainer.close()
  shutil.rmtree(tmp, ignore_errors=True)
  return out


def main(argv):
  del argv
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  from train import distributed
  distributed.initialize()  # one CPU device per core, as the entry point does
  import jax
  from train import flops as flops_lib
  from train.pretrain import STAGE
  from train.stage import run_stage

  config = FLAGS.config
  peak = flops_lib.measure_matmul_peak()
  with config.unlocked():
    config.train.peak_flops = peak
    config.train.eval_every = 0  # evaluate once, at the end, on the whole split
    config.train.checkpoint_every = 0  # checkpoint once, at the end
  workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="bench_shakespeare_")
  t0 = time.perf_counter()
  results = run_stage(STAGE, config, workdir)
  wall = time.perf_counter() - t0
  steps, train_wall = results["run/steps"], results["run/wall_s"]
  tokens_per_step = config.train.batch_size * config.data.seq_len
  tok_s = steps * tokens_per_step / train_wall
  from model.config import ModelConfig
  model_cfg = ModelConfig.from_dict({**config.model.to_dict(), "vocab_size": 69})
  mfu = flops_lib.flops_per_token(model_cfg, config.data.seq_len) * tok_s / peak
  step_ms = train_wall / steps * 1000
  data_frac = results["run/data_wait_s"] / train_wall
  breakdown = step_breakdown(config, FLAGS.breakdown_steps)
  print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; "
        f"matmul peak {peak / 1e9:.1f} GFLOP/s (measured)")
  print(f"val loss {results['loss']:.4f} at iteration {config.train.num_steps} "
        f"(whole validation split, {int(results['tokens'])} tokens)")
  print(f"wall {wall:.1f}s total; {tok_s:,.0f} tokens/s steady state "
        f"({tok_s / NANOGPT_TOKENS_PER_SEC:.2f}x nanoGPT's {NANOGPT_TOKENS_PER_SEC:,})")
  print(f"step {step_ms:.1f} ms = data wait {step_ms * data_frac:.2f} ms "
        f"({100 * data_frac:.1f}%) + compute {step_ms * (1 - data_frac):.1f} ms; "
        f"MFU {100 * mfu:.1f}%")
  print("breakdown (isolated, same shapes): " +
        ", ".join(f"{k} {v:.1f}" for k, v in breakdown.items() if not k.startswith("profile")))
  print("profile (ms per step per device, by XLA op kind): " +
        ", ".join(f"{k[8:-3]} {v:.1f}" for k, v in breakdown.items() if k.startswith("profile")))
  print(json.dumps({
      "val_loss": results["loss"], "iters": config.train.num_steps, "wall_s": wall,
      "tokens_per_sec": tok_s, "data_wait_frac": data_frac, "mfu": mfu,
      "step_ms": step_ms, "data_wait_ms": step_ms * data_frac,
      "compute_ms": step_ms * (1 - data_frac), "matmul_peak_flops": peak,
      "speedup_vs_nanogpt": tok_s / NANOGPT_TOKENS_PER_SEC, **breakdown}))


if __name__ == "__main__":
  app.run(main)
