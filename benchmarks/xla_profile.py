"""Where device time goes: run a function under the JAX profiler and sum XLA ops by kind.

  with_profile(fn, steps) -> dict of milliseconds per step per device, by category

Categories (from the names XLA gives executed ops/fusions; on CPU these are thunk names):
  matmul       dots and the library fusions that hold them (YNNPACK/XNNPACK/oneDNN, cuBLAS)
  collective   all-reduce / all-gather / reduce-scatter / all-to-all / collective-permute,
               including the time a device waits for the others to arrive
  data_move    fusions whose name mentions copy / transpose / concatenate / pad / slice:
               layout changes and the glue of fused projections (XLA names a fusion after
               its ops, so elementwise work fused into such a copy is counted here too)
  elementwise  every other fusion (norms, activations, softmax, rotary, optimizer update)
The sum is the device's busy time per step; what is left of the step's wall time is host
work and idle time.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
from typing import Callable

_MATMUL = re.compile(r"^(ynn|xnn|onednn|dot|cublas|gemm|triton_gemm|custom-call.*gemm)", re.I)
_COLLECTIVE = re.compile(r"^(all-reduce|all-gather|reduce-scatter|all-to-all|"
                         r"collective-permute)", re.I)
_DATA_MOVE = re.compile(r"(^|_)(copy|transpose|concatenate|pad|slice|dynamic-slice)(_|\.|$)")
# Events nested inside an op (would be counted twice) or not ops at all.
_SKIP = re.compile(r"^(Thunk|Rendezvous|InvokeRendezvous|Wait|ThreadpoolListener|end: |\$|"
                   r"Pjit|PjitFunction|CommonPjRt|TfrtCpu|PjRt|np\.|Execute)")


def categorize(name: str) -> str | None:
  """The category of one trace event name, or None when it is not a device op."""
  if _SKIP.match(name):
    return None
  if _COLLECTIVE.match(name):
    return "collective"
  if _MATMUL.match(name):
    return "matmul"
  if not re.search(r"fusion|^[a-z][\w-]*(\.\d+)?$", name):
    return None
  return "data_move" if _DATA_MOVE.search(name) else "elementwise"


def summarize(trace_file: str, steps: int, devices: int) -> dict[str, float]:
  """Milliseconds per step per device by category, from a perfetto trace.json.gz."""
  with gzip.open(trace_file) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  # The Python host tracer's thread holds host calls (shard_args, ...), not device ops.
  host_threads = {(e.get("pid"), e.get("tid")) for e in events
                  if e.get("ph") == "M" and e.get("name") == "thread_name"
                  and e.get("args", {}).get("name") == "python"}
  totals: dict[str, float] = collections.defaultdict(float)
  for e in events:
    if e.get("ph") != "X" or (e.get("pid"), e.get("tid")) in host_threads:
      continue
    cat = categorize(e.get("name", ""))
    if cat:
      totals[cat] += e["dur"] / 1000.0  # us -> ms
  out = {f"profile_{k}_ms": v / steps / devices for k, v in sorted(totals.items())}
  out["profile_busy_ms"] = sum(totals.values()) / steps / devices
  return out


def with_profile(fn: Callable[[], None], steps: int, devices: int) -> dict[str, float]:
  """Runs `fn` (which must run `steps` train steps and block on them) under the profiler."""
  import jax
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      fn()
    files = glob.glob(os.path.join(tmp, "**", "perfetto_trace.json.gz"), recursive=True)
    if not files:
      raise RuntimeError(f"The profiler wrote no perfetto trace under {tmp}")
    return summarize(files[0], steps, devices)
