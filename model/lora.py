"""Low-rank adapters (LoRA) on the attention and MLP projections, and their merge.

A target projection y = x W gets y = x W + (alpha / r) (x A) B, with A [in..., r] and
B [r, out...] (B starts at zero, so a fresh adapter leaves the model unchanged):

  target  W (unfused)        A                B
  q       wq [E, N, D]        [E, r]           [r, N, D]
  k, v    wk/wv [E, K, D]     [E, r]           [r, K, D]
  o       wo [N, D, E]        [N, D, r]        [r, E]
  gate/up w_gate/w_up [E, F]  [E, r]           [r, F]
  down    w_down [F, E]       [F, r]           [r, E]

Adapters are per logical projection in both layouts of `ModelConfig.fuse_projections`:
with fused weights the q/k/v (gate/up) deltas are added to the slices of the fused output,
so the adapter tree, and a merge, are the same for either layout. They live next to their
weight as submodules named `lora_<target>` with Params `a` and `b` (a params path such as
`blocks/0/attn/lora_q/a`), created with logical axis names like every other parameter, so
sharded init, scan_layers stacking (`layers` axis) and Orbax see ordinary Params.

Which projections get adapters, the rank and alpha are `ModelConfig.lora_rank`,
`lora_alpha` and `lora_targets`: they decide the parameter tree, so a checkpoint's model
config says how to read it. What is trained is the stage's business (train/): the
helpers here split a pure params dict into adapters (+ scalar heads) and the frozen rest.

Decision (why not qwix 0.1.8's `LoraProvider`): in Flax NNX it intercepts one method of
the model only (here `__call__`; `hidden`, the reward model's `score`/`values` and the
sampler's cached decoding would silently run without adapters), creates the adapter
params lazily during a first forward pass (under our `lax.scan` over split layer state
that fails, and it does not fit eval_shape -> logical specs -> jitted sharded init), and
has no merge. The adapter itself is a few lines; owning it keeps every path adapted.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
GROUPS = {"attn": ("q", "k", "v", "o"), "mlp": ("gate", "up", "down")}
PREFIX = "lora_"
# Subtrees trained in full alongside the adapters: the scalar head of a reward/value model
# is new (random) and tiny, so it is trained, as in PEFT's `modules_to_save` for heads.
TRAINED_IN_FULL = ("head",)


def parse_targets(targets: str | Iterable[str]) -> tuple[str, ...]:
  """"attn,mlp" / "q,v" / ["q", "v"] -> targets in canonical order (ValueError if unknown)."""
  items = targets.split(",") if isinstance(targets, str) else list(targets)
  out: set[str] = set()
  for item in (t.strip() for t in items):
    if not item:
      continue
    if item in GROUPS:
      out.update(GROUPS[item])
    elif item in TARGETS:
      out.add(item)
    else:
      raise ValueError(f"lora targets: unknown target {item!r}; expected names from "
                       f"{TARGETS} or groups {tuple(GROUPS)}")
  return tuple(t for t in TARGETS if t in out)


class Adapter(nnx.Module):
  """One low-rank update: x [..., in...] -> (alpha / r) (x A) B [..., out...]."""

  def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int],
               in_names: Sequence[str | None], out_names: Sequence[str | None], rank: int,
               alpha: float, param_dtype: Any, rngs: nnx.Rngs):
    self.num_in, self.scale = len(in_shape), alpha / rank
    fan_in = 1
    for d in in_shape:
      fan_in *= d
    # A ~ N(0, 1/fan_in) (the fan-in scaling of PEFT's Kaiming init), B = 0: no change at start.
    init = nnx.initializers.normal(fan_in ** -0.5)
    self.a = nnx.Param(init(rngs.params(), (*in_shape, rank), param_dtype),
                       out_sharding=(*in_names, None))
    self.b = nnx.Param(jnp.zeros((rank, *out_shape), param_dtype),
                       out_sharding=(None, *out_names))

  def __call__(self, x: jax.Array) -> jax.Array:
    dt = x.dtype
    h = jnp.tensordot(x, self.a[...].astype(dt), axes=self.num_in)  # [..., r]
    return jnp.tensordot(h, self.b[...].astype(dt) * jnp.asarray(self.scale, dt), axes=1)


def add_adapters(module: nnx.Module, cfg: Any, group: str,
                 shapes: dict[str, tuple[tuple, tuple, tuple, tuple]], rngs: nnx.Rngs) -> None:
  """Sets `module.lora_<t>` for each configured target `t` of `group` ("attn" or "mlp").

  `shapes[t]` = (in_shape, out_shape, in_names, out_names) of that projection.
  """
  if not getattr(cfg, "lora_rank", 0):
    return
  for t in parse_targets(cfg.lora_targets):
    if t in GROUPS[group]:
      setattr(module, PREFIX + t, Adapter(*shapes[t], cfg.lora_rank, cfg.lora_alpha,
                                          jnp.float32, rngs))


def adapt(module: nnx.Module, target: str, x: jax.Array, y: jax.Array) -> jax.Array:
  """y plus the `target` adapter's update of input x (y unchanged without one)."""
  adapter = getattr(module, PREFIX + target, None)
  return y if adapter is None else y + adapter(x).astype(y.dtype)


# ------------------------------------------------------------------ pure-dict helpers
def is_adapter_path(path: Sequence[Any]) -> bool:
  return any(str(k).startswith(PREFIX) for k in path)


def is_trainable_path(path: Sequence[Any]) -> bool:
  """Adapters and the subtrees trained in full (the scalar head) under LoRA."""
  return is_adapter_path(path) or (len(path) > 0 and str(path[0]) in TRAINED_IN_FULL)


def partition(tree: dict, predicate=is_trainable_path) -> tuple[dict, dict]:
  """(leaves where predicate(path), the other leaves), as two nested dicts (no empties)."""
  def walk(d: dict, path: tuple) -> tuple[dict, dict]:
    yes, no = {}, {}
    for key, value in d.items():
      p = (*path, key)
      if isinstance(value, dict):
        a, b = walk(value, p)
        if a:
          yes[key] = a
        if b:
          no[key] = b
      elif predicate(p):
        yes[key] = value
      else:
        no[key] = value
    return yes, no
  return walk(tree, ())


def combine(a: dict, b: dict) -> dict:
  """Deep union of two nested dicts with disjoint leaves (inverse of `partition`)."""
  out = dict(a)
  for key, value in b.items():
    out[key] = combine(out[key], value) if key in out and isinstance(value, dict) else value
  return out


def adapter_params(params: dict) -> dict:
  """Only the adapter leaves (what distinguishes a LoRA run from its base)."""
  return partition(params, is_adapter_path)[0]


def base_params(params: dict) -> dict:
  """Everything but the adapters."""
  return partition(params, is_adapter_path)[1]


def zero_adapters(params: dict) -> dict:
  """`params` with every adapter's B set to zero: the base model's function, without a
  second copy of the base weights (DPO's / PPO's reference under LoRA)."""
  def walk(d: dict) -> dict:
    out = {}
    for key, value in d.items():
      if str(key).startswith(PREFIX):
        out[key] = {**value, "b": jnp.zeros_like(value["b"])}
      else:
        out[key] = walk(value) if isinstance(value, dict) else value
    return out
  return walk(params)


def cast_frozen(params: dict, dtype: str) -> dict:
  """Frozen (non-trainable) floating leaves cast to `dtype` ("" = unchanged)."""
  if not dtype:
    return params
  train, frozen = partition(params)
  frozen = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                        else x, frozen)
  return combine(train, frozen)


def _delta(adapter: dict, scale: float, stacked: bool) -> jax.Array:
  """(alpha / r) A @ B in float32: [in..., out...], or [L, in..., out...] when `stacked`
  (scan_layers: A [L, in..., r], B [L, r, out...])."""
  a, b = jnp.asarray(adapter["a"], jnp.float32), jnp.asarray(adapter["b"], jnp.float32)
  outer = lambda x, y: jnp.tensordot(x, y, axes=1)  # noqa: E731
  return (jax.vmap(outer)(a, b) if stacked else outer(a, b)) * scale


def merge(params: dict, cfg: Any) -> dict:
  """Plain params: every adapted weight W replaced by W + (alpha / r) A @ B (float32 math,
  cast back to W's dtype) and the adapters removed. Works for both projection layouts and
  both layer layouts; a params tree without adapters is returned as it is."""
  if not getattr(cfg, "lora_rank", 0):
    return params
  scale = cfg.lora_alpha / cfg.lora_rank
  g = cfg.num_heads // cfg.num_kv_heads

  def add(w, delta):
    return (jnp.asarray(w, jnp.float32) + delta).astype(w.dtype)

  def merge_group(p: dict) -> dict:
    p = dict(p)
    deltas = {k[len(PREFIX):]: _delta(p.pop(k), scale, cfg.scan_layers)
              for k in list(p) if k.startswith(PREFIX)}
    for t, d in deltas.items():
      if t in ("q", "k", "v") and "wqkv" in p:
        w = jnp.asarray(p["wqkv"], jnp.float32)  # [..., E, K, G+2, D]
        if t == "q":
          d = d.reshape(*d.shape[:-2], cfg.num_kv_heads, g, d.shape[-1])  # [..., E, K, G, D]
          w = w.at[..., :g, :].add(d)
        else:
          w = w.at[..., g if t == "k" else g + 1, :].add(d)
        p["wqkv"] = w.astype(p["wqkv"].dtype)
      elif t in ("gate", "up") and "w_gate_up" in p:
        w = jnp.asarray(p["w_gate_up"], jnp.float32)  # [..., E, 2, F]
        w = w.at[..., 0 if t == "gate" else 1, :].add(d)
        p["w_gate_up"] = w.astype(p["w_gate_up"].dtype)
      else:
        name = {"q": "wq", "k": "wk", "v": "wv", "o": "wo", "gate": "w_gate", "up": "w_up",
                "down": "w_down"}[t]
        p[name] = add(p[name], d)
    return p

  def walk(d: dict) -> dict:
    return {k: (merge_group(walk(v)) if k in GROUPS else walk(v)) if isinstance(v, dict)
            else v for k, v in d.items()}
  return walk(params)
