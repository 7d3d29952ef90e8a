"""A 2-process `jax.distributed` pretraining run on localhost (launch/local.py, gloo CPU
collectives, one device per process) logs the same per-step losses as one process with two
local devices: the same global batch, split over hosts instead of over local devices.
"""

import io
import os

import pytest

from conftest import (REF_FLAGS, REF_STEPS, eval_records, finalized_steps, pretrain_cmd,
                      subprocess_env, train_losses)
from launch.local import launch


def test_two_processes_match_one_process_with_two_devices(reference_run, tmp_path):
  workdir = str(tmp_path / "run")
  args = pretrain_cmd(workdir, *REF_FLAGS, local_devices=None)[1:]  # launch adds python
  sink = io.StringIO()
  code = launch(args, num_processes=2, local_devices=1, timeout=400, env=subprocess_env(),
                sink=sink)
  out = sink.getvalue()
  assert code == 0, out[-5000:]
  assert "[0] Model:" in out and "2 devices, 2 process(es)" in out, out[-3000:]
  assert "[1] " in out

  got, want = train_losses(workdir), train_losses(reference_run)
  assert sorted(got) == sorted(want) == list(range(1, REF_STEPS + 1))
  diffs = {s: (got[s], want[s]) for s in want if abs(got[s] - want[s]) > 1e-5}
  assert not diffs, f"(2 processes, 1 process) losses differ: {diffs}"
  assert eval_records(workdir)[-1]["eval/loss"] == pytest.approx(
      eval_records(reference_run)[-1]["eval/loss"], abs=1e-5)
  # Both processes took part in the checkpoint (one data-iterator blob each).
  last = os.path.join(workdir, "checkpoints", str(finalized_steps(
      os.path.join(workdir, "checkpoints"))[-1]), "data_iter")
  assert {"process_0.bin", "process_1.bin"} <= set(os.listdir(last))
