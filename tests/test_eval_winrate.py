"""Tests for eval/winrate.py: policies answering held-out prompts, judged by a reward model.

On the smoke chain's checkpoints: the SFT policy against itself ties on every comparison with
zero KL (common random numbers); the base model against the SFT policy gives figures that
are recomputed here from the per-response JSONL (win rate with its counts, score gain in
std units, KL, distinct-2), and bad flags stop with a message."""

import json
import os
import sys

import numpy as np
import pytest

from conftest import run_cmd


def _winrate_cmd(*flags):
  return [sys.executable, "-m", "eval.winrate", *flags]


def test_policies_compared_on_held_out_prompts(english_sft_run, english_rm_run, tmp_path):
  from rlhf.rollout import distinct_n
  from train import checkpoint as ckpt_lib
  sft, (rm, data, _) = english_sft_run[0], english_rm_run
  base = ckpt_lib.read_metadata(sft)["parent"]["path"]
  out_path = str(tmp_path / "compare.jsonl")
  out = run_cmd(_winrate_cmd(
      f"--policy=sft={sft}", f"--policy=same={sft}", f"--policy=base={base}",
      "--baseline=sft", f"--reference={sft}", f"--judge=rm={rm}", f"--judge=rm2={rm}",
      f"--sources={data}", "--val_fraction=0.25", "--max_prompt_tokens=48",
      "--max_new_tokens=16", "--samples_per_prompt=3", "--batch_size=8",
      f"--output={out_path}"))
  assert out.returncode == 0, out.stdout[-5000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  n, k = result["num_prompts"], result["samples_per_prompt"]
  assert n >= 2 and k == 3
  same, base_r = result["policies"]["same"], result["policies"]["base"]
  assert same["winrate/rm"] == 0.5 and same["winrate/rm/wins_ties_losses"] == [0, n * k, 0]
  assert same["kl"] == 0.0 and same["gain_std/rm"] == 0.0 and same["distinct2_ratio"] == 1.0
  with open(out_path) as f:
    records = [json.loads(line) for line in f]
  rows = {name: [r for r in records if r["policy"] == name] for name in ("sft", "base")}
  assert len(rows["base"]) == n * k
  theirs = np.array([r["score/rm"] for r in rows["sft"]])
  ours = np.array([r["score/rm"] for r in rows["base"]])
  wins = int((ours > theirs).sum())
  ties = int((ours == theirs).sum())
  assert base_r["winrate/rm/wins_ties_losses"] == [wins, ties, n * k - wins - ties]
  assert base_r["winrate/rm"] == pytest.approx((wins + 0.5 * ties) / (n * k))
  lo, hi = base_r["winrate/rm/ci"]
  assert lo <= base_r["winrate/rm"] <= hi
  assert base_r["gain_std/rm"] == pytest.approx((ours.mean() - theirs.mean()) / theirs.std(),
                                                rel=1e-4)
  assert base_r["score/rm"] == base_r["score/rm2"]  # the same judge twice
  kl = np.array([r["kl"] for r in rows["base"]])
  assert base_r["kl"] == pytest.approx(kl.mean(), rel=1e-5) and base_r["kl"] != 0.0
  assert 0 < base_r["distinct2"] <= 1


def test_bad_flags_stop_with_a_message(english_sft_run, english_rm_run, tmp_path):
  from eval.winrate import parse_named
  sft, rm = english_sft_run[0], english_rm_run[0]
  with pytest.raises(ValueError, match="expected name=checkpoint"):
    parse_named(["runs/sft"], "policy")
  with pytest.raises(ValueError, match="given twice"):
    parse_named(["a=x", "a=y"], "policy")
  cases = [
      ((f"--policy=sft={sft}", f"--judge=rm={sft}"), "not the RewardModel"),
      ((f"--policy=sft={rm}", f"--judge=rm={rm}"), "not the Transformer"),
      ((f"--policy=sft={sft}", f"--judge=rm={rm}", "--baseline=ppo"), "not one of the policies"),
      ((f"--policy=sft={sft}", f"--judge=rm={rm}", "--max_prompt_tokens=2"), "No held-out prompt"),
      ((f"--policy=sft={sft}", f"--judge=rm={tmp_path / 'nothing'}"), "does not exist"),
  ]
  for flags, message in cases:
    out = run_cmd(_winrate_cmd(*flags))
    assert out.returncode != 0 and message in out.stdout, (flags, out.stdout[-2000:])
