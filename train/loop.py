"""The Trainer's step loop: dispatch, bounded calls in flight, timing, logging, checkpoints.

Steps are dispatched asynchronously, `train.steps_per_call` at a time (one jitted scan over a
stack of batches; 1 = one step per call), and at most `train.max_calls_in_flight` calls are
outstanding: with several (fake) CPU devices, dispatching an unbounded number of steps
without waiting on any result can deadlock XLA's CPU all-reduce rendezvous (the process
aborts after 40 s). Waiting on the oldest call before dispatching a new one avoids that
while still overlapping the host's data loading with device compute.

A call never crosses a step where something happens on the host (a log line, a hook such
as eval, a checkpoint, the last step), and calls end on multiples of `steps_per_call`, so
every call has the same length and compiles once (the first call after a resume from an
odd step may be shorter). Several steps per call pay the host's per-dispatch work (argument
handling, transfers, fetching metrics) once per call: on a 2-core CPU, where that work
competes with the computation for the same cores, this is worth a few percent of step time.

Time accounting per logging interval: `data wait` is the time spent getting the next batch
and building global arrays; the rest of the wall time is compute (including waiting on the
device). tokens/s and MFU use wall time.
"""

from __future__ import annotations

import collections
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


def _complete(trainer: "Trainer", first_step: int, metrics: Mapping[str, Any],
              interval: _Interval) -> None:
  """Blocks on a dispatched call's metrics; stops the run on a non-finite loss."""
  values = {k: np.atleast_1d(np.asarray(v, np.float64))
            for k, v in jax.device_get(metrics).items()}
  losses = values["train/loss"]
  bad = np.flatnonzero(~np.isfinite(losses))
  if bad.size:
    step = first_step + int(bad[0])
    trainer.checkpointer.wait()  # let an in-progress save of an earlier (good) step finish
    last = trainer.checkpointer.latest_step()
    where = f"{trainer.checkpointer.directory}/{last}" if last is not None else "none saved yet"
    raise NonFiniteLossError(
        f"Loss became {losses[bad[0]]} at step {step}; stopping without saving this "
        f"state. Last good checkpoint: {where}. Lower the learning rate, check the data, or "
        "resume from that checkpoint.")
  for k, v in values.items():
    interval.sums[k] += float(v.sum())
  interval.steps += losses.size


def _call_end(step: int, trainer: "Trainer", steps_per_call: int) -> int:
  """Last step of the call that starts after `step` (see the module docstring)."""
  tcfg = trainer.config.train
  end = min(trainer.num_steps, (step // steps_per_call + 1) * steps_per_call)
  for every in [tcfg.log_every, tcfg.checkpoint_every] + [e for e, _ in trainer._hooks]:
    if every and every > 0:
      end = min(end, (step // every + 1) * every)
  return end


def run_loop(trainer: "Trainer", state: "TrainState",
             batches: Iterator[Mapping[str, np.ndarray]]) -> "TrainState":
  tcfg = trainer.config.train
  start = int(jax.device_get(state.step))
  progress = Progress(trainer.num_steps, start)
  interval = _Interval()
  pending: collections.deque = collections.deque()
  max_in_flight = max(1, tcfg.max_calls_in_flight)
  steps_per_call = max(1, tcfg.steps_per_call)

  def drain() -> None:
    while pending:
      _complete(trainer, *pending.popleft(), interval)

  with trainer.mesh_context():
    step = start
    while step < trainer.num_steps:
      first, step = step + 1, _call_end(step, trainer, steps_per_call)
      t0 = time.perf_counter()
      batch = trainer.stage([next(batches) for _ in range(step - first + 1)])
      interval.data_s += time.perf_counter() - t0
      state, metrics = trainer.dispatch(state, batch, step - first + 1)
      pending.append((first, metrics))
      while len(pending) >= max_in_flight:
        _complete(trainer, *pending.popleft(), interval)
      if first == start + 1:  # keep compilation out of the first interval's throughput
        drain()
        if jax.process_index() == 0:
          print(f"First call ({step - first + 1} step(s), compilation included) took "
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
