"""Tests for launch/continual.py and launch/continual_eval.py: the config and the stage
commands it plans, the feedback split, the gate's refusal rule, bad input, and the loop end
to end at smoke size (feedback recorded as the server records it -> a LoRA DPO update ->
evaluated against the serving version -> refused with a negative tolerance, then
registered and promoted)."""

import json
import os
import sys

import pytest

from conftest import REPO_ROOT, _subset_file, run_cmd
from data.chat import render
from data.preferences import read_source
from launch import continual, continual_eval
from launch import overrides as ov
from serve.feedback import FeedbackStore
from serve.registry import Registry

SMOKE = "configs/continual/default.py:runlocal=true"


def _config(**changes):
  config = ov.load_config(SMOKE)
  return ov.apply_overrides(config, changes, "test")


def test_config_variants_load_and_name_loadable_stage_configs():
  for spec in ("configs/continual/default.py", SMOKE):
    config = ov.load_config(spec)
    for stage in ("dpo", "sft"):
      stage_cfg = ov.load_config(config[stage].config)
      overrides = ov.parse_assignments(list(config[stage].overrides), stage)
      ov.apply_overrides(stage_cfg, overrides, spec)
    assert set(config.tolerance.keys()) == set(continual_eval.GATED)
  with open(os.path.join(REPO_ROOT, "configs/continual/default.py")) as f:
    assert "--config=configs/continual/default.py" in f.read()


def _feedback(tmp_path, pairs, version="v0", rate_chosen_every=2):
  """Feedback as the server records it: each pair's rejected answer served and rated 0
  with the chosen one as the preferred answer; every other prompt also answered with the
  chosen one, rated 1."""
  store = FeedbackStore(str(tmp_path / "feedback.db"))
  for i, p in enumerate(pairs):
    request = {"messages": list(p.prompt), "max_tokens": 16, "temperature": 0.0}
    store.record_completion(f"a{i}", version, "chat", request, p.rejected)
    store.record_feedback(f"a{i}", rating=0.0, preferred=p.chosen)
    if i % rate_chosen_every == 0:
      store.record_completion(f"b{i}", version, "chat", request, p.chosen)
      store.record_feedback(f"b{i}", rating=1.0)
  return store


def _hh_pairs(tmp_path, n):
  """The first n short HH pairs (those of the reward-model fixture)."""
  return read_source(_subset_file(str(tmp_path / "hh.jsonl"), n)).pairs


class _FakeRegistry:
  """`current()` and `root` only: collect() needs nothing else."""
  root = "/nowhere"

  def __init__(self, created, metrics=None):
    self._current = {"name": "v0", "created": created, "checkpoint": "/ckpt",
                     "metrics": metrics or {}}

  def current(self):
    return self._current


def test_collect_splits_feedback_as_the_stages_do(tmp_path):
  store = _feedback(tmp_path, _hh_pairs(tmp_path, 40))
  found = continual.collect(_FakeRegistry(0.0), store.path, _config(
      **{"updates": ("sft", "dpo"), "feedback.val_fraction": 0.3}))
  split = found["split"]
  assert split["dpo"]["train"] + split["dpo"]["heldout"] == len(found["pairs"].records) == 40
  assert split["dpo"]["heldout"] == len(found["val_pairs"]) > 0
  assert split["sft"]["train"] > 0 and split["sft"]["heldout"] > 0
  # Held-out prompts are never among the prompts any stage trains on.
  held = {render(m) for m in found["heldout_prompts"]}
  val = {render(p.prompt) for p in found["val_pairs"]}
  train_prompts = {render(r["prompt"]) for r in found["pairs"].records} - val
  assert held and not held & train_prompts


def test_too_little_feedback_is_bad_input(tmp_path):
  store = _feedback(tmp_path, _hh_pairs(tmp_path, 40))
  # Only feedback since the serving version was registered counts: here none.
  with pytest.raises(ValueError, match="too little feedback for dpo: 0 training and 0 "
                     "held-out preference pairs from 0 feedback rows since v0"):
    continual.collect(_FakeRegistry(store.feedback()[-1]["created"] + 1), store.path,
                      _config())
  # A version the loop made: the rows after the last one it was trained on, whatever
  # their time (here the last 4, two prompts' rows: too few for a held-out part).
  rows = store.feedback()
  made = _FakeRegistry(rows[-1]["created"] + 1, {"feedback": {"last_id": rows[-5]["id"]}})
  with pytest.raises(ValueError, match="from 4 feedback rows since v0"):
    continual.collect(made, store.path, _config())
  with pytest.raises(ValueError, match="no feedback database"):
    continual.collect(_FakeRegistry(0.0), str(tmp_path / "none.db"), _config())
  with pytest.raises(ValueError, match="config.updates names 'ppo'"):
    continual.collect(_FakeRegistry(0.0), store.path, _config(updates=("ppo",)))


def test_plan_chains_stages_from_the_serving_checkpoint(tmp_path):
  config = _config(updates=("sft", "dpo"))
  data = {"sft": "/d/sft.jsonl", "dpo": "/d/pairs.jsonl"}
  (sft, sft_cmd, sft_dir), (dpo, dpo_cmd, dpo_dir) = continual.plan_stages(
      config, "/serving/checkpoints/30", str(tmp_path), data)
  assert (sft, dpo) == ("sft", "dpo")
  assert sft_cmd[:4] == ["-m", "train.sft", "--config=configs/sft/chat.py:runlocal=true",
                         f"--workdir={tmp_path}/sft"]
  assert "--config.init_from=/serving/checkpoints/30" in sft_cmd
  assert f"--config.init_from={sft_dir}" in dpo_cmd  # DPO starts from the SFT update
  for cmd, source in ((sft_cmd, data["sft"]), (dpo_cmd, data["dpo"])):
    assert f"--config.data.sources={source}" in cmd
    assert "--config.lora.rank=8" in cmd and "--config.data.val_fraction=0.2" in cmd
  bad = _config(**{"dpo.overrides": ("train.num_stepz=3",)})
  with pytest.raises(ValueError, match="num_stepz"):
    continual.plan_stages(bad, "/s", str(tmp_path), data)


def test_regressions_beyond_tolerance_refuse():
  result = {"serving": {"rm_score": 0.2, "rm_winrate": 0.5, "pair_accuracy": 0.6,
                        "redteam_safe": 1.0},
            "candidate": {"rm_score": 0.0, "rm_winrate": 0.45, "pair_accuracy": 0.6,
                          "redteam_safe": float("nan"), "blocklist_clean": 0.0}}
  tolerance = {"rm_score": 0.25, "rm_winrate": 0.1, "pair_accuracy": 0.0,
               "redteam_safe": 0.5, "blocklist_clean": 0.0}
  # blocklist_clean is missing on the serving side: not checked; NaN always regresses.
  assert continual_eval.regressions(result, tolerance) == [
      "refused: redteam_safe nan < 1.0000 - 0.5"]
  tolerance.update(rm_score=0.1, pair_accuracy=-0.01)
  assert continual_eval.regressions(result, tolerance) == [
      "refused: rm_score 0.0000 < 0.2000 - 0.1",
      "refused: pair_accuracy 0.6000 < 0.6000 - -0.01",
      "refused: redteam_safe nan < 1.0000 - 0.5"]


def _loop(registry, feedback, workdir, rm, *flags):
  return run_cmd([sys.executable, "-m", "launch.continual", f"--registry={registry}",
                  f"--feedback={feedback}", f"--workdir={workdir}", f"--config={SMOKE}",
                  f"--config.eval.reward_checkpoint={rm}", *flags], timeout=900)


@pytest.mark.cli
def test_bad_input_is_one_error_line(tmp_path):
  registry = str(tmp_path / "reg")
  Registry(registry)
  for flags, cause in (((), "has no current version"),
                       (("--config.lora.rnk=2",), "--config.lora.rnk: the config has no field")):
    out = _loop(registry, str(tmp_path / "f.db"), str(tmp_path / "w"), "/no/rm", *flags)
    assert out.returncode == 2, out.stdout
    lines = out.stdout.strip().splitlines()
    assert lines[-1].startswith("error: ") and cause in lines[-1], lines


def test_loop_end_to_end(tmp_path, english_sft_run, english_rm_run):
  sft, _ = english_sft_run
  rm, pairs_file, _ = english_rm_run
  registry = Registry(str(tmp_path / "reg"))
  serving = registry.register("v0", sft)
  registry.promote("v0")
  store = _feedback(tmp_path, read_source(pairs_file).pairs[:32])
  workdir = str(tmp_path / "work")

  # Only pair accuracy decides here: a smoke-size update moves the judge's figures by noise
  # (their own tolerances are the config's business, tested on regressions() above), so
  # they get tolerances nothing can exceed. A tolerance below zero: the candidate must beat
  # the serving version on pair accuracy by more than 1, which it cannot. Refused, with
  # the reason; nothing registered.
  loose = {"rm_score": 1e6, "rm_winrate": 2.0, "redteam_safe": 2.0, "blocklist_clean": 2.0}
  loose_flags = [f"--config.tolerance.{k}={v}" for k, v in loose.items()]
  out = _loop(registry.root, store.path, workdir, rm, "--name=cand", *loose_flags,
              "--config.tolerance.pair_accuracy=-1.0")
  assert out.returncode == 1, out.stdout[-5000:]
  assert "$ " + sys.executable + " -m rlhf.dpo --config=configs/dpo/hh.py:runlocal=true" \
      in out.stdout  # the exact command is printed
  refusal = [line for line in out.stdout.splitlines() if line.startswith("refused:")]
  assert len(refusal) == 1 and refusal[0].startswith("refused: pair_accuracy "), out.stdout
  assert refusal[0].endswith(" - -1"), refusal
  assert [v["name"] for v in registry.versions()] == ["v0"]
  assert registry.current()["name"] == "v0" and registry.generation() == 1
  gate = json.load(open(os.path.join(workdir, "cand", "gate.json")))
  assert gate["refused"] == refusal
  assert gate["counts"]["feedback_prompts"] > 0 and gate["counts"]["heldout_pairs_scored"] > 0

  # The update was trained on the loop's training pairs and validated on exactly its
  # held-out pairs (the stage splits as the loop does).
  heldout = json.load(open(os.path.join(workdir, "cand", "data", "heldout.json")))
  metrics = [json.loads(line) for line in open(os.path.join(workdir, "cand", "dpo",
                                                            "metrics.jsonl"))]
  assert any("train/loss" in m for m in metrics)
  evals = [m for m in metrics if "eval/tokens" in m]
  assert evals and evals[-1]["eval/tokens"] == heldout["split"]["dpo"]["heldout"]

  # The same command with pair accuracy allowed to fall by 1 (it cannot fall further): the
  # finished update is not trained again; the gate passes; the candidate is registered and
  # promoted.
  out = _loop(registry.root, store.path, workdir, rm, "--name=cand", *loose_flags,
              "--config.tolerance.pair_accuracy=1.0")
  assert out.returncode == 0, out.stdout[-5000:]
  assert "dpo: finished" in out.stdout and "refused" not in out.stdout
  assert out.stdout.strip().splitlines()[-1] == "promoted cand (generation 2)"
  version = registry.current()
  assert version["name"] == "cand" and version["parent"] == "v0"
  assert version["checkpoint"] == os.path.join(workdir, "cand", "dpo", "checkpoints", "10")
  assert version["lineage"]["stage"] == "dpo" and version["lineage"]["lora"]["rank"] == 8
  assert version["lineage"]["parents"][0]["path"] == serving["checkpoint"]
  gate = version["metrics"]["gate"]
  assert set(gate["candidate"]) >= set(continual_eval.GATED)
  assert continual_eval.regressions(gate, {**loose, "pair_accuracy": 1.0}) == []
  assert version["metrics"]["feedback"]["rows"] == len(store.feedback())
  # A rollback (the server's other path) returns to the serving version.
  assert registry.rollback()["name"] == "v0"
