"""launch/pipeline.py: checks before any work, and the whole lifecycle at tiny size (slow)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, subprocess_env

TINY = "configs/pipeline/cpu.py:size=tiny"


def _pipeline(workdir, *flags, config=TINY, timeout=900):
  return subprocess.run([sys.executable, "-m", "launch.pipeline", f"--config={config}",
                         f"--workdir={workdir}", *flags], cwd=REPO_ROOT, env=subprocess_env(),
                        capture_output=True, text=True, timeout=timeout)


def test_missing_parent_checkpoint_stops_before_any_work(tmp_path):
  from launch import overrides as ov, pipeline
  config = ov.load_config(TINY)
  # A stage whose parent is a path without a checkpoint.
  config.stages[1]["init_from"] = str(tmp_path / "nowhere")
  with pytest.raises(pipeline.PipelineError, match=r"stage sft: parent checkpoint "
                     r"init_from=.*nowhere is missing"):
    pipeline.plan(config, str(tmp_path / "run"))
  # A stage whose parent stage has not finished and may not run.
  config = ov.load_config(TINY)
  with pytest.raises(pipeline.PipelineError, match=r"stage sft: parent checkpoint "
                     r"init_from='pretrain' is missing: stage pretrain has not finished"):
    pipeline.plan(config, str(tmp_path / "run"), selected=["sft"])
  # An override naming a field that does not exist.
  with pytest.raises(ValueError, match=r"stage rm .*no 'marginn' in reward"):
    pipeline.plan(config, str(tmp_path / "run"), extra={"rm": {"reward.marginn": 1.0}})
  assert not (tmp_path / "run").exists()


def test_cli_reports_the_cause_and_runs_nothing(tmp_path):
  out = _pipeline(tmp_path / "run", "--stages=sft")
  assert out.returncode != 0
  assert "stage sft: parent checkpoint init_from='pretrain' is missing" in out.stderr
  assert not (tmp_path / "run").exists()
  dry = _pipeline(tmp_path / "run", "--dry_run", "--override=ppo:ppo.kl_coef=0.1")
  assert dry.returncode == 0, dry.stderr
  assert "--config.ppo.kl_coef=0.1" in dry.stdout and "-m eval.winrate" in dry.stdout
  assert f"--config.init_from={tmp_path / 'run' / 'sft'}" in dry.stdout


@pytest.mark.slow
def test_tiny_pipeline_end_to_end_and_resume(tmp_path):
  workdir = tmp_path / "run"
  out = _pipeline(workdir)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  report = json.loads((workdir / "report.json").read_text())
  assert list(report["stages"]) == ["pretrain", "sft", "rm", "ppo", "dpo"]
  for name, figures in report["stages"].items():
    assert figures["steps"] > 0 and report["minutes"][name] > 0, name
  # Every stage started from its parent's checkpoint.
  from train import checkpoint as ckpt_lib
  for child, parent in (("sft", "pretrain"), ("rm", "sft"), ("dpo", "sft")):
    meta = ckpt_lib.read_metadata(str(workdir / child))
    assert meta["parent"]["path"].startswith(str(workdir / parent)), (child, meta["parent"])
  policy = ckpt_lib.read_metadata(str(workdir / "ppo" / "policy"))
  assert policy["parent"]["path"].startswith(str(workdir / "sft"))
  assert set(report["eval"]) == {"base", "sft", "ppo", "dpo", "rm"}
  assert "hellaswag" in report["eval"]["ppo"] and "rm_accuracy" in report["eval"]["rm"]
  assert set(report["winrate"]["policies"]) == {"base", "sft", "ppo", "dpo"}
  md = (workdir / "report.md").read_text()
  assert "| ppo | rlhf.ppo |" in md and "## Reward-model win rates" in md
  for png in ("curves.png", "eval.png"):
    assert (workdir / png).read_bytes()[:4] == b"\x89PNG"
  # Re-running skips every finished stage and only rewrites the report.
  again = _pipeline(workdir)
  assert again.returncode == 0, again.stderr[-2000:]
  assert again.stdout.count(": finished") == 11 and "$ " not in again.stdout
