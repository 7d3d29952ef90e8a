"""Reward-model evaluation: pairwise accuracy with a bootstrap interval, and length baselines.

  python -m eval.reward --checkpoint=runs/rm                     # the run's validation pairs
  python -m eval.reward --checkpoint=runs/rm --data=my_pairs.jsonl --split=all

Reports, on the same pairs:
- `accuracy`: fraction of pairs with r(chosen) > r(rejected) (a tie counts 1/2), and a
  percentile-bootstrap confidence interval (`ci_low`, `ci_high`; pairs resampled with
  replacement, 10,000 resamples, seeded).
- `longer_baseline` / `shorter_baseline`: the accuracy of "the longer (shorter) response
  wins", length in characters of the response text, a tie counting 1/2. A model that does
  not beat both has learned nothing a length count could not do. Each has its own interval.

The pairs are those the reward model can score: read and split exactly as its run did
(`data.preferences`, the run's `data.val_fraction` and `data.seed` unless overridden), then
encoded with its tokenizer and `data.seq_len`; pairs dropped as too long are counted and
excluded from every figure. The last line printed is one JSON object.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Mapping, Sequence

import numpy as np
from absl import app, flags, logging

from data.chat import get_template
from data.preference_pipeline import PreferenceRows, build_rows
from data.preferences import PreferencePair, read_sources, split_pairs
from data.row_pipeline import RowValidationSet
from eval.loading import LoadedCheckpoint, load_checkpoint, parse_mesh
from model.heads import RewardModel
from rlhf.reward import pair_scores
from train import checkpoint as ckpt_lib

SPLITS = ("val", "train", "all")


def bootstrap_ci(values: Sequence[float], num_resamples: int = 10_000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
  """Percentile-bootstrap interval of the mean of `values` (resampled with replacement)."""
  values = np.asarray(values, np.float64)
  if values.size == 0:
    raise ValueError("bootstrap_ci of no values")
  rng = np.random.default_rng(seed)
  means = np.empty(num_resamples)
  chunk = max(1, 2_000_000 // values.size)  # bounded memory for large sets
  for start in range(0, num_resamples, chunk):
    n = min(chunk, num_resamples - start)
    means[start:start + n] = values[rng.integers(0, values.size, (n, values.size))].mean(1)
  alpha = (1.0 - level) / 2
  return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def pairwise_wins(first: Sequence[float], second: Sequence[float]) -> np.ndarray:
  """Per pair: 1 if first > second, 0.5 on a tie, else 0."""
  first, second = np.asarray(first, np.float64), np.asarray(second, np.float64)
  return (first > second) + 0.5 * (first == second)


def length_baselines(pairs: Sequence[PreferencePair]) -> tuple[np.ndarray, np.ndarray]:
  """Per-pair outcomes of "longer wins" and "shorter wins" (characters of the responses)."""
  chosen = np.array([len(p.chosen) for p in pairs])
  rejected = np.array([len(p.rejected) for p in pairs])
  return pairwise_wins(chosen, rejected), pairwise_wins(rejected, chosen)


def score_rows(loaded: LoadedCheckpoint, rows: PreferenceRows, batch_size: int = 32
               ) -> np.ndarray:
  """Scores [N, 2] (chosen, rejected) of every row, on the checkpoint's runtime (one
  compiled program per padded shape, every process gets every row's scores)."""
  if not rows.num_rows:
    return np.zeros([0, 2], np.float32)
  runtime = loaded.runtime
  batch_size = runtime.padded_batch_size(batch_size)
  scores = runtime.apply_batches(pair_scores, loaded.params,
                                 RowValidationSet(rows)(batch_size))
  return np.asarray(scores)[:rows.num_rows]


def evaluate_pairs(loaded: LoadedCheckpoint, pairs: Sequence[PreferencePair], *,
                   seq_len: int, min_prompt_tokens: int = 16, batch_size: int = 32,
                   num_resamples: int = 10_000, seed: int = 0) -> dict[str, Any]:
  """Accuracy, its bootstrap interval and both length baselines on `pairs` (module doc)."""
  template = get_template("auto", loaded.tokenizer)
  # The same encoding as training; the pairs too long for seq_len are left out.
  rows, counts = build_rows(pairs, template, seq_len=seq_len,
                            min_prompt_tokens=min_prompt_tokens)
  dropped = counts["dropped_too_long"]
  if not rows.num_rows:
    raise ValueError(f"No pair fits seq_len={seq_len} ({dropped} dropped as too long)")
  kept = [pairs[i] for i in rows.source_index]
  scores = score_rows(loaded, rows, batch_size)
  correct = pairwise_wins(scores[:, 0], scores[:, 1])
  longer, shorter = length_baselines(kept)
  out: dict[str, Any] = {"num_pairs": len(kept), "dropped_too_long": dropped}
  for name, values in (("accuracy", correct), ("longer_baseline", longer),
                       ("shorter_baseline", shorter)):
    lo, hi = bootstrap_ci(values, num_resamples, seed=seed)
    prefix = "" if name == "accuracy" else name + "_"
    out.update({name: float(values.mean()), f"{prefix}ci_low": lo, f"{prefix}ci_high": hi})
  out.update(chosen_mean=float(scores[:, 0].mean()), rejected_mean=float(scores[:, 1].mean()),
             score_std=float(scores.std()), margin=float((scores[:, 0] - scores[:, 1]).mean()))
  return out


def select_pairs(sources: str, split: str, val_fraction: float, seed: int
                 ) -> tuple[list[PreferencePair], dict[str, Any]]:
  """Reads `sources` and returns the pairs of `split` ("val", "train" or "all")."""
  if split not in SPLITS:
    raise ValueError(f"--split={split!r}: expected one of {SPLITS}")
  pairs, files = read_sources(sources)
  info = {"records": sum(f.records for f in files),
          "skipped": {r: sum(f.skipped[r] for f in files) for r in files[0].skipped}}
  if split == "all":
    return pairs, info
  train, val, _ = split_pairs(pairs, val_fraction, seed)
  return (val if split == "val" else train), info


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  FLAGS = flags.FLAGS
  logging.set_verbosity(logging.ERROR)  # Orbax logs every file operation
  try:
    mesh_shape = parse_mesh(FLAGS.mesh)
    loaded = load_checkpoint(FLAGS.checkpoint, mesh_shape, expect=RewardModel)
    data_cfg = loaded.meta.get("config", {}).get("data", {})
    sources = FLAGS.data or data_cfg.get("sources", "")
    fraction = (FLAGS.val_fraction if FLAGS.val_fraction >= 0
                else data_cfg.get("val_fraction", 0.1))
    pairs, info = select_pairs(sources, FLAGS.split, fraction, data_cfg.get("seed", 0))
    result = evaluate_pairs(
        loaded, pairs, seq_len=FLAGS.seq_len or data_cfg.get("seq_len", 256),
        min_prompt_tokens=data_cfg.get("min_prompt_tokens", 16),
        batch_size=FLAGS.batch_size, num_resamples=FLAGS.num_resamples)
  except (ckpt_lib.CheckpointError, ValueError, OSError) as e:
    sys.exit("error: " + " ".join(str(e).split()))  # one line, no traceback
  result.update(split=FLAGS.split, sources=sources, checkpoint=loaded.meta["checkpoint_path"],
                records=info["records"], skipped=info["skipped"])
  print(f"{sources} [{FLAGS.split}]: {result['num_pairs']} pairs scored "
        f"({result['dropped_too_long']} too long for seq_len; skipped records "
        f"{ {k: v for k, v in info['skipped'].items() if v} })")
  for name in ("accuracy", "longer_baseline", "shorter_baseline"):
    prefix = "" if name == "accuracy" else name + "_"
    print(f"  {name:17s} {result[name]:.4f}  95% CI [{result[prefix + 'ci_low']:.4f}, "
          f"{result[prefix + 'ci_high']:.4f}]")
  print(json.dumps(result, sort_keys=True))


def define_flags() -> None:
  """The command-line flags (defined only when this module is the program)."""
  flags.DEFINE_string("checkpoint", None, "Reward-model checkpoint (workdir, checkpoints "
                      "dir or step dir).", required=True)
  flags.DEFINE_string("data", "", "Preference sources; default: the run's data.sources.")
  flags.DEFINE_enum("split", "val", list(SPLITS), "The run's held-out pairs, its training "
                    "pairs, or all pairs of the sources.")
  flags.DEFINE_float("val_fraction", -1.0, "Split fraction; -1 = the run's.")
  flags.DEFINE_integer("seq_len", 0, "Tokens per side; 0 = the run's data.seq_len.")
  flags.DEFINE_integer("batch_size", 32, "Pairs per scoring call.")
  flags.DEFINE_integer("num_resamples", 10_000, "Bootstrap resamples.")
  flags.DEFINE_string("mesh", "", "Mesh, e.g. 'data=2' (default: one device).")


if __name__ == "__main__":
  define_flags()
  app.run(main)
