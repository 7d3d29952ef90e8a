"""Run an entry point as N processes on this machine, joined by `jax.distributed`.

  python -m launch.local --num_processes=2 --local_devices=1 -- \
      -m train.pretrain --config=configs/pretrain/shakespeare_char.py --workdir=runs/x2

Each process gets LM_COORDINATOR_ADDRESS (a free localhost port), LM_NUM_PROCESSES,
LM_PROCESS_ID and LM_LOCAL_DEVICES in its environment (read by `train/distributed.py`), and
CPU collectives go through gloo. Output lines are prefixed with the process index. The
launcher prints the exact command it runs and watches every process: as soon as one exits
non-zero (e.g. killed at start-up) it names that process and its exit code, stops the others
(which would otherwise wait minutes in jax.distributed for their dead peer) and exits with
that code.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from typing import Sequence

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_processes", 2, "Processes to start.")
flags.DEFINE_integer("local_devices", 1, "CPU devices per process.")
flags.DEFINE_integer("timeout", 3600, "Seconds before all processes are killed.")

_POLL_SECONDS = 0.2  # how soon a dead process is noticed


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _stream(proc: subprocess.Popen, index: int, sink) -> None:
  for line in proc.stdout:
    sink.write(f"[{index}] {line}")
    sink.flush()


def launch(args: Sequence[str], num_processes: int, local_devices: int = 1,
           timeout: float = 3600, env: dict[str, str] | None = None, sink=sys.stdout) -> int:
  """Starts `python <args>` num_processes times and watches them all.

  As soon as one exits non-zero (e.g. dies at start-up) the others are stopped: they would
  otherwise wait minutes in `jax.distributed` or a collective for the dead peer.

  Returns:
    0 when every process succeeded, else the first failure's exit code (128 + the signal
    for a process killed by a signal; 124 when `timeout` seconds passed). The failure is
    named on `sink` (the process index and its exit code).
  """
  address = f"127.0.0.1:{free_port()}"
  cmd = [sys.executable, *args]
  print(f"launch.local: {num_processes} x {shlex.join(cmd)} (coordinator {address})",
        file=sink, flush=True)
  procs, threads = [], []
  try:
    for i in range(num_processes):
      penv = {**os.environ, **(env or {}), "LM_COORDINATOR_ADDRESS": address,
              "LM_NUM_PROCESSES": str(num_processes), "LM_PROCESS_ID": str(i),
              "LM_LOCAL_DEVICES": str(local_devices), "JAX_PLATFORMS": "cpu"}
      penv.pop("XLA_FLAGS", None)  # device count comes from LM_LOCAL_DEVICES
      p = subprocess.Popen(cmd, env=penv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
      t = threading.Thread(target=_stream, args=(p, i, sink), daemon=True)
      t.start()
      procs.append(p)
      threads.append(t)
    return _watch(procs, threads, timeout, sink)
  finally:
    _stop(procs)
    for t in threads:
      t.join(timeout=5)


def _watch(procs: list[subprocess.Popen], threads: list[threading.Thread], timeout: float,
           sink) -> int:
  """Polls every process until all succeeded (0), one failed, or the timeout passed."""
  deadline = time.monotonic() + timeout
  while True:
    running = False
    for i, p in enumerate(procs):
      rc = p.poll()
      if rc is None:
        running = True
      elif rc != 0:
        threads[i].join(timeout=5)  # its last lines (the cause) come before ours
        how = f"was killed by signal {-rc}" if rc < 0 else f"exited with code {rc}"
        print(f"launch.local: process {i} {how}; stopping the other processes", file=sink,
              flush=True)
        return 128 - rc if rc < 0 else rc
    if not running:
      return 0
    if time.monotonic() > deadline:
      print(f"launch.local: timeout after {timeout:.0f} s; stopping every process",
            file=sink, flush=True)
      return 124
    time.sleep(_POLL_SECONDS)


def _stop(procs: list[subprocess.Popen], grace: float = 5.0) -> None:
  """SIGTERM to the processes still running, SIGKILL to those alive after `grace` s."""
  for p in procs:
    if p.poll() is None:
      p.terminate()
  deadline = time.monotonic() + grace
  for p in procs:
    try:
      p.wait(timeout=max(deadline - time.monotonic(), 0.01))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def main(argv: Sequence[str]) -> None:
  sys.exit(launch(argv[1:], FLAGS.num_processes, FLAGS.local_devices, FLAGS.timeout))


if __name__ == "__main__":
  app.run(main)
