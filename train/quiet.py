"""Keeps third-party log noise off the console: Orbax's and absl's INFO/WARNING lines,
TensorFlow's C++ start-up lines. `--verbose` (train/entry.py) brings them back.

`TF_CPP_MIN_LOG_LEVEL` only takes effect if it is set before TensorFlow is first imported,
so `train/__init__.py` sets its default when the package is imported.
"""

from __future__ import annotations

import logging
import os

from absl import logging as absl_logging

NOISY_LOGGERS = ("absl", "orbax", "tensorflow", "jax._src.distributed", "etils", "transformers",
                 "torch")


def set_library_logs(verbose: bool) -> None:
  """Libraries log ERROR and above only, unless `verbose`."""
  level = logging.INFO if verbose else logging.ERROR
  if verbose:
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
  absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.ERROR)
  for name in NOISY_LOGGERS:
    logging.getLogger(name).setLevel(level)
