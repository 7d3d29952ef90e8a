"""Shared command-line launch for every stage's entry point.

Each stage module (train.pretrain, and later train.sft, rlhf.reward, rlhf.ppo, ...) keeps a
library function `run(config, workdir)` and ends with

    if __name__ == "__main__":
      entry.launch(run)

so its flags exist only when it is the program (the module stays importable from tests and
benchmarks). Flags: --config (ml_collections file, locked: unknown fields are errors, dotted
overrides like --config.optim.lr=3e-4), --workdir, and the multi-host flags of
train/distributed.py.
"""

from __future__ import annotations

from typing import Any, Callable

from absl import app, flags, logging
from ml_collections import config_flags


def launch(run: Callable[[Any, str], Any]) -> None:
  """Defines the flags, initialises jax.distributed if asked, and calls run(config, workdir)."""
  config_flags.DEFINE_config_file("config", None, "Run config file (configs/...py[:args]).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory (local path or gs://).")
  flags.DEFINE_string("coordinator_address", "", "jax.distributed coordinator host:port.")
  flags.DEFINE_integer("num_processes", 0, "Number of processes of a multi-process run.")
  flags.DEFINE_integer("process_id", -1, "This process's index in a multi-process run.")
  flags.DEFINE_integer("local_devices", 0, "CPU devices per process (CPU runs; 0 = one per "
                       "core).")
  flags.DEFINE_bool("distributed_auto", False, "jax.distributed.initialize() with "
                    "auto-detection (Cloud TPU VM pods, SLURM).")
  flags.mark_flags_as_required(["config", "workdir"])

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    FLAGS = flags.FLAGS
    # Orbax and TF log every file operation at INFO; keep the console for progress lines.
    logging.set_verbosity(logging.WARNING)
    from train import distributed, storage
    try:  # a workdir that cannot be written (e.g. gs:// without credentials) stops here
      storage.check_workdir(FLAGS.workdir)
    except storage.WorkdirError as e:
      raise SystemExit(f"error: {e}") from None
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                           FLAGS.local_devices, FLAGS.distributed_auto)
    run(FLAGS.config, FLAGS.workdir)

  app.run(main)
