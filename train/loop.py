"""The step loop and the services every loop shares (the Trainer's and PPO's outer loop).

Services, each a public piece:
  Preemption   SIGTERM and SIGINT (Ctrl-C) set a flag; the loop saves the current step and
               stops; the entry point then exits with `PREEMPTED_EXIT_CODE` (75, EX_TEMPFAIL:
               "try again"), so a scheduler can tell a preempted run from a finished (0) or
               failed (1, or 2 for bad input) one. A second Ctrl-C interrupts at once.
  check_finite stops the run on a non-finite loss, gradient norm or updated parameter
               (`train/finite`, computed inside the step), before anything is logged or
               saved: the newest checkpoint is always a finite one.
  Throughput   tokens and FLOPs per step -> tokens/s and MFU in the progress lines.

`run_loop` dispatches steps asynchronously, `train.steps_per_call` at a time (one jitted
scan over a stack of batches; 1 = one step per call), and at most
`train.max_calls_in_flight` calls are outstanding: with several (fake) CPU devices,
dispatching an unbounded number of steps without waiting on any result can deadlock XLA's
CPU all-reduce rendezvous (the process aborts after 40 s). Waiting on the oldest call before
dispatching a new one avoids that while still overlapping the host's data loading with
device compute.

A call never crosses a step where something happens on the host (a log line, a hook such
as eval, a checkpoint, the last step), and calls end on multiples of `steps_per_call`, so
every call has the same length and compiles once (the first call after a resume from an
odd step may be shorter).

Time accounting per logging interval: `data wait` is the time spent getting the next batch
and building global arrays; the rest of the wall time is compute (including waiting on the
device). tokens/s and MFU use wall time.
"""

from __future__ import annotations

import collections
import dataclasses
import signal
import time
from typing import Any, Callable, Iterator, Mapping, Protocol

import jax
import numpy as np

from train.metrics import MetricsWriter, Progress
from train.step import FINITE

PREEMPTED_EXIT_CODE = 75


class NonFiniteError(RuntimeError):
  """A step produced a NaN/Inf loss, gradient or parameter; nothing of it was saved."""


class Preemption:
  """SIGTERM / SIGINT -> `requested`; `install()` while a loop runs, `uninstall()` after."""

  def __init__(self):
    self.requested: str | None = None  # the signal's name once one arrived
    self._previous: dict[int, Any] = {}

  def _handler(self, signum: int, frame: Any) -> None:
    del frame
    if signum == signal.SIGINT and self.requested == "SIGINT":
      raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the save
    self.requested = signal.Signals(signum).name
    print(f"{self.requested}: saving at the end of this step, then stopping "
          "(Ctrl-C again to stop at once)", flush=True)

  def install(self) -> "Preemption":
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handler)
    return self

  def uninstall(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()


def check_finite(first_step: int, values: Mapping[str, np.ndarray], last_saved: str) -> None:
  """Raises NonFiniteError naming the first bad step of a call's metrics ([n] arrays)."""
  bad_loss = ~np.isfinite(values["train/loss"])
  bad = bad_loss | (values[FINITE] < 1) if FINITE in values else bad_loss
  if bad.any():
    i = int(np.flatnonzero(bad)[0])
    what = {k.split("/")[-1]: float(values[k][i]) for k in ("train/loss", "train/grad_norm")
            if k in values}
    raise NonFiniteError(
        f"Step {first_step + i} is not finite ({', '.join(f'{k} {v}' for k, v in what.items())}"
        f"; parameters after the update finite: "
        f"{'yes' if values.get(FINITE, [1] * (i + 1))[i] >= 1 else 'no'}); stopping without "
        f"saving it. Last good checkpoint: {last_saved}. Lower the learning rate, check the "
        "data, or resume from that checkpoint.")


@dataclasses.dataclass
class Throughput:
  """What progress lines report: tokens and model FLOPs per step, the hardware peak."""
  tokens_per_step: int = 0
  flops_per_step: float = 0.0
  peak_flops: float = 0.0


class Saver(Protocol):
  """Checkpoint service of a loop (the Trainer's `save`, `wait`, `latest` and `check`)."""

  def save(self, state: Any) -> None: ...
  def wait(self) -> None: ...
  def check(self) -> None: ...
  def latest(self) -> str: ...


@dataclasses.dataclass(frozen=True)
class Hook:
  """`fn(step, state)` after every `every`-th step and at the last step."""
  every: int
  fn: Callable[[int, Any], None]


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

  def summary(self, throughput: Throughput) -> dict[str, float]:
    wall = max(time.perf_counter() - self.t0, 1e-9)
    timed = self.steps - self.untimed
    out = {k: v / max(self.steps, 1) for k, v in self.sums.items()}
    if timed > 0:
      out["time/step_s"] = wall / timed
      out["time/data_wait_frac"] = self.data_s / wall
      if throughput.tokens_per_step:
        out["train/tokens_per_sec"] = throughput.tokens_per_step * timed / wall
      if throughput.flops_per_step and throughput.peak_flops:
        out["train/mfu"] = throughput.flops_per_step * timed / wall / throughput.peak_flops
    return out


@dataclasses.dataclass
class LoopResult:
  state: Any
  totals: dict[str, float]      # steady-state steps, wall_s, data_wait_s
  preempted: str | None         # the signal's name if the run stopped early


def run_loop(dispatch: Callable[[Any, Any, int], tuple[Any, Any]],
             stage: Callable[[list], Any], state: Any, batches: Iterator[Mapping[str, Any]], *,
             num_steps: int, train_cfg: Any, hooks: list[Hook], saver: Saver,
             writer: MetricsWriter, stop: Preemption, throughput: Throughput) -> LoopResult:
  """Runs steps from `state.step` to `num_steps` (see the module docstring).

  Args:
    dispatch: `(state, staged batch, n) -> (state, metrics)` for n steps in one call.
    stage: host batches of one call -> device arrays.
    train_cfg: config.train (log_every, checkpoint_every, steps_per_call,
      max_calls_in_flight).
  """
  start = int(jax.device_get(state.step))
  progress = Progress(num_steps, start)
  interval = _Interval()
  pending: collections.deque = collections.deque()
  max_in_flight = max(1, train_cfg.max_calls_in_flight)
  steps_per_call = max(1, train_cfg.steps_per_call)
  everies = [train_cfg.log_every, train_cfg.checkpoint_every] + [h.every for h in hooks]

  def complete(first: int, metrics: Mapping[str, Any]) -> None:
    values = {k: np.atleast_1d(np.asarray(v, np.float64))
              for k, v in jax.device_get(metrics).items()}
    if not np.all(np.isfinite(values["train/loss"])) or np.any(values.get(FINITE, 1) < 1):
      saver.wait()  # an in-progress save of an earlier (good) step finishes first
      check_finite(first, values, saver.latest())
    values.pop(FINITE, None)
    for k, v in values.items():
      interval.sums[k] += float(v.sum())
    interval.steps += values["train/loss"].size

  def drain() -> None:
    while pending:
      complete(*pending.popleft())

  step = start
  while step < num_steps:
    first = step + 1
    step = min(num_steps, (step // steps_per_call + 1) * steps_per_call,
               *[(step // e + 1) * e for e in everies if e and e > 0])
    t0 = time.perf_counter()
    batch = stage([next(batches) for _ in range(step - first + 1)])
    interval.data_s += time.perf_counter() - t0
    state, metrics = dispatch(state, batch, step - first + 1)
    pending.append((first, metrics))
    while len(pending) >= max_in_flight:
      complete(*pending.popleft())
    if first == start + 1:  # keep compilation out of the first interval's throughput
      drain()
      if jax.process_index() == 0:
        print(f"First call ({step - first + 1} step(s), compilation included) took "
              f"{time.perf_counter() - interval.t0:.1f}s", flush=True)
      interval.restart_clock()

    last = step == num_steps
    if step % train_cfg.log_every == 0 or last:
      drain()
      summary = interval.summary(throughput)
      writer.write(step, summary)
      if jax.process_index() == 0:
        print(progress.line(step, summary), flush=True)
      interval.reset()
    due = [h for h in hooks if step % h.every == 0 or last]
    save_now = (train_cfg.checkpoint_every and step % train_cfg.checkpoint_every == 0) or last
    if due or save_now or stop.requested:
      drain()
      interval.reset()  # close the interval: hook and save time is not training time
      for hook in due:
        hook.fn(step, state)
      if save_now or stop.requested:
        saver.save(state)
      interval.restart_clock()
    saver.check()  # a failed background save stops the run here, not steps later
    if stop.requested:
      saver.wait()
      print(f"{stop.requested}: saved checkpoint at step {step}; stopping.", flush=True)
      break
  drain()
  interval.reset()
  saver.wait()
  return LoopResult(state, dict(interval.totals), stop.requested)
