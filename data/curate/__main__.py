"""Runs a curation: `python -m data.curate --config=configs/data/shared.py --workdir=DIR`
(flags below; the steps in the `data.curate` package doc). Flags this program does not
define go to the Beam runner: `--runner=DataflowRunner --project=... --region=...
--temp_location=gs://... --setup_file=./setup.py` (README "Data curation")."""

from __future__ import annotations

import json
import sys
import traceback
from typing import Sequence

from absl import app, flags
from ml_collections import config_flags

from data.curate import pipeline
from data.curate.report import report_markdown

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "configs/data/*.py", lock_config=True)
flags.DEFINE_string("workdir", None, "Output directory (local or gs://).", required=True)
flags.DEFINE_integer("workers", 1, "DirectRunner worker processes (direct_num_workers).")
flags.DEFINE_string("runner", "", "Beam runner (default DirectRunner, multi-process).")
flags.DEFINE_bool("verbose", False, "Beam's log lines and tracebacks on the console.")


def main(argv: Sequence[str]) -> None:
  runner_args = list(argv[1:]) + ([f"--runner={FLAGS.runner}"] if FLAGS.runner else [])
  try:
    report = pipeline.run(FLAGS.config, FLAGS.workdir, FLAGS.workers, runner_args,
                          FLAGS.verbose)
  except (ValueError, OSError, RuntimeError) as e:
    if FLAGS.verbose:
      traceback.print_exc()
    print("error: " + " ".join(str(e).split()), file=sys.stderr)
    sys.exit(2)
  print(report_markdown(report))
  print(json.dumps({"per_source": report["per_source"], "bad_input": report["bad_input"],
                    "empty_sources": report["empty_sources"]}))


def parse_flags(argv: Sequence[str]) -> list[str]:
  """This program's flags; the rest (the runner's options) is returned for `main`."""
  return FLAGS(list(argv), known_only=True)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
