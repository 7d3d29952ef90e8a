"""Tests for rlhf/ppo.py on real smoke-size SFT and reward-model checkpoints: the first
minibatch's ratio is exactly 1, a toy rule-based reward rises (and does not with a huge KL
coefficient), an end-to-end CLI run with checkpoints, curves and resume, and bad inputs."""

import json
import os
import sys

import numpy as np
import pytest

from conftest import run_cmd


def _config(sft, **ppo):
  from configs.ppo.hh import get_config
  config = get_config("runlocal=true")
  config.init_from, config.reward_from = sft, ""
  config.ppo.update(ppo)
  config.train.update(dict(peak_flops=1e9, async_checkpoint=False))
  return config


def _lower_half_reward(vocab_size):
  """Fraction of response tokens in the lower half of the vocabulary (optimum 1.0)."""
  def reward(tokens, response_mask):
    n = response_mask.shape[1]
    low = (tokens[:, -n:] < vocab_size // 2).astype(np.float32)
    return (low * response_mask).sum(1) / np.maximum(response_mask.sum(1), 1)
  return reward


@pytest.fixture(scope="module")
def toy_runs(english_sft_run, tmp_path_factory):
  """The toy task twice: without KL penalty, and with a huge KL coefficient."""
  from rlhf.ppo import PPO
  sft, _ = english_sft_run
  runs = {}
  for name, kl in (("free", 0.0), ("pinned", 100.0)):
    config = _config(sft, iterations=16, rollout_batch_size=16, epochs=2, minibatches=2,
                     kl_coef=kl, temperature=1.0, missing_eos_penalty=0.0,
                     normalize_reward=False, checkpoint_every=0, sample_every=0)
    config.optim.lr = config.value_optim.lr = 3e-3
    ppo = PPO(config, str(tmp_path_factory.mktemp("toy") / name),
              reward_fn=_lower_half_reward(0))
    ppo.reward_fn = _lower_half_reward(ppo.policy.model_cfg.vocab_size)
    runs[name] = ppo.train()
  return runs


def test_first_minibatch_ratio_is_exactly_one(toy_runs):
  for history in toy_runs.values():
    for m in history:
      assert m["ppo/first_ratio_max_dev"] < 1e-5, m["ppo/first_ratio_max_dev"]
      # The sampler's log-probs are the training forward's, too.
      assert m["ppo/sampler_logp_max_dev"] < 1e-4


def test_toy_reward_rises_and_a_huge_kl_coefficient_pins_the_policy(toy_runs):
  # Measured once: free 0.68 -> 0.98 over 16 iterations, KL ~11 nats at the end; pinned
  # (kl_coef 100) 0.68 -> 0.72, KL ~2 (the first update, at KL 0, follows the score).
  gain = lambda h: np.mean([m["ppo/score"] for m in h[-4:]]) - np.mean(
      [m["ppo/score"] for m in h[:4]])
  late_kl = lambda h: np.mean([m["ppo/kl"] for m in h[-4:]])
  free, pinned = toy_runs["free"], toy_runs["pinned"]
  assert gain(free) > 0.15, [m["ppo/score"] for m in free]
  assert np.isfinite([m["ppo/kl"] for m in free]).all()
  assert gain(pinned) < 0.5 * gain(free), [m["ppo/score"] for m in pinned]
  assert late_kl(pinned) < 0.5 * late_kl(free)


def _ppo_cmd(workdir, sft, rm, *flags):
  return [sys.executable, "-m", "rlhf.ppo", "--config=configs/ppo/hh.py:runlocal=true",
          f"--workdir={workdir}", f"--config.init_from={sft}", f"--config.reward_from={rm}",
          "--local_devices=2", "--config.train.peak_flops=1e9", *flags]


def test_ppo_cli_from_sft_and_reward_checkpoints_and_resume(english_sft_run, english_rm_run,
                                                            tmp_path):
  from train import checkpoint as ckpt_lib
  sft, rm = english_sft_run[0], english_rm_run[0]
  workdir = str(tmp_path / "ppo")
  out = run_cmd(_ppo_cmd(workdir, sft, rm, "--config.ppo.iterations=2"))
  assert out.returncode == 0, out.stdout[-5000:]
  assert "iter 2/2" in out.stdout
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == [1, 2]
  for key in ("ppo/score", "ppo/kl", "ppo/entropy",
              "ppo/non_score_reward", "ppo/approxkl", "ppo/clipfrac",
              "ppo/ratio_mean", "ppo/ratio_var", "value/clipfrac",
              "value/explained_variance", "value/loss", "ppo/eos_fraction", "ppo/response_length",
              "time/rollout_s", "time/scoring_s", "time/update_s", "time/rollout_mfu"):
    assert all(np.isfinite(r[key]) for r in records), key
  assert records[0]["ppo/first_ratio_max_dev"] < 1e-5
  assert os.path.getsize(os.path.join(workdir, "ppo_curves.png")) > 1000
  assert os.path.exists(os.path.join(workdir, "samples.jsonl"))
  meta = ckpt_lib.read_metadata(os.path.join(workdir, "value"))
  assert meta["ppo"]["iteration"] == 2 and meta["parent"]["stage"] == "reward"
  assert ckpt_lib.read_metadata(os.path.join(workdir, "policy"))["parent"]["stage"] == "sft"
  # Resume: a longer run in the same workdir continues at iteration 3.
  out = run_cmd(_ppo_cmd(workdir, sft, rm, "--config.ppo.iterations=3"))
  assert out.returncode == 0, out.stdout[-5000:]
  assert "iter 3/3" in out.stdout and "iter 1/3" not in out.stdout


def _with_other_tokenizer(rm, tokenizer_from, path):
  """A copy of the reward-model run `rm` whose checkpoint holds `tokenizer_from`'s tokenizer."""
  import glob
  import shutil
  from train import checkpoint as ckpt_lib
  shutil.copytree(rm, path)
  blobs = glob.glob(os.path.join(path, "checkpoints", "*", "tokenizer", "blob.bin"))
  assert blobs
  for blob in blobs:
    with open(blob, "wb") as f:
      f.write(ckpt_lib.read_tokenizer(tokenizer_from))
  return str(path)


def test_ppo_refuses_bad_inputs(english_sft_run, english_rm_run, reference_run, tmp_path):
  from rlhf.ppo import PPO
  sft, rm = english_sft_run[0], english_rm_run[0]
  other_tokenizer = _with_other_tokenizer(rm, reference_run, tmp_path / "rm_char")
  cases = [
      (dict(reward_from=other_tokenizer), {}, "tokenizer .* differs from the policy's"),
      (dict(reward_from=sft), {}, "without a scalar head"),
      (dict(reward_from=rm), dict(max_prompt_tokens=4), "Empty prompt set"),
      (dict(reward_from=rm), dict(max_new_tokens=60), "exceeds the model context"),
      (dict(reward_from=""), {}, "set --config.reward_from"),
      (dict(reward_from=rm), dict(temperature=0.0), "temperature"),
  ]
  for i, (top, ppo, message) in enumerate(cases):
    config = _config(sft, **ppo)
    config.update(top)
    with pytest.raises(ValueError, match=message):
      PPO(config, str(tmp_path / str(i)))
