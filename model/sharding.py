"""Device mesh and the logical-axis vocabulary.

Parameters are created with logical axis names (`embed`, `mlp`, `heads`, ...); which mesh axis
each name is sharded over is configuration (`config.mesh.rules`), not model code. The mesh has
three axes:

  data    pure data parallelism (parameters replicated),
  fsdp    data parallelism with parameters and optimizer state sharded (ZeRO-3 style),
  tensor  tensor (model) parallelism inside a layer.

The batch is split over `data` and `fsdp` together.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np
from flax.core import spmd
from jax.sharding import AxisType, Mesh, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# The logical names used anywhere in model/ (the house vocabulary of DESIGN.md section 4).
LOGICAL_AXES = ("batch", "length", "embed", "mlp", "heads", "kv_heads", "head_dim", "vocab",
                "layers")

# Default logical -> mesh mapping: FSDP shards the embed dimension of every matrix, tensor
# parallelism splits heads / mlp / vocab (Megatron-style), activations split only the batch.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("layers", None),
)


def normalize_rules(rules: Iterable[Sequence[Any]] | Mapping[str, Any] | None
                    ) -> tuple[tuple[str, Any], ...]:
  """Returns rules as a tuple of (logical, mesh axes) pairs, validating names.

  Accepts the tuple form or a mapping (what a ConfigDict holds). Lists become tuples so that
  `("data", "fsdp")` written as a list in a config still means "both axes".
  """
  if rules is None:
    return DEFAULT_RULES
  items = rules.items() if isinstance(rules, Mapping) else rules
  out = []
  for logical, mesh_axes in items:
    if logical not in LOGICAL_AXES:
      raise ValueError(f"Sharding rule for unknown logical axis {logical!r}; known: {LOGICAL_AXES}")
    if isinstance(mesh_axes, list):
      mesh_axes = tuple(mesh_axes)
    for axis in (mesh_axes if isinstance(mesh_axes, tuple) else (mesh_axes,)):
      if axis is not None and axis not in MESH_AXES:
        raise ValueError(f"Sharding rule {logical!r} -> {axis!r}: mesh axes are {MESH_AXES}")
    out.append((logical, mesh_axes))
  return tuple(out)


def resolve_mesh_shape(shape: Mapping[str, int] | Sequence[int], num_devices: int
                       ) -> tuple[int, int, int]:
  """Resolves a (data, fsdp, tensor) shape where one entry may be -1 ("fill the rest").

  Raises:
    ValueError: naming the shape and the device count when they do not match.
  """
  if isinstance(shape, Mapping):
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
      raise ValueError(f"config.mesh.shape has unknown axes {sorted(unknown)}; axes: {MESH_AXES}")
    dims = [int(shape.get(a, 1)) for a in MESH_AXES]
  else:
    dims = [int(x) for x in shape]
  if len(dims) != 3 or dims.count(-1) > 1 or any(d == 0 or d < -1 for d in dims):
    raise ValueError(f"Mesh shape {dict(zip(MESH_AXES, dims))}: expected three positive sizes "
                     "for (data, fsdp, tensor), at most one of them -1")
  known = math.prod(d for d in dims if d != -1)
  if -1 in dims:
    if num_devices % known:
      raise ValueError(f"Mesh shape {dict(zip(MESH_AXES, dims))} cannot fill {num_devices} "
                       f"devices: {num_devices} is not divisible by {known}")
    dims[dims.index(-1)] = num_devices // known
  if math.prod(dims) != num_devices:
    raise ValueError(f"Mesh shape {dict(zip(MESH_AXES, dims))} needs {math.prod(dims)} devices "
                     f"but {num_devices} are available; use -1 for one axis to fill")
  return tuple(dims)  # type: ignore[return-value]


def make_mesh(shape: Mapping[str, int] | Sequence[int],
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the (data, fsdp, tensor) mesh over `devices` (default: all global devices)."""
  devices = list(devices) if devices is not None else jax.devices()
  dims = resolve_mesh_shape(shape, len(devices))
  # Auto axes: shardings are propagated by the compiler (GSPMD); explicit axes would make
  # every op's output sharding part of its type, which this codebase does not use.
  if devices == jax.devices():
    return jax.make_mesh(dims, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  return Mesh(np.asarray(devices).reshape(dims), MESH_AXES,
              axis_types=(AxisType.Auto,) * 3)


def batch_parallel_size(mesh: Mesh | Mapping[str, int],
                        rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> int:
  """Number of ways the batch dimension is split on `mesh` (or a {axis: size} shape, e.g. a
  resolved mesh shape before any device exists) under `rules`."""
  mesh_axes = dict(rules).get("batch")
  if mesh_axes is None:
    return 1
  axes = mesh_axes if isinstance(mesh_axes, tuple) else (mesh_axes,)
  shape = mesh.shape if isinstance(mesh, Mesh) else mesh
  return math.prod(shape[a] for a in axes)


def rules_from_config(rules_cfg: Any) -> tuple[tuple[str, Any], ...]:
  """Config rules are strings: "" = replicated, "data,fsdp" = several mesh axes."""
  out = []
  for logical, value in dict(rules_cfg).items():
    axes = tuple(a.strip() for a in str(value).split(",") if a.strip())
    out.append((logical, None if not axes else axes[0] if len(axes) == 1 else axes))
  return tuple(out)


def logical_to_spec(logical: Sequence[str | None], rules: Sequence[tuple[str, Any]]) -> P:
  """Maps a tuple of logical names to a mesh PartitionSpec."""
  table = dict(rules)
  return P(*(table.get(name) if name is not None else None for name in logical))


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names; a no-op outside a mesh context.

  Used at block boundaries so activations stay batch-sharded. The rules come from
  `nnx.logical_axis_rules`, which the Trainer sets while tracing.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  rules = spmd.get_logical_axis_rules() or DEFAULT_RULES
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical, rules))
