"""The Trainer's step loop: dispatch, bounded steps in flight, timing, logging, checkpoints.

Steps are dispatched asynchronously, but at most `train.max_steps_in_flight` at a time: with
several (fake) CPU devices, dispatching an unbounded number of steps without waiting on any
result can deadlock XLA's CPU all-reduce rendezvous (the process aborts after 40 s). Waiting
on the oldest step before dispatching a new one avoids that while still overlapping the
host's data loading with device compute.

Time accounting per logging interval: `data wait` is the time spent getting the next batch
and building global arrays; the rest of the wall time is compute (including waiting on the
device). tokens/s and MFU use wall time.
"""

from __future__ import annotations

import collections
import math
import time
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import jax
import numpy as np

from train.metrics import Progress

if TYPE_CHECKING:
  from train.trainer import Trainer
  from train.state import TrainState


class NonFiniteLossError(RuntimeError):
  """Raised when a step produces a NaN/Inf loss; the last good checkpoint is kept."""


class _Interval:
  """Accumulates wall, data-wait and per-step metrics between two log lines.

  `totals` keeps run-level sums over all intervals (steady-state steps only: compilation,
  eval and checkpoint time are excluded because the interval is reset after them).
  """

  def __init__(self):
    self.totals = {"steps": 0, "wall_s": 0.0, "data_wait_s": 0.0}
    self.steps = self.untimed = 0
    self.reset(count=False)

  def reset(self, count: bool = True) -> None:
    """Starts a new interval; `count` adds the finished one to the run totals."""
    timed = self.steps - self.untimed
    if count and timed > 0:
      self.totals["steps"] += timed
      self.totals["wall_s"] += time.perf_counter() - self.t0
      self.totals["data_wait_s"] += self.data_s
    self.restart_clock()
    self.steps = 0
    self.untimed = 0
    self.sums: dict[str, float] = collections.defaultdict(float)

  def restart_clock(self) -> None:
    """Keeps the metrics gathered so far but times only the steps that follow."""
    self.t0 = time.perf_counter()
    self.data_s = 0.0
    self.untimed = self.steps

  def summary(self, trainer: "Trainer") -> dict[str, float]:
    wall = max(time.perf_counter() - self.t0, 1e-9)
    timed = self.steps - self.untimed
    out = {k: v / max(self.steps, 1) for k, v in self.sums.items()}
    if timed > 0:
      out["train/step_time_s"] = wall / timed
      out["train/data_wait_frac"] = self.data_s / wall
      if trainer.tokens_per_step:
        out["train/tokens_per_sec"] = trainer.tokens_per_step * timed / wall
      if trainer.flops_per_step and trainer.peak_flops:
        out["train/mfu"] = trainer.flops_per_step * timed / wall / trainer.peak_flops
    return out


def _complete(trainer: "Trainer", step: int, metrics: Mapping[str, Any],
              interval: _Interval) -> None:
  """Blocks on a dispatched step's metrics; stops the run on a non-finite loss."""
  values = {k: float(v) for k, v in jax.device_get(metrics).items()}
  if not math.isfinite(values["train/loss"]):
    trainer.checkpointer.wait()  # let an in-progress save of an earlier (good) step finish
    last = trainer.checkpointer.latest_step()
    where = f"{trainer.checkpointer.directory}/{last}" if last is not None else "none saved yet"
    raise NonFiniteLossError(
        f"Loss became {values['train/loss']} at step {step}; stopping without saving this "
        f"state. Last good checkpoint: {where}. Lower the learning rate, check the data, or "
        "resume from that checkpoint.")
  for k, v in values.items():
    interval.sums[k] += v
  interval.steps += 1


def run_loop(trainer: "Trainer", state: "TrainState",
             batches: Iterator[Mapping[str, np.ndarray]]) -> "TrainState":
  tcfg = trainer.config.train
  start = int(jax.device_get(state.step))
  progress = Progress(trainer.num_steps, start)
  interval = _Interval()
  pending: collections.deque = collections.deque()
  max_in_flight = max(1, tcfg.max_steps_in_flight)

  def drain() -> None:
    while pending:
      _complete(trainer, *pending.popleft(), interval)

  with trainer.mesh_context():
    for step in range(start + 1, trainer.num_steps + 1):
      t0 = time.perf_counter()
      batch = trainer.to_global(next(batches))
      interval.data_s += time.perf_counter() - t0
      state, metrics = trainer._jit_step(state, batch)
      pending.append((step, metrics))
      while len(pending) >= max_in_flight:
        _complete(trainer, *pending.popleft(), interval)
      if step == start + 1:  # keep compilation out of the first interval's throughput
        drain()
        if jax.process_index() == 0:
          print(f"First step (compilation included) took "
                f"{time.perf_counter() - interval.t0:.1f}s", flush=True)
        interval.restart_clock()

      last = step == trainer.num_steps
      if step % tcfg.log_every == 0 or last:
        drain()
        summary = interval.summary(trainer)
        trainer.writer.write(step, summary)
        if jax.process_index() == 0:
          print(progress.line(step, summary), flush=True)
        interval.reset()
      due_hooks = [fn for every, fn in trainer._hooks if step % every == 0 or last]
      save_now = (tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0) or last
      if due_hooks or save_now or trainer._sigterm:
        drain()
        interval.reset()  # close the interval: hook and save time is not training time
        for fn in due_hooks:
          fn(trainer, step, state)
        if save_now or trainer._sigterm:
          trainer.save(state)
        interval.restart_clock()
      if trainer._sigterm:
        trainer.checkpointer.wait()
        print(f"SIGTERM: saved checkpoint at step {step}; stopping.", flush=True)
        break
    drain()
  interval.reset()
  trainer.run_stats = dict(interval.totals)
  trainer.checkpointer.wait()
  return state
