"""The pure train and eval steps every loop runs, built from a loss function.

Loss contract: `loss_fn(model, batch, rng) -> (loss, aux)` where `model` is the NNX module
rebuilt from params inside the step (so the loss is a pure function of params), `batch` is
a dict of global arrays and `aux` is a dict of scalar metrics. If `aux["weight"]` exists,
eval averages metrics weighted by it (e.g. the number of target tokens), which makes eval
loss the exact per-token mean over the whole split.

The train step returns `(new_state, metrics)` with `train/loss`, `train/grad_norm`,
`train/lr`, the aux metrics as `train/<name>` and `train/finite`: 1 when the loss, the
gradient norm and every updated parameter are finite. The loop checks that flag before it
logs, runs hooks or saves (`train.loop.check_finite`), so a state whose update went NaN is
never written, even when the loss it was computed from was still finite.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding

from model.lora import combine as combine_params
from train.state import TrainState

LossFn = Callable[[nnx.Module, Mapping[str, jax.Array], jax.Array],
                  tuple[jax.Array, dict[str, jax.Array]]]
FINITE = "train/finite"


def tree_is_finite(tree: Any) -> jax.Array:
  """True iff every element of every floating-point leaf is finite."""
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
           if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


class Steps:
  """Pure train / eval steps of one model structure, loss and optimizer.

  Args:
    graphdef: the model structure (`nnx.split(model)[0]`).
    loss_fn: see the module docstring.
    tx, schedule: the optimizer and its learning-rate schedule (for logging).
    grad_accum_steps: micro-batches per step (strided: each device keeps its rows).
    micro_batch_sharding: the sharding each micro-batch is constrained to.
    split: params -> (trained, frozen) pure dicts (`train.state.trainable_split`); gradients
      and the optimizer see only the trained part (LoRA: adapters and heads). Default: all.
  """

  def __init__(self, graphdef: Any, loss_fn: LossFn, tx: optax.GradientTransformation,
               schedule: Callable[[jax.Array], jax.Array], grad_accum_steps: int,
               micro_batch_sharding: NamedSharding,
               split: Callable[[Any], tuple[Any, Any]] | None = None):
    self.graphdef, self.loss_fn, self.tx, self.schedule = graphdef, loss_fn, tx, schedule
    self.accum = grad_accum_steps
    self.micro_batch_sharding = micro_batch_sharding
    self.split = split or (lambda params: (params, {}))

  def loss(self, params: Any, batch: Mapping[str, jax.Array], rng: jax.Array):
    """The loss function on the module rebuilt from `params`."""
    return self.loss_fn(nnx.merge(self.graphdef, params), batch, rng)

  def _grads(self, params: Any, batch: Mapping[str, jax.Array], rng: jax.Array):
    """(loss, aux, gradients of the trained params); frozen ones get no gradient at all."""
    trained, frozen = self.split(params)
    grad_fn = jax.value_and_grad(
        lambda t, b, r: self.loss(combine_params(t, frozen), b, r), has_aux=True)
    params = trained
    if self.accum == 1:
      (loss, aux), grads = grad_fn(params, batch, rng)
      return loss, aux, grads
    accum = self.accum
    # Strided micro-batches ([B] -> [B/A, A] -> [A, B/A]) keep each device's rows local.
    micro = jax.tree.map(lambda x: jnp.swapaxes(
        x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1), batch)

    def body(carry, xs):
      mb, r = xs
      mb = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
          x, self.micro_batch_sharding), mb)
      (l, a), g = grad_fn(params, mb, r)
      return jax.tree.map(jnp.add, carry, (l, a, g)), None

    shapes = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), rng)
    zeros = jax.tree.map(jnp.zeros_like, (shapes[0][0], shapes[0][1], shapes[1]))
    (loss, aux, grads), _ = jax.lax.scan(body, zeros, (micro, jax.random.split(rng, accum)))
    return jax.tree.map(lambda x: x / accum, (loss, aux, grads))

  def train_step(self, state: TrainState, batch: Mapping[str, jax.Array]
                 ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step; see the module docstring for the metrics."""
    rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
    loss, aux, grads = self._grads(state.params, batch, step_rng)
    trained, frozen = self.split(state.params)
    updates, opt_state = self.tx.update(grads, state.opt_state, trained)
    params = combine_params(optax.apply_updates(trained, updates), frozen)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & tree_is_finite(params)
    metrics = {"train/loss": loss, "train/grad_norm": grad_norm,
               "train/lr": self.schedule(state.step),
               **{f"train/{k}": v for k, v in aux.items() if k != "loss"},
               FINITE: finite.astype(jnp.float32)}
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                           rng=jax.random.key_data(rng))
    return new_state, metrics

  def eval_step(self, params: Any, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Weighted sums of the loss and aux metrics over one batch (plus their weight)."""
    loss, aux = self.loss(params, batch, jax.random.key(0))
    aux = {"loss": loss, **aux}
    weight = aux.pop("weight", jnp.ones(()))
    return {"weight": weight, **{k: v * weight for k, v in aux.items()}}

  def compile(self, state_shardings: Any, batch_sharding: NamedSharding,
              stacked_batch_sharding: NamedSharding, param_shardings: Any,
              replicated: NamedSharding) -> dict[str, Any]:
    """The jitted steps (explicit shardings, donated state): `step` (one batch), `steps`
    (a scan over a stack of batches [n, B, ...]) and `eval`."""
    return {
        "step": jax.jit(self.train_step, in_shardings=(state_shardings, batch_sharding),
                        out_shardings=(state_shardings, replicated), donate_argnums=(0,)),
        "steps": jax.jit(lambda state, batches: jax.lax.scan(self.train_step, state, batches),
                         in_shardings=(state_shardings, stacked_batch_sharding),
                         out_shardings=(state_shardings, replicated), donate_argnums=(0,)),
        "eval": jax.jit(self.eval_step, in_shardings=(param_shardings, batch_sharding),
                        out_shardings=replicated),
    }

