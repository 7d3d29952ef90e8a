"""The one sharded-apply runtime: a model structure on a mesh, and functions applied to rows.

  runtime = Runtime(mesh, rules, graphdef, param_shardings)
  scores = runtime.apply(pair_scores, params, rows, batch_size=32)   # numpy [N, ...]

Every "run a model function over rows" in the project goes through `Runtime.apply`: the
Trainer's predictions, DPO's reference pass, PPO's scoring, the log-likelihood scorer,
reward scoring and win rates. What it guarantees:

- explicit in/out shardings: parameters as the run shards them, rows split over the batch
  axes, outputs replicated (every process gets every row's result, so several processes
  with parameters no single process holds whole can still return host arrays);
- one compiled program per (function, model structure, mesh, rules) and input shape:
  jitted functions are cached at module level, so two checkpoints of the same structure
  (a policy and its reference, the policies a judge compares) share one program
  (`compile_count` lets a test check it);
- rows are the *global* rows, identical on every process (they come from the same files
  or the same rollout); each batch is padded to a multiple of the data-parallel size by
  repeating rows and the padding is cut from the result.

`to_global` is the other host -> device boundary, for training batches, where each process
holds only its own rows.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from model import sharding as msharding

ApplyFn = Callable[[nnx.Module, Mapping[str, jax.Array]], Any]

# (fn, graphdef, mesh, rules) -> jitted function: shared by every Runtime of that structure.
_COMPILED: dict[tuple, Any] = {}


class Runtime:
  """A model structure (`graphdef`) with its parameter shardings on a mesh.

  Args:
    mesh: the device mesh.
    rules: logical axis rules (normalised, as `model.sharding.normalize_rules` returns).
    graphdef: `nnx.split(model)[0]` of the model the parameters belong to.
    param_shardings: NamedShardings of the parameter tree.
  """

  def __init__(self, mesh: Mesh, rules: tuple[tuple[str, Any], ...], graphdef: Any,
               param_shardings: Any):
    self.mesh, self.rules, self.graphdef = mesh, tuple(rules), graphdef
    self.param_shardings = param_shardings
    self.batch_axes = dict(self.rules).get("batch")
    self.batch_sharding = NamedSharding(mesh, P(self.batch_axes))
    self.stacked_batch_sharding = NamedSharding(mesh, P(None, self.batch_axes))
    self.replicated = NamedSharding(mesh, P())
    self.data_parallel = msharding.batch_parallel_size(mesh, self.rules)

  @contextlib.contextmanager
  def mesh_context(self) -> Iterator[None]:
    """Mesh + logical rules, active whenever model code is traced or run."""
    with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
      yield

  # ------------------------------------------------------------------ host -> device
  def to_global(self, batch: Mapping[str, np.ndarray], sharding: NamedSharding | None = None
                ) -> dict[str, jax.Array]:
    """Process-local rows (each process its own slice) -> global arrays on the mesh.

    With one process the local rows are the global batch and one batched `device_put` of
    the whole dict is enough (about half the host time of one call per array, which
    matters when the host shares its cores with the computation).
    """
    sharding = sharding or self.batch_sharding
    if jax.process_count() == 1:
      return jax.device_put({k: np.asarray(v) for k, v in batch.items()}, sharding)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}

  def stage(self, batches: list[Mapping[str, np.ndarray]]) -> dict[str, jax.Array]:
    """Process-local batches of one call -> global arrays ([n, B, ...] when n > 1)."""
    if len(batches) == 1:
      return self.to_global(batches[0])
    stacked = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
    return self.to_global(stacked, self.stacked_batch_sharding)

  def replicated_rows(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """Global rows that every process holds whole -> arrays sharded over the batch axes
    (each process places only the slices its devices own)."""
    if jax.process_count() == 1:
      return jax.device_put({k: np.asarray(v) for k, v in batch.items()},
                            self.batch_sharding)
    out = {}
    for k, v in batch.items():
      v = np.asarray(v)
      out[k] = jax.make_array_from_callback(v.shape, self.batch_sharding,
                                            lambda index, v=v: v[index])
    return out

  # ------------------------------------------------------------------ apply
  def compiled(self, fn: ApplyFn) -> Any:
    """`fn(model, batch)` jitted for this structure and mesh (cached; see module doc)."""
    key = (fn, self.graphdef, self.mesh, self.rules)
    if key not in _COMPILED:
      graphdef = self.graphdef
      _COMPILED[key] = jax.jit(lambda params, batch: fn(nnx.merge(graphdef, params), batch),
                               in_shardings=(self.param_shardings, self.batch_sharding),
                               out_shardings=self.replicated)
    return _COMPILED[key]

  def compile_count(self, fn: ApplyFn) -> int:
    """How many programs `fn` has been compiled to on this structure (one per shape)."""
    key = (fn, self.graphdef, self.mesh, self.rules)
    return _COMPILED[key]._cache_size() if key in _COMPILED else 0  # noqa: SLF001

  def padded_batch_size(self, batch_size: int) -> int:
    """`batch_size` rounded up to a multiple of the data-parallel size."""
    return -(-max(batch_size, 1) // self.data_parallel) * self.data_parallel

  def apply(self, fn: ApplyFn, params: Any, rows: Mapping[str, np.ndarray],
            batch_size: int) -> Any:
    """`fn(model, batch)` over all `rows` ([N, ...] arrays, the same on every process) in
    batches of `batch_size` (rounded up to the data-parallel size; the last batch is
    padded by repeating rows). Returns numpy outputs for the N rows (a tree if `fn`
    returns one)."""
    total = len(next(iter(rows.values())))
    if total == 0:
      raise ValueError("Runtime.apply got no rows")
    size = self.padded_batch_size(batch_size)
    batches = ({k: np.asarray(v)[np.arange(start, start + size) % total]  # wrap to pad
                for k, v in rows.items()} for start in range(0, total, size))
    return jax.tree.map(lambda x: x[:total], self.apply_batches(fn, params, batches))

  def apply_batches(self, fn: ApplyFn, params: Any,
                    batches: Iterator[Mapping[str, np.ndarray]]) -> Any:
    """`fn` over ready-made global batches (each already a multiple of the data-parallel
    size, e.g. a validation set's padded batches); outputs concatenated on the host."""
    run = self.compiled(fn)
    parts = []
    with self.mesh_context():
      for batch in batches:
        parts.append(jax.device_get(run(params, self.replicated_rows(batch))))
    return jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs]), *parts)
