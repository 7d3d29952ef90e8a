"""The request side of the serving engine (`serve/engine.py`): sampling parameters, the
events a request streams (TokenEvent ... Finished) and the handle the caller holds.

A handle is fed by the engine's scheduler thread (`emit`, a request's new events once per
decode chunk) and read by any other thread: `events()` streams one event at a time,
`event_batches()` a list per wake-up, `listen(callback)` has them pushed instead (no
waiting thread), `result()` waits for the whole answer. `result()` sees every event; the
streams share one queue (read it from one consumer).
`row_params` turns a request's parameters into its row of the decode step's RowParams.
"""

from __future__ import annotations

import dataclasses
import functools
import queue
import threading
from typing import Callable, Iterator

import jax
import numpy as np

from serve.engine_step import MAX_STOP_IDS, TOP_LOGPROBS, RowParams


@dataclasses.dataclass(frozen=True)
class GenerationParams:
  """How one request samples (validated on construction).

  Attributes:
    max_tokens: Tokens to generate at most.
    temperature: 0 = greedy; otherwise logits are divided by it.
    top_p: Nucleus filtering (1.0 = off).
    top_k: Keep the k most likely tokens (0 = off).
    seed: PRNG seed; None: the engine picks one from a counter.
    stop_ids: Token ids that end the request (included in the output).
    logprobs: Report each token's log-probability.
    top_logprobs: Also report this many most likely tokens per step (0..20).
  """
  max_tokens: int = 64
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  seed: int | None = None
  stop_ids: tuple[int, ...] = ()
  logprobs: bool = False
  top_logprobs: int = 0

  def __post_init__(self):
    checks = [(self.max_tokens >= 1, f"max_tokens={self.max_tokens} must be >= 1"),
              (self.temperature >= 0, f"temperature={self.temperature} must be >= 0"),
              (0.0 < self.top_p <= 1.0, f"top_p={self.top_p} must be in (0, 1]"),
              (self.top_k >= 0, f"top_k={self.top_k} must be >= 0 (0 = off)"),
              (0 <= self.top_logprobs <= TOP_LOGPROBS,
               f"top_logprobs={self.top_logprobs} must be in 0..{TOP_LOGPROBS}"),
              (len(self.stop_ids) <= MAX_STOP_IDS,
               f"{len(self.stop_ids)} stop ids; at most {MAX_STOP_IDS}"),
              (self.seed is None or 0 <= self.seed < 2**63, f"seed={self.seed} must be >= 0")]
    for ok, message in checks:
      if not ok:
        raise ValueError(message)


@dataclasses.dataclass
class TokenEvent:
  """One generated token (`logprob` / `top_logprobs` None unless the request asked)."""
  token: int
  logprob: float | None
  top_logprobs: list[tuple[int, float]] | None


@dataclasses.dataclass
class Finished:
  """The end of a request: reason "stop" (a stop id), "length" (max_tokens or context),
  "cancelled" or "error" (with `error`)."""
  reason: str
  prompt_tokens: int
  completion_tokens: int
  error: str | None = None


class RequestHandle:
  """The caller's side of a submitted request (thread-safe)."""

  def __init__(self, request_id: str, wake: Callable[[], None]):
    self.id = request_id
    self._wake = wake  # tells the scheduler to look (a cancel frees the slot at once)
    self._queue: queue.Queue = queue.Queue()
    self._tokens: list[TokenEvent] = []
    self._finished: Finished | None = None
    self._done = threading.Event()
    self._listener: Callable[[list], None] | None = None
    self._lock = threading.Lock()  # orders `listen` against `emit`
    self.cancelled = False

  def listen(self, callback: Callable[[list[TokenEvent | Finished]], None]) -> None:
    """Pushes the events instead: `callback(events)` is called with every batch not yet
    read, now, then from the engine's thread as each chunk is delivered (so it must be
    quick and must not block, e.g. `loop.call_soon_threadsafe`). No thread per request
    waits on the queue; `events()` / `event_batches()` then see nothing more."""
    with self._lock:
      self._listener = callback
      while True:
        try:
          callback(self._queue.get_nowait())
        except queue.Empty:
          break

  def events(self, timeout: float | None = None) -> Iterator[TokenEvent | Finished]:
    """Yields TokenEvents as they are generated, then the Finished, then ends.

    Raises:
      TimeoutError: no event arrived within `timeout` seconds.
    """
    for batch in self.event_batches(timeout):
      yield from batch

  def event_batches(self, timeout: float | None = None
                    ) -> Iterator[list[TokenEvent | Finished]]:
    """Like `events`, but yields every event available at once as one list (the engine
    delivers a request's tokens once per decode chunk): one wake-up per chunk, not per
    token, for a consumer that forwards them (e.g. into an event loop)."""
    while True:
      try:
        batch = self._queue.get(timeout=timeout)
      except queue.Empty:
        raise TimeoutError(f"request {self.id}: no event within {timeout} s") from None
      while isinstance(batch[-1], TokenEvent):  # more may be waiting already
        try:
          batch = batch + self._queue.get_nowait()
        except queue.Empty:
          break
      yield batch
      if isinstance(batch[-1], Finished):
        return

  def cancel(self) -> None:
    """Ends the request at the next step boundary (Finished reason "cancelled")."""
    self.cancelled = True
    self._wake()

  def result(self, timeout: float | None = None) -> tuple[list[TokenEvent], Finished]:
    """Blocks until the request ends; returns all its tokens and the Finished."""
    if not self._done.wait(timeout):
      raise TimeoutError(f"request {self.id}: not finished within {timeout} s")
    return list(self._tokens), self._finished

  @property
  def done(self) -> bool:
    return self._done.is_set()

  def emit(self, events: list[TokenEvent | Finished]) -> None:
    """Delivers events (the engine's side): tokens, possibly ending with the Finished."""
    if not events:
      return
    finished = isinstance(events[-1], Finished)
    self._tokens.extend(events[:-1] if finished else events)
    if finished:
      self._finished = events[-1]
    with self._lock:
      if self._listener is not None:
        self._listener(events)
      else:
        self._queue.put(events)
    if finished:
      self._done.set()


@dataclasses.dataclass
class Request:
  """A request as the scheduler holds it."""
  handle: RequestHandle
  prompt: np.ndarray
  params: GenerationParams
  seed: int
  produced: int = 0


def row_params(req: Request | None, n: int) -> RowParams:
  """RowParams arrays [n] of one request (None: an idle greedy row)."""
  p = req.params if req is not None else GenerationParams(temperature=0.0, max_tokens=1)
  seed = req.seed if req is not None else 0
  stops = np.full((n, MAX_STOP_IDS), -1, np.int32)
  stops[:, :len(p.stop_ids)] = p.stop_ids
  key = key_data(seed)
  return RowParams(np.full(n, p.temperature, np.float32), np.full(n, p.top_p, np.float32),
                   np.full(n, p.top_k, np.int32), np.tile(key, (n, 1)), stops,
                   np.full(n, p.max_tokens, np.int32),
                   np.full(n, p.logprobs or p.top_logprobs > 0), np.full(n, p.top_logprobs > 0))


@functools.lru_cache(maxsize=1024)
def key_data(seed: int) -> np.ndarray:
  """Raw key data of jax.random.key(seed) with 64-bit seeds (cached).

  Without jax_enable_x64 JAX keeps only a seed's low 32 bits, so seeds 5 and 2**32 + 5
  would draw alike; a threefry key is (high 32 bits, low 32 bits) of the seed, built here.
  """
  data = np.asarray(jax.random.key_data(jax.random.key(seed & 0xFFFFFFFF)), np.uint32)
  if data.shape == (2,):  # threefry2x32 (the default): [high, low]
    data = np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32)
  return data


@functools.lru_cache(maxsize=1)
def idle_params() -> RowParams:
  """The parameters of a free row (computed once, on first use: no jax work at import)."""
  return row_params(None, 1)
