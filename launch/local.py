"""Run an entry point as N processes on this machine, joined by `jax.distributed`.

  python -m launch.local --num_processes=2 --local_devices=1 -- \
      -m train.pretrain --config=configs/pretrain/shakespeare_char.py --workdir=runs/x2

Each process gets LM_COORDINATOR_ADDRESS (a free localhost port), LM_NUM_PROCESSES,
LM_PROCESS_ID and LM_LOCAL_DEVICES in its environment (read by `train/distributed.py`), and
CPU collectives go through gloo. Output lines are prefixed with the process index. The
launcher prints the exact command it runs, waits for all processes, and exits non-zero if any
failed (the others are then terminated).
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import threading
from typing import Sequence

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_processes", 2, "Processes to start.")
flags.DEFINE_integer("local_devices", 1, "CPU devices per process.")
flags.DEFINE_integer("timeout", 3600, "Seconds before all processes are killed.")


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
  """Starts `python <args>` num_processes times; returns the first non-zero exit code or 0."""
  address = f"127.0.0.1:{free_port()}"
  cmd = [sys.executable, *args]
  print(f"launch.local: {num_processes} x {shlex.join(cmd)} (coordinator {address})", flush=True)
  procs, threads = [], []
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
  code = 0
  try:
    for p in procs:
      rc = p.wait(timeout=timeout)
      if rc and not code:
        code = rc
        for other in procs:  # one failed: the others would wait forever in a collective
          if other.poll() is None:
            other.terminate()
  except subprocess.TimeoutExpired:
    code = 124
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
    for t in threads:
      t.join(timeout=5)
  return code


def main(argv: Sequence[str]) -> None:
  sys.exit(launch(argv[1:], FLAGS.num_processes, FLAGS.local_devices, FLAGS.timeout))


if __name__ == "__main__":
  app.run(main)
