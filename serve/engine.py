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
request frees its slot at once. Requests admitted at the same boundary are prefilled
together, n rows per call (n a power of two; one compilation per (n, bucket) shape,
`prefill_shapes`): one pass over the weights for all of them instead of one each. The alternative, one shared
write index with left-padded rows (model/sampling.py's layout), would have to shift every
row's cache whenever a request joins behind the others.

One background thread runs the scheduler: admit queued requests into free slots (prefill
each), then one decode *chunk*: up to `steps_per_sync` decode steps for all slots inside
one jit call (`serve/engine_step.py`), so the host syncs once per chunk, not per token;
a request that finishes mid-chunk is cut at its stop on the host and its row idles for
the rest of the chunk. The chunk attends only over the occupied prefix of the cache: the
host picks the smallest cache-length bucket holding every running row's slots for the
chunk (buckets prompt_bucket * 2^k, capped at max_len; one compilation each). Sampling
parameters are per-row arrays of the one compiled step (no recompilation per request
mix; see serve/engine_step.py), and a request's randomness is its own: token i uses
fold_in(key(seed), i), so its output does not depend on the other requests, and a greedy
request equals model/sampling.py's offline greedy output.

The cache is donated to every jit call (updated in place); per chunk only [slots] state
arrays and the [slots, steps] draws cross between host and device. On a mesh (`mesh`,
`rules`, `param_shardings` as model/sampling.py's Sampler takes them) cache rows shard
over the batch axes and kv heads over tensor, like the weights.

Metrics: `on_step(step_tokens, seconds)` is called after every prefill call (one token per
request) and every decode chunk (the tokens it delivered), from the scheduler thread.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import logging
import threading
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from model import sharding as msharding
from model.transformer import CACHE_AXES, init_cache
from serve import engine_step
from serve.engine_requests import (Finished, GenerationParams, Request, RequestHandle,
                                   TokenEvent, idle_params, row_params)
from serve.engine_step import DecodeState, RowParams, buckets

__all__ = ["Engine", "Finished", "GenerationParams", "RequestHandle", "TokenEvent"]

log = logging.getLogger(__name__)


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
    self.rules = tuple(rules) if rules is not None else msharding.DEFAULT_RULES
    split = msharding.batch_parallel_size(mesh, self.rules) if mesh is not None else 1
    if slots % split:
      raise ValueError(f"slots={slots} must be a multiple of the mesh's batch split {split}")
    self.graphdef, self.model_cfg, self.mesh = graphdef, model_cfg, mesh
    self.param_shardings, self.steps_per_sync, self.on_step = (param_shardings,
                                                               steps_per_sync, on_step)
    self.params = params if param_shardings is None else jax.device_put(params,
                                                                        param_shardings)
    self._slots = slots
    self.prompt_buckets = buckets(min(prompt_bucket, self.max_len), self.max_len)
    self.cache_buckets = buckets(self.prompt_buckets[0], self.max_len, fine=True)
    # Prefill shapes (rows n, bucket P): n a power of two up to `slots`, n * P within a
    # token budget (one full-context prompt, or a smallest-bucket prompt per slot).
    budget = max(self.max_len, slots * self.prompt_buckets[0])
    self.prefill_shapes = [(n, p) for p in self.prompt_buckets
                           for n in buckets(1, slots) if n == 1 or n * p <= budget]
    self._prefill_fns: dict[tuple[int, int], Any] = {}
    self._decode_fns: dict[int, Any] = {}
    self._cache = self._new_cache()
    self._rows: list[Request | None] = [None] * slots
    self._state = DecodeState(*(np.zeros(slots, np.int32) for _ in range(3)),
                              np.zeros(slots, bool))
    self._rp = RowParams(*(np.asarray(x) for x in row_params(None, slots)))
    self._queue: collections.deque[Request] = collections.deque()
    self._cv = threading.Condition()
    self._device = threading.Lock()  # the cache is donated: one device call at a time
    self._thread: threading.Thread | None = None
    self._stopping = self._drain = False
    self._ids, self._seeds = itertools.count(), itertools.count(1)

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
    nothing, so it is also safe while serving, if slower)."""
    with self._device:
      for n, p in self.prefill_shapes:
        self._prefill([], n, p)
      inactive = DecodeState(*(np.zeros(self._slots, np.int32) for _ in range(3)),
                             np.zeros(self._slots, bool))
      for n in self.cache_buckets:
        self._decode(inactive, n)

  def compilations(self) -> dict[str, int]:
    """Compiled programs so far: {"prefill": n, "decode": n} (tests count them)."""
    count = lambda fns: sum(f._cache_size() for f in fns.values())
    return {"prefill": count(self._prefill_fns), "decode": count(self._decode_fns)}

  # ------------------------------------------------------------------------ device calls
  def _context(self) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    if self.mesh is not None:  # the model's sharding constraints read these at trace time
      stack.enter_context(jax.set_mesh(self.mesh))
      stack.enter_context(nnx.logical_axis_rules(self.rules))
    return stack

  def _cache_shardings(self) -> Any:
    axes = CACHE_AXES if self.model_cfg.scan_layers else CACHE_AXES[1:]
    sharding = NamedSharding(self.mesh, msharding.logical_to_spec(axes, self.rules))
    cache = jax.eval_shape(lambda: init_cache(self.model_cfg, self._slots, self.max_len))
    return jax.tree.map(lambda _: sharding, cache)

  def _jit(self, fn: Callable, n_args: int, n_out: int):
    """jit of fn(params, cache, ...) -> (cache, ...) with the cache donated and, on a mesh,
    explicit shardings: params as given, the cache by CACHE_AXES, the rest (small host
    arrays) replicated."""
    if self.mesh is None:
      return jax.jit(fn, donate_argnums=(1,))
    cache, replicated = self._cache_shardings(), NamedSharding(self.mesh, P())
    return jax.jit(fn, in_shardings=(self.param_shardings, cache) + (replicated,) * (n_args - 2),
                   out_shardings=(cache,) + (replicated,) * (n_out - 1), donate_argnums=(1,))

  def _new_cache(self) -> Any:
    make = lambda: init_cache(self.model_cfg, self._slots, self.max_len)
    if self.mesh is None:
      return jax.jit(make)()
    with self._context():
      return jax.jit(make, out_shardings=self._cache_shardings())()

  def _prefill(self, batch: list[tuple[int, Request]], n: int, bucket: int
               ) -> engine_step.Draw:
    """Prefills `batch` (slot, request) as n rows of `bucket` tokens (fillers after it
    write nothing: their row index is out of range)."""
    if (n, bucket) not in self._prefill_fns:
      self._prefill_fns[n, bucket] = self._jit(
          engine_step.bound(self.graphdef, engine_step.prefill), n_args=6, n_out=2)
    tokens = np.zeros((n, bucket), np.int32)
    lengths, rows = np.ones(n, np.int32), np.full(n, self._slots, np.int32)
    rp = row_params(None, n)
    for i, (row, req) in enumerate(batch):
      tokens[i, :req.prompt.size], lengths[i], rows[i] = req.prompt, req.prompt.size, row
      for field, value in zip(RowParams._fields, row_params(req, 1)):
        getattr(rp, field)[i] = value[0]
    with self._context():
      self._cache, draw = self._prefill_fns[n, bucket](self.params, self._cache, rows, tokens,
                                                       lengths, rp)
    return jax.device_get(draw)

  def _decode(self, state: DecodeState, cache_len: int
              ) -> tuple[DecodeState, engine_step.ChunkOutput]:
    if cache_len not in self._decode_fns:
      fn = functools.partial(engine_step.decode, steps=self.steps_per_sync,
                             cache_len=cache_len)
      run = engine_step.bound(self.graphdef, fn)
      self._decode_fns[cache_len] = self._jit(
          lambda params, cache, state, rp: run(params, cache, state, rp), n_args=4, n_out=3)
    with self._context():
      self._cache, state, out = self._decode_fns[cache_len](self.params, self._cache, state,
                                                             self._rp)
    return jax.device_get((state, out))

  # ------------------------------------------------------------------------ scheduler
  def _wake(self) -> None:
    with self._cv:
      self._cv.notify_all()

  def _loop(self) -> None:
    while True:
      with self._cv:
        while not (self._queue or self._stopping or self.slots_in_use):
          self._cv.wait()
        if self._stopping and not self._drain:
          self._cancel_queued()
          for row, req in enumerate(self._rows):
            if req is not None:
              req.handle.cancelled = True
        if self._stopping and not self._queue and not self.slots_in_use:
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
    """Admits (prefills) new requests, frees cancelled ones, runs one decode chunk."""
    self._admit(admit)
    for row, req in enumerate(self._rows):
      if req is not None and req.handle.cancelled:
        req.handle.emit([self._free(row, "cancelled")])
    if not self._state.active.any():
      return
    t0 = time.perf_counter()
    pos = self._state.pos[self._state.active]
    cache_len = engine_step.pick(self.cache_buckets, int(pos.max()) + self.steps_per_sync)
    state, out = self._decode(self._state, cache_len)
    self._state = DecodeState(*(np.array(x) for x in state))
    delivered = 0
    for row, req in enumerate(self._rows):
      n = 0 if req is None else int(out.produced[row])
      if not n:
        continue
      events = self._events(req, *(x[row, :n] for x in out[:4]))
      if not self._state.active[row]:
        last = events[-1].token
        events.append(self._free(row, "stop" if last in req.params.stop_ids else "length"))
      req.handle.emit(events)
      delivered += n
    if self.on_step is not None:
      self.on_step(delivered, time.perf_counter() - t0)

  def _admit(self, admit: list[tuple[int, Request]]) -> None:
    """Prefills the admitted requests, those of one prompt bucket together (up to the
    largest compiled row count), and starts decoding them."""
    admit = sorted(admit, key=lambda x: x[1].prompt.size)
    while admit:
      t0 = time.perf_counter()
      bucket = engine_step.pick(self.prompt_buckets, admit[0][1].prompt.size)
      same = [x for x in admit if engine_step.pick(self.prompt_buckets, x[1].prompt.size) == bucket]
      n_max = max(n for n, p in self.prefill_shapes if p == bucket)
      batch, admit = same[:n_max], admit[min(len(same), n_max):]
      n = min(n for n, p in self.prefill_shapes if p == bucket and n >= len(batch))
      draw = self._prefill(batch, n, bucket)
      for i, (row, req) in enumerate(batch):
        self._start(row, req, engine_step.Draw(*(x[i:i + 1] for x in draw)))
      if self.on_step is not None:
        self.on_step(len(batch), time.perf_counter() - t0)

  def _start(self, row: int, req: Request, draw: engine_step.Draw) -> None:
    """Puts a prefilled request in its slot with its first token delivered."""
    self._rows[row] = req
    for field, value in zip(RowParams._fields, row_params(req, 1)):
      getattr(self._rp, field)[row] = value[0]
    events = self._events(req, *draw)
    token = events[0].token
    if token in req.params.stop_ids:
      events.append(self._free(row, "stop"))
    elif req.produced >= req.params.max_tokens:
      events.append(self._free(row, "length"))
    else:
      for field, value in zip(DecodeState._fields, (token, req.prompt.size, 1, True)):
        getattr(self._state, field)[row] = value
    req.handle.emit(events)

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
    for field, value in zip(DecodeState._fields, (0, 0, 0, False)):
      getattr(self._state, field)[row] = value
    for field, value in zip(RowParams._fields, idle_params()):
      getattr(self._rp, field)[row] = value[0]
    return Finished(reason, req.prompt.size, req.produced, error)

  def _fail_all(self, admit: list[tuple[int, Request]], error: str) -> None:
    """After a failed device call: every running and just-admitted request ends with
    "error", and the (possibly donated) cache is rebuilt."""
    for row, req in enumerate(self._rows):
      if req is not None:
        req.handle.emit([self._free(row, "error", error)])
    for _, req in admit:
      if not req.handle.done:
        req.handle.emit([Finished("error", req.prompt.size, req.produced, error)])
    self._cache = self._new_cache()
