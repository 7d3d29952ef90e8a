"""How a run gets its first state: resume this workdir, or init_from a parent, or scratch.

Plain functions over explicit arguments (the Trainer passes its own pieces):

  restore_or_init(...)  this workdir's newest readable checkpoint (exact resume: params,
                        optimizer state, step, PRNG, data-iterator state), else the
                        `init_from` params (fresh optimizer), else a fresh sharded init.
  load_init_params(...) the `init_from` params as this run's model, on this mesh.

A parent of another shape (a grown vocabulary, a scalar head on an LM trunk) is mapped by an
`InitAdapter`, run under jit on the sharded arrays (no host gather, so it works when no
process holds the whole model); otherwise the parent's model config must equal this run's up
to the `EXECUTION_FIELDS`, which change how a model runs but not its parameters.

A parent is an Orbax checkpoint of the shared format or a Hugging Face directory
(`init_from=hf:<dir>`, streamed onto the mesh by `train/hf_import.py`): both go through
`restore_params`, so adapters, references and value models start from either the same way.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import jax

from model import lora
from model.config import ModelConfig
from train import checkpoint as ckpt_lib
from train.hf_import import hf_dir_of, load_hf_parent, load_hf_params
from train.runtime import Runtime
from train.state import ModelFactory, TrainState, abstract_model, mesh_shardings, with_shardings


@dataclasses.dataclass(frozen=True)
class InitAdapter:
  """How `init_from` maps a parent checkpoint of another model shape onto this run's model.

  Attributes:
    parent_model_cfg: The parent's ModelConfig (checked against its metadata).
    adapt: Parent params (pure dict of arrays) -> this model's params; traced under jit, so
      written with jax.numpy.
    parent_factory: Builds the parent's module (default: this run's model factory).
  """
  parent_model_cfg: ModelConfig
  adapt: Callable[[Any], Any]
  parent_factory: ModelFactory | None = None


# Fields that only change how the model executes, not what its parameters are: a checkpoint
# may be restored into a config that differs in these.
EXECUTION_FIELDS = ("attention_impl", "attention_block_size", "remat_policy", "dtype",
                    "param_dtype", "one_hot_embed", "max_seq_len")


def model_config_diff(saved: Mapping[str, Any], current: ModelConfig) -> dict[str, tuple]:
  """Parameter-relevant fields that differ between a checkpoint and `current` (a field the
  checkpoint predates counts as its default)."""
  now = current.to_dict()
  default = ModelConfig().to_dict()
  return {k: (saved.get(k, default[k]), now[k]) for k in now
          if k not in EXECUTION_FIELDS and saved.get(k, default[k]) != now[k]}


def check_model_config(meta: Mapping[str, Any], where: Any, expected: ModelConfig) -> None:
  """The checkpoint's model config must be `expected` up to execution fields."""
  diff = model_config_diff(meta.get("model_config", {}), expected)
  if diff:
    detail = ", ".join(f"{k}: checkpoint={a!r} config={b!r}" for k, (a, b) in diff.items())
    raise ckpt_lib.CheckpointError(
        f"Checkpoint {where} has a different model config ({detail}); point the run at a "
        "compatible checkpoint or a new workdir")


def check_resume(meta: Mapping[str, Any], where: Any, model_cfg: ModelConfig,
                 config: Any) -> None:
  """Resume needs the same model and the same optimizer-state layout."""
  check_model_config(meta, where, model_cfg)
  saved = meta.get("config", {}).get("optim", {}).get("flatten_update", False)
  if saved != config.optim.flatten_update:
    raise ckpt_lib.CheckpointError(
        f"Checkpoint {where} was written with optim.flatten_update={saved}, this run has "
        f"{config.optim.flatten_update}: the optimizer state layouts differ; resume "
        "with the same setting or start a new workdir with init_from")


def restore_params(path: str, model_cfg: ModelConfig, target: Any,
                   validate: Callable[[Mapping[str, Any]], None]
                   ) -> tuple[Any, dict[str, Any]]:
  """(params onto `target`'s shardings, metadata) of a checkpoint or an `hf:<dir>` parent.

  A Hugging Face directory is read as `model_cfg` in any layout (its names and shapes are
  checked against the files; `validate`, a comparison of saved configs, does not apply).
  """
  hf_dir = hf_dir_of(path)
  if hf_dir is None:
    params, meta, _ = ckpt_lib.load_params(path, target, validate=validate)
    return params, meta
  _, _, meta = load_hf_parent(hf_dir)
  return load_hf_params(hf_dir, model_cfg, target), meta


def load_init_params(path: str, *, model_cfg: ModelConfig, model_factory: ModelFactory,
                     abstract_params: Any, runtime: Runtime,
                     adapter: InitAdapter | None) -> tuple[Any, dict[str, Any]]:
  """The `path` checkpoint's params as this run's model, on this mesh, with its metadata.

  Without an adapter the parent must be this model (up to execution fields). With one,
  the params are restored as the parent's model on this mesh, then mapped by
  `adapter.adapt` under jit with this model's shardings as outputs. A parent with LoRA
  adapters is merged first (model/lora.py), so the child sees plain weights. With LoRA on
  this model (`model_cfg.lora_rank`), the result is its base: no adapters
  (`abstract_params` is then the base tree; the Trainer adds fresh adapters).
  """
  if model_cfg.lora_rank and adapter is None:
    raise ValueError("config.lora.rank > 0 needs a fine-tuning stage (SFT, reward model, DPO, "
                     "PPO): they map init_from onto the adapted model")
  if adapter is None:
    return restore_params(path, model_cfg, abstract_params,
                          lambda m: check_model_config(m, path, model_cfg))
  _, abstract, logical = abstract_model(adapter.parent_factory or model_factory,
                                        adapter.parent_model_cfg)
  shardings = mesh_shardings(logical, runtime.mesh, runtime.rules)
  params, meta = restore_params(
      path, adapter.parent_model_cfg, with_shardings(abstract, shardings),
      lambda m: check_model_config(m, path, adapter.parent_model_cfg))
  parent_cfg = adapter.parent_model_cfg
  targets = (lora.base_params(runtime.param_shardings) if model_cfg.lora_rank
             else runtime.param_shardings)
  with runtime.mesh_context():
    params = jax.jit(lambda p: adapter.adapt(lora.merge(p, parent_cfg)),
                     out_shardings=targets)(params)
  return params, meta


class Start(NamedTuple):
  """Where a run starts: its state, data-iterator state, parent record, and how."""
  state: TrainState
  data_state: bytes | None
  parent: dict[str, Any] | None
  resumed: bool


def restore_or_init(checkpointer: ckpt_lib.Checkpointer, abstract_state: TrainState, *,
                    validate: Callable[[Mapping[str, Any]], None], init_from: str,
                    load_parent: Callable[[], tuple[Any, dict[str, Any]]],
                    init_state: Callable[[Any], TrainState]) -> Start:
  """Resume order: this workdir's newest readable checkpoint, then init_from, then scratch.

  Args:
    checkpointer: this run's checkpoints.
    abstract_state: the state's structure with target shardings.
    validate: checks a checkpoint's metadata before any array is read (`check_resume`).
    init_from: the parent checkpoint path ("" for none).
    load_parent: loads the parent's params as this model (`load_init_params`).
    init_state: params or None -> a fresh state (sharded init).
  """
  if checkpointer.latest_step() is not None:
    a = abstract_state
    restored = checkpointer.restore(
        a.params, {"opt_state": a.opt_state, "step": a.step, "rng": a.rng}, validate=validate)
    ts = restored["train_state"]
    state = TrainState(step=ts["step"], params=restored["params"],
                       opt_state=ts["opt_state"], rng=ts["rng"])
    print(f"Resumed from {checkpointer.directory}/{restored['step']}", flush=True)
    return Start(state, restored["data_iter"], restored["metadata"].get("parent"), True)
  if init_from:
    params, meta = load_parent()
    parent = {"path": meta["checkpoint_path"], "step": meta["step"], "stage": meta.get("stage")}
    print(f"Initialised params from {meta['checkpoint_path']} ({meta.get('stage')})",
          flush=True)
    return Start(init_state(params), None, parent, False)
  return Start(init_state(None), None, None, False)
