"""Tests for rlhf/dpo.py on a real SFT checkpoint: the loss at initialisation is log 2
(policy = reference), and a short CLI run lowers the loss and records its parent."""

import json
import math
import os
import sys

import numpy as np
import pytest

from conftest import run_cmd


def _config(init_from):
  from configs.dpo.hh import get_config
  config = get_config("runlocal=true")
  config.init_from = init_from
  config.train.update(dict(batch_size=8, eval_batch_size=16, peak_flops=1e9,
                           async_checkpoint=False))
  return config


def test_dpo_loss_at_initialisation_is_log2(english_sft_run, tmp_path):
  from rlhf.dpo import build
  sft, _ = english_sft_run
  run = build(_config(sft), str(tmp_path / "dpo"))
  trainer, stats = run.trainers[0], run.stats
  state, _ = trainer.restore_or_init()
  metrics = run.evaluate(state.params)
  assert stats["reference_pairs"] > 100 and metrics["tokens"] >= 10
  assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-5)
  assert metrics["reward_accuracy"] == 0.5 and abs(metrics["reward_margin"]) < 1e-5
  assert metrics["logp_chosen"] < 0 and metrics["logp_rejected"] < 0
  trainer.close()


def test_dpo_cli_run_fits_its_pairs_and_records_its_parent(english_sft_run, english_rm_run,
                                                           tmp_path):
  # The reward-model test's 48 short HH pairs: a small set the smoke model can fit.
  from train import checkpoint as ckpt_lib
  sft, (_, pairs, _) = english_sft_run[0], english_rm_run
  workdir = str(tmp_path / "run")
  out = run_cmd([sys.executable, "-m", "rlhf.dpo", "--config=configs/dpo/hh.py:runlocal=true",
                 f"--workdir={workdir}", f"--config.init_from={sft}", "--local_devices=2",
                 "--config.train.peak_flops=1e9", "--config.optim.lr=1e-3",
                 f"--config.data.sources={pairs}", "--config.data.val_fraction=0.25",
                 "--config.data.seq_len=128", "--config.model.max_seq_len=128",
                 "--config.train.num_steps=40", "--config.train.log_every=10",
                 "--config.train.eval_every=40", "--config.train.checkpoint_every=40"])
  assert out.returncode == 0, out.stdout[-4000:]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  losses = [r["train/loss"] for r in records if "train/loss" in r]
  assert losses[-1] < 0.5 * losses[0] and losses[0] < math.log(2) + 0.05, losses
  train_acc = [r["train/reward_accuracy"] for r in records if "train/loss" in r]
  assert train_acc[-1] > 0.8, train_acc
  meta = ckpt_lib.read_metadata(workdir)
  assert meta["stage"] == "dpo" and meta["parent"]["stage"] == "sft"
  assert np.isfinite([r.get("eval/loss", 0.0) for r in records]).all()
