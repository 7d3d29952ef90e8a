"""Tests for rlhf/dpo_core.py: the loss against hand-computed values (log 2 at init, label
smoothing, IPO) and response log-probabilities against a per-token numpy loop."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf.dpo_core import dpo_loss, response_logps


def test_dpo_loss_is_log2_when_policy_equals_reference():
  pc, pr = jnp.asarray([-5.0, -1.0]), jnp.asarray([-3.0, -8.0])
  losses, aux = dpo_loss(pc, pr, pc, pr, beta=0.1)
  np.testing.assert_allclose(np.asarray(losses), [math.log(2)] * 2, rtol=1e-6)
  assert np.asarray(aux["reward_accuracy"]).tolist() == [0.5, 0.5]


def test_dpo_sigmoid_smoothing_and_ipo_match_hand_values():
  pc, pr, rc, rr = (jnp.asarray([x]) for x in (-4.0, -6.0, -5.0, -5.0))
  z = (-4 + 5) - (-6 + 5)  # = 2
  nls = lambda x: math.log1p(math.exp(-x))  # -log sigmoid(x)
  losses, aux = dpo_loss(pc, pr, rc, rr, beta=0.5)
  assert float(losses[0]) == pytest.approx(nls(0.5 * z), rel=1e-6)
  assert float(aux["reward_margin"][0]) == pytest.approx(0.5 * z)
  losses, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1)
  assert float(losses[0]) == pytest.approx(0.9 * nls(1.0) + 0.1 * nls(-1.0), rel=1e-6)
  losses, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="ipo")
  assert float(losses[0]) == pytest.approx((2 - 1) ** 2, rel=1e-6)
  with pytest.raises(ValueError, match="hinge"):
    dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="hinge")


def test_response_logps_sum_the_response_tokens_only():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 6, 5)).astype(np.float32)
  tokens = rng.integers(0, 5, (2, 6)).astype(np.int32)
  start, end = np.array([2, 1]), np.array([4, 5])
  out = response_logps(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(start),
                       jnp.asarray(end))
  logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))
  for b in range(2):
    expected = sum(logp[b, j - 1, tokens[b, j]] for j in range(start[b], end[b] + 1))
    assert float(out[b]) == pytest.approx(expected, rel=1e-5)
