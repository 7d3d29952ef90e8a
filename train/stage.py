"""The `Stage` spec and the one driver, `run_stage`, that every training entry point uses.

A stage module declares only what differs from the others and ends with

    STAGE = Stage("sft", programs=programs, build=build)
    if __name__ == "__main__":
      entry.launch(STAGE)

- `programs(config, model_cfg)` -> the stage's trainers as `Program`s: model factory, loss
  and the abstract batch of its batch contract (PPO: policy and value). `launch/shapes.py`
  compiles these without data or weights; `build` uses the same losses and factories.
- `build(config, workdir)` -> a `Run`: reads the parent checkpoint, the data and the
  tokenizer, builds the Trainer(s) (mesh and batch arithmetic are checked in the Trainer's
  constructor) and returns the data pipelines, the eval function and the hooks. It must
  not write anything.

`run_stage` then does the rest in one order, so no entry point repeats it:

  build (every input validated) -> refuse an incompatible checkpoint already in the
  workdir -> workdir writable -> config.json (+ files the stage asked for) -> open
  checkpointer and writer -> restore or init -> eval hook and the stage's hooks -> fit
  (preemption-safe) -> close -> results

A stage with its own outer loop (PPO) gives `Run.loop`, which runs on the same services
(`train.loop`: Preemption, finite check, saver, writer, progress).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterable, Mapping

import jax

from model.attention import describe
from model.config import ModelConfig
from model.layers import attention_options
from train import storage
from train.loop import Hook
from train.state import ModelFactory
from train.step import LossFn
from train.trainer import Trainer


@dataclasses.dataclass(frozen=True)
class Program:
  """One trainer of a stage: its config, model factory, loss and abstract batch."""
  name: str
  config: Any
  model_factory: ModelFactory
  loss_fn: LossFn
  batch: dict[str, jax.ShapeDtypeStruct]


@dataclasses.dataclass
class Run:
  """What a stage built from its config, before anything was written.

  Attributes:
    trainers: every Trainer of the run (resume compatibility is checked for each).
    train_iter: the training batches (iterable, with get_state / set_state) of `trainers[0]`.
    evaluate: params -> eval metrics on the whole validation set.
    summary: eval metrics -> the text of the "eval step N:" line.
    tokens_per_step, seq_len, output_projection: what the progress lines' tokens/s and
      MFU count.
    info: lines printed once the run is set up (data statistics, model size).
    stats: the data pipeline's counts (also in `info`), for callers and tests.
    files: extra files to write into the workdir with config.json (name -> bytes).
    eval_at_start: results key for an eval of the starting model (SFT: "base_loss").
    on_eval: called with (step, metrics) after each eval (e.g. the reward model's score
      normalisation at the last step, before the final save).
    hooks: more hooks (step, state), given the Trainer (e.g. SFT's samples).
    finish: results -> results, after the run (e.g. the reward normalisation figures).
    loop: replaces the Trainer loop (PPO's outer loop); returns the results.
  """
  trainers: list[Trainer]
  train_iter: Any = None
  evaluate: Callable[[Any], dict[str, float]] | None = None
  summary: Callable[[Mapping[str, float]], str] = lambda m: f"loss {m['loss']:.4f}"
  tokens_per_step: int = 0
  seq_len: int = 0
  output_projection: bool = True
  info: list[str] = dataclasses.field(default_factory=list)
  stats: dict[str, Any] = dataclasses.field(default_factory=dict)
  files: dict[str, bytes] = dataclasses.field(default_factory=dict)
  eval_at_start: str = ""
  on_eval: Callable[[int, dict[str, float]], None] | None = None
  hooks: list[Hook] = dataclasses.field(default_factory=list)
  finish: Callable[[dict[str, float]], dict[str, float]] | None = None
  loop: Callable[[], Any] | None = None


@dataclasses.dataclass(frozen=True)
class Stage:
  """A training stage: a name, its trainers' programs and how to build a run."""
  name: str
  programs: Callable[[Any, ModelConfig], list[Program]]
  build: Callable[[Any, str], Run]


def write_files(workdir: str, files: Mapping[str, bytes]) -> None:
  """Writes `files` (name -> bytes) into `workdir`, local or gs://."""
  import tensorflow as tf  # gfile: local paths and gs:// alike; heavy, so imported here
  tf.io.gfile.makedirs(workdir)
  for name, data in files.items():
    with tf.io.gfile.GFile(os.path.join(workdir, name), "wb") as f:
      f.write(data)


def refuse_incompatible_resume(trainer: Trainer) -> None:
  """A checkpoint already in the workdir must fit this run; checked before any write, so a
  refused run leaves the existing run's files (config.json included) as they were."""
  meta = trainer.existing_metadata()
  if meta is not None:
    trainer.check_resume(meta, meta["checkpoint_path"])


def write_run_files(run: Run, config: Any, workdir: str) -> None:
  """config.json (the resolved config) and the stage's own files, on process 0, once
  everything is validated."""
  storage.check_workdir(workdir)  # the write probe (credentials were checked at launch)
  if jax.process_index() == 0:
    text = json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)
    write_files(workdir, {"config.json": text.encode(), **run.files})


def attention_line(run: Run) -> str:
  """Which attention kernel the run's model executes, e.g. "attention: cudnn (fallback to
  xla: backend is cpu, cuDNN needs a GPU)" (model/attention.py)."""
  cfg = run.trainers[0].model_cfg
  return describe(attention_options(cfg), dtype=cfg.dtype, head_dim=cfg.resolved_head_dim,
                  seq_len=run.seq_len or None)


def run_stage(stage: Stage, config: Any, workdir: str) -> Any:
  """Builds, validates and runs one stage in `workdir` (module docstring); returns the
  final eval metrics plus the run's `run/*` totals (PPO: its per-iteration history)."""
  run = stage.build(config, workdir)
  for trainer in run.trainers:
    refuse_incompatible_resume(trainer)
  write_run_files(run, config, workdir)
  if jax.process_index() == 0:
    for line in [*run.info, attention_line(run)]:
      print(line, flush=True)
  if run.loop is not None:
    return run.loop()
  return fit_trainer(run, config)


def fit_trainer(run: Run, config: Any) -> dict[str, float]:
  """The Trainer path of `run_stage`: restore, hooks, fit, results."""
  trainer = run.trainers[0]
  state, data_state = trainer.restore_or_init()
  if data_state is not None:
    run.train_iter.set_state(data_state)
  trainer.data_state_fn = run.train_iter.get_state
  trainer.setup_throughput(run.tokens_per_step, run.seq_len, run.output_projection)
  results: dict[str, float] = {}

  def evaluate(step: int, params: Any) -> dict[str, float]:
    metrics = run.evaluate(params)
    if run.on_eval is not None:
      run.on_eval(step, metrics)
    trainer.log_eval(step, metrics, run.summary(metrics))
    return metrics

  if run.evaluate is not None:
    if run.eval_at_start and data_state is None and int(jax.device_get(state.step)) == 0:
      results[run.eval_at_start] = evaluate(0, state.params)["loss"]
    trainer.add_hook(lambda step, state: results.update(evaluate(step, state.params)),
                     every=config.train.eval_every or config.train.num_steps)
  for hook in run.hooks:
    trainer.add_hook(hook.fn, hook.every)
  results.update(trainer.fit(state, iter(run.train_iter)))
  if trainer.preempted:
    results["preempted"] = 1.0
  return run.finish(results) if run.finish else results


def evaluate_on(trainer: Trainer, val_set: Callable[[int], Iterable], batch_size: int
                ) -> Callable[[Any], dict[str, float]]:
  """params -> the trainer's weighted eval metrics over one pass of `val_set(batch_size)`."""
  return lambda params: trainer.evaluate(params, val_set(batch_size))
