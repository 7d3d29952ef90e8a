"""Every stage and `eval.run` as 2 processes x 2 devices on localhost (launch/local.py, gloo
CPU collectives) against 1 process x 4 devices, from a checkpoint of the previous stage.

The mesh is fsdp=4 in both, so in the 2-process runs every parameter is split over devices of
both processes (no process holds the whole model): init_from through the stages' adapters
(vocabulary growth, a scalar head on an LM trunk), DPO's reference pass, PPO's sampling and
scoring and the evaluation scorers all run on arrays that are not fully addressable.
Tolerance: the same programs on the same mesh, so only the order of the cross-process
reductions differs: losses and metrics must agree to 2e-4 (absolute).
"""

from __future__ import annotations

import io
import json
import os
import sys

import pytest

from conftest import (REPO_ROOT, SMALL_MODEL_FLAGS, read_metrics, run_cmd, subprocess_env,
                      train_losses)
from launch.local import launch

pytestmark = pytest.mark.slow

TOL = 2e-4
MESH = ("--config.mesh.shape.data=1", "--config.mesh.shape.fsdp=4",
        "--config.optim.flatten_update=False", "--config.train.peak_flops=1e9")


def _both(tmp_path, name: str, module: str, config: str, *flags: str) -> tuple[str, str]:
  """Runs `python -m module` as 1 process x 4 devices and as 2 processes x 2 devices;
  returns the two workdirs."""
  one, two = str(tmp_path / f"{name}_1x4"), str(tmp_path / f"{name}_2x2")
  args = ["-m", module, f"--config={config}", *MESH, *flags]
  out = run_cmd([sys.executable, *args, f"--workdir={one}", "--local_devices=4"], timeout=900)
  assert out.returncode == 0, out.stdout[-4000:]
  sink = io.StringIO()
  code = launch([*args, f"--workdir={two}"], num_processes=2, local_devices=2, timeout=900,
                env=subprocess_env(), sink=sink)
  assert code == 0, sink.getvalue()[-6000:]
  assert "4 devices, 2 process(es)" in sink.getvalue() or module != "train.pretrain"
  return one, two


def _assert_close(got: dict, want: dict, what: str) -> None:
  assert sorted(got) == sorted(want), (what, sorted(got), sorted(want))
  diffs = {k: (got[k], want[k]) for k in want if abs(got[k] - want[k]) > TOL}
  assert not diffs, f"{what}: 2 processes vs 1 process differ: {diffs}"


def _compare_runs(one: str, two: str) -> None:
  _assert_close(train_losses(two), train_losses(one), "train/loss")
  last = lambda w: {k: v for k, v in [r for r in read_metrics(w) if any(  # noqa: E731
      k.startswith("eval/") for k in r)][-1].items() if k.startswith("eval/")}
  _assert_close(last(two), last(one), "final eval")


@pytest.fixture(scope="module")
def chain(english_sft_run, english_rm_run):
  """(base checkpoint, SFT workdir, RM workdir, pairs file) of the smoke chain."""
  from train import checkpoint as ckpt_lib
  sft = english_sft_run[0]
  base = ckpt_lib.read_metadata(sft)["parent"]["path"]
  rm, pairs, _ = english_rm_run
  return base, sft, rm, pairs


def test_pretrain(tmp_path):
  one, two = _both(tmp_path, "pretrain", "train.pretrain",
                   os.path.join(REPO_ROOT, "configs/pretrain/shakespeare_char.py"),
                   *SMALL_MODEL_FLAGS, "--config.train.num_steps=6", "--config.train.log_every=1",
                   "--config.train.eval_batch_size=16", "--config.data.val_fraction=0.005")
  _compare_runs(one, two)


def test_sft_from_the_base(chain, tmp_path):
  base = chain[0]
  one, two = _both(tmp_path, "sft", "train.sft", "configs/sft/chat.py:runlocal=true",
                   f"--config.init_from={base}", "--config.train.num_steps=4",
                   "--config.train.log_every=1", "--config.sample_every=0")
  _compare_runs(one, two)


@pytest.mark.parametrize("name,module,config", [
    ("rm", "rlhf.reward", "configs/reward/hh.py:runlocal=true"),
    ("dpo", "rlhf.dpo", "configs/dpo/hh.py:runlocal=true")])
def test_preference_stages_from_sft(chain, tmp_path, name, module, config):
  _, sft, _, pairs = chain
  one, two = _both(tmp_path, name, module, config,
                   f"--config.init_from={sft}", f"--config.data.sources={pairs}",
                   "--config.data.val_fraction=0.25", "--config.train.num_steps=4",
                   "--config.train.log_every=1", "--config.train.steps_per_call=1")
  _compare_runs(one, two)


def test_ppo_from_sft_and_the_reward_model(chain, tmp_path):
  _, sft, rm, pairs = chain
  one, two = _both(tmp_path, "ppo", "rlhf.ppo", "configs/ppo/hh.py:runlocal=true",
                   f"--config.init_from={sft}", f"--config.reward_from={rm}",
                   f"--config.data.sources={pairs}", "--config.data.val_fraction=0.25",
                   "--config.ppo.iterations=2", "--config.value_optim.flatten_update=False")
  keys = ("ppo/score", "ppo/kl", "ppo/entropy", "ppo/clipfrac", "ppo/policy_loss",
          "value/loss", "ppo/response_length")
  per_iter = lambda w: {f"{r['step']}:{k}": r[k] for r in read_metrics(w)  # noqa: E731
                        for k in keys}
  _assert_close(per_iter(two), per_iter(one), "PPO iterations")


def test_eval_run_with_a_language_model_and_a_reward_model(chain, tmp_path):
  _, sft, rm, pairs = chain
  results = {}
  for name, checkpoint, tasks in (("lm", sft, "hellaswag,arc_easy"),
                                  ("rm", rm, "rm_accuracy")):
    for procs in (1, 2):
      out_dir = str(tmp_path / f"{name}_{procs}")
      args = ["-m", "eval.run", f"--checkpoint={checkpoint}", f"--tasks={tasks}",
              "--limit=16", "--mesh=fsdp=4", f"--output_dir={out_dir}", "--batch_size=8"]
      if procs == 1:
        out = run_cmd([sys.executable, *args, "--local_devices=4"], timeout=900)
        assert out.returncode == 0, out.stdout[-4000:]
      else:
        sink = io.StringIO()
        code = launch(args, num_processes=2, local_devices=2, timeout=900,
                      env=subprocess_env(), sink=sink)
        assert code == 0, sink.getvalue()[-6000:]
      with open(os.path.join(out_dir, "results.json")) as f:
        tasks_out = json.load(f)["results"]
      results[(name, procs)] = {f"{t}/{k}": v for t, r in tasks_out.items()
                                for k, v in r.items()
                                if isinstance(v, float) and k != "seconds"}
  for name in ("lm", "rm"):
    assert results[(name, 1)], results
    _assert_close(results[(name, 2)], results[(name, 1)], f"eval.run {name}")
