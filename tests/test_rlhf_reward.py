"""Tests for rlhf/reward.py: the Bradley-Terry loss against hand-computed values, init_from
an SFT checkpoint (trunk kept, fresh head), and an end-to-end CLI run on the shared HH pairs
that fits its training pairs and reports validation accuracy, then eval.reward on it.
"""

import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import reward_cmd, run_cmd
from rlhf.reward import bradley_terry, reward_loss

def _nll(x):
  return math.log1p(math.exp(-x))  # -log sigmoid(x), by hand


def test_bradley_terry_matches_hand_computed_values():
  chosen, rejected = jnp.asarray([1.0, -0.5, 2.0]), jnp.asarray([0.2, 0.5, 2.0])
  np.testing.assert_allclose(bradley_terry(chosen, rejected),
                             [_nll(0.8), _nll(-1.0), math.log(2.0)], rtol=1e-6)
  np.testing.assert_allclose(bradley_terry(chosen, rejected, 0.5),
                             [_nll(0.3), _nll(-1.5), _nll(-0.5)], rtol=1e-6)


class _TableModel:
  """A stand-in reward model: the score of a sequence is TABLE[its first token]."""
  TABLE = jnp.asarray([1.0, 0.2, -0.5, 0.5, 3.0, 3.0, 9.0, -9.0])

  def score(self, tokens, positions, segment_ids, score_index):
    del positions, segment_ids, score_index
    return self.TABLE[tokens[:, 0]]


def _batch(pairs, margins, mask):
  tokens = np.zeros((len(pairs), 2, 4), np.int32)
  tokens[:, :, 0] = pairs
  return {"tokens": jnp.asarray(tokens), "positions": jnp.zeros_like(tokens),
          "segment_ids": jnp.ones_like(tokens), "score_index": jnp.zeros((len(pairs), 2),
                                                                        jnp.int32),
          "margin": jnp.asarray(margins, jnp.float32), "pair_mask": jnp.asarray(mask,
                                                                               jnp.float32)}


def test_reward_loss_and_metrics_on_a_small_example():
  # Pairs (chosen score, rejected score): (1, 0.2), (-0.5, 0.5), (3, 3); a padding pair last.
  batch = _batch([[0, 1], [2, 3], [4, 5], [6, 7]], [0.0, 0.25, 0.0, 0.0], [1, 1, 1, 0])
  loss, aux = reward_loss(_TableModel(), batch, None)
  expected = (_nll(0.8) + _nll(-1.25) + math.log(2.0)) / 3
  np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
  assert float(aux["accuracy"]) == pytest.approx((1 + 0 + 0.5) / 3)
  assert float(aux["margin"]) == pytest.approx((0.8 - 1.0 + 0.0) / 3)
  assert float(aux["chosen_mean"]) == pytest.approx(3.5 / 3)
  assert float(aux["rejected_mean"]) == pytest.approx(3.7 / 3)
  assert float(aux["score_std"]) == pytest.approx(np.std([1, 0.2, -0.5, 0.5, 3, 3]), rel=1e-5)
  assert float(aux["weight"]) == 3
  # A constant margin of 0.5 adds to each pair's own; centering adds c * mean((rc + rr)^2).
  loss_m, _ = reward_loss(_TableModel(), batch, None, margin=0.5, center_coef=0.01)
  expected_m = (_nll(0.3) + _nll(-1.75) + _nll(-0.5)) / 3 + 0.01 * (1.2**2 + 0 + 36) / 3
  np.testing.assert_allclose(float(loss_m), expected_m, rtol=1e-6)


def _reward_config(init_from, **data):
  from configs.reward.hh import get_config
  config = get_config("runlocal=true")
  config.init_from = init_from
  config.train.update(dict(batch_size=8, eval_batch_size=16, peak_flops=1e9,
                           async_checkpoint=False))
  config.data.update(data)
  return config


def test_init_from_an_sft_checkpoint_keeps_the_trunk_and_adds_a_fresh_head(english_sft_run,
                                                                          tmp_path):
  from model.heads import score_head_params
  from model.transformer import Transformer
  from rlhf.reward import build
  from train import checkpoint as ckpt_lib
  from train.state import abstract_model
  sft, _ = english_sft_run
  trainer = build(_reward_config(sft), str(tmp_path / "rm")).trainers[0]
  state, data_state = trainer.restore_or_init()
  assert data_state is None and trainer.parent["stage"] == "sft"
  _, abstract, _ = abstract_model(Transformer, trainer.model_cfg)
  parent, _, _ = ckpt_lib.load_params(sft, abstract)
  params = jax.device_get(state.params)
  assert "lm_head" in parent and "lm_head" not in params["trunk"]
  parent.pop("lm_head")
  jax.tree.map(np.testing.assert_array_equal, params["trunk"], jax.device_get(parent))
  fresh = score_head_params(trainer.model_cfg, trainer.config.seed)
  # The head is initialised inside the jitted init adapter: equal to an eager init up to the
  # last bit of float32 rounding.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               params["head"], fresh)
  assert np.abs(params["head"]["kernel"]).sum() > 0 and params["head"]["bias"].tolist() == [0]
  trainer.close()


def test_reward_model_fits_its_training_pairs_and_reports_validation(english_rm_run):
  workdir, data, stdout = english_rm_run
  assert "Preference data: 48 records" in stdout
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  evals = [r for r in records if "eval/accuracy" in r]
  assert [r["step"] for r in evals] == [20, 40]
  assert all(0 <= r["eval/accuracy"] <= 1 and r["eval/tokens"] >= 5 for r in evals)
  losses = [r["train/loss"] for r in records if "train/loss" in r]
  assert losses[-1] < 0.3 < math.log(2) - 0.1 < losses[0] + 0.1, losses
  # Accuracy on the training pairs, scored afresh from the checkpoint: the model can fit.
  out = run_cmd([sys.executable, "-m", "eval.reward", f"--checkpoint={workdir}",
                 "--split=train", "--num_resamples=2000"])
  assert out.returncode == 0, out.stdout[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["accuracy"] >= 0.9, result
  assert result["ci_low"] <= result["accuracy"] <= result["ci_high"]
  assert result["num_pairs"] + result["dropped_too_long"] > 30


def test_reward_checkpoint_records_parent_and_score_normalisation(english_rm_run,
                                                                  english_sft_run):
  from train import checkpoint as ckpt_lib
  workdir, _, _ = english_rm_run
  meta = ckpt_lib.read_metadata(workdir)
  assert meta["stage"] == "reward" and meta["model_class"] == "RewardModel"
  assert meta["parent"]["stage"] == "sft"
  assert meta["parent"]["path"].startswith(os.path.abspath(english_sft_run[0]))
  norm = meta["reward_norm"]
  assert norm["std"] > 0 and np.isfinite(norm["mean"]) and norm["num_scores"] >= 10
  # Validation eval on the held-out pairs: eval.reward reproduces the run's own figure.
  out = run_cmd([sys.executable, "-m", "eval.reward", f"--checkpoint={workdir}",
                 "--num_resamples=1000"])
  assert out.returncode == 0, out.stdout[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    last_eval = [r for r in map(json.loads, f) if "eval/accuracy" in r][-1]
  assert result["accuracy"] == pytest.approx(last_eval["eval/accuracy"], abs=1e-6)
  assert result["num_pairs"] == last_eval["eval/tokens"]
  assert {"longer_baseline", "shorter_baseline"} <= set(result)


def test_reward_entry_point_refuses_bad_configs(english_sft_run, tmp_path):
  out = run_cmd(reward_cmd(str(tmp_path / "a"), ""))
  assert out.returncode != 0 and "set --config.init_from" in out.stdout
  out = run_cmd(reward_cmd(str(tmp_path / "b"), english_sft_run[0],
                           "--config.data.seq_len=512"))
  assert out.returncode != 0 and "exceeds the model context" in out.stdout
