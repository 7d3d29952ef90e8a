"""Tests for train/optim.py (schedule, weight-decay mask) and train/losses.py (masked LM loss),
against closed forms computed here.
"""

import math

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs.common import optim_config
from model.transformer import Transformer
from train.losses import lm_loss, token_log_probs
from train.optim import decay_mask, learning_rate_schedule
from train.state import abstract_model
from model.sharding import rules_from_config


def _nanogpt_lr(step, lr, end_lr, warmup, decay):
  """Linear warmup from 0, cosine from lr to end_lr reached at `decay`, then flat."""
  if step < warmup:
    return lr * step / warmup
  if step > decay:
    return end_lr
  ratio = (step - warmup) / (decay - warmup)
  return end_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - end_lr)


@pytest.mark.parametrize("decay_steps", [0, 1500])
def test_cosine_schedule_matches_the_closed_form(decay_steps):
  cfg = optim_config(lr=1e-3, end_lr=1e-4, warmup_steps=100, decay_steps=decay_steps)
  schedule = learning_rate_schedule(cfg, num_steps=2000)
  decay = decay_steps or 2000
  for step in (0, 1, 50, 99, 100, 101, 550, 1000, decay - 1, decay, decay + 300):
    assert float(schedule(step)) == pytest.approx(
        _nanogpt_lr(step, 1e-3, 1e-4, 100, decay), rel=1e-5, abs=1e-12), step


def test_constant_schedule_and_unknown_schedule():
  cfg = optim_config(lr=3e-4, warmup_steps=10, schedule="constant")
  schedule = learning_rate_schedule(cfg, num_steps=100)
  assert float(schedule(5)) == pytest.approx(1.5e-4)
  assert float(schedule(10)) == pytest.approx(3e-4)
  assert float(schedule(99)) == pytest.approx(3e-4)
  with pytest.raises(ValueError, match="schedule='linear'"):
    learning_rate_schedule(optim_config(schedule="linear"), 100)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_weight_decay_applies_to_matrices_and_embeddings_not_norms(tiny_cfg, scan_layers):
  _, _, logical = abstract_model(Transformer, tiny_cfg.replace(scan_layers=scan_layers))
  mask = decay_mask(logical)
  block = mask["blocks"] if scan_layers else mask["blocks"][0]
  assert mask["embedding"] and mask["lm_head"]
  assert block["attn"]["wq"] and block["mlp"]["w_down"]
  assert not mask["final_norm"]["scale"]
  assert not block["attn_norm"]["scale"] and not block["mlp_norm"]["scale"]
  if scan_layers:
    assert logical["blocks"]["attn_norm"]["scale"] == P("layers", "embed")


def test_rules_from_config_strings():
  rules = dict(rules_from_config({"batch": "data,fsdp", "embed": "fsdp", "vocab": "",
                                  "mlp": " tensor "}))
  assert rules == {"batch": ("data", "fsdp"), "embed": "fsdp", "vocab": None, "mlp": "tensor"}


def test_lm_loss_is_the_masked_mean_cross_entropy():
  rng = np.random.default_rng(0)
  b, t, v = 2, 5, 7
  logits = rng.normal(size=(b, t, v)).astype(np.float32)
  targets = rng.integers(0, v, (b, t)).astype(np.int32)
  mask = np.array([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1]], np.float32)
  batch = dict(tokens=np.zeros((b, t), np.int32), targets=targets,
               positions=np.zeros((b, t), np.int32), segment_ids=np.ones((b, t), np.int32),
               loss_mask=mask)
  seen = {}

  def model(tokens, positions, segment_ids):
    seen["args"] = (tokens, positions, segment_ids)
    return logits

  loss, aux = lm_loss(model, batch, None)
  log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(log_softmax, targets[..., None], -1)[..., 0]
  assert float(loss) == pytest.approx(float((nll * mask).sum() / mask.sum()), rel=1e-5)
  correct = (logits.argmax(-1) == targets) * mask
  assert float(aux["accuracy"]) == pytest.approx(float(correct.sum() / mask.sum()), rel=1e-6)
  assert float(aux["weight"]) == mask.sum()
  assert seen["args"][2] is batch["segment_ids"]
  np.testing.assert_allclose(np.asarray(token_log_probs(logits, targets)), -nll, rtol=1e-5)
  # A fully masked batch gives 0, not NaN.
  loss0, aux0 = lm_loss(model, {**batch, "loss_mask": np.zeros_like(mask)}, None)
  assert float(loss0) == 0.0 and float(aux0["weight"]) == 0.0
