"""Chains of runs that resume: the pipeline (launch/pipeline.py), sweeps (launch/sweep.py) and
the end-to-end benchmarks (benchmarks/reward_hh.py, rlhf_hh.py).

A stage is one command writing one workdir. It runs only if it has not finished (a training
run: its checkpoint reached the configured last step; anything else: its own `done` check),
so an interrupted chain resumes where it stopped. Each stage's wall minutes are summed over
attempts into `<root>/minutes.json`, its output goes to `<root>/<name>.log`, and the exact
command is printed before it runs. While it runs, its progress lines (`step N/M | ...`, `eval
step`, `iter N/M`, eval.run's `task: n/N requests`, `error:` lines) are shown prefixed by the
stage name; the log keeps everything.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from typing import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def checkpoint_dir(workdir: str) -> str:
  """Where a run's checkpoint is: `<workdir>/policy` for PPO (policy + value), else workdir."""
  policy = os.path.join(workdir, "policy")
  return policy if os.path.isdir(policy) else workdir


def finished(workdir: str) -> bool:
  """True when the run in `workdir` checkpointed its last configured step (for PPO: its
  last iteration, read from `<workdir>/policy`)."""
  from train import checkpoint as ckpt_lib
  try:
    if os.path.isdir(os.path.join(workdir, "policy")):
      meta = ckpt_lib.read_metadata(os.path.join(workdir, "policy"))
      return meta["ppo"]["iteration"] >= meta["config"]["ppo"]["iterations"]
    meta = ckpt_lib.read_metadata(workdir)
  except Exception:  # noqa: BLE001 - no (readable) checkpoint yet
    return False
  return meta["step"] >= meta["config"]["train"]["num_steps"]


class StageFailed(RuntimeError):
  """A stage's command exited non-zero (the message names the stage and its log)."""


class Chain:
  """The stages' minutes (`<root>/minutes.json`) and the runner."""

  def __init__(self, root: str, quiet_orbax: bool = True):
    if quiet_orbax:
      from absl import logging
      logging.set_verbosity(logging.ERROR)  # Orbax logs every file operation it reads
    self.root = os.path.abspath(root)
    os.makedirs(self.root, exist_ok=True)
    self.path = os.path.join(self.root, "minutes.json")
    self.minutes = json.load(open(self.path)) if os.path.exists(self.path) else {}

  def workdir(self, name: str) -> str:
    return os.path.join(self.root, name)

  def log_path(self, name: str) -> str:
    return os.path.join(self.root, f"{name}.log")

  def ensure(self, name: str, cmd: list[str], allowed: bool = True,
             done: Callable[[], bool] | None = None, exit_on_failure: bool = True) -> bool:
    """Runs `python <cmd...>` unless stage `name` is done (default: `finished(workdir)`).

    Returns True when it ran. A failure exits with a message (or raises StageFailed when
    `exit_on_failure` is False); a stage that is not done and not `allowed` exits too.
    """
    done = done or (lambda: finished(self.workdir(name)))
    if done():
      print(f"{name}: finished ({self.minutes.get(name, float('nan')):.1f} min recorded)",
            flush=True)
      return False
    if not allowed:
      sys.exit(f"{name} is not finished in {self.root} and may not run (--stages)")
    cmd = [sys.executable, *cmd]
    print("$ " + shlex.join(cmd), flush=True)
    print(f"{name}: running, output in {self.log_path(name)}", flush=True)
    start = time.perf_counter()
    rc = run_logged(cmd, self.log_path(name), name)
    self.minutes[name] = self.minutes.get(name, 0.0) + (time.perf_counter() - start) / 60
    with open(self.path, "w") as f:
      json.dump(self.minutes, f, indent=1)
    if rc != 0:
      message = f"{name} failed (rc={rc}); see {self.log_path(name)}"
      if exit_on_failure:
        sys.exit(message)
      raise StageFailed(message)
    print(f"{name}: done, {self.minutes[name]:.1f} min in all", flush=True)
    return True


# Lines of a stage's output worth showing while it runs: training and eval steps, PPO
# iterations, eval.run's per-task progress, and errors. The log keeps everything.
PROGRESS_LINE = re.compile(r"\s*(step \d+/\d+ \||eval step \d+|iter \d+/\d+ \||"
                           r"\S+: \d+/\d+ requests \||error)")


def run_logged(cmd: list[str], log_path: str, name: str) -> int:
  """Runs `cmd`, appending its output to `log_path` and echoing its progress lines.

  Progress lines (`PROGRESS_LINE`) are printed as `[name] <line>` as they come, so a stage
  that runs for half an hour is not silent. Returns the exit code.
  """
  # Unbuffered: the child's progress reaches the log and the console when it is printed.
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  with open(log_path, "a") as log:
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace")
    try:
      for line in proc.stdout:
        log.write(line)
        log.flush()
        if PROGRESS_LINE.match(line):
          print(f"[{name}] {line.strip()}", flush=True)
    finally:
      proc.stdout.close()
      if proc.poll() is None and sys.exc_info()[0] is not None:
        proc.terminate()  # e.g. Ctrl-C in the parent: the stage stops with it
      rc = proc.wait()
  return rc


def run_json(cmd: list[str]) -> dict:
  """Runs `python cmd...`, echoes its output and returns its last line parsed as JSON."""
  out = subprocess.run([sys.executable, *cmd], cwd=REPO, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
  print(out.stdout.strip(), flush=True)
  if out.returncode != 0:
    sys.exit(f"{' '.join(cmd[:2])} failed (rc={out.returncode})")
  return json.loads(out.stdout.strip().splitlines()[-1])
