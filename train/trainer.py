"""The one `Trainer` core used by every training loop (pretrain, SFT, reward model, PPO, DPO).

A loop differs from another only in its model factory, its loss function, its data and its
config. The Trainer owns the rest:

  mesh + logical rules -> sharded init, init_from, or exact resume -> one jitted train step
  (explicit in/out shardings, donated state, gradient accumulation) -> loop with bounded
  steps in flight -> metrics (console, TensorBoard, metrics.jsonl), eval, hooks every N
  steps, checkpoints (async, keep-last-N, SIGTERM save, NaN stop).

Loss contract: `loss_fn(model, batch, rng) -> (loss, aux)` where `model` is the NNX module
rebuilt from params inside the step (so the loss is a pure function of params), `batch` is
a dict of global arrays and `aux` is a dict of scalar metrics. If `aux["weight"]` exists,
eval averages metrics weighted by it (e.g. the number of target tokens), which makes eval
loss the exact per-token mean over the whole split.
"""

from __future__ import annotations

import collections
import contextlib
import signal
from typing import Any, Callable, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from model import sharding as msharding
from model.config import ModelConfig
from model.transformer import Transformer
from train import checkpoint as ckpt_lib
from train import flops as flops_lib
from train.loop import run_loop
from train.metrics import MetricsWriter
from train.optim import make_optimizer
from train.restore import InitAdapter, Restorer
from train.state import (ModelFactory, TrainState, abstract_model, make_init_fn,
                         mesh_shardings, opt_state_shardings, with_shardings)

LossFn = Callable[[nnx.Module, Mapping[str, jax.Array], jax.Array],
                  tuple[jax.Array, dict[str, jax.Array]]]
Hook = Callable[["Trainer", int, TrainState], None]


class Trainer(Restorer):
  """Owns the mesh, state, jitted step, loop, eval, metrics and checkpoints of one run.

  Args:
    config: the resolved run ConfigDict (sections train, optim, mesh; fields seed, stage,
      init_from).
    workdir: run directory (metrics, TensorBoard, checkpoints); None builds an abstract
      trainer (mesh, shardings, jitted steps) that writes nothing, for train/shapes.py.
    model_cfg: the model to train.
    loss_fn: see the module docstring.
    model_factory: builds the module from (ModelConfig, Rngs); default `Transformer`.
    tokenizer_bytes: the SentencePiece model, stored in every checkpoint.
    tokenizer_fingerprint: its sha256, recorded in checkpoint metadata.
    devices: devices of the mesh (default: all global devices).
    init_adapter: maps an `init_from` checkpoint of a different model shape (see
      InitAdapter); without it the parent must have this run's model config.
  """

  def __init__(self, config: Any, workdir: str | None, model_cfg: ModelConfig, loss_fn: LossFn, *,
               model_factory: ModelFactory = Transformer, tokenizer_bytes: bytes | None = None,
               tokenizer_fingerprint: str = "", devices: list[jax.Device] | None = None,
               init_adapter: InitAdapter | None = None):
    self.config, self.workdir, self.model_cfg = config, workdir, model_cfg
    self.loss_fn, self.model_factory = loss_fn, model_factory
    self.tokenizer_bytes, self.tokenizer_fingerprint = tokenizer_bytes, tokenizer_fingerprint
    self.init_adapter = init_adapter
    tcfg = config.train
    self.num_steps = tcfg.num_steps
    self.rules = msharding.normalize_rules(rules_from_config(config.mesh.rules))
    self.mesh = msharding.make_mesh(dict(config.mesh.shape), devices)
    self.batch_axes = dict(self.rules).get("batch")
    self._check_batch_sizes()
    self.graphdef, abstract_params, self.logical_specs = abstract_model(model_factory, model_cfg)
    self.tx, self.schedule = make_optimizer(config.optim, self.num_steps, self.logical_specs)
    self.param_shardings = mesh_shardings(self.logical_specs, self.mesh, self.rules)
    self._init = make_init_fn(model_factory, model_cfg, self.tx)
    abstract_state = jax.eval_shape(self._init, jax.random.key(0))
    self.replicated = NamedSharding(self.mesh, P())
    self.state_shardings = TrainState(
        step=self.replicated, params=self.param_shardings,
        opt_state=(jax.tree.map(lambda _: self.replicated, abstract_state.opt_state)
                   if config.optim.flatten_update else  # one flat vector, replicated
                   opt_state_shardings(self.tx, abstract_state.opt_state,
                                       self.param_shardings, self.mesh)),
        rng=self.replicated)
    self.abstract_state = with_shardings(abstract_state, self.state_shardings)
    self.batch_sharding = NamedSharding(self.mesh, P(self.batch_axes))
    self._hooks: list[tuple[int, Hook]] = []
    self._jit_predict: dict[Callable, Any] = {}
    self._compile()
    self.checkpointer = ckpt_lib.Checkpointer(
        f"{workdir}/checkpoints", keep=tcfg.keep_checkpoints,
        async_save=tcfg.async_checkpoint) if workdir else None
    self.writer = MetricsWriter(workdir or "", enabled=bool(workdir) and
                                jax.process_index() == 0)
    self.parent: dict[str, Any] | None = None
    # Stage-specific facts added to every checkpoint's metadata from now on (e.g. the
    # reward model's score normalisation, set by a last-step hook before the final save).
    self.extra_metadata: dict[str, Any] = {}
    self.data_state_fn: Callable[[], bytes] | None = None
    self._sigterm = False
    self.tokens_per_step = 0
    self.flops_per_step = 0.0
    self.peak_flops = 0.0
    self.run_stats: dict[str, float] = {}  # steady-state totals of the last train() call

  # ------------------------------------------------------------------ setup
  def _check_batch_sizes(self) -> None:
    tcfg = self.config.train
    dp = msharding.batch_parallel_size(self.mesh, self.rules)
    accum = tcfg.grad_accum_steps
    if tcfg.batch_size % accum:
      raise ValueError(f"config.train.batch_size={tcfg.batch_size} is not divisible by "
                       f"config.train.grad_accum_steps={accum}")
    micro = tcfg.batch_size // accum
    if micro % dp:
      raise ValueError(f"Global batch {tcfg.batch_size} (micro-batch {micro} with "
                       f"grad_accum_steps={accum}) is not divisible by the data-parallel size "
                       f"{dp} (mesh {dict(self.mesh.shape)}, batch axes {self.batch_axes})")
    if self.config.optim.flatten_update and (self.mesh.shape["fsdp"] > 1 or
                                             self.mesh.shape["tensor"] > 1):
      raise ValueError("config.optim.flatten_update=True needs replicated parameters, but the "
                       f"mesh {dict(self.mesh.shape)} shards them over fsdp/tensor; set it to "
                       "False")
    if tcfg.eval_batch_size % dp or tcfg.eval_batch_size % jax.process_count():
      raise ValueError(f"config.train.eval_batch_size={tcfg.eval_batch_size} is not divisible "
                       f"by the data-parallel size {dp} and the process count "
                       f"{jax.process_count()}")
    if tcfg.batch_size % jax.process_count():
      raise ValueError(f"config.train.batch_size={tcfg.batch_size} is not divisible by the "
                       f"process count {jax.process_count()}")

  @contextlib.contextmanager
  def mesh_context(self):
    """Mesh + logical rules, active whenever model code is traced."""
    with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
      yield

  def _compile(self) -> None:
    """The one place where the train and eval steps are jitted."""
    self._jit_init = jax.jit(self._init, out_shardings=self.state_shardings)
    self._jit_init_from = jax.jit(self._init, in_shardings=(self.replicated, self.param_shardings),
                                  out_shardings=self.state_shardings)
    self._jit_step = jax.jit(self._train_step, in_shardings=(self.state_shardings,
                                                             self.batch_sharding),
                             out_shardings=(self.state_shardings, self.replicated),
                             donate_argnums=(0,))
    # `steps_per_call` steps in one dispatch: a scan over a stack of batches [n, B, ...].
    self.stacked_batch_sharding = NamedSharding(self.mesh, P(None, self.batch_axes))
    self._jit_steps = jax.jit(
        lambda state, batches: jax.lax.scan(self._train_step, state, batches),
        in_shardings=(self.state_shardings, self.stacked_batch_sharding),
        out_shardings=(self.state_shardings, self.replicated), donate_argnums=(0,))
    self._jit_eval = jax.jit(self._eval_step, in_shardings=(self.param_shardings,
                                                            self.batch_sharding),
                             out_shardings=self.replicated)

  # ------------------------------------------------------------------ pure steps
  def _loss(self, params: Any, batch: Mapping[str, jax.Array], rng: jax.Array):
    model = nnx.merge(self.graphdef, params)
    return self.loss_fn(model, batch, rng)

  def _train_step(self, state: TrainState, batch: Mapping[str, jax.Array]):
    rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
    grad_fn = jax.value_and_grad(self._loss, has_aux=True)
    accum = self.config.train.grad_accum_steps
    if accum == 1:
      (loss, aux), grads = grad_fn(state.params, batch, step_rng)
    else:
      # Strided micro-batches ([B] -> [B/A, A] -> [A, B/A]) keep each device's rows local.
      micro = jax.tree.map(lambda x: jnp.swapaxes(
          x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1), batch)

      def body(carry, xs):
        mb, r = xs
        mb = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
            x, NamedSharding(self.mesh, P(self.batch_axes))), mb)
        (l, a), g = grad_fn(state.params, mb, r)
        return jax.tree.map(jnp.add, carry, (l, a, g)), None

      zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, state.params,
                                                          jax.tree.map(lambda x: x[0], micro),
                                                          step_rng))
      zeros = (zeros[0][0], zeros[0][1], zeros[1])
      (loss, aux, grads), _ = jax.lax.scan(body, zeros,
                                           (micro, jax.random.split(step_rng, accum)))
      loss, aux, grads = jax.tree.map(lambda x: x / accum, (loss, aux, grads))
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"train/loss": loss, "train/grad_norm": optax.global_norm(grads),
               "train/lr": self.schedule(state.step),
               **{f"train/{k}": v for k, v in aux.items() if k != "loss"}}
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                           rng=jax.random.key_data(rng))
    return new_state, metrics

  def _eval_step(self, params: Any, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    loss, aux = self._loss(params, batch, jax.random.key(0))
    aux = {"loss": loss, **aux}
    weight = aux.pop("weight", jnp.ones(()))
    return {"weight": weight, **{k: v * weight for k, v in aux.items()}}

  # ------------------------------------------------------------------ state
  def to_global(self, batch: Mapping[str, np.ndarray], sharding: NamedSharding | None = None
                ) -> dict[str, jax.Array]:
    """The one host -> device boundary: process-local numpy rows -> global sharded arrays.

    With one process the local rows are the global batch and one batched `device_put` of
    the whole dict is enough (about half the host time of one call per array, which
    matters when the host shares its cores with the computation).
    """
    sharding = sharding or self.batch_sharding
    if jax.process_count() == 1:
      return jax.device_put({k: np.asarray(v) for k, v in batch.items()}, sharding)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}

  def stage(self, batches: list[Mapping[str, np.ndarray]]) -> dict[str, jax.Array]:
    """Host batches of one call -> global device arrays ([n, B, ...] stacked when n > 1)."""
    if len(batches) == 1:
      return self.to_global(batches[0])
    stacked = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
    return self.to_global(stacked, self.stacked_batch_sharding)

  def dispatch(self, state: TrainState, batch: Mapping[str, jax.Array], num_steps: int
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """Dispatches `num_steps` train steps on a `stage`d batch as one call.

    Returns the new state and the metrics: scalars for one step, [n] arrays for n > 1.
    """
    return (self._jit_step if num_steps == 1 else self._jit_steps)(state, batch)

  def init_state(self, params: Any = None) -> TrainState:
    """Fresh state (sharded init), or fresh optimizer state around given `params`."""
    rng = jax.random.key(self.config.seed)
    with self.mesh_context():
      if params is None:
        return self._jit_init(rng)
      return self._jit_init_from(rng, params)

  def save(self, state: TrainState) -> None:
    step = int(jax.device_get(state.step))
    meta = {"stage": self.config.stage, "config": self.config.to_dict(),
            "model_config": self.model_cfg.to_dict(), "parent": self.parent,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "model_class": getattr(self.model_factory, "__name__", ""),
            "process_count": jax.process_count(), **self.extra_metadata}
    data_state = self.data_state_fn() if self.data_state_fn else None
    self.checkpointer.save(step, state.params,
                           {"opt_state": state.opt_state, "step": state.step, "rng": state.rng},
                           metadata=meta, tokenizer=self.tokenizer_bytes, data_state=data_state)

  # ------------------------------------------------------------------ loop
  def add_hook(self, fn: Hook, every: int) -> None:
    """Calls fn(trainer, step, state) after every `every`-th step (and at the last step)."""
    if every > 0:
      self._hooks.append((every, fn))

  def evaluate(self, params: Any, batches: Iterable[Mapping[str, np.ndarray]]
               ) -> dict[str, float]:
    """Weighted means of the loss_fn metrics over all `batches` (e.g. a whole split)."""
    totals: dict[str, float] = collections.defaultdict(float)
    with self.mesh_context():
      for batch in batches:
        out = jax.device_get(self._jit_eval(params, self.to_global(batch)))
        for k, v in out.items():
          totals[k] += float(v)
    weight = totals.pop("weight", 0.0)
    if not weight:
      raise ValueError("Evaluation saw no weighted examples (empty validation split?)")
    return {**{k: v / weight for k, v in totals.items()}, "tokens": weight}

  def log_eval(self, step: int, metrics: Mapping[str, float], summary: str) -> None:
    """Writes `metrics` as eval/<name> (TensorBoard, metrics.jsonl) and prints
    "eval step <step>: <summary>" on process 0: every stage's eval hook ends with this."""
    self.writer.write(step, {f"eval/{k}": v for k, v in metrics.items()})
    if jax.process_index() == 0:
      print(f"eval step {step}: {summary}", flush=True)

  def predict(self, fn: Callable[[nnx.Module, Mapping[str, jax.Array]], jax.Array],
              params: Any, batches: Iterable[Mapping[str, np.ndarray]]) -> np.ndarray:
    """Per-row outputs of `fn(model, batch) -> [B, ...]` over `batches`, concatenated on the
    host (jitted once per `fn`, rows sharded like training batches)."""
    if fn not in self._jit_predict:
      self._jit_predict[fn] = jax.jit(
          lambda p, batch: fn(nnx.merge(self.graphdef, p), batch),
          in_shardings=(self.param_shardings, self.batch_sharding),
          out_shardings=self.batch_sharding)
    out = []
    with self.mesh_context():
      for batch in batches:
        out.append(np.asarray(jax.device_get(self._jit_predict[fn](params,
                                                                   self.to_global(batch)))))
    return np.concatenate(out)

  def setup_throughput(self, tokens_per_step: int, seq_len: int,
                       output_projection: bool = True) -> None:
    """Sets what progress lines report: tokens per step and model FLOPs for MFU
    (`output_projection=False` for models without the vocabulary projection)."""
    self.tokens_per_step = tokens_per_step
    self.flops_per_step = flops_lib.flops_per_token(
        self.model_cfg, seq_len, output_projection=output_projection) * tokens_per_step
    peak = self.config.train.peak_flops
    if not peak:
      per_device = flops_lib.device_peak_flops()
      peak = (per_device * jax.device_count() if per_device else
              flops_lib.measure_matmul_peak() * jax.process_count())
    self.peak_flops = peak

  def train(self, state: TrainState, batches: Iterator[Mapping[str, np.ndarray]]
            ) -> TrainState:
    """Runs steps until config.train.num_steps; returns the final state."""
    return run_loop(self, state, batches)

  def fit(self, state: TrainState, batches: Iterator[Mapping[str, np.ndarray]]
          ) -> dict[str, float]:
    """What every entry point does last: train with the SIGTERM save installed, close the
    checkpointer and writer whatever happens, and return the run's `run/...` totals."""
    self.install_sigterm_handler()
    try:
      self.train(state, batches)
    finally:
      self.close()
    return {f"run/{k}": v for k, v in self.run_stats.items()}

  def install_sigterm_handler(self) -> None:
    """SIGTERM (preemption) makes the loop save a checkpoint and stop after this step."""
    def handler(signum, frame):
      del signum, frame
      self._sigterm = True
    signal.signal(signal.SIGTERM, handler)

  def close(self) -> None:
    if self.checkpointer is not None:
      self.checkpointer.close()
    self.writer.close()


def rules_from_config(rules_cfg: Any) -> tuple[tuple[str, Any], ...]:
  """Config rules are strings: "" = replicated, "data,fsdp" = several mesh axes."""
  out = []
  for logical, value in dict(rules_cfg).items():
    axes = tuple(a.strip() for a in str(value).split(",") if a.strip())
    out.append((logical, None if not axes else axes[0] if len(axes) == 1 else axes))
  return tuple(out)
