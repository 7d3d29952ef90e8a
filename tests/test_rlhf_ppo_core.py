"""Tests for rlhf/ppo_core.py against straightforward numpy loops (GAE, rewards, losses, KL
estimators, whitening) and the ratio-is-1 property on unchanged log-probs."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from rlhf import ppo_core


def _masks(rng, b, n):
  lengths = rng.integers(0, n + 1, b)
  lengths[0] = n  # one full row
  return (np.arange(n)[None] < lengths[:, None]).astype(np.float32), lengths


def _gae_loop(rewards, values, length, gamma, lam):
  """GAE of one row, textbook form: V after the last response token is 0."""
  adv = np.zeros(len(rewards))
  last = 0.0
  for t in reversed(range(length)):
    next_value = values[t + 1] if t + 1 < length else 0.0
    delta = rewards[t] + gamma * next_value - values[t]
    last = delta + gamma * lam * last
    adv[t] = last
  return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0)])
def test_gae_matches_a_loop(gamma, lam):
  rng = np.random.default_rng(0)
  mask, lengths = _masks(rng, 6, 9)
  rewards, values = rng.normal(size=(6, 9)), rng.normal(size=(6, 9))
  adv, ret = ppo_core.gae(jnp.asarray(rewards, jnp.float32), jnp.asarray(values, jnp.float32),
                          jnp.asarray(mask), gamma, lam)
  for b in range(6):
    expected = _gae_loop(rewards[b], values[b], lengths[b], gamma, lam)
    np.testing.assert_allclose(np.asarray(adv[b]), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ret[b]), (expected + values[b]) * mask[b],
                               rtol=1e-5, atol=1e-5)


def test_kl_estimators_and_token_rewards():
  logp, ref = np.log([0.5, 0.2, 0.9]), np.log([0.25, 0.4, 0.9])
  r = np.exp(ref - logp)
  for name, expected in (("k1", -np.log(r)), ("k2", 0.5 * np.log(r) ** 2),
                         ("k3", (r - 1) - np.log(r))):
    np.testing.assert_allclose(ppo_core.kl_estimate(jnp.asarray(logp), jnp.asarray(ref), name),
                               expected, rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match="k4"):
    ppo_core.kl_estimate(jnp.asarray(logp), jnp.asarray(ref), "k4")
  mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], np.float32)
  lp = np.log(np.full((3, 4), 0.5))
  rf = np.log(np.full((3, 4), 0.25))
  rewards, kl = ppo_core.token_rewards(jnp.asarray([2.0, -1.0, 5.0]), jnp.asarray(lp),
                                       jnp.asarray(rf), jnp.asarray(mask), 0.1)
  k = math.log(2.0)  # k1 per token
  np.testing.assert_allclose(np.asarray(kl), k * mask, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(rewards), [[-0.1 * k, -0.1 * k, 2 - 0.1 * k, 0],
                                                   [-1 - 0.1 * k, 0, 0, 0], [0, 0, 0, 0]],
                             rtol=1e-6, atol=1e-7)


def test_policy_loss_matches_numpy_and_is_exact_at_ratio_one():
  rng = np.random.default_rng(1)
  mask, _ = _masks(rng, 4, 7)
  logp, old = rng.normal(-2, 0.3, (4, 7)), rng.normal(-2, 0.3, (4, 7))
  adv = rng.normal(size=(4, 7))
  loss, aux = ppo_core.policy_loss(*map(jnp.asarray, (logp, old, adv, mask)), clip=0.2)
  ratio = np.exp(logp - old)
  per = np.maximum(-adv * ratio, -adv * np.clip(ratio, 0.8, 1.2))
  np.testing.assert_allclose(float(loss), (per * mask).sum() / mask.sum(), rtol=1e-5)
  clipped = (-adv * np.clip(ratio, 0.8, 1.2) > -adv * ratio)
  np.testing.assert_allclose(float(aux["clipfrac"]), (clipped * mask).sum() / mask.sum(),
                             rtol=1e-6)
  np.testing.assert_allclose(float(aux["approxkl"]),
                             (0.5 * (logp - old) ** 2 * mask).sum() / mask.sum(), rtol=1e-5)
  loss1, aux1 = ppo_core.policy_loss(*map(jnp.asarray, (old, old, adv, mask)), clip=0.2)
  assert float(aux1["ratio_max_dev"]) == 0.0 and float(aux1["approxkl"]) == 0.0
  np.testing.assert_allclose(float(loss1), (-adv * mask).sum() / mask.sum(), rtol=1e-6)


def test_value_loss_and_explained_variance_match_numpy():
  rng = np.random.default_rng(2)
  mask, _ = _masks(rng, 4, 6)
  v, old, ret = rng.normal(size=(3, 4, 6))
  loss, aux = ppo_core.value_loss(*map(jnp.asarray, (v, old, ret, mask)), clip=0.2)
  vc = old + np.clip(v - old, -0.2, 0.2)
  per = np.maximum((v - ret) ** 2, (vc - ret) ** 2)
  np.testing.assert_allclose(float(loss), 0.5 * (per * mask).sum() / mask.sum(), rtol=1e-5)
  sel = mask > 0
  ev = 1 - np.var((ret - v)[sel]) / np.var(ret[sel])
  np.testing.assert_allclose(float(aux["explained_variance"]), ev, rtol=1e-4)


def test_whiten_and_adaptive_controller():
  x = jnp.asarray([[1.0, 2.0, 3.0, 100.0]])
  mask = jnp.asarray([[1.0, 1.0, 1.0, 0.0]])
  w = np.asarray(ppo_core.whiten(x, mask))
  np.testing.assert_allclose(w[0, :3], (np.array([1, 2, 3]) - 2) / np.std([1, 2, 3]), rtol=1e-5)
  assert w[0, 3] == 0
  np.testing.assert_allclose(np.asarray(ppo_core.whiten(x, mask, shift_mean=False))[0, :3],
                             (np.array([1, 2, 3]) - 2) / np.std([1, 2, 3]) + 2, rtol=1e-5)
  fixed = ppo_core.KLController(0.05)
  assert fixed.update(100.0, 64) == 0.05
  adaptive = ppo_core.KLController(0.2, target=6.0, horizon=10_000)
  assert adaptive.update(12.0, 100) == pytest.approx(0.2 * (1 + 0.2 * 100 / 10_000))
  assert adaptive.update(3.0, 100) == pytest.approx(0.2 * 1.002 * (1 - 0.2 * 0.01))
