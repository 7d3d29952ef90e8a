"""How a run gets its first state: resume this workdir, or init_from a parent, or scratch.

`Restorer` is the part of the `Trainer` that reads checkpoints back (mixed into `Trainer`,
which provides the mesh, shardings, abstract state, checkpointer and config it uses):

  restore_or_init()   this workdir's newest readable checkpoint (exact resume: params,
                      optimizer state, step, PRNG, data-iterator state), else `init_from`
                      (params only, fresh optimizer), else a fresh sharded init.
  load_init_params()  the `init_from` params as this run's model, on this mesh.

A parent of another shape (a grown vocabulary, a scalar head on an LM trunk) is mapped by an
`InitAdapter`; otherwise the parent's model config must equal this run's up to the
`EXECUTION_FIELDS`, which change how a model runs but not its parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax

from model.config import ModelConfig
from train import checkpoint as ckpt_lib
from train.state import ModelFactory, TrainState, abstract_model, mesh_shardings, with_shardings


@dataclasses.dataclass(frozen=True)
class InitAdapter:
  """How `init_from` maps a parent checkpoint of another model shape onto this run's model.

  Attributes:
    parent_model_cfg: The parent's ModelConfig (checked against its metadata).
    adapt: Parent params (pure dict of host arrays) -> this model's params.
    parent_factory: Builds the parent's module (default: this run's model factory).
  """
  parent_model_cfg: ModelConfig
  adapt: Callable[[Any], Any]
  parent_factory: ModelFactory | None = None


# Fields that only change how the model executes, not what its parameters are: a checkpoint
# may be restored into a config that differs in these.
EXECUTION_FIELDS = ("attention_impl", "remat_policy", "dtype", "param_dtype", "one_hot_embed",
                    "max_seq_len")


def model_config_diff(saved: Mapping[str, Any], current: ModelConfig) -> dict[str, tuple]:
  """Parameter-relevant fields that differ between a checkpoint and `current`."""
  now = current.to_dict()
  return {k: (saved.get(k), now[k]) for k in now
          if k not in EXECUTION_FIELDS and saved.get(k) != now[k]}


class Restorer:
  """Checkpoint reading of the Trainer (see the module docstring)."""

  def restore_or_init(self) -> tuple[TrainState, bytes | None]:
    """Resume order: this workdir's newest readable checkpoint, then init_from, then scratch.

    Returns (state, data iterator state bytes or None).
    """
    if self.checkpointer.latest_step() is not None:
      restored = self.checkpointer.restore(
          self.abstract_state.params, self._abstract_train_state(),
          validate=lambda meta: self._check_resume(meta, self.checkpointer.directory))
      self.parent = restored["metadata"].get("parent")
      ts = restored["train_state"]
      state = TrainState(step=ts["step"], params=restored["params"],
                         opt_state=ts["opt_state"], rng=ts["rng"])
      self.writer.truncate_after(int(restored["step"]))
      print(f"Resumed from {self.checkpointer.directory}/{restored['step']}", flush=True)
      return state, restored["data_iter"]
    if self.config.init_from:
      params, meta = self.load_init_params()
      self.parent = {"path": meta["checkpoint_path"], "step": meta["step"],
                     "stage": meta.get("stage")}
      print(f"Initialised params from {meta['checkpoint_path']} ({meta.get('stage')})",
            flush=True)
      return self.init_state(params), None
    return self.init_state(), None

  def load_init_params(self) -> tuple[Any, dict[str, Any]]:
    """The `init_from` checkpoint's params as this run's model (through the init adapter if
    any), on this mesh, with the parent's metadata. DPO's frozen reference is exactly this."""
    path = self.config.init_from
    if self.init_adapter is not None:
      return self._load_adapted(path)
    params, meta, _ = ckpt_lib.load_params(
        path, self.abstract_state.params,
        validate=lambda meta: self._check_model_config(meta, path))
    return params, meta

  def _load_adapted(self, path: str) -> tuple[Any, dict[str, Any]]:
    """init_from through `init_adapter`: load the parent's params as the parent's model, on
    this mesh, then map them to this model's (e.g. a larger vocabulary, or added heads)."""
    adapter = self.init_adapter
    _, abstract, logical = abstract_model(adapter.parent_factory or self.model_factory,
                                          adapter.parent_model_cfg)
    shardings = mesh_shardings(logical, self.mesh, self.rules)

    params, meta, _ = ckpt_lib.load_params(
        path, with_shardings(abstract, shardings),
        validate=lambda meta: self._check_model_config(meta, path, adapter.parent_model_cfg))
    # The adapter works on host arrays: simple, and fine for the models this runs on CPU;
    # a pod-scale adapter would map sharded arrays under jit instead.
    params = jax.device_put(adapter.adapt(jax.device_get(params)), self.param_shardings)
    return params, meta

  def _abstract_train_state(self) -> dict[str, Any]:
    a = self.abstract_state
    return {"opt_state": a.opt_state, "step": a.step, "rng": a.rng}

  def _check_resume(self, meta: Mapping[str, Any], where: Any) -> None:
    """Resume needs the same model and the same optimizer-state layout."""
    self._check_model_config(meta, where)
    saved = meta.get("config", {}).get("optim", {}).get("flatten_update", False)
    if saved != self.config.optim.flatten_update:
      raise ckpt_lib.CheckpointError(
          f"Checkpoint {where} was written with optim.flatten_update={saved}, this run has "
          f"{self.config.optim.flatten_update}: the optimizer state layouts differ; resume "
          "with the same setting or start a new workdir with init_from")

  def _check_model_config(self, meta: Mapping[str, Any], where: Any,
                          expected: ModelConfig | None = None) -> None:
    """The checkpoint's model config must be `expected` (default: this run's model)."""
    diff = model_config_diff(meta.get("model_config", {}), expected or self.model_cfg)
    if diff:
      detail = ", ".join(f"{k}: checkpoint={a!r} config={b!r}" for k, (a, b) in diff.items())
      raise ckpt_lib.CheckpointError(
          f"Checkpoint {where} has a different model config ({detail}); point the run at a "
          "compatible checkpoint or a new workdir")
