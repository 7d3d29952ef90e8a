"""Hugging Face model directories as parents: `init_from=hf:<dir>` and the import command.

  load_hf_parent(hf_dir)                 (ModelConfig, Tokenizer, metadata) of a directory
  load_hf_params(hf_dir, cfg, target)    its weights, streamed onto target's shardings
  import_hf(hf_dir, workdir)             writes them as a step-0 checkpoint (stage hf_import)

A directory holds `config.json` (model_type llama / qwen2 / qwen3 / mistral,
`model.hf_config`), weights in `model.safetensors` or shards listed by
`model.safetensors.index.json` (float32, bfloat16 or float16), and the tokenizer
(`load_hf_tokenizer`, the one call that reads it).

Weights never exist as one host copy: every device's shard of every parameter is built from
only the rows of the Hugging Face tensors it needs (`safe_open(...).get_slice`, in blocks,
one file mapping open at a time), copied to its device, and freed before the next is read;
`jax.make_array_from_single_device_arrays` then assembles the sharded array. The host holds
one shard of one parameter at a time next to the device arrays. All
names and shapes are checked against config.json from the safetensors headers before any
tensor is read.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import jax
import ml_dtypes  # noqa: F401 - registers bfloat16 with numpy before safetensors reads it
import numpy as np

from data.hf_tokenizer import tokenizer_from_hf_dir
from model import sharding as msharding
from model.config import ModelConfig
from model.hf import check_hf_tensors, path_key
from model.hf_config import model_config_from_hf
from model.transformer import Transformer
from train import checkpoint as ckpt_lib
from train.state import abstract_model, mesh_shardings, with_shardings

HF_PREFIX = "hf:"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES = ("F32", "BF16", "F16")
READ_BLOCK_BYTES = 32 * 2**20  # largest slice of a file mapped at once


def hf_dir_of(init_from: str) -> str | None:
  """The directory of an `hf:<dir>` init_from, else None (an Orbax checkpoint path)."""
  return os.path.expanduser(init_from[len(HF_PREFIX):]) if init_from.startswith(HF_PREFIX) \
      else None


def _header(path: str) -> dict[str, Any]:
  """A safetensors file's header (name -> dtype, shape, offsets), read without mapping it."""
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise ValueError(f"{path}: not a safetensors file (shorter than its header length)")
    (n,) = struct.unpack("<Q", raw)
    try:
      header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError) as e:
      raise ValueError(f"{path}: not a safetensors file (unreadable header: {e})") from e
  header.pop("__metadata__", None)
  return header


class HFWeights:
  """The safetensors files of a directory: which file holds each tensor, its shape, and
  `fetch(name, box)` reading one box of one tensor."""

  def __init__(self, hf_dir: str):
    index, single = os.path.join(hf_dir, INDEX_FILE), os.path.join(hf_dir, SINGLE_FILE)
    if os.path.isfile(index):
      self.where = index
      with open(index) as f:
        weight_map = json.load(f).get("weight_map")
      if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index}: weight_map is missing or empty")
      files = sorted(set(weight_map.values()))
    elif os.path.isfile(single):
      self.where, weight_map, files = single, None, [SINGLE_FILE]
    else:
      raise ValueError(f"{hf_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} exists (PyTorch "
                       ".bin weights are not read: re-save with safe_serialization)")
    self.file_of: dict[str, str] = {}
    self.shapes: dict[str, tuple[int, ...]] = {}
    for name in files:
      path = os.path.join(hf_dir, name)
      if not os.path.isfile(path):
        raise ValueError(f"{self.where}: weight_map names {name}, which does not exist")
      for tensor, info in _header(path).items():
        if weight_map is not None and weight_map.get(tensor) != name:
          continue  # stored but not indexed here: the index decides
        if info["dtype"] not in DTYPES:
          raise ValueError(f"{path}: tensor {tensor!r} has dtype {info['dtype']}, expected "
                           f"one of {DTYPES}")
        self.file_of[tensor], self.shapes[tensor] = path, tuple(info["shape"])
    for tensor, name in (weight_map or {}).items():
      if tensor not in self.file_of:
        raise ValueError(f"{self.where}: tensor {tensor!r} is mapped to {name}, which does "
                         "not hold it")

  def fetch(self, name: str, box: tuple[slice, ...]) -> np.ndarray:
    """One box of one tensor, copied out of the file in blocks of rows.

    Each block maps the file anew and unmaps it after the copy: the pages a read touches
    count in the process's RSS while mapped, so a whole-tensor mapping would add the
    tensor's size (not just the box's) to the peak.
    """
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    shape = self.shapes[name]
    box = tuple(slice(*s.indices(n)[:2]) for s, n in zip(box, shape))
    rows = box[0] if box else slice(0, 1)
    out = None
    row_bytes = max(1, int(np.prod([s.stop - s.start for s in box[1:]], dtype=np.int64))) * 4
    step = max(1, READ_BLOCK_BYTES // row_bytes)
    for r in range(rows.start, max(rows.stop, rows.start + 1), step):
      block = (slice(r, min(r + step, rows.stop)), *box[1:]) if box else ()
      with safe_open(self.file_of[name], framework="numpy") as f:
        part = f.get_slice(name)[block]
      if out is None:
        if not box or rows.stop - rows.start <= step:
          return part
        out = np.empty((rows.stop - rows.start, *part.shape[1:]), part.dtype)
      out[r - rows.start:r - rows.start + part.shape[0]] = part
    return out


def read_hf_config(hf_dir: str) -> ModelConfig:
  """ModelConfig of `<hf_dir>/config.json` (errors name the file and field)."""
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(path):
    raise ValueError(f"{path} does not exist (not a Hugging Face model directory)")
  with open(path) as f:
    try:
      config = json.load(f)
    except ValueError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from e
  return model_config_from_hf(config, path)


def load_hf_tokenizer(hf_dir: str, cfg: ModelConfig) -> Any:
  """THE tokenizer read of a Hugging Face directory: `data.hf_tokenizer.tokenizer_from_hf_dir`
  (tokenizer.json, a tiktoken BPE file, or a SentencePiece tokenizer.model, with the special
  tokens and chat template of tokenizer_config.json), checked against config.json's vocab."""
  tokenizer = tokenizer_from_hf_dir(hf_dir)
  if tokenizer.vocab_size > cfg.vocab_size:
    raise ValueError(f"{hf_dir}: the tokenizer has {tokenizer.vocab_size} tokens, more than "
                     f"config.json's vocab_size={cfg.vocab_size}")
  return tokenizer


def load_hf_parent(hf_dir: str) -> tuple[ModelConfig, Any, dict[str, Any]]:
  """(ModelConfig, Tokenizer, parent metadata) of a directory, as `load_parent` returns for
  a checkpoint. The weights' names and shapes are checked here, before a run starts."""
  cfg = read_hf_config(hf_dir)
  tokenizer = load_hf_tokenizer(hf_dir, cfg)
  check_hf_tensors(HFWeights(hf_dir).shapes, cfg, hf_dir)
  meta = {"stage": "hf_import", "step": 0, "checkpoint_path": HF_PREFIX + os.path.abspath(hf_dir),
          "model_config": cfg.to_dict(), "model_class": "Transformer",
          "tokenizer_fingerprint": tokenizer.fingerprint, "parent": None}
  return cfg, tokenizer, meta


def load_hf_params(hf_dir: str, cfg: ModelConfig, target: Any) -> Any:
  """The directory's weights as `cfg`'s params (any layout), streamed onto `target`.

  Args:
    hf_dir: the Hugging Face directory.
    cfg: the model to build (its layout and param_dtype; shapes from config.json).
    target: params tree of ShapeDtypeStructs carrying the target shardings.

  Raises:
    ValueError: a missing, misshapen or unexpected tensor, named with its file.
  """
  weights = HFWeights(hf_dir)
  sources = check_hf_tensors(weights.shapes, cfg, weights.where)
  used = set()

  def leaf(path: Any, spec: jax.ShapeDtypeStruct) -> jax.Array:
    key = path_key(path)
    if key not in sources or sources[key].shape != tuple(spec.shape):
      raise ValueError(f"{weights.where}: parameter {key} {tuple(spec.shape)} has no Hugging "
                       "Face counterpart of that shape")
    used.add(key)
    source = sources[key]
    # One device's shard at a time, each copied to its device before the next is read
    # (make_array_from_callback reads every shard before transferring any).
    shards = []
    for device, box in spec.sharding.addressable_devices_indices_map(spec.shape).items():
      host = np.asarray(source.read(weights.fetch, box), spec.dtype)
      shards.append(jax.device_put(host, device).block_until_ready())
      del host
    return jax.make_array_from_single_device_arrays(spec.shape, spec.sharding, shards)

  params = jax.tree_util.tree_map_with_path(leaf, target)
  if set(sources) - used:
    raise ValueError(f"{weights.where}: the model has no parameter for "
                     f"{sorted(set(sources) - used)[0]}")
  return params


def import_hf(hf_dir: str, workdir: str, param_dtype: str = "float32") -> str:
  """Writes `hf_dir` as a step-0 checkpoint of the shared format; returns its step dir.

  The weights stream onto an FSDP mesh of this process's devices (`load_hf_params`) and are
  saved from there, so this needs no more host memory than `init_from=hf:` does.
  """
  cfg, tokenizer, meta = load_hf_parent(hf_dir)
  cfg = cfg.replace(param_dtype=param_dtype)
  mesh = msharding.make_mesh({"fsdp": -1})
  _, abstract, logical = abstract_model(Transformer, cfg)
  target = with_shardings(abstract, mesh_shardings(logical, mesh, msharding.DEFAULT_RULES))
  params = load_hf_params(hf_dir, cfg, target)
  metadata = {**{k: v for k, v in meta.items() if k != "checkpoint_path"},
              "config": {"hf_dir": os.path.abspath(hf_dir)}, "model_config": cfg.to_dict()}
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  checkpointer.save(0, params, {"step": np.zeros((), np.int32)}, metadata=metadata,
                    tokenizer=tokenizer.to_bytes())
  checkpointer.close()
  return os.path.join(workdir, "checkpoints", "0")
