"""The one `Trainer` core used by every training loop (pretrain, SFT, reward model, PPO, DPO).

A loop differs from another only in its model factory, its loss function, its data and its
config. The Trainer composes public pieces, each in its own module:

  train/runtime.py  mesh, logical rules, shardings, host -> device, sharded apply
  train/step.py     the pure train / eval steps (loss contract, finite flag)
  train/restore.py  resume, init_from (adapters under jit), fresh sharded init
  train/loop.py     the step loop and its services (preemption, finite check, throughput)
  train/checkpoint.py, train/metrics.py  the checkpoint format and the metrics writer

and holds what ties them to one run: the jitted steps (explicit in/out shardings, donated
state), the abstract state, the checkpointer and writer (opened only once the run's inputs
are validated: `open()`), the hooks, the parent record and the checkpoint metadata.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Iterable, Iterator, Mapping

import jax
import numpy as np
from flax import nnx

from model import lora
from model import sharding as msharding
from model.config import ModelConfig
from model.transformer import Transformer
from train import checkpoint as ckpt_lib
from train import flops as flops_lib
from train import restore as restore_lib
from train.loop import Hook, LoopResult, Preemption, Throughput, run_loop
from train.metrics import MetricsWriter
from train.optim import make_optimizer
from train.restore import InitAdapter
from train.runtime import Runtime
from train.state import (ModelFactory, TrainState, abstract_model, add_adapters_fn,
                         make_init_fn, mesh_shardings, opt_state_shardings, trainable_split,
                         with_shardings)
from train.step import LossFn, Steps


def check_batch_sizes(config: Any, mesh: jax.sharding.Mesh, rules: Any) -> None:
  """The batch arithmetic a run needs on `mesh`; raises ValueError naming the field."""
  tcfg = config.train
  dp = msharding.batch_parallel_size(mesh, rules)
  accum = tcfg.grad_accum_steps
  if tcfg.batch_size % accum:
    raise ValueError(f"config.train.batch_size={tcfg.batch_size} is not divisible by "
                     f"config.train.grad_accum_steps={accum}")
  micro = tcfg.batch_size // accum
  if micro % dp:
    raise ValueError(f"Global batch {tcfg.batch_size} (micro-batch {micro} with "
                     f"grad_accum_steps={accum}) is not divisible by the data-parallel size "
                     f"{dp} (mesh {dict(mesh.shape)}, batch axes {dict(rules).get('batch')})")
  if config.optim.flatten_update and (mesh.shape["fsdp"] > 1 or mesh.shape["tensor"] > 1):
    raise ValueError("config.optim.flatten_update=True needs replicated parameters, but the "
                     f"mesh {dict(mesh.shape)} shards them over fsdp/tensor; set it to False")
  if tcfg.eval_batch_size % dp or tcfg.eval_batch_size % jax.process_count():
    raise ValueError(f"config.train.eval_batch_size={tcfg.eval_batch_size} is not divisible "
                     f"by the data-parallel size {dp} and the process count "
                     f"{jax.process_count()}")
  if tcfg.batch_size % jax.process_count():
    raise ValueError(f"config.train.batch_size={tcfg.batch_size} is not divisible by the "
                     f"process count {jax.process_count()}")


class Trainer:
  """Owns the mesh, state, jitted step, loop, eval, metrics and checkpoints of one run.

  Args:
    config: the resolved run ConfigDict (sections train, optim, mesh; fields seed, stage,
      init_from).
    workdir: run directory (metrics, TensorBoard, checkpoints); None builds an abstract
      trainer (mesh, shardings, jitted steps) that writes nothing, for launch/shapes.py.
    model_cfg: the model to train.
    loss_fn: `loss_fn(model, batch, rng) -> (loss, aux)` (train/step.py).
    model_factory: builds the module from (ModelConfig, Rngs); default `Transformer`.
    tokenizer_bytes: the tokenizer model, stored in every checkpoint.
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
    self.num_steps = config.train.num_steps
    self.rules = msharding.normalize_rules(msharding.rules_from_config(config.mesh.rules))
    self.mesh = msharding.make_mesh(dict(config.mesh.shape), devices)
    check_batch_sizes(config, self.mesh, self.rules)
    self.graphdef, abstract_params, self.logical_specs = abstract_model(model_factory, model_cfg)
    # LoRA (model_cfg.lora_rank > 0): only adapters and heads are trained (train/state.py).
    self.split = trainable_split(model_cfg)
    self.tx, self.schedule = make_optimizer(config.optim, self.num_steps,
                                            self.split(self.logical_specs)[0])
    self.param_shardings = mesh_shardings(self.logical_specs, self.mesh, self.rules)
    self.runtime = Runtime(self.mesh, self.rules, self.graphdef, self.param_shardings)
    self.batch_sharding = self.runtime.batch_sharding
    lora_cfg = config.get("lora")
    self._init = make_init_fn(model_factory, model_cfg, self.tx,
                              lora_cfg.base_dtype if lora_cfg is not None else "")
    abstract_state = jax.eval_shape(self._init, jax.random.key(0))
    rep = self.runtime.replicated
    self.state_shardings = TrainState(
        step=rep, params=self.param_shardings,
        opt_state=(jax.tree.map(lambda _: rep, abstract_state.opt_state)
                   if config.optim.flatten_update else  # one flat vector, replicated
                   opt_state_shardings(self.tx, abstract_state.opt_state,
                                       self.split(self.param_shardings)[0], self.mesh)),
        rng=rep)
    self.abstract_state = with_shardings(abstract_state, self.state_shardings)
    self.steps = Steps(self.graphdef, loss_fn, self.tx, self.schedule,
                       config.train.grad_accum_steps, self.batch_sharding, self.split)
    # The one place where the train and eval steps are jitted.
    self._jit = self.steps.compile(self.state_shardings, self.batch_sharding,
                                   self.runtime.stacked_batch_sharding, self.param_shardings,
                                   rep)
    self._jit_init = jax.jit(self._init, out_shardings=self.state_shardings)
    self._jit_init_from = jax.jit(self._init, in_shardings=(rep, self.param_shardings),
                                  out_shardings=self.state_shardings)
    self._jit_add_adapters = jax.jit(add_adapters_fn(model_factory, model_cfg),
                                     out_shardings=self.param_shardings)
    self.checkpointer: ckpt_lib.Checkpointer | None = None
    self.writer = MetricsWriter("", enabled=False)
    self.hooks: list[Hook] = []
    self.preemption = Preemption()
    self.throughput = Throughput()
    self.parent: dict[str, Any] | None = None
    # Stage-specific facts added to every checkpoint's metadata from now on (e.g. the
    # reward model's score normalisation, set by a last-step hook before the final save).
    self.extra_metadata: dict[str, Any] = {}
    self.data_state_fn: Callable[[], bytes] | None = None
    self.run_stats: dict[str, float] = {}  # steady-state totals of the last train() call
    self.preempted: str | None = None
    self.base_checksum = ""

  # ------------------------------------------------------------------ files
  def open(self) -> None:
    """Creates the checkpointer and the metrics writer (the first writes to the workdir;
    run_stage calls this only after every input was validated)."""
    if self.workdir and self.checkpointer is None:
      tcfg = self.config.train
      self.checkpointer = ckpt_lib.Checkpointer(
          f"{self.workdir}/checkpoints", keep=tcfg.keep_checkpoints,
          async_save=tcfg.async_checkpoint)
      self.writer = MetricsWriter(self.workdir, enabled=jax.process_index() == 0)

  def existing_metadata(self) -> dict[str, Any] | None:
    """The newest checkpoint's metadata in this workdir, read without creating anything."""
    if not self.workdir:
      return None
    try:
      return ckpt_lib.read_metadata(f"{self.workdir}/checkpoints")
    except ckpt_lib.CheckpointError:
      return None

  # ------------------------------------------------------------------ steps
  def mesh_context(self):
    """Mesh + logical rules, active whenever model code is traced."""
    return self.runtime.mesh_context()

  def to_global(self, batch: Mapping[str, np.ndarray], sharding: Any = None
                ) -> dict[str, jax.Array]:
    """Process-local rows -> global arrays (train/runtime.py)."""
    return self.runtime.to_global(batch, sharding)

  def stage(self, batches: list[Mapping[str, np.ndarray]]) -> dict[str, jax.Array]:
    """Host batches of one call -> global arrays ([n, B, ...] stacked when n > 1)."""
    return self.runtime.stage(batches)

  def step(self, state: TrainState, batch: Mapping[str, jax.Array]
           ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One jitted train step on a global batch (donates `state`)."""
    return self._jit["step"](state, batch)

  def dispatch(self, state: TrainState, batch: Mapping[str, jax.Array], num_steps: int
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """`num_steps` train steps on a `stage`d batch as one call (metrics: [n] when n > 1)."""
    return (self._jit["step"] if num_steps == 1 else self._jit["steps"])(state, batch)

  def compile_counts(self) -> dict[str, int]:
    """Programs compiled so far per jitted step (a test checks each compiles once)."""
    return {name: fn._cache_size() for name, fn in self._jit.items()}  # noqa: SLF001

  def lower(self, batch: Mapping[str, jax.ShapeDtypeStruct]) -> Any:
    """The train step lowered for an abstract batch (shardings and memory, no weights)."""
    with self.mesh_context():
      return self._jit["step"].lower(self.abstract_state, batch)

  # ------------------------------------------------------------------ state
  def init_state(self, params: Any = None) -> TrainState:
    """Fresh state (sharded init), or fresh optimizer state around given `params`."""
    rng = jax.random.key(self.config.seed)
    with self.mesh_context():
      if params is None:
        return self._jit_init(rng)
      return self._jit_init_from(rng, params)

  def load_init_params(self) -> tuple[Any, dict[str, Any]]:
    """The `init_from` checkpoint's params as this run's model, on this mesh, with the
    parent's metadata. DPO's and PPO's frozen reference is exactly this.

    With LoRA the parent gives the base (a LoRA parent is merged first) and the adapters
    are fresh, B = 0: the params compute the parent's function."""
    lora_on = bool(self.model_cfg.lora_rank)
    params, meta = restore_lib.load_init_params(
        self.config.init_from, model_cfg=self.model_cfg, model_factory=self.model_factory,
        abstract_params=(lora.base_params(self.abstract_state.params) if lora_on else
                         self.abstract_state.params), runtime=self.runtime,
        adapter=self.init_adapter)
    if lora_on:
      with self.mesh_context():
        params = self._jit_add_adapters(jax.random.key(self.config.seed + 1), params)
    return params, meta

  def check_resume(self, meta: Mapping[str, Any], where: Any = None) -> None:
    """A checkpoint of this workdir must have this model and optimizer layout."""
    restore_lib.check_resume(meta, where or f"{self.workdir}/checkpoints", self.model_cfg,
                             self.config)

  def restore_or_init(self) -> tuple[TrainState, bytes | None]:
    """Resume, init_from or scratch (train/restore.py); returns (state, data state)."""
    self.open()
    start = restore_lib.restore_or_init(
        self.checkpointer, self.abstract_state, validate=self.check_resume,
        init_from=self.config.init_from, load_parent=self.load_init_params,
        init_state=self.init_state)
    self.parent = start.parent
    if self.model_cfg.lora_rank:
      # A cheap fingerprint of the frozen base (sum and sum of squares of every weight): a
      # checkpoint of this run names the exact base weights its adapters were trained on.
      frozen = jax.tree.leaves(self.split(start.state.params)[1])
      sums = jax.jit(lambda xs: jax.numpy.stack(
          [sum(jax.numpy.sum(x.astype("float32") ** p) for x in xs) for p in (1, 2)]))(frozen)
      total, squares = (float(v) for v in jax.device_get(sums))
      self.base_checksum = f"sum={total:.9g};sumsq={squares:.9g}"
    # Records past the starting step are re-done (and a run from scratch redoes them all).
    self.writer.truncate_after(int(jax.device_get(start.state.step)))
    return start.state, start.data_state

  # ------------------------------------------------------------------ checkpoints (Saver)
  def save(self, state: TrainState) -> None:
    self.open()
    step = int(jax.device_get(state.step))
    meta = {"stage": self.config.stage, "config": self.config.to_dict(),
            "model_config": self.model_cfg.to_dict(), "parent": self.parent,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "model_class": getattr(self.model_factory, "__name__", ""),
            "process_count": jax.process_count(), **self.extra_metadata}
    if self.model_cfg.lora_rank:
      meta["lora"] = self.lora_metadata()
    data_state = self.data_state_fn() if self.data_state_fn else None
    self.checkpointer.save(step, state.params,
                           {"opt_state": state.opt_state, "step": state.step, "rng": state.rng},
                           metadata=meta, tokenizer=self.tokenizer_bytes, data_state=data_state)

  def lora_metadata(self) -> dict[str, Any]:
    """What a LoRA checkpoint says about itself: adapter shape, and its base (the parent
    checkpoint or hf:<dir> it was initialised from, merged if that was a LoRA run)."""
    c = self.model_cfg
    lora_cfg = self.config.get("lora")
    return {"rank": c.lora_rank, "alpha": c.lora_alpha, "targets": c.lora_targets,
            "base_dtype": lora_cfg.base_dtype if lora_cfg is not None else "",
            "base": self.parent, "base_checksum": self.base_checksum}

  def wait(self) -> None:
    self.checkpointer.wait()

  def check(self) -> None:
    self.checkpointer.check()

  def latest(self) -> str:
    last = self.checkpointer.latest_step()
    return f"{self.checkpointer.directory}/{last}" if last is not None else "none saved yet"

  # ------------------------------------------------------------------ loop
  def add_hook(self, fn: Callable[[int, TrainState], None], every: int) -> None:
    """Calls fn(step, state) after every `every`-th step (and at the last step)."""
    if every > 0:
      self.hooks.append(Hook(every, fn))

  def evaluate(self, params: Any, batches: Iterable[Mapping[str, np.ndarray]]
               ) -> dict[str, float]:
    """Weighted means of the loss_fn metrics over all `batches` (e.g. a whole split)."""
    totals: dict[str, float] = collections.defaultdict(float)
    with self.mesh_context():
      for batch in batches:
        out = jax.device_get(self._jit["eval"](params, self.to_global(batch)))
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

  def predict(self, fn: Callable[[nnx.Module, Mapping[str, jax.Array]], Any], params: Any,
              rows: Mapping[str, np.ndarray], batch_size: int) -> Any:
    """Per-row outputs of `fn(model, batch)` over global `rows` (train/runtime.py)."""
    return self.runtime.apply(fn, params, rows, batch_size)

  def setup_throughput(self, tokens_per_step: int, seq_len: int,
                       output_projection: bool = True) -> None:
    """Sets what progress lines report: tokens per step and model FLOPs for MFU
    (`output_projection=False` for models without the vocabulary projection)."""
    peak = self.config.train.peak_flops
    if not peak:
      per_device = flops_lib.device_peak_flops()
      peak = (per_device * jax.device_count() if per_device else
              flops_lib.measure_matmul_peak() * jax.process_count())
    self.throughput = Throughput(
        tokens_per_step, flops_lib.flops_per_token(
            self.model_cfg, seq_len, output_projection=output_projection) * tokens_per_step,
        peak)

  def train(self, state: TrainState, batches: Iterator[Mapping[str, np.ndarray]]
            ) -> TrainState:
    """Runs steps until config.train.num_steps (or a preemption); returns the final state."""
    self.open()
    with self.mesh_context():
      result: LoopResult = run_loop(
          self.dispatch, self.stage, state, batches, num_steps=self.num_steps,
          train_cfg=self.config.train, hooks=self.hooks, saver=self, writer=self.writer,
          stop=self.preemption, throughput=self.throughput)
    self.run_stats, self.preempted = result.totals, result.preempted
    return result.state

  def fit(self, state: TrainState, batches: Iterator[Mapping[str, np.ndarray]]
          ) -> dict[str, float]:
    """Trains with SIGTERM/SIGINT saving installed, closes the checkpointer and writer
    whatever happens, and returns the run's `run/...` totals."""
    self.preemption.install()
    try:
      self.train(state, batches)
    except BaseException:
      # The run's own error is the one to report: closing must not replace it (e.g. a
      # failed save raises again when the checkpointer waits for it).
      self.preemption.uninstall()
      self.close(raise_errors=False)
      raise
    self.preemption.uninstall()
    self.close()
    return {f"run/{k}": v for k, v in self.run_stats.items()}

  def close(self, raise_errors: bool = True) -> None:
    """Waits for pending saves and closes the checkpointer and the writer."""
    try:
      if self.checkpointer is not None:
        self.checkpointer.close()
    except Exception:  # noqa: BLE001
      if raise_errors:
        raise
    finally:
      self.writer.close()

