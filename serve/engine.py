"""Continuous batching over the KV cache: a fixed number of slots, one jitted decode step.

  engine = Engine(graphdef, params, model_cfg, slots=8).start()
  handle = engine.submit(prompt_ids, GenerationParams(max_tokens=64, temperature=0.0))
  for event in handle.events():   # TokenEvent ... then Finished
    ...
  engine.stop()

Design. The engine owns one decode cache of `slots` rows ([slots, K, max_len, D] per layer);
slot r owns row r from slot 0 and keeps its own write index (per-row `cache_index` in the
model's cache path, per-row causal offset in the decode mask). Rows therefore never need
re-aligning when requests join or leave: a new request is prefilled (prompt right-padded
to a bucket) into a fresh cache row that is written over its slot's row, and it joins the
running batch at the next decode boundary; a finished (stop id, max_tokens) or cancelled
request frees its slot at once. The alternative, one shared write index with left-padded
rows (model/sampling.py's layout), would have to shift every row's cache whenever a
request joins behind the others. Requests admitted at the same boundary are prefilled
together, n rows per call (n = 1, 4, 16, ... or `slots`; one compilation per (n, bucket)
shape, `prefill_shapes`): one pass over the weights for all of them.

Decoding runs in *chunks*: up to `steps_per_sync` decode steps for all slots inside one
jit call (a `lax.while_loop`, serve/engine_step.py), so the host syncs once per chunk,
not per token; a request that finishes mid-chunk is cut at its stop and its row idles for
the rest of the chunk. While slots are free and requests are arriving (one within
ARRIVAL_WINDOW_S), chunks are short (steps/8, a traced limit: no recompilation): a request
joins only after the running chunk and the one queued behind it, so a filling batch then
admits within milliseconds (16 HTTP clients: 4,186 -> 6,261 tokens/s). A chunk attends only over the occupied prefix of the cache: the
host picks the smallest cache-length bucket holding every running row's slots for the
chunk (`cache_buckets`, at most 1.5x apart; one compilation each). Sampling parameters
are per-row arrays of the one compiled step (no recompilation per request mix), and a
request's randomness is its own: token i uses fold_in(key(seed), i), so its output does
not depend on the other requests, and a greedy request equals model/sampling.py's offline
greedy output.

One background thread schedules, and it never lets the device wait for Python: the cache
and the per-slot decode state stay on the device and flow from one call to the next
(serve/engine_programs.py), so each iteration dispatches its prefills and the next chunk
*first* and only then reads the previous chunk's tokens and hands them to the requests
(one list per request per chunk, `RequestHandle.event_batches` / `listen`). Host work
overlaps device work; admissions and cancellations go to the device as calls, never as a
sync. The price: a finished request's slot is seen free one chunk later.

On a mesh (`mesh`, `rules`, `param_shardings` as model/sampling.py's Sampler takes them)
cache rows shard over the batch axes and kv heads over tensor, like the weights.

Metrics: `on_step(step_tokens, seconds)` is called from the scheduler thread whenever a
prefill's or a chunk's tokens are delivered (their number, busy seconds since the last).
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np

from model import sharding as msharding
from serve.engine_programs import Programs
from serve.engine_requests import (Finished, GenerationParams, Request, RequestHandle,
                                   TokenEvent, idle_params, row_params)
from serve.engine_step import RowParams, buckets, pick

__all__ = ["Engine", "Finished", "GenerationParams", "RequestHandle", "TokenEvent"]

log = logging.getLogger(__name__)
ARRIVAL_WINDOW_S = 0.05  # a request this recent means more may be arriving (short chunks)


class _Pending(NamedTuple):
  """Dispatched work whose results the host has not read yet: a prefill (`batch` of
  (slot, request), `draw`) or a decode chunk (`owners` at dispatch, `state`, `out`)."""
  batch: list[tuple[int, Request]] | None
  draw: Any
  owners: list[Request | None] | None
  state: Any
  out: Any


class Engine:
  """Continuous-batching generation for one model (see the module docstring).

  Args:
    graphdef, params: the model (`nnx.split(model)[0]` and its pure params, placed with
      `param_shardings` when a mesh is given).
    model_cfg: its ModelConfig.
    slots: requests decoded together (cache rows); a multiple of the mesh's batch split.
    max_len: cache slots per row (prompt + generated tokens); default the model context.
    mesh, rules, param_shardings: as model/sampling.py's Sampler.
    prompt_bucket: prompts are padded to prompt_bucket * 2^k tokens (compiled per bucket and
      per number of prompts prefilled together).
    steps_per_sync: decode steps per jit call (per host round trip).
    on_step: called with (tokens delivered, seconds) after each prefill and decode chunk.
  """

  def __init__(self, graphdef: Any, params: Any, model_cfg: Any, *, slots: int = 8,
               max_len: int | None = None, mesh: jax.sharding.Mesh | None = None,
               rules: Sequence[tuple[str, Any]] | None = None, param_shardings: Any = None,
               prompt_bucket: int = 32, steps_per_sync: int = 16,
               on_step: Callable[[int, float], None] | None = None):
    self.max_len = int(max_len or model_cfg.max_seq_len)
    if not 1 < self.max_len <= model_cfg.max_seq_len:
      raise ValueError(f"max_len={self.max_len} must be in 2..{model_cfg.max_seq_len} "
                       "(the model context)")
    if slots < 1 or prompt_bucket < 1 or steps_per_sync < 1:
      raise ValueError(f"slots={slots}, prompt_bucket={prompt_bucket} and steps_per_sync="
                       f"{steps_per_sync} must be >= 1")
    if jax.process_count() > 1:
      raise ValueError("The serving engine runs in one process (its scheduler admits "
                       "requests on its own); use a mesh of this process's devices")
    self.rules = tuple(rules) if rules is not None else msharding.DEFAULT_RULES
    split = msharding.batch_parallel_size(mesh, self.rules) if mesh is not None else 1
    if slots % split:
      raise ValueError(f"slots={slots} must be a multiple of the mesh's batch split {split}")
    self.model_cfg, self.mesh = model_cfg, mesh
    self.steps_per_sync, self.on_step = steps_per_sync, on_step
    self._slots = slots
    self.prompt_buckets = buckets(min(prompt_bucket, self.max_len), self.max_len)
    self.cache_buckets = buckets(self.prompt_buckets[0], self.max_len, fine=True)
    # Prefill shapes (rows n, bucket P): n in 1, 4, 16, ... and `slots`, n * P within a
    # token budget (one full-context prompt, or a smallest-bucket prompt per slot). Powers
    # of 4, not 2: half the programs to compile (~2 s each on CPU); a prefill costs little
    # next to a decode chunk, so filler rows are cheap.
    budget = max(self.max_len, slots * self.prompt_buckets[0])
    rows = sorted({1, slots} | {4 ** k for k in range(1, 8) if 4 ** k < slots})
    self.prefill_shapes = [(n, p) for p in self.prompt_buckets for n in rows
                           if n == 1 or n * p <= budget]
    self._programs = Programs(graphdef, params, model_cfg, slots=slots, max_len=self.max_len,
                              steps_per_sync=steps_per_sync, mesh=mesh, rules=self.rules,
                              param_shardings=param_shardings)
    self._rows: list[Request | None] = [None] * slots  # the request each slot serves
    self._rp = RowParams(*(np.asarray(x) for x in row_params(None, slots)))
    # Upper bound of each slot's next write slot after all dispatched work, and the last
    # slot its request may write: they choose the cache-length bucket of a chunk.
    self._pos_hi = np.zeros(slots, np.int64)
    self._last = np.zeros(slots, np.int64)
    self._pending: collections.deque[_Pending] = collections.deque()
    self._busy_since: float | None = None
    self._queue: collections.deque[Request] = collections.deque()
    self._cv = threading.Condition()
    self._device = threading.Lock()  # the cache is donated: one device call at a time
    self._thread: threading.Thread | None = None
    self._stopping = self._drain = False
    self._ids, self._seeds = itertools.count(), itertools.count(1)
    self._last_submit = float("-inf")

  # ------------------------------------------------------------------------ public API
  @property
  def slots(self) -> int:
    return self._slots

  @property
  def queue_depth(self) -> int:
    """Requests waiting for a slot."""
    return len(self._queue)

  @property
  def slots_in_use(self) -> int:
    return sum(r is not None for r in self._rows)

  def start(self) -> "Engine":
    """Starts the scheduler thread; returns self."""
    if self._thread is None:
      self._thread = threading.Thread(target=self._loop, name="serve-engine", daemon=True)
      self._thread.start()
    return self

  def submit(self, prompt_ids: Sequence[int], params: GenerationParams) -> RequestHandle:
    """Queues a request (thread-safe); its tokens stream from the returned handle.

    Raises:
      ValueError: an empty prompt, ids outside the vocabulary, or prompt + max_tokens
        beyond the context (`max_len`).
      RuntimeError: the engine is stopping.
    """
    prompt = np.asarray(list(prompt_ids), np.int32)
    vocab = self.model_cfg.vocab_size
    if prompt.size == 0:
      raise ValueError("The prompt is empty; a prompt needs at least one token")
    if prompt.min() < 0 or prompt.max() >= vocab:
      raise ValueError(f"Prompt token ids must be in 0..{vocab - 1}")
    if prompt.size + params.max_tokens > self.max_len:
      raise ValueError(f"The prompt has {prompt.size} tokens; with max_tokens="
                       f"{params.max_tokens} that exceeds the context of {self.max_len} "
                       "tokens (shorten the prompt or max_tokens)")
    with self._cv:
      if self._stopping:
        raise RuntimeError("The engine is stopping; it takes no new requests")
      seed = params.seed if params.seed is not None else next(self._seeds)
      handle = RequestHandle(f"req-{next(self._ids)}", self._wake)
      self._last_submit = time.perf_counter()
      request = Request(handle, prompt, params, seed)
      self._queue.append(request)
      self._cv.notify_all()
    return request.handle

  def stop(self, drain: bool = True) -> None:
    """Stops the scheduler: drain=True finishes queued and running requests first,
    drain=False cancels them. Blocks until the thread has ended."""
    with self._cv:
      self._stopping, self._drain = True, drain
      self._cv.notify_all()
    if self._thread is not None:
      self._thread.join()
    else:  # never started: nothing runs, so queued requests can only be cancelled
      self._cancel_queued()

  def warmup(self) -> None:
    """Compiles every prefill shape and decode bucket (before serving; the prefills write
    nothing and the chunks run idle rows, so it is also safe while serving, if slower)."""
    with self._device:
      for n, p in self.prefill_shapes:
        self._programs.prefill(np.zeros((n, p), np.int32), np.ones(n, np.int32),
                               np.full(n, self._slots, np.int32), row_params(None, n))
      for n in self.cache_buckets:
        self._programs.decode(n, row_params(None, self._slots), self._programs.idle_state())
      jax.block_until_ready(self._programs.cache)

  def compilations(self) -> dict[str, int]:
    """Compiled programs so far: {"prefill": n, "decode": n} (tests count them)."""
    return self._programs.compilations()

  # ------------------------------------------------------------------------ scheduler
  def _wake(self) -> None:
    with self._cv:
      self._cv.notify_all()

  def _loop(self) -> None:
    while True:
      with self._cv:
        while not (self._queue or self._stopping or self.slots_in_use or self._pending):
          self._busy_since = None
          self._cv.wait()
        if self._stopping and not self._drain:
          self._cancel_queued()
          for req in self._rows:
            if req is not None:
              req.handle.cancelled = True
        if (self._stopping and not self._queue and not self.slots_in_use
            and not self._pending):
          return
        admit = self._take_admissions()
      with self._device:
        try:
          self._step(admit)
        except Exception as e:  # pylint: disable=broad-except
          log.exception("serve engine step failed")
          self._fail_all(admit, f"{type(e).__name__}: {e}")

  def _take_admissions(self) -> list[tuple[int, Request]]:
    """Pops queued requests into free slots (under the lock); drops cancelled ones."""
    free = [r for r, req in enumerate(self._rows) if req is None]
    admit = []
    while self._queue and len(admit) < len(free):
      req = self._queue.popleft()
      if req.handle.cancelled:
        req.handle.emit([Finished("cancelled", req.prompt.size, 0)])
      else:
        admit.append((free[len(admit)], req))
    return admit

  def _cancel_queued(self) -> None:
    while self._queue:
      req = self._queue.popleft()
      req.handle.emit([Finished("cancelled", req.prompt.size, 0)])

  def _step(self, admit: list[tuple[int, Request]]) -> None:
    """Dispatches cancellations, prefills and the next decode chunk, then delivers the
    results of everything dispatched before that chunk (which keeps running meanwhile)."""
    if self._busy_since is None:
      self._busy_since = time.perf_counter()
    cancelled = [r for r, req in enumerate(self._rows)
                 if req is not None and req.handle.cancelled]
    if cancelled:
      keep = np.ones(self._slots, bool)
      keep[cancelled] = False
      self._programs.deactivate(keep)
      for row in cancelled:
        handle = self._rows[row].handle
        handle.emit([self._free(row, "cancelled")])
    self._admit(admit)
    chunk = self._dispatch_chunk()
    while len(self._pending) > (1 if chunk else 0):
      self._deliver(self._pending.popleft())

  def _admit(self, admit: list[tuple[int, Request]]) -> None:
    """Dispatches the prefills of the admitted requests, those of one prompt bucket
    together (up to the largest compiled row count)."""
    admit = sorted(admit, key=lambda x: x[1].prompt.size)
    while admit:
      bucket = pick(self.prompt_buckets, admit[0][1].prompt.size)
      same = [x for x in admit if pick(self.prompt_buckets, x[1].prompt.size) == bucket]
      n_max = max(n for n, p in self.prefill_shapes if p == bucket)
      batch, admit = same[:n_max], admit[min(len(same), n_max):]
      n = min(n for n, p in self.prefill_shapes if p == bucket and n >= len(batch))
      tokens = np.zeros((n, bucket), np.int32)
      lengths, rows = np.ones(n, np.int32), np.full(n, self._slots, np.int32)
      rp = row_params(None, n)
      for i, (row, req) in enumerate(batch):
        tokens[i, :req.prompt.size], lengths[i], rows[i] = req.prompt, req.prompt.size, row
        for field, value in zip(RowParams._fields, row_params(req, 1)):
          getattr(rp, field)[i] = getattr(self._rp, field)[row] = value[0]
        self._rows[row] = req
        self._pos_hi[row] = req.prompt.size
        self._last[row] = req.prompt.size + req.params.max_tokens - 2
      draw = self._programs.prefill(tokens, lengths, rows, rp)
      self._pending.append(_Pending(batch, draw, None, None, None))

  def _dispatch_chunk(self) -> bool:
    """Dispatches a decode chunk if a slot is (as far as the host knows) generating."""
    busy = [r for r, req in enumerate(self._rows) if req is not None]
    if not busy:
      return False
    # Short chunks while slots fill (module doc; steps/4 measured slower than steps/8).
    limit = self.steps_per_sync
    if len(busy) < self._slots and (self._queue or time.perf_counter() - self._last_submit
                                    < ARRIVAL_WINDOW_S):
      limit = max(1, self.steps_per_sync // 8)
    need = np.minimum(self._pos_hi[busy] + limit, self._last[busy] + 1)
    cache_len = pick(self.cache_buckets, int(need.max()))
    rp = RowParams(*(np.array(x) for x in self._rp))  # copies: dispatch is asynchronous
    state, out = self._programs.decode(cache_len, rp, limit=limit)
    self._pos_hi[busy] += limit
    self._pending.append(_Pending(None, None, list(self._rows), state, out))
    return True

  def _deliver(self, item: _Pending) -> None:
    """Reads one dispatched item's results (waiting for them) and hands the tokens to
    their requests; requests that ended free their slots."""
    delivered = 0
    if item.batch is not None:  # a prefill: each request's first token
      draw = jax.device_get(item.draw)
      for i, (row, req) in enumerate(item.batch):
        if not req.handle.done:
          delivered += self._emit(row, req, [x[i:i + 1] for x in draw], None)
    else:
      state, out = jax.device_get((item.state, item.out))
      for row, req in enumerate(item.owners):
        if req is not None and not req.handle.done and out.produced[row]:
          n = int(out.produced[row])
          delivered += self._emit(row, req, [x[row, :n] for x in out[:4]],
                                  bool(state.active[row]))
    if self.on_step is not None and delivered:
      now = time.perf_counter()
      self.on_step(delivered, now - self._busy_since)
      self._busy_since = now

  def _emit(self, row: int, req: Request, draws: list[np.ndarray],
            active: bool | None) -> int:
    """Delivers a request's new tokens; frees its slot when it ended (`active` False, or
    for a first token: a stop id or max_tokens 1). Returns the number of tokens."""
    events = self._events(req, *draws)
    last = events[-1].token
    if active is None:
      active = last not in req.params.stop_ids and req.produced < req.params.max_tokens
    if not active:
      events.append(self._free(row, "stop" if last in req.params.stop_ids else "length"))
    req.handle.emit(events)
    return len(draws[0])

  def _events(self, req: Request, tokens, logprobs, top_ids, top_logprobs
              ) -> list[TokenEvent]:
    """TokenEvents of a request's new tokens ([n] arrays, top ones [n, 20])."""
    p = req.params
    req.produced += len(tokens)
    if not (p.logprobs or p.top_logprobs):
      return [TokenEvent(t, None, None) for t in tokens.tolist()]
    top = [None] * len(tokens)
    if p.top_logprobs:
      top = [list(zip(i, v)) for i, v in zip(top_ids[:, :p.top_logprobs].tolist(),
                                              top_logprobs[:, :p.top_logprobs].tolist())]
    return [TokenEvent(t, lp, tl) for t, lp, tl in zip(tokens.tolist(), logprobs.tolist(), top)]

  def _free(self, row: int, reason: str, error: str | None = None) -> Finished:
    """Frees `row` (its row parameters back to greedy, so an idle row never switches on
    the sampling branches); returns the Finished of the request that held it."""
    req = self._rows[row]
    self._rows[row] = None
    for field, value in zip(RowParams._fields, idle_params()):
      getattr(self._rp, field)[row] = value[0]
    return Finished(reason, req.prompt.size, req.produced, error)

  def _fail_all(self, admit: list[tuple[int, Request]], error: str) -> None:
    """After a failed device call: every running and just-admitted request ends with
    "error", and the cache (possibly donated to the failed call) and state are rebuilt."""
    for row, req in enumerate(self._rows):
      if req is not None:
        req.handle.emit([self._free(row, "error", error)])
    for _, req in admit:
      if not req.handle.done:
        req.handle.emit([Finished("error", req.prompt.size, req.produced, error)])
    self._pending.clear()
    try:
      self._programs.reset()
    except Exception:  # pylint: disable=broad-except
      # The device may be gone for good: later requests then fail in their turn, with
      # their own "error" Finished, rather than hang on a dead scheduler thread.
      log.exception("serve engine: rebuilding the cache failed")
