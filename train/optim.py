"""Optimizer and learning-rate schedule: AdamW, linear warmup then cosine decay, clipping.

Weight decay applies to matrices and embeddings only (not to norm scales), as in nanoGPT and
most LLM recipes. Which parameters are "matrices" is decided from their logical axis names,
so a norm scale stacked on a `layers` axis (scan_layers=True) is still not decayed.

Mixed precision (`optim.master_dtype="float32"` with `model.param_dtype="bfloat16"`):
the parameters the model computes with (and FSDP gathers) are bf16, while the optimizer
state keeps a float32 master copy; gradients are cast up, the whole update (clipping, Adam
moments, decay) runs on the master in float32, and the bf16 parameters are the master
rounded once per step. Without the master copy, an update smaller than half a bf16 ulp
(2^-9 relative) is rounded away and training stalls; `tests/test_train_optim_losses.py`
checks the loss of a short bf16 + master run against float32.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P


def learning_rate_schedule(optim_cfg: Any, num_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `lr` over `warmup_steps`, then cosine to `end_lr`.

  `decay_steps` (0 = `num_steps`) is the step at which the cosine reaches `end_lr`
  (nanoGPT's lr_decay_iters); the rate stays at `end_lr` afterwards.
  """
  decay_steps = optim_cfg.decay_steps or num_steps
  warmup = optim_cfg.warmup_steps
  if optim_cfg.schedule == "constant":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, optim_cfg.lr, max(warmup, 1)),
         optax.constant_schedule(optim_cfg.lr)], [warmup])
  if optim_cfg.schedule != "cosine":
    raise ValueError(f"config.optim.schedule={optim_cfg.schedule!r}: expected 'cosine' or "
                     "'constant'")
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim_cfg.lr, warmup_steps=warmup,
      decay_steps=max(decay_steps, warmup + 1), end_value=optim_cfg.end_lr)


def decay_mask(logical_specs: Any) -> Any:
  """True for parameters with two or more non-`layers` logical axes (matrices, embeddings)."""
  def is_matrix(spec: P) -> bool:
    return len([name for name in spec if name not in (None, "layers")]) >= 2
  return jax.tree.map(is_matrix, logical_specs, is_leaf=lambda x: isinstance(x, P))


class MasterState(NamedTuple):
  """State of `with_master_weights`: the float master copy and the inner optimizer's state."""
  master: Any
  inner: Any


def with_master_weights(inner: optax.GradientTransformation, dtype: str = "float32"
                        ) -> optax.GradientTransformation:
  """Runs `inner` on a `dtype` master copy of the parameters (see the module docstring).

  The returned updates are `rounded(new master) - params` in `dtype`, so
  `optax.apply_updates` (which adds in the wider type, then casts to the parameter dtype)
  yields exactly the master rounded to the parameter dtype.
  """
  dt = jnp.dtype(dtype)

  def init(params):
    master = jax.tree.map(lambda p: jnp.asarray(p, dt), params)
    return MasterState(master=master, inner=inner.init(master))

  def update(grads, state, params=None):
    if params is None:
      raise ValueError("with_master_weights needs the parameters in update()")
    grads = jax.tree.map(lambda g: g.astype(dt), grads)
    updates, inner_state = inner.update(grads, state.inner, state.master)
    master = optax.apply_updates(state.master, updates)
    deltas = jax.tree.map(lambda m, p: m.astype(p.dtype).astype(dt) - p.astype(dt),
                          master, params)
    return deltas, MasterState(master=master, inner=inner_state)

  return optax.GradientTransformation(init, update)


def make_optimizer(optim_cfg: Any, num_steps: int, logical_specs: Any
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with global-norm clipping; returns (transformation, schedule).

  With `optim_cfg.flatten_update`, clipping and the Adam moments run on one concatenated
  vector (`optax.flatten`): a few large fused loops instead of several small kernels per
  parameter, which roughly halves the update time of a ~1M-parameter model on CPU. Weight
  decay and the learning rate stay per array (they need the decay mask). Only for replicated
  parameters: concatenating arrays sharded over fsdp/tensor would reshard them every step.
  """
  schedule = learning_rate_schedule(optim_cfg, num_steps)
  tx = _adamw(optim_cfg, schedule, decay_mask(logical_specs))
  master_dtype = optim_cfg.get("master_dtype", "")
  if master_dtype:
    if master_dtype != "float32":
      raise ValueError(f"config.optim.master_dtype={master_dtype!r}: expected '' (update "
                       "the parameters in their own dtype) or 'float32'")
    tx = with_master_weights(tx, master_dtype)
  return tx, schedule


def _adamw(optim_cfg: Any, schedule: optax.Schedule, mask: Any
           ) -> optax.GradientTransformation:
  """Clipping + AdamW (flattened or per array, see make_optimizer)."""
  if optim_cfg.flatten_update:
    inner = [optax.clip_by_global_norm(optim_cfg.grad_clip)] if optim_cfg.grad_clip > 0 else []
    inner.append(optax.scale_by_adam(b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps))
    tx = optax.chain(optax.flatten(optax.chain(*inner)),
                     optax.add_decayed_weights(optim_cfg.weight_decay, mask),
                     optax.scale_by_learning_rate(schedule))
    return tx
  chain = []
  if optim_cfg.grad_clip > 0:
    chain.append(optax.clip_by_global_norm(optim_cfg.grad_clip))
  chain.append(optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                           weight_decay=optim_cfg.weight_decay, mask=mask))
  return optax.chain(*chain)
