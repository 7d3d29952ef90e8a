"""launch/sweep.py: a two-point sweep end to end (table + PNG), and bad overrides up front."""

import csv
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, subprocess_env

TINY_SWEEP = '''
import ml_collections
def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.entry = "train.pretrain"
  c.base = "configs/pretrain/shakespeare_char.py:runlocal=true"
  c.fixed = {"train": {"num_steps": 4, "eval_every": 2, "log_every": 2,
                       "checkpoint_every": 4, "steps_per_call": 1, "peak_flops": 1e9},
             "model": {"num_layers": 1, "embed_dim": 32, "mlp_dim": 64}}
  c.points = [{"optim.lr": 1e-3}, {"optim.lr": 1e-2}]
  c.product = [("seed", (0,))]
  return c
'''


def _sweep(config_path, workdir, *flags):
  return subprocess.run([sys.executable, "-m", "launch.sweep", f"--config={config_path}",
                         f"--workdir={workdir}", *flags], cwd=REPO_ROOT, env=subprocess_env(),
                        capture_output=True, text=True, timeout=600)


@pytest.mark.cli
def test_two_point_sweep_runs_and_writes_table_and_plot(tmp_path):
  config = tmp_path / "tiny.py"
  config.write_text(TINY_SWEEP)
  out = _sweep(config, tmp_path / "run")
  assert out.returncode == 0, out.stdout + out.stderr
  with open(tmp_path / "run" / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["point"] for r in rows] == ["lr=0.001,seed=0", "lr=0.01,seed=0"]
  for r in rows:
    assert r["steps"] == "4" and float(r["final_eval/loss"]) > 0
    assert float(r["best_eval/loss"]) <= float(r["final_eval/loss"])
    # The table's loss is the run's own last logged value.
    point_dir = [d for d in os.listdir(tmp_path / "run") if d.endswith(r["point"])][0]
    with open(tmp_path / "run" / point_dir / "metrics.jsonl") as f:
      records = [json.loads(line) for line in f]
    assert float(r["final_train_loss"]) == pytest.approx(
        [x["train/loss"] for x in records if "train/loss" in x][-1])
  table = (tmp_path / "run" / "results.md").read_text()
  assert "| lr=0.001,seed=0 |" in table and "final_eval/loss" in table
  png = (tmp_path / "run" / "curves.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
  summary = json.loads(out.stdout.strip().splitlines()[-1])
  assert summary["points"] == 2 and summary["lr=0.01"] == pytest.approx(
      float(rows[1]["final_eval/loss"]), abs=1e-4)
  # Re-running skips the finished points.
  again = _sweep(config, tmp_path / "run")
  assert again.returncode == 0 and again.stdout.count(": finished") == 2


def test_sweep_override_of_a_missing_field_stops_before_any_run(tmp_path):
  config = tmp_path / "bad.py"
  config.write_text(TINY_SWEEP.replace('{"optim.lr": 1e-2}', '{"optim.lrr": 1e-2}'))
  out = _sweep(config, tmp_path / "run")
  assert out.returncode != 0
  assert "sweep point 1" in out.stderr and "no 'lrr' in optim (did you mean lr?)" in out.stderr
  assert not (tmp_path / "run").exists()  # nothing ran, nothing was created


def test_sweep_expansion_and_tpu_commands():
  from launch import overrides as ov, sweep
  config = ov.load_config("configs/ablations/depth_width.py")
  points = sweep.expand(config)
  assert [p["name"] for p in points[:3]] == ["2x176,seed=0", "2x176,seed=1", "4x128,seed=0"]
  assert points[0]["overrides"]["train.num_steps"] == 1000
  assert points[0]["overrides"]["model.num_layers"] == 2 and points[1]["seed"] == 1
  with pytest.raises(ValueError, match=r"train.num_stepz"):
    sweep.expand(config, {"train.num_stepz": 3})
  with pytest.raises(ValueError, match=r"train.num_steps='x'"):
    sweep.expand(config, {"train.num_steps": "x"})
  from launch import tpu_vm
  cmd = tpu_vm.sweep_point_command({"name": "v", "zone": "z", "accelerator_type": "v4-8"},
                                   sweep.command(config, points[0], "gs://b/p0"))
  assert cmd[:7] == ["python", "-m", "launch.tpu_vm", "run", "--name=v", "--zone=z",
                     "--accelerator_type=v4-8"]
  assert cmd[7:10] == ["--", "-m", "train.pretrain"] and "--workdir=gs://b/p0" in cmd


def test_curve_ylim_covers_train_and_eval_points():
  from launch.sweep import curve_ylim
  train = [4.2, 3.5, 3.0, 2.8, 2.7, 2.65, 2.6, 2.58, 2.57, 2.56]
  # Eval below the lowest train loss (e.g. dropout off at eval): it must stay on the chart.
  evals = [2.9, 2.4, 2.3]
  lo, hi = curve_ylim(train, evals)
  assert lo < min(evals) and hi > max(evals)
  assert lo < min(train) and hi < max(train)  # the first steps are still cut off
  # An eval series alone (no train loss logged yet), non-finite values ignored.
  lo, hi = curve_ylim([float("nan")], [3.0, 2.0, float("inf")])
  assert lo < 2.0 and hi > 3.0
  assert curve_ylim([], []) is None and curve_ylim([float("nan")], []) is None
