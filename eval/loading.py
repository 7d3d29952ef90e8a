"""Loading any checkpoint of the shared format for inference: params on a mesh + tokenizer.

  loaded = load_checkpoint("runs/rm", mesh_shape={"data": 2})
  loaded.model_class, loaded.params, loaded.tokenizer, loaded.meta["stage"]

The module class comes from the checkpoint's metadata (`model_class`, written by the
Trainer: `Transformer` for language models, `RewardModel` for scalar-head models; older
checkpoints without it are language models). Weights are restored straight onto the mesh:
one device by default, or `mesh_shape` (e.g. {"fsdp": 2}; -1 fills the remaining devices)
to shard a model that does not fit one device. The logical rules are the run's own.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple

import jax
from etils import epath

from data.hf_backend import HFTokenizer
from data.tokenizer import Tokenizer, load_tokenizer
from model import sharding as msharding
from model.config import ModelConfig
from model.heads import RewardModel
from model.transformer import Transformer
from train import checkpoint as ckpt_lib
from train.runtime import Runtime
from train.state import abstract_model, mesh_shardings, with_shardings
from model.sharding import rules_from_config

MODEL_CLASSES = {cls.__name__: cls for cls in (Transformer, RewardModel)}


class LoadedCheckpoint(NamedTuple):
  """A restored checkpoint, ready for jitted inference on `mesh`."""
  model_class: type
  graphdef: Any
  params: Any          # on `mesh`, sharded by `param_shardings`
  param_shardings: Any
  model_cfg: ModelConfig
  tokenizer: Tokenizer | HFTokenizer
  meta: dict[str, Any]  # checkpoint metadata, incl. checkpoint_path
  mesh: jax.sharding.Mesh
  rules: tuple[tuple[str, Any], ...]

  @property
  def runtime(self) -> Runtime:
    """The sharded-apply runtime of this model on its mesh (compiled functions are shared
    by every checkpoint of the same structure)."""
    return Runtime(self.mesh, self.rules, self.graphdef, self.param_shardings)


def parse_mesh(spec: str) -> dict[str, int]:
  """Parses "data=1,fsdp=2,tensor=1" (missing axes are 1); "" means one device."""
  shape = {}
  for item in filter(None, (s.strip() for s in spec.split(","))):
    axis, _, value = (x.strip() for x in item.partition("="))
    if axis not in msharding.MESH_AXES or not value.lstrip("-").isdigit():
      raise ValueError(f"--mesh={spec!r}: expected axis=size pairs with axes "
                       f"{msharding.MESH_AXES}, e.g. 'data=1,fsdp=2,tensor=1'")
    shape[axis] = int(value)
  return shape


def inference_mesh(mesh_shape: Mapping[str, int] | None) -> jax.sharding.Mesh:
  """One device by default; else the first prod(shape) devices (all of them with a -1)."""
  shape = dict(mesh_shape or {})
  devices = jax.devices()
  if -1 not in shape.values():
    devices = devices[:math.prod(shape.values())]  # too few: make_mesh names the shortfall
  return msharding.make_mesh(shape, devices)


def run_rules(meta: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
  """The run's logical rules (its config.mesh.rules), else the defaults."""
  rules_cfg = meta.get("config", {}).get("mesh", {}).get("rules")
  return msharding.normalize_rules(rules_from_config(rules_cfg) if rules_cfg else None)


def load_checkpoint(checkpoint: str, mesh_shape: Mapping[str, int] | None = None,
                    expect: type | None = None) -> LoadedCheckpoint:
  """Restores a checkpoint's params (onto the mesh), tokenizer and metadata.

  Args:
    checkpoint: a workdir, its `checkpoints/` directory, or one step directory.
    mesh_shape: e.g. {"data": 1, "fsdp": 2, "tensor": 1}; None = one device.
    expect: the module class the caller needs (e.g. RewardModel); another is an error.

  Raises:
    CheckpointError: missing, unreadable, without model config or a readable tokenizer,
      or of another model class than `expect`; the message names the path.
    ValueError: a mesh that does not fit the devices.
  """
  if not epath.Path(checkpoint).exists():
    raise ckpt_lib.CheckpointError(f"Checkpoint {checkpoint!r} does not exist")
  try:
    meta = ckpt_lib.read_metadata(checkpoint)
    model_cfg = ModelConfig.from_dict(meta["model_config"])
  except Exception as e:  # noqa: BLE001 - any failure here means an unusable checkpoint
    raise ckpt_lib.CheckpointError(
        f"Cannot read checkpoint {checkpoint!r}: {type(e).__name__}: {e}") from e
  name = meta.get("model_class") or Transformer.__name__
  if name not in MODEL_CLASSES:
    raise ckpt_lib.CheckpointError(f"Checkpoint {checkpoint!r} holds a {name!r}; this code "
                                   f"knows {sorted(MODEL_CLASSES)}")
  model_class = MODEL_CLASSES[name]
  if expect is not None and model_class is not expect:
    raise ckpt_lib.CheckpointError(
        f"Checkpoint {checkpoint!r} (stage {meta.get('stage')!r}) holds a {name}, not the "
        f"{expect.__name__} this tool needs")
  rules = run_rules(meta)
  mesh = inference_mesh(mesh_shape)
  graphdef, abstract, logical = abstract_model(model_class, model_cfg)
  shardings = mesh_shardings(logical, mesh, rules)
  path = meta["checkpoint_path"]  # the step read above, even if a newer one appears
  try:
    params, meta, tokenizer_bytes = ckpt_lib.load_params(path, with_shardings(abstract, shardings))
  except Exception as e:  # noqa: BLE001
    raise ckpt_lib.CheckpointError(
        f"Cannot restore params from {path}: {type(e).__name__}: {e}") from e
  if not tokenizer_bytes:
    raise ckpt_lib.CheckpointError(f"Checkpoint {path} holds no tokenizer")
  try:
    tokenizer = load_tokenizer(tokenizer_bytes)
  except Exception as e:  # noqa: BLE001 - SentencePiece raises a bare RuntimeError
    raise ckpt_lib.CheckpointError(
        f"Checkpoint {path} holds an unreadable tokenizer (tokenizer/blob.bin, "
        f"{len(tokenizer_bytes)} bytes, is neither a SentencePiece model nor a tokenizer "
        f"bundle: {e})") from e
  return LoadedCheckpoint(model_class, graphdef, params, shardings, model_cfg, tokenizer,
                          meta, mesh, rules)
