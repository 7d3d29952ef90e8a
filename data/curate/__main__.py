"""Runs a curation: `python -m data.curate --config=configs/data/shared.py --workdir=DIR`
(flags below; phases and cluster mode in the `data.curate` package doc)."""

from __future__ import annotations

import json
import os
import sys
from typing import Sequence

from absl import app, flags
from ml_collections import config_flags

from data.curate.phases import PHASES, Curator


def main(argv: Sequence[str]) -> None:
  FLAGS = flags.FLAGS
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  phases = PHASES if FLAGS.phase == "all" else tuple(FLAGS.phase.split(","))
  try:
    report = Curator(FLAGS.config, FLAGS.workdir).run(
        FLAGS.workers, phases, FLAGS.process_index, FLAGS.process_count)
  except (ValueError, OSError, RuntimeError) as e:
    sys.exit("error: " + " ".join(str(e).split()))
  if report is not None:
    with open(os.path.join(FLAGS.workdir, "report.md")) as f:
      print(f.read())
    print(json.dumps({"per_source": report["per_source"], "bad_input": report["bad_input"]}))


if __name__ == "__main__":
  # Flags are defined only when run: a spawned pool worker imports this module again (as
  # __mp_main__) and must not define them a second time.
  config_flags.DEFINE_config_file("config", None, "configs/data/*.py", lock_config=True)
  flags.DEFINE_string("workdir", None, "Output directory.", required=True)
  flags.DEFINE_integer("workers", 1, "Worker processes for the per-unit phases.")
  flags.DEFINE_string("phase", "all", f"'all' or comma-separated phases of {PHASES}.")
  flags.DEFINE_integer("process_index", 0, "This process (cluster mode; see module doc).")
  flags.DEFINE_integer("process_count", 1, "Processes running the per-unit phases.")
  app.run(main)
