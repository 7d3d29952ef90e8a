"""Train state and sharded initialisation.

The state is a plain pytree: params are a nested dict of arrays (`nnx.to_pure_dict` of the
model's Params; `nnx.merge(graphdef, params)` rebuilds the module inside the jitted step),
so optax, Orbax and later the Hugging Face exporter all see ordinary dicts.

Initialisation never materialises the model on one device: `jax.eval_shape` gives shapes,
logical axis names give PartitionSpecs, and a jitted init with `out_shardings` creates
every array directly in its shard.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from model import lora
from model.config import ModelConfig
from model.sharding import logical_to_spec

ModelFactory = Callable[[ModelConfig, nnx.Rngs], nnx.Module]


@flax.struct.dataclass
class TrainState:
  """Everything a step changes: step counter, params, optimizer state, PRNG key data."""
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key data (checkpointable); wrapped with wrap_key_data


def abstract_model(factory: ModelFactory, cfg: ModelConfig) -> tuple[nnx.GraphDef, Any, Any]:
  """Returns (graphdef, abstract params dict, logical PartitionSpec dict) without allocating."""
  model = nnx.eval_shape(lambda: factory(cfg, nnx.Rngs(params=0)))
  graphdef, state = nnx.split(model)
  non_params = [p for p, v in nnx.to_flat_state(state) if not isinstance(v, nnx.Param)]
  if non_params:
    raise ValueError(f"Model has non-Param state {non_params}; the Trainer expects only Params")
  logical = nnx.to_pure_dict(nnx.get_partition_spec(state))
  return graphdef, nnx.to_pure_dict(state), logical


def mesh_shardings(logical_specs: Any, mesh: Mesh, rules: Any) -> Any:
  """Maps a tree of logical PartitionSpecs to NamedShardings on `mesh`."""
  return jax.tree.map(lambda spec: NamedSharding(mesh, logical_to_spec(spec, rules)),
                      logical_specs, is_leaf=lambda x: isinstance(x, P))


def opt_state_shardings(tx: optax.GradientTransformation, abstract_opt_state: Any,
                        param_shardings: Any, mesh: Mesh) -> Any:
  """Optimizer moments shard like their parameters; scalars (counts) are replicated."""
  replicated = NamedSharding(mesh, P())
  return optax.tree_map_params(tx, lambda _, s: s, abstract_opt_state, param_shardings,
                               transform_non_params=lambda _: replicated,
                               is_leaf=lambda x: isinstance(x, NamedSharding))


def trainable_split(cfg: ModelConfig) -> Callable[[Any], tuple[Any, Any]]:
  """params -> (trained, frozen) pure dicts: everything is trained without LoRA; with
  adapters (`cfg.lora_rank` > 0) only they and the scalar head are (model/lora.py)."""
  if cfg.lora_rank:
    return lora.partition
  return lambda params: (params, {})


def make_init_fn(factory: ModelFactory, cfg: ModelConfig, tx: optax.GradientTransformation,
                 base_dtype: str = "") -> Callable[[jax.Array, Any], TrainState]:
  """init(rng, params=None): builds params from `rng` (or takes `params`) and fresh opt state.

  The optimizer state covers the trained params only (`trainable_split`); with LoRA the
  frozen ones are cast to `base_dtype` ("" = keep the model's param_dtype).
  """
  split = trainable_split(cfg)

  def init(rng: jax.Array, params: Any = None) -> TrainState:
    init_rng, state_rng = jax.random.split(rng)
    if params is None:
      model = factory(cfg, nnx.Rngs(params=init_rng))
      params = nnx.to_pure_dict(nnx.state(model))
    if cfg.lora_rank:
      params = lora.cast_frozen(params, base_dtype)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(split(params)[0]), rng=jax.random.key_data(state_rng))
  return init


def add_adapters_fn(factory: ModelFactory, cfg: ModelConfig
                    ) -> Callable[[jax.Array, Any], Any]:
  """(rng, params without adapters) -> params with fresh adapters (B = 0: the same function).
  Under jit only the adapters' initialisers survive (the rest of the fresh model is unused)."""
  def add(rng: jax.Array, params: Any) -> Any:
    fresh = nnx.to_pure_dict(nnx.state(factory(cfg, nnx.Rngs(params=rng))))
    return lora.combine(params, lora.adapter_params(fresh))
  return add


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying target shardings (restore targets)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)
