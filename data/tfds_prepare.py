"""Prepares every local TFDS dataset (data/tfds_builders.py) into a TFDS data dir.

  python -m data.tfds_prepare --data_dir=~/tensorflow_datasets

(A separate module: running data/tfds_builders.py as __main__ would register its builders
under a second module name.)
"""

import os

from absl import app, flags

from data import tfds_builders

flags.DEFINE_string("data_dir", os.path.expanduser("~/tensorflow_datasets"),
                    "TFDS data directory to prepare into.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  for name in tfds_builders.prepare_all(os.path.expanduser(flags.FLAGS.data_dir)):
    print(f"prepared {name} in {flags.FLAGS.data_dir}", flush=True)


if __name__ == "__main__":
  app.run(main)
