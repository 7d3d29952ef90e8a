"""Agreement of a CAI judge's labels with the human HH labels.

  python -m rlhf.cai_agreement --judge=runs/sft --pairs=200
  python -m rlhf.cai_agreement --judge=hf:/path/to/model --pairs=500 --split=all

The judge (any language model with a chat template, own checkpoint or `hf:<dir>`) compares
the human-chosen and human-rejected responses of the shared HH harmless-base pairs exactly
as rlhf.cai's feedback phase compares two samples: a principle drawn per prompt
(`--constitution`, `--seed`), options (A)/(B) scored by log-likelihood, both presentation
orders averaged. Agreement is the share of pairs where the averaged P(human-chosen better)
is above 0.5 (exactly 0.5 counts one half), with a 95% Wilson interval; also reported: the
mean soft label, the share of exact 0.5 labels, and the judge's mean P("(A)") (0.5 = no
position preference in a single order). Pairs whose judge prompt does not fit the judge's
context (`--max_new_tokens` spare) are left out and counted. The last line is JSON.

Split: `val` (default: the held-out prompts of the RM/DPO runs), `train` or `all`, by the
preference split of `--val_fraction` / `--split_seed`; `--pairs` takes the first N that fit.
Bad input (a missing checkpoint, a malformed constitution) is one `error:` line, exit 2.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Any, Sequence

from absl import app, flags, logging

from data.config import default_preference_data_config
from data.preferences import read_sources, split_pairs
from rlhf import cai, cai_model
from rlhf import cai_prompts as cp
from train import checkpoint as ckpt_lib

SPLITS = ("val", "train", "all")
# The shipped constitution (configs/cai/constitution.json), found from the repository root.
CONSTITUTION = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "configs", "cai", "constitution.json")


def select(sources: str, split: str, val_fraction: float, seed: int) -> list[Any]:
  """The HH pairs of one split (see the module doc)."""
  if split not in SPLITS:
    raise ValueError(f"--split={split!r}: expected one of {SPLITS}")
  pairs, _ = read_sources(sources)
  if split == "all":
    return pairs
  train, val, _ = split_pairs(pairs, val_fraction, seed)
  return val if split == "val" else train


def agreement(judge: cai_model.ChatModel, pairs: Sequence[Any],
              principles: Sequence[cp.Principle], limit: int, seed: int, batch_size: int
              ) -> dict[str, Any]:
  """Judges (chosen, rejected) of the first `limit` pairs that fit; the figures."""
  chosen = cp.sample_principles(principles, [p.key for p in pairs], seed, "feedback")
  items, too_long = [], 0
  for pair, principle in zip(pairs, chosen):
    if len(items) == limit:
      break
    convs = [cp.judge_conversation(pair.prompt, a, b, principle)
             for a, b in ((pair.chosen, pair.rejected), (pair.rejected, pair.chosen))]
    if not all(cai_model.fits(judge, c, 8) for c in convs):
      too_long += 1
      continue
    items.append((pair.prompt, pair.chosen, pair.rejected, principle))
  if not items:
    raise ValueError(f"no pair fits the judge's context of {judge.context} tokens")
  labels, first = cai.judge_pairs(judge, items, batch_size)
  agree = sum(1.0 if p > 0.5 else 0.5 if p == 0.5 else 0.0 for p in labels)
  lo, hi = cp.wilson_interval(agree, len(labels))
  return {"pairs": len(labels), "too_long": too_long, "agreement": agree / len(labels),
          "agreement_ci95": [lo, hi], "interval": "wilson",
          "mean_soft_label": sum(labels) / len(labels),
          "exact_half": sum(p == 0.5 for p in labels) / len(labels),
          "judge_first_position_mean": sum(first) / len(first)}


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  FLAGS = flags.FLAGS
  logging.set_verbosity(logging.ERROR)  # Orbax logs every file it reads
  start = time.perf_counter()
  try:
    principles = cp.load_constitution(FLAGS.constitution)
    if FLAGS.pairs < 1:
      raise ValueError(f"--pairs={FLAGS.pairs}: expected at least 1")
    pairs = select(FLAGS.sources, FLAGS.split, FLAGS.val_fraction, FLAGS.split_seed)
    judge = cai_model.load_chat_model(FLAGS.judge, "--judge", FLAGS.template)
    out = agreement(judge, pairs, principles, FLAGS.pairs, FLAGS.seed, FLAGS.batch_size)
  except (ValueError, KeyError, FileNotFoundError, ckpt_lib.CheckpointError) as e:
    if FLAGS.verbose:
      traceback.print_exception(e, file=sys.stderr)
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
    sys.exit(2)
  out.update(judge=FLAGS.judge, split=FLAGS.split, sources=FLAGS.sources,
             seconds=round(time.perf_counter() - start, 1))
  print(json.dumps(out), flush=True)


def define_flags() -> None:
  """The command-line flags (defined only when this module is the program)."""
  flags.DEFINE_string("judge", None, "Judge checkpoint (or hf:<dir>).", required=True)
  flags.DEFINE_integer("pairs", 200, "Pairs judged (the first that fit).")
  flags.DEFINE_string("split", "val", f"Which pairs: {' | '.join(SPLITS)}.")
  flags.DEFINE_string("sources", default_preference_data_config().sources,
                      "Preference sources (human labels).")
  flags.DEFINE_float("val_fraction", 0.1, "Held-out fraction of prompts (the runs').")
  flags.DEFINE_integer("split_seed", 0, "Seed of the split (the runs' data.seed).")
  flags.DEFINE_string("constitution", CONSTITUTION, "Constitution file (JSON).")
  flags.DEFINE_integer("seed", 0, "Seeds the principle drawn per prompt.")
  flags.DEFINE_string("template", "auto", "Chat template name (data.chat).")
  flags.DEFINE_integer("batch_size", 16, "Rows per forward pass.")
  flags.DEFINE_bool("verbose", False, "Print the traceback of an error too.")


if __name__ == "__main__":
  define_flags()
  app.run(main)
