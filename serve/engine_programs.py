"""The compiled programs of one engine and the device state they carry (`Programs`).

`serve/engine_step.py` holds the traced functions; this module jits them (one program per
prefill shape (n, P) and per decode cache-length bucket), places them on the mesh and owns
what flows between them on the device: the KV cache (donated to every call, so it is
updated in place) and the per-slot decode state. Every call only *dispatches* work (JAX
runs it asynchronously): the cache and state returned by one call feed the next without a
host round trip, so the scheduler can queue the next decode chunk before it reads the
previous chunk's tokens. Results come back as futures the scheduler fetches later.

On a mesh (`mesh`, `rules`, `param_shardings` as model/sampling.py's Sampler takes them)
cache rows shard over the batch axes and kv heads over tensor, like the weights; the small
per-slot arrays are replicated.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from model import sharding as msharding
from model.transformer import CACHE_AXES, init_cache
from serve import engine_step
from serve.engine_step import ChunkOutput, DecodeState, Draw, RowParams


class Programs:
  """Jitted prefill / decode / deactivate for one model, slot count and cache length.

  Args:
    graphdef, params: the model (params placed with `param_shardings` on a mesh).
    model_cfg: its ModelConfig.
    slots, max_len: cache rows and slots per row.
    steps_per_sync: decode steps per decode call.
    mesh, rules, param_shardings: sharding (None: one device).
  """

  def __init__(self, graphdef: Any, params: Any, model_cfg: Any, *, slots: int, max_len: int,
               steps_per_sync: int, mesh: jax.sharding.Mesh | None = None,
               rules: Sequence[tuple[str, Any]] = msharding.DEFAULT_RULES,
               param_shardings: Any = None):
    self.graphdef, self.model_cfg, self.mesh, self.rules = graphdef, model_cfg, mesh, rules
    self.param_shardings = param_shardings
    self.params = params if param_shardings is None else jax.device_put(params,
                                                                        param_shardings)
    self.slots, self.max_len, self.steps = slots, max_len, steps_per_sync
    self._prefill_fns: dict[tuple[int, int], Any] = {}
    self._decode_fns: dict[int, Any] = {}
    self._deactivate_fn = jax.jit(engine_step.deactivate)
    self.reset()

  def reset(self) -> None:
    """A fresh cache and an all-idle decode state (also after a failed call, whose
    donated cache may be gone)."""
    self.cache = self._new_cache()
    self.state = self.idle_state()

  def idle_state(self) -> DecodeState:
    """Every slot free, as device arrays like the ones calls return (a numpy state would
    be another jit signature: a second compilation of each program)."""
    return self._deactivate_fn(idle_state(self.slots), np.zeros(self.slots, bool))

  def compilations(self) -> dict[str, int]:
    """Compiled programs so far: {"prefill": n, "decode": n}."""
    # jax's own count of what each jitted function compiled (its cache size).
    count = lambda fns: sum(f._cache_size() for f in fns.values())  # pylint: disable=W0212
    return {"prefill": count(self._prefill_fns), "decode": count(self._decode_fns)}

  def prefill(self, tokens: np.ndarray, lengths: np.ndarray, rows: np.ndarray,
              rp: RowParams) -> Draw:
    """Dispatches a prefill of tokens [n, P] into `rows` [n] (index `slots`: a filler
    whose writes are dropped); returns the first tokens' draws (device arrays)."""
    shape = tokens.shape
    if shape not in self._prefill_fns:
      self._prefill_fns[shape] = self._jit(
          engine_step.bound(self.graphdef, engine_step.prefill), n_args=7, n_out=3)
    with self._context():
      self.cache, self.state, draw = self._prefill_fns[shape](
          self.params, self.cache, self.state, rows, tokens, lengths, rp)
    return draw

  def decode(self, cache_len: int, rp: RowParams, state: DecodeState | None = None,
             limit: int | None = None) -> tuple[DecodeState, ChunkOutput]:
    """Dispatches one decode chunk of at most `limit` steps (default: steps_per_sync) over
    slots [0, cache_len) from the carried state (or `state`, which is then not carried on:
    warm-up); returns (state after, outputs)."""
    if cache_len not in self._decode_fns:
      run = engine_step.bound(self.graphdef, functools.partial(
          engine_step.decode, steps=self.steps, cache_len=cache_len))
      self._decode_fns[cache_len] = self._jit(
          lambda params, cache, state, rp, limit: run(params, cache, state, rp, limit),
          n_args=5, n_out=3)
    with self._context():
      self.cache, after, out = self._decode_fns[cache_len](
          self.params, self.cache, self.state if state is None else state, rp,
          np.int32(self.steps if limit is None else limit))
    if state is None:
      self.state = after
    return after, out

  def deactivate(self, keep: np.ndarray) -> None:
    """Dispatches: rows where `keep` [slots] is False stop decoding."""
    self.state = self._deactivate_fn(self.state, keep)

  # ------------------------------------------------------------------------ internals
  def _context(self) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    if self.mesh is not None:  # the model's sharding constraints read these at trace time
      stack.enter_context(jax.set_mesh(self.mesh))
      stack.enter_context(nnx.logical_axis_rules(self.rules))
    return stack

  def _cache_shardings(self) -> Any:
    axes = CACHE_AXES if self.model_cfg.scan_layers else CACHE_AXES[1:]
    sharding = NamedSharding(self.mesh, msharding.logical_to_spec(axes, self.rules))
    cache = jax.eval_shape(lambda: init_cache(self.model_cfg, self.slots, self.max_len))
    return jax.tree.map(lambda _: sharding, cache)

  def _jit(self, fn: Callable, n_args: int, n_out: int):
    """jit of fn(params, cache, ...) -> (cache, ...) with the cache donated and, on a mesh,
    explicit shardings: params as given, the cache by CACHE_AXES, the rest (small per-slot
    arrays) replicated."""
    if self.mesh is None:
      return jax.jit(fn, donate_argnums=(1,))
    cache, replicated = self._cache_shardings(), NamedSharding(self.mesh, P())
    return jax.jit(fn, in_shardings=(self.param_shardings, cache) + (replicated,) * (n_args - 2),
                   out_shardings=(cache,) + (replicated,) * (n_out - 1), donate_argnums=(1,))

  def _new_cache(self) -> Any:
    make = lambda: init_cache(self.model_cfg, self.slots, self.max_len)
    if self.mesh is None:
      return jax.jit(make)()
    with self._context():
      return jax.jit(make, out_shardings=self._cache_shardings())()


def idle_state(slots: int) -> DecodeState:
  """Every slot free: nothing to feed, inactive."""
  return DecodeState(*(np.zeros(slots, np.int32) for _ in range(3)), np.zeros(slots, bool))
