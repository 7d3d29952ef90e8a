"""Chains of training runs for the end-to-end benchmarks (reward_hh.py, rlhf_hh.py).

A stage is one training command writing one workdir. It runs only if the workdir has not
finished (its checkpoint has not reached the configured last step), so an interrupted chain
resumes where it stopped; each stage's wall minutes are summed over attempts into
`<root>/minutes.json` and its output goes to `<root>/<name>.log`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


class Chain:
  """The stages' minutes (`<root>/minutes.json`) and the runner."""

  def __init__(self, root: str):
    from absl import logging
    logging.set_verbosity(logging.ERROR)  # Orbax logs every file operation it reads
    self.root = os.path.abspath(root)
    os.makedirs(self.root, exist_ok=True)
    self.path = os.path.join(self.root, "minutes.json")
    self.minutes = json.load(open(self.path)) if os.path.exists(self.path) else {}

  def workdir(self, name: str) -> str:
    return os.path.join(self.root, name)

  def ensure(self, name: str, cmd: list[str], allowed: bool = True) -> None:
    """Runs `cmd` (python -m ... args) unless stage `name` has finished."""
    if finished(self.workdir(name)):
      print(f"{name}: finished ({self.minutes.get(name, float('nan')):.1f} min recorded)",
            flush=True)
      return
    if not allowed:
      sys.exit(f"{name} is not finished in {self.root} and may not run (--stages)")
    cmd = [sys.executable, *cmd]
    print("$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    with open(os.path.join(self.root, f"{name}.log"), "a") as log:
      rc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    self.minutes[name] = self.minutes.get(name, 0.0) + (time.perf_counter() - start) / 60
    with open(self.path, "w") as f:
      json.dump(self.minutes, f, indent=1)
    if rc != 0:
      sys.exit(f"{name} failed (rc={rc}); see {os.path.join(self.root, name + '.log')}")
    print(f"{name}: done, {self.minutes[name]:.1f} min in all", flush=True)


def run_json(cmd: list[str]) -> dict:
  """Runs `python cmd...`, echoes its output and returns its last line parsed as JSON."""
  out = subprocess.run([sys.executable, *cmd], cwd=REPO, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
  print(out.stdout.strip(), flush=True)
  if out.returncode != 0:
    sys.exit(f"{' '.join(cmd[:2])} failed (rc={out.returncode})")
  return json.loads(out.stdout.strip().splitlines()[-1])
