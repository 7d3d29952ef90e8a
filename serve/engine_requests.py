"""The request side of the serving engine (`serve/engine.py`): sampling parameters, the
events a request streams (TokenEvent ... Finished) and the handle the caller holds.

A handle is fed by the engine's scheduler thread (`emit`) and read by any other thread:
`events()` streams, `result()` waits for the whole answer; both see every event.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from typing import Callable, Iterator

import numpy as np

from serve.engine_step import MAX_STOP_IDS, TOP_LOGPROBS


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
    self.cancelled = False

  def events(self, timeout: float | None = None) -> Iterator[TokenEvent | Finished]:
    """Yields TokenEvents as they are generated, then the Finished, then ends.

    Raises:
      TimeoutError: no event arrived within `timeout` seconds.
    """
    while True:
      try:
        event = self._queue.get(timeout=timeout)
      except queue.Empty:
        raise TimeoutError(f"request {self.id}: no event within {timeout} s") from None
      yield event
      if isinstance(event, Finished):
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

  def emit(self, event: TokenEvent | Finished) -> None:
    if isinstance(event, Finished):
      self._finished = event
      self._queue.put(event)
      self._done.set()
    else:
      self._tokens.append(event)
      self._queue.put(event)


@dataclasses.dataclass
class Request:
  """A request as the scheduler holds it."""
  handle: RequestHandle
  prompt: np.ndarray
  params: GenerationParams
  seed: int
  produced: int = 0
