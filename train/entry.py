"""Shared command line of every training entry point (pretrain, SFT, reward model, DPO, PPO).

A stage module defines `STAGE = Stage(...)` (train/stage.py) and ends with

    if __name__ == "__main__":
      entry.launch(STAGE)

so its flags exist only when it is the program (the module stays importable from tests and
benchmarks). Flags: --config (ml_collections file, locked: unknown fields are errors, dotted
overrides like --config.optim.lr=3e-4), --workdir, --verbose, and the multi-host flags of
train/distributed.py; `--help` lists them.

Exit codes: 0 finished; 2 bad input (one line `error: <cause>` naming the file, field or
checkpoint; the traceback only with --verbose; nothing written to the workdir); 75
preempted (SIGTERM or Ctrl-C: the current step was saved, run the same command to resume);
1 anything else (a bug: the traceback is printed).
"""

from __future__ import annotations

import re
import sys
import traceback
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from train import checkpoint as ckpt_lib
from train import distributed, quiet, storage
from train.loop import PREEMPTED_EXIT_CODE, NonFiniteError
from train.stage import Stage, run_stage

BAD_INPUT_EXIT_CODE = 2
# Errors that mean "the input (config, data, checkpoint, workdir) is not usable".
INPUT_ERRORS = (ValueError, KeyError, FileNotFoundError, NotADirectoryError,
                IsADirectoryError, PermissionError, UnicodeError, ckpt_lib.CheckpointError,
                storage.WorkdirError)


class Preempted(Exception):
  """The run stopped on SIGTERM / SIGINT after saving its current step."""


def fail(message: str, code: int = BAD_INPUT_EXIT_CODE) -> None:
  """Prints one `error:` line and exits (the traceback stays hidden unless --verbose)."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def define_flags(extra_help: str = "") -> None:
  """--config, --workdir, --verbose and the multi-host flags, as key flags of the program
  (so `--help` lists them)."""
  config_flags.DEFINE_config_file("config", None, "Run config file (configs/...py[:args]); "
                                  "override fields with --config.section.field=value.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory (local path or gs://); re-running the "
                      "same command resumes from its newest checkpoint." + extra_help)
  define_common_flags()
  flags.DEFINE_string("coordinator_address", "", "jax.distributed coordinator host:port.")
  flags.DEFINE_integer("num_processes", 0, "Number of processes of a multi-process run.")
  flags.DEFINE_integer("process_id", -1, "This process's index in a multi-process run.")
  flags.DEFINE_integer("local_devices", 0, "CPU devices per process (CPU runs; 0 = one per "
                       "core).")
  flags.DEFINE_bool("distributed_auto", False, "jax.distributed.initialize() with "
                    "auto-detection (Cloud TPU VM pods, SLURM).")
  adopt_flags_for_help(RUN_FLAGS)


RUN_FLAGS = ("config", "workdir", "verbose", "coordinator_address", "num_processes",
             "process_id", "local_devices", "distributed_auto")


def define_common_flags() -> None:
  """--verbose: what every entry point has (evaluation tools included)."""
  if "verbose" not in flags.FLAGS:
    flags.DEFINE_bool("verbose", False, "Tracebacks for bad input, and the libraries' INFO "
                      "and WARNING logs (Orbax, TensorFlow, absl), which are off by default.")


def adopt_flags_for_help(names: tuple[str, ...]) -> None:
  """Registers the named flags under the main program, so absl's short `--help` (which
  lists only the main module's flags, not the libraries' dozens) shows them."""
  main = sys.argv[0]
  own = flags.FLAGS.get_flags_for_module(main)
  for name in names:
    if name in flags.FLAGS and flags.FLAGS[name] not in own:
      flags.FLAGS.register_flag_by_module(main, flags.FLAGS[name])


def run_main(body: Any) -> None:
  """Runs `body()` with the house's error handling: bad input -> one `error:` line, exit 2;
  preemption -> exit 75; Ctrl-C outside the loop -> one line, exit 130."""
  verbose = flags.FLAGS["verbose"].value if "verbose" in flags.FLAGS else False
  quiet.set_library_logs(verbose)
  try:
    body()
  except Preempted as e:
    print(f"stopped by {e}; run the same command to resume", file=sys.stderr, flush=True)
    sys.exit(PREEMPTED_EXIT_CODE)
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr, flush=True)
    sys.exit(130)
  except (NonFiniteError, ckpt_lib.CheckpointSaveError) as e:
    if verbose:
      traceback.print_exc()
    fail(str(e), code=1)
  except INPUT_ERRORS as e:
    if verbose:
      traceback.print_exc()
    fail(str(e) if isinstance(e, (ValueError, ckpt_lib.CheckpointError,
                                  storage.WorkdirError)) else f"{type(e).__name__}: {e}")


def launch(stage: Stage) -> None:
  """Defines the flags, checks the workdir, initialises jax.distributed if asked, and runs
  the stage through `run_stage`."""
  quiet.set_library_logs(False)
  define_flags()
  flags.mark_flags_as_required(["config", "workdir"])

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    FLAGS = flags.FLAGS

    def body():
      config = loaded_config()
      # Credentials only: the write probe runs once every input is validated.
      storage.check_workdir(FLAGS.workdir, probe=False)
      distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                             FLAGS.local_devices, FLAGS.distributed_auto)
      result = run_stage(stage, config, FLAGS.workdir)
      if isinstance(result, dict) and result.get("preempted"):
        raise Preempted("a signal")

    run_main(body)

  app.run(main, flags_parser=parse_flags)


def loaded_config() -> Any:
  """--config, loaded (config_flags reports a file that fails to load only on first use)."""
  config = flags.FLAGS.config
  try:
    config.get("stage")
  except OSError as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    fail(f"--config: {lines[-1] if lines else e} ({flags.FLAGS['config'].serialize()})")
  return config


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with its errors (e.g. a misspelt --config.optim.lrr, a config file
  that does not load) as one `error:` line and exit code 2, like any other bad input."""
  verbose = "--verbose" in argv
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(str(e) if verbose else str(e).splitlines()[0])
  except (KeyError, AttributeError) as e:
    # config_flags: an override of a field the (locked) config does not have.
    if verbose:
      traceback.print_exc()
    text = str(e.args[0] if e.args else e).encode().decode("unicode_escape")
    names = re.findall(r"'(\w+)'", text)
    hint = re.search(r'Did you mean "(\w+)"', text)
    given = [a.split("=")[0] for a in argv if a.startswith("--config.")]
    bad = [a for a in given if names and a.endswith("." + names[0])]
    fail(f"{(bad or given or ['--config'])[0]}: the config has no field "
         f"{names[0] if names else text!r}" + (f" (did you mean {hint.group(1)}?)" if hint else ""))
  except (ValueError, FileNotFoundError, SyntaxError, TypeError, ImportError) as e:
    # config_flags raises these for a config file that does not load.
    if verbose:
      traceback.print_exc()
    fail(f"--config: {type(e).__name__}: {e}")
  return []
