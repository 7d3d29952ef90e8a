"""Hugging Face tensor layout <-> our parameters: a table of pure relayouts, no files.

Our `Transformer` is the Llama / Qwen2 / Qwen3 / Mistral block (pre-RMSNorm, "rotate half"
rotary embeddings, grouped-query attention with query head n on kv head n // G, SwiGLU,
optional tied embeddings, q/k/v biases, per-head q/k norms), so every parameter is a
relayout of Hugging Face tensors, no arithmetic:

  ours                              transformers (torch Linear: y = x @ W.T + b)
  embedding [V, E]                  model.embed_tokens.weight [V, E]
  blocks.i.attn.wq [E, N, D]        model.layers.i.self_attn.q_proj.weight [N*D, E]
  blocks.i.attn.wk / wv [E, K, D]   ...k_proj / v_proj.weight [K*D, E]
  blocks.i.attn.bq [N, D]           ...q_proj.bias [N*D]            (qkv_bias)
  blocks.i.attn.bk / bv [K, D]      ...k_proj / v_proj.bias [K*D]   (qkv_bias)
  blocks.i.attn.q_norm.scale [D]    ...self_attn.q_norm.weight [D]  (qk_norm; k_norm alike)
  blocks.i.attn.wo [N, D, E]        ...o_proj.weight [E, N*D]
  blocks.i.mlp.w_gate / w_up [E, F] model.layers.i.mlp.gate_proj / up_proj.weight [F, E]
  blocks.i.mlp.w_down [F, E]        ...mlp.down_proj.weight [E, F]
  blocks.i.attn_norm.scale          ...input_layernorm.weight
  blocks.i.mlp_norm.scale           ...post_attention_layernorm.weight
  final_norm.scale                  model.norm.weight
  lm_head [E, V] (untied only)      lm_head.weight [V, E]

The fused layout (`attn.wqkv` [E, K, G+2, D], `attn.bqkv` [K, G+2, D], `mlp.w_gate_up`
[E, 2, F]) concatenates those, and scanned layers stack them on a leading layer axis.

`hf_sources(cfg)` describes every parameter of a config as a `Source` over named Hugging
Face tensors. A source reads any box (tuple of slices) of its array from a `fetch(name, box)`
callback that returns a box of a Hugging Face tensor, so a loader can build each device's
shard from only the rows it needs (`train/hf_import.py`), and it writes its array back as
Hugging Face tensors (`to_hf_state_dict`). Config conversion is `model/hf_config.py`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from model.config import ModelConfig

Box = tuple[slice, ...]
Fetch = Callable[[str, Box], np.ndarray]  # (HF tensor name, box of it) -> that box

# Tensors a Hugging Face checkpoint may hold that carry nothing we need.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _norm_box(box: Sequence[slice], shape: Sequence[int]) -> list[slice]:
  """Slices with explicit start/stop (make_array_from_callback passes slice(None))."""
  out = []
  for s, n in zip(box, shape):
    start, stop, step = s.indices(n)
    if step != 1:
      raise ValueError(f"Strided box {box} of shape {tuple(shape)} is not supported")
    out.append(slice(start, stop))
  return out


def _full(shape: Sequence[int]) -> Box:
  return tuple(slice(0, n) for n in shape)


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One of our arrays as a relayout of one Hugging Face tensor `name`.

  kind "T": HF [R, C] -> ours (C, *split), prod(split) == R   (Linear weights)
  kind "Tin": HF [R, C] -> ours (*split, R), prod(split) == C (output projections)
  kind "N": HF [R, *rest] -> ours (*split, *rest), prod(split) == R (embeddings, norms,
    biases)
  Only the first split axis narrows what is read; the others are cut after reading.
  """
  name: str
  kind: str
  split: tuple[int, ...]
  hf_shape: tuple[int, ...]

  @property
  def shape(self) -> tuple[int, ...]:
    if self.kind == "T":
      return (self.hf_shape[1], *self.split)
    if self.kind == "Tin":
      return (*self.split, self.hf_shape[0])
    return (*self.split, *self.hf_shape[1:])

  def hf_tensors(self) -> dict[str, tuple[int, ...]]:
    return {self.name: self.hf_shape}

  def read(self, fetch: Fetch, box: Sequence[slice]) -> np.ndarray:
    box = _norm_box(box, self.shape)
    inner = math.prod(self.split[1:])
    ns = len(self.split)
    if self.kind == "T":
      lead, rest, other = box[1], box[2:], box[0]
    elif self.kind == "Tin":
      lead, rest, other = box[0], box[1:ns], box[-1]
    else:
      lead, rest, other = box[0], box[1:ns], box[ns:]
    rows = slice(lead.start * inner, lead.stop * inner)
    n_lead = lead.stop - lead.start
    if self.kind == "T":  # read [rows, cols] of HF, ours has cols first
      a = fetch(self.name, (rows, other))
      a = a.reshape(n_lead, *self.split[1:], a.shape[-1])[(slice(None), *rest)]
      return np.moveaxis(a, -1, 0)
    if self.kind == "Tin":
      a = fetch(self.name, (other, rows))
      a = a.reshape(a.shape[0], n_lead, *self.split[1:])[(slice(None), slice(None), *rest)]
      return np.moveaxis(a, 0, -1)
    a = fetch(self.name, (rows, *other))
    return a.reshape(n_lead, *self.split[1:], *a.shape[1:])[(slice(None), *rest)]

  def write(self, ours: np.ndarray, out: dict[str, np.ndarray]) -> None:
    if self.kind == "T":
      a = np.moveaxis(ours, 0, -1)
    elif self.kind == "Tin":
      a = np.moveaxis(ours, -1, 0)
    else:
      a = ours
    out[self.name] = np.ascontiguousarray(a.reshape(self.hf_shape))


@dataclasses.dataclass(frozen=True)
class Concat:
  """Parts concatenated along `axis` (fused projections)."""
  parts: tuple[Any, ...]
  axis: int

  @property
  def shape(self) -> tuple[int, ...]:
    first = list(self.parts[0].shape)
    first[self.axis] = sum(p.shape[self.axis] for p in self.parts)
    return tuple(first)

  def hf_tensors(self) -> dict[str, tuple[int, ...]]:
    return {k: v for p in self.parts for k, v in p.hf_tensors().items()}

  def read(self, fetch: Fetch, box: Sequence[slice]) -> np.ndarray:
    box = _norm_box(box, self.shape)
    whole = []
    for p in self.parts:  # the concatenated axis is never sharded: read it whole
      sub = list(box)
      sub[self.axis] = slice(0, p.shape[self.axis])
      whole.append(p.read(fetch, sub))
    a = np.concatenate(whole, axis=self.axis)
    return a[(slice(None),) * self.axis + (box[self.axis],)]

  def write(self, ours: np.ndarray, out: dict[str, np.ndarray]) -> None:
    cuts = np.cumsum([p.shape[self.axis] for p in self.parts])[:-1]
    for p, piece in zip(self.parts, np.split(ours, cuts, axis=self.axis)):
      p.write(piece, out)


@dataclasses.dataclass(frozen=True)
class Stack:
  """One source per layer, stacked on a leading axis (scanned layers)."""
  layers: tuple[Any, ...]

  @property
  def shape(self) -> tuple[int, ...]:
    return (len(self.layers), *self.layers[0].shape)

  def hf_tensors(self) -> dict[str, tuple[int, ...]]:
    return {k: v for p in self.layers for k, v in p.hf_tensors().items()}

  def read(self, fetch: Fetch, box: Sequence[slice]) -> np.ndarray:
    box = _norm_box(box, self.shape)
    return np.stack([self.layers[i].read(fetch, box[1:])
                     for i in range(box[0].start, box[0].stop)])

  def write(self, ours: np.ndarray, out: dict[str, np.ndarray]) -> None:
    for layer, a in zip(self.layers, ours):
      layer.write(a, out)


def _layer_sources(cfg: ModelConfig, i: int) -> dict[str, Any]:
  """Our block parameters (plain or fused, one layer) -> sources, keyed "attn/wq" etc."""
  e, n, k, d, f = (cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim,
                   cfg.mlp_dim)
  g = n // k
  p = f"model.layers.{i}."
  q, kk, v = (p + f"self_attn.{x}_proj." for x in "qkv")
  out: dict[str, Any] = {}
  if cfg.fuse_projections:
    out["attn/wqkv"] = Concat((Tensor(q + "weight", "T", (k, g, d), (n * d, e)),
                               Tensor(kk + "weight", "T", (k, 1, d), (k * d, e)),
                               Tensor(v + "weight", "T", (k, 1, d), (k * d, e))), axis=2)
    if cfg.qkv_bias:
      out["attn/bqkv"] = Concat((Tensor(q + "bias", "N", (k, g, d), (n * d,)),
                                 Tensor(kk + "bias", "N", (k, 1, d), (k * d,)),
                                 Tensor(v + "bias", "N", (k, 1, d), (k * d,))), axis=1)
    out["mlp/w_gate_up"] = Concat((Tensor(p + "mlp.gate_proj.weight", "T", (1, f), (f, e)),
                                   Tensor(p + "mlp.up_proj.weight", "T", (1, f), (f, e))),
                                  axis=1)
  else:
    out["attn/wq"] = Tensor(q + "weight", "T", (n, d), (n * d, e))
    out["attn/wk"] = Tensor(kk + "weight", "T", (k, d), (k * d, e))
    out["attn/wv"] = Tensor(v + "weight", "T", (k, d), (k * d, e))
    if cfg.qkv_bias:
      out["attn/bq"] = Tensor(q + "bias", "N", (n, d), (n * d,))
      out["attn/bk"] = Tensor(kk + "bias", "N", (k, d), (k * d,))
      out["attn/bv"] = Tensor(v + "bias", "N", (k, d), (k * d,))
    out["mlp/w_gate"] = Tensor(p + "mlp.gate_proj.weight", "T", (f,), (f, e))
    out["mlp/w_up"] = Tensor(p + "mlp.up_proj.weight", "T", (f,), (f, e))
  if cfg.qk_norm:
    out["attn/q_norm/scale"] = Tensor(p + "self_attn.q_norm.weight", "N", (d,), (d,))
    out["attn/k_norm/scale"] = Tensor(p + "self_attn.k_norm.weight", "N", (d,), (d,))
  out["attn/wo"] = Tensor(p + "self_attn.o_proj.weight", "Tin", (n, d), (e, n * d))
  out["mlp/w_down"] = Tensor(p + "mlp.down_proj.weight", "T", (e,), (e, f))
  out["attn_norm/scale"] = Tensor(p + "input_layernorm.weight", "N", (e,), (e,))
  out["mlp_norm/scale"] = Tensor(p + "post_attention_layernorm.weight", "N", (e,), (e,))
  return out


def hf_sources(cfg: ModelConfig) -> dict[str, Any]:
  """Every parameter of a `Transformer(cfg)` as a source, keyed by "/"-joined param path
  ("embedding", "blocks/3/attn/wq", or with scanned layers "blocks/attn/wq")."""
  v, e = cfg.vocab_size, cfg.embed_dim
  out: dict[str, Any] = {
      "embedding": Tensor("model.embed_tokens.weight", "N", (v,), (v, e)),
      "final_norm/scale": Tensor("model.norm.weight", "N", (e,), (e,))}
  layers = [_layer_sources(cfg, i) for i in range(cfg.num_layers)]
  for name in layers[0]:
    if cfg.scan_layers:
      out[f"blocks/{name}"] = Stack(tuple(layer[name] for layer in layers))
    else:
      out.update({f"blocks/{i}/{name}": layer[name] for i, layer in enumerate(layers)})
  if not cfg.tie_embeddings:
    out["lm_head"] = Tensor("lm_head.weight", "T", (v,), (v, e))
  return out


def path_key(path: Sequence[Any]) -> str:
  """A jax tree path (dict keys, ints or strings) -> our "/"-joined source key."""
  return "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)


def check_hf_tensors(shapes: Mapping[str, Sequence[int]], cfg: ModelConfig,
                     where: str = "the weights") -> dict[str, Any]:
  """Checks a directory's tensor names and shapes against `cfg` before anything is read.

  Args:
    shapes: every HF tensor name -> shape (from safetensors headers).
    cfg: the model config (from config.json).
    where: names the weights in messages (file or directory).

  Returns:
    `hf_sources(cfg)`.

  Raises:
    ValueError: a missing tensor, a shape that disagrees with config.json, or an unexpected
      tensor (e.g. biases of a config without them), each named.
  """
  sources = hf_sources(cfg)
  needed: dict[str, tuple[int, ...]] = {}
  for source in sources.values():
    needed.update(source.hf_tensors())
  for name, shape in needed.items():
    if name not in shapes:
      raise ValueError(f"{where}: tensor {name!r} is missing (config.json describes a "
                       f"{cfg.family} model with it)")
    if tuple(shapes[name]) != shape:
      raise ValueError(f"{where}: tensor {name!r} has shape {tuple(shapes[name])}, expected "
                       f"{shape} from config.json")
  extra = sorted(n for n in set(shapes) - set(needed) if not n.endswith(IGNORED_SUFFIXES)
                 and not (cfg.tie_embeddings and n == "lm_head.weight"))
  if extra:
    raise ValueError(f"{where}: unexpected tensor {extra[0]!r} ({len(extra)} in all) that "
                     f"config.json's {cfg.family} model does not have")
  return sources


def from_hf_state_dict(state: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict[str, Any]:
  """An in-memory HF state dict -> our params (numpy, in cfg's layout).

  Raises:
    ValueError: a missing, misshapen or unexpected tensor (see `check_hf_tensors`).
  """
  sources = check_hf_tensors({k: np.shape(a) for k, a in state.items()}, cfg)
  fetch = lambda name, box: np.asarray(state[name])[tuple(box)]
  out: dict[str, Any] = {}
  for key, source in sources.items():
    node = out
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(int(p) if p.isdigit() else p, {})
    node[leaf] = np.ascontiguousarray(source.read(fetch, _full(source.shape)))
  return out


def _lookup(params: Mapping[str, Any], key: str) -> Any:
  node: Any = params
  for p in key.split("/"):
    node = node[int(p)] if p.isdigit() and int(p) in node else node[p]
  return node


def to_hf_state_dict(params: Mapping[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
  """Our params (pure dict, any layout) -> the HF state dict of cfg's family (numpy, the
  params' dtype)."""
  if not cfg.tie_embeddings and "lm_head" not in params:
    raise ValueError("These params have no lm_head (a reward-model trunk?); only language "
                     "models export to a *ForCausalLM")
  out: dict[str, np.ndarray] = {}
  for key, source in hf_sources(cfg).items():
    source.write(np.asarray(_lookup(params, key)), out)
  return out
