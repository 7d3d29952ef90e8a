"""Metrics output: console progress, TensorBoard event files and `metrics.jsonl`.

Every loop writes the same names (`train/loss`, `train/tokens_per_sec`, `train/mfu`,
`eval/loss`, ...) through one `MetricsWriter`. Only process 0 writes files; every process
may print. `metrics.jsonl` has one JSON object per line: {"step": N, "<name>": value, ...}.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping, Sequence

import jax


def format_duration(seconds: float) -> str:
  seconds = max(0, int(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _scalar(x: Any) -> float:
  return float(jax.device_get(x))


def _step_of(line: str) -> int | None:
  """The step of one metrics.jsonl record; None for a blank or cut-off line (a crash or a
  full disk can leave a partial last line, which must not stop every later resume)."""
  try:
    return int(json.loads(line).get("step", 0)) if line.strip() else None
  except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
    return None


class MetricsWriter:
  """Writes scalar metrics to TensorBoard and metrics.jsonl under `workdir`.

  Args:
    workdir: run directory (local or gs://; TensorBoard goes through tf.io.gfile).
    enabled: write files (False on non-zero processes).
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if enabled:
      import tensorflow as tf  # TensorBoard writer; TF is already a dependency for tf.data
      self._tf = tf
      tf.io.gfile.makedirs(workdir)
      self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

  def truncate_after(self, step: int) -> None:
    """Drops jsonl records past `step` (a resumed run re-does those steps)."""
    if not self.enabled or not self._tf.io.gfile.exists(self.jsonl_path):
      return
    with self._tf.io.gfile.GFile(self.jsonl_path) as f:
      kept = [line for line in f if _step_of(line) is not None and _step_of(line) <= step]
    with self._tf.io.gfile.GFile(self.jsonl_path, "w") as f:
      f.write("".join(line if line.endswith("\n") else line + "\n" for line in kept))

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    values = {k: _scalar(v) for k, v in metrics.items()}
    with self._tb.as_default(step=step):
      for name, value in values.items():
        self._tf.summary.scalar(name, value)
    self._tb.flush()
    record = {"step": int(step), **{k: (v if math.isfinite(v) else str(v))
                                    for k, v in values.items()}}
    with self._tf.io.gfile.GFile(self.jsonl_path, "a") as f:
      f.write(json.dumps(record) + "\n")

  def write_text(self, step: int, name: str, text: str) -> None:
    if self.enabled:
      with self._tb.as_default(step=step):
        self._tf.summary.text(name, text)
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


class Progress:
  """Console progress lines: step, loss, tokens/s, MFU, data-wait share and ETA."""

  def __init__(self, total_steps: int, start_step: int = 0, unit: str = "step"):
    self.total = total_steps
    self.start_step = start_step
    self.unit = unit
    self.t0 = time.perf_counter()

  def line(self, step: int, metrics: Mapping[str, float],
           extra: Sequence[str] = ()) -> str:
    """"<unit> N/total | loss | tok/s | mfu | data wait | <extra...> | eta"."""
    done = step - self.start_step
    elapsed = time.perf_counter() - self.t0
    eta = elapsed / max(done, 1) * (self.total - step)
    parts = [f"{self.unit} {step}/{self.total}"]
    if "train/loss" in metrics:
      parts.append(f"loss {metrics['train/loss']:.4f}")
    if "train/tokens_per_sec" in metrics:
      parts.append(f"{metrics['train/tokens_per_sec']:,.0f} tok/s")
    if "train/mfu" in metrics:
      parts.append(f"mfu {100 * metrics['train/mfu']:.1f}%")
    if "time/data_wait_frac" in metrics:
      parts.append(f"data wait {100 * metrics['time/data_wait_frac']:.1f}%")
    parts.extend(extra)
    parts.append(f"eta {format_duration(eta)}")
    return " | ".join(parts)
