"""launch/local.py: N processes on localhost; one that dies at start-up stops the launch at
once (the others would wait minutes in jax.distributed for it)."""

import io
import time

import pytest

from conftest import subprocess_env
from launch.local import launch

# Process 1 dies at once; process 0 stands for a peer blocked waiting for it.
DIES_AT_START = ("import os, sys, time\n"
                 "if os.environ['LM_PROCESS_ID'] == '1':\n"
                 "  print('process 1 starting', flush=True)\n"
                 "  sys.exit(3)\n"
                 "time.sleep(120)\n")


@pytest.mark.parametrize("death,code,message", [
    ("sys.exit(3)", 3, "process 1 exited with code 3"),
    ("os.kill(os.getpid(), 9)", 137, "process 1 was killed by signal 9"),
])
def test_a_process_that_dies_at_start_up_stops_the_others_within_seconds(death, code,
                                                                         message):
  sink = io.StringIO()
  start = time.perf_counter()
  got = launch(["-c", DIES_AT_START.replace("sys.exit(3)", death)], num_processes=3,
               timeout=60, env=subprocess_env(), sink=sink)
  elapsed = time.perf_counter() - start
  out = sink.getvalue()
  assert got == code, out
  assert elapsed < 10, (elapsed, out)
  assert "[1] process 1 starting" in out
  assert f"launch.local: {message}; stopping the other processes" in out, out


def test_all_processes_succeeding_is_exit_code_0():
  sink = io.StringIO()
  code = launch(["-c", "import os; print('hi from', os.environ['LM_PROCESS_ID'])"],
                num_processes=2, timeout=60, env=subprocess_env(), sink=sink)
  out = sink.getvalue()
  assert code == 0, out
  assert "[0] hi from 0" in out and "[1] hi from 1" in out
