"""Tests for eval/reward.py: the bootstrap interval against the normal approximation, the
pairwise outcomes with ties, the length baselines, and the CLI's errors."""

import math
import sys

import numpy as np
import pytest

from conftest import run_cmd
from data.preferences import PreferencePair
from eval.reward import bootstrap_ci, length_baselines, pairwise_wins


def test_bootstrap_interval_matches_the_normal_approximation():
  values = np.r_[np.ones(240), np.zeros(160)]  # accuracy 0.6 on 400 pairs
  lo, hi = bootstrap_ci(values, num_resamples=20_000, seed=1)
  half = 1.959964 * math.sqrt(0.6 * 0.4 / 400)  # closed form, ~0.048
  assert lo == pytest.approx(0.6 - half, abs=0.006)
  assert hi == pytest.approx(0.6 + half, abs=0.006)
  assert bootstrap_ci(np.ones(10)) == (1.0, 1.0)
  assert bootstrap_ci(values, 500, seed=3) == bootstrap_ci(values, 500, seed=3)
  with pytest.raises(ValueError):
    bootstrap_ci([])


def test_pairwise_wins_and_length_baselines_count_ties_as_half():
  np.testing.assert_array_equal(pairwise_wins([2, 1, 3], [1, 1, 4]), [1, 0.5, 0])
  pair = lambda c, r: PreferencePair(({"role": "user", "content": "q"},), c, r, "q")
  longer, shorter = length_baselines([pair("long answer", "short"), pair("ab", "abc"),
                                      pair("same", "size")])
  np.testing.assert_array_equal(longer, [1, 0, 0.5])
  np.testing.assert_array_equal(shorter, [0, 1, 0.5])
  assert longer.mean() + shorter.mean() == 1.0


@pytest.mark.cli
def test_cli_names_a_missing_or_wrong_kind_of_checkpoint(tmp_path):
  out = run_cmd([sys.executable, "-m", "eval.reward", f"--checkpoint={tmp_path / 'none'}"])
  assert out.returncode != 0 and "does not exist" in out.stdout
