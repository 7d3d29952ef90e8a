"""Tests for model/heads.py: the score is read at the explicit end index whatever the
padding, per-token values agree with scores, and the head's initialisation.
"""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.heads import RewardModel, ScalarHead, gather_positions


@pytest.fixture(scope="module")
def reward_model(tiny_cfg):
  return RewardModel(tiny_cfg, nnx.Rngs(params=0))


def _alone(model, seq):
  """Score of one unpadded sequence, read at its last token."""
  tokens = jnp.asarray(seq, jnp.int32)[None]
  return float(model.score(tokens, None, None, jnp.asarray([len(seq) - 1]))[0])


@pytest.mark.parametrize("side", ["right", "left"])
def test_score_of_a_padded_batch_equals_each_sequence_alone(reward_model, tiny_cfg, side):
  rng = np.random.default_rng(0)
  seqs = [rng.integers(1, tiny_cfg.vocab_size, n).tolist() for n in (5, 12, 1, 9)]
  t = 16
  tokens = np.zeros((4, t), np.int32)
  positions = np.zeros((4, t), np.int32)
  segments = np.zeros((4, t), np.int32)
  index = np.zeros(4, np.int32)
  for b, seq in enumerate(seqs):
    start = 0 if side == "right" else t - len(seq)
    tokens[b, start:start + len(seq)] = seq
    positions[b, start:start + len(seq)] = np.arange(len(seq))
    segments[b, start:start + len(seq)] = 1
    index[b] = start + len(seq) - 1
  # Padding tokens that would change the answer if they were attended to.
  tokens[segments == 0] = 7
  batch = reward_model.score(jnp.asarray(tokens), jnp.asarray(positions),
                             jnp.asarray(segments), jnp.asarray(index))
  alone = [_alone(reward_model, seq) for seq in seqs]
  np.testing.assert_allclose(np.asarray(batch), alone, rtol=1e-5, atol=1e-5)
  # Reading "the last position" instead would be wrong for right padding.
  if side == "right":
    last = reward_model.score(jnp.asarray(tokens), jnp.asarray(positions),
                              jnp.asarray(segments), jnp.full(4, t - 1))
    assert not np.allclose(np.asarray(last), alone, atol=1e-3)


def test_values_are_per_token_scores(reward_model, tiny_cfg):
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, tiny_cfg.vocab_size, (2, 8)),
                       jnp.int32)
  values = reward_model.values(tokens)
  assert values.shape == (2, 8) and values.dtype == jnp.float32
  for i in range(8):
    np.testing.assert_allclose(reward_model.score(tokens, None, None, jnp.full(2, i)),
                               values[:, i], rtol=1e-5, atol=1e-6)


def test_head_init_and_no_output_projection(tiny_cfg):
  cfg = tiny_cfg.replace(embed_dim=512)
  head = ScalarHead(cfg, nnx.Rngs(params=3))
  std = float(np.std(np.asarray(head.kernel[...])))
  assert abs(std - 1 / math.sqrt(513)) < 0.15 / math.sqrt(513)
  assert np.asarray(head.bias[...]).tolist() == [0.0]
  params = nnx.to_pure_dict(nnx.state(RewardModel(tiny_cfg, nnx.Rngs(params=0))))
  assert set(params) == {"trunk", "head"} and "lm_head" not in params["trunk"]
  h = jnp.arange(24, dtype=jnp.float32).reshape(2, 3, 4)
  np.testing.assert_array_equal(gather_positions(h, jnp.asarray([2, 0])), h[[0, 1], [2, 0]])
  with pytest.raises(ValueError, match="no output projection"):
    RewardModel(tiny_cfg, nnx.Rngs(params=0)).trunk.logits(jnp.zeros((1, 1, 64)))
