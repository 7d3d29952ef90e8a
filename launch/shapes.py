"""A run config's train step(s), compiled abstractly: shardings and memory without weights.

  python -m launch.shapes --config=configs/pretrain/llama3_8b.py [--devices=8] \
      [--mesh=data=2,fsdp=2,tensor=2] [--parent=configs/pretrain/english_bpe.py]

For each trainer a stage declares (its `Stage.programs`: pretrain, SFT, reward model, DPO:
one; PPO: the policy and the value model), the real `Trainer` is constructed without a workdir, so its parameters and
optimizer state exist only as `jax.eval_shape` structures; its jitted train step is lowered
with abstract batches of the stage's batch contract (global batch = config.train.batch_size /
grad_accum_steps rows) and compiled for the mesh. Nothing the size of the model is ever
allocated, so the 1B and 8B configs compile on a laptop's 8 fake CPU devices. Reported per
trainer: every parameter's PartitionSpec, the optimizer state's per-device bytes, and XLA's
per-device memory estimate of the step (arguments, outputs, temporaries).

`tests/test_golden_shardings.py` compares these against the golden files in
`tests/golden/shardings/`. The CLI prints them for any config and mesh, e.g. to see whether a
config fits a device before launching it on a pod.

Fine-tuning stages take their architecture from `init_from`: here it comes from a parent
config (`--parent`, default configs/pretrain/english_bpe.py, the base model of the shared
SFT / RM / DPO / PPO configs), with its vocabulary resolved as the tokenizer would.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from typing import Any, Mapping

import jax
import numpy as np
from absl import app, flags
from flax import traverse_util

from data.chat import CHAT_MARKERS
from launch.overrides import load_config
from model.config import ModelConfig
from rlhf import dpo, ppo, reward
from train import pretrain, sft
from train.parent import child_model_config
from train.stage import Program, Stage
from train.trainer import Trainer

DEFAULT_PARENT = "configs/pretrain/english_bpe.py"
CHAR_VOCAB = 65  # tiny Shakespeare's characters (the char tokenizer's vocabulary)
STAGES: dict[str, Stage] = {s.name: s for s in (pretrain.STAGE, sft.STAGE, reward.STAGE,
                                                dpo.STAGE, ppo.STAGE)}


def resolved_vocab(config: Any) -> int:
  """The vocabulary a pretraining run would get: the explicit one, or the tokenizer's."""
  if config.model.vocab_size:
    return int(config.model.vocab_size)
  tok = config.data.tokenizer
  return CHAR_VOCAB if tok.model_type == "char" else int(tok.vocab_size)


def model_config(config: Any, parent: Any | None = None) -> ModelConfig:
  """The ModelConfig a run of `config` trains (fine-tuning: the parent's + overrides)."""
  if "vocab_size" in config.model:
    return ModelConfig.from_dict({**config.model.to_dict(), "vocab_size": resolved_vocab(config)})
  if parent is None:
    raise ValueError(f"Stage {config.stage!r} takes its model from init_from; give a parent "
                     "pretraining config")
  parent_cfg = model_config(parent)
  reserved = set(str(parent.data.tokenizer.get("user_defined_symbols", "")).split(","))
  vocab = parent_cfg.vocab_size + sum(m not in reserved for m in CHAT_MARKERS)
  return child_model_config(parent_cfg, config.model, vocab, lora_cfg=config.get("lora"))


def programs(config: Any, model_cfg: ModelConfig) -> list[Program]:
  """The trainers of `config.stage`, as its Stage declares them."""
  if config.stage not in STAGES:
    raise ValueError(f"Unknown stage {config.stage!r}; known: {sorted(STAGES)}")
  if config.stage == "ppo":
    config = copy.deepcopy(config)
    ppo._check(config)  # noqa: SLF001 - the trainers' batch size and step count
  return STAGES[config.stage].programs(config, model_cfg)


def _nbytes(tree: Any) -> int:
  """Per-device bytes of a tree of sharded ShapeDtypeStructs (the largest shard)."""
  total = 0
  for x in jax.tree.leaves(tree):
    shard = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    total += int(np.prod(shard, dtype=np.int64)) * x.dtype.itemsize
  return total


def compile_program(program: Program, model_cfg: Any, devices: list[Any]) -> dict[str, Any]:
  """Lowers and compiles `program`'s train step on `devices`; returns its shardings and
  memory figures (per device, bytes)."""
  trainer = Trainer(program.config, None, model_cfg, program.loss_fn,
                    model_factory=program.model_factory, devices=devices)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=trainer.batch_sharding)
           for k, v in program.batch.items()}
  compiled = trainer.lower(batch).compile()
  flat = {"/".join(map(str, k)): v
          for k, v in traverse_util.flatten_dict(trainer.abstract_state.params).items()}
  params = {path: str(tuple(x.sharding.spec)) for path, x in sorted(flat.items())}
  mem = compiled.memory_analysis()
  figures = {"argument_bytes": int(mem.argument_size_in_bytes),
             "output_bytes": int(mem.output_size_in_bytes),
             "alias_bytes": int(mem.alias_size_in_bytes),
             "temp_bytes": int(mem.temp_size_in_bytes)}
  return {"mesh": {k: int(v) for k, v in trainer.mesh.shape.items()},
          "params": params,
          "param_count": int(sum(np.prod(x.shape) for x in flat.values())),
          "param_bytes_per_device": _nbytes(trainer.abstract_state.params),
          "opt_state_bytes_per_device": _nbytes(trainer.abstract_state.opt_state),
          "memory": figures}


def report(config: Any, devices: list[Any], parent: Any | None = None,
           mesh: Mapping[str, int] | None = None) -> dict[str, Any]:
  """{program name: compile_program(...)} for `config` on `devices` (mesh: override of the
  config's mesh shape; sharded meshes get flatten_update=False, which needs replicated
  parameters)."""
  config = copy.deepcopy(config)
  with config.unlocked():
    if mesh is not None:
      config.mesh.shape.update(dict(mesh))
    sharded = config.mesh.shape.fsdp != 1 or config.mesh.shape.tensor != 1
    for section in ("optim", "value_optim"):
      if section in config and sharded:
        config[section].flatten_update = False
  model_cfg = model_config(config, parent)
  return {p.name: compile_program(p, model_cfg, devices) for p in programs(config, model_cfg)}


def main(argv) -> None:
  del argv
  flags_ = flags.FLAGS
  config = load_config(flags_.config)
  parent = None if "vocab_size" in config.model else load_config(flags_.parent)
  mesh = None
  if flags_.mesh:
    mesh = {k: int(v) for k, v in (item.split("=") for item in flags_.mesh.split(","))}
  devices = jax.devices()[:flags_.devices] if flags_.devices else jax.devices()
  out = report(config, devices, parent, mesh)
  for name, r in out.items():
    print(f"{name}: mesh {r['mesh']}, {r['param_count']:,} parameters")
    for path, spec in r["params"].items():
      print(f"  {path:50s} {spec}")
    gib = lambda x: f"{x / 2**30:.3f} GiB"  # noqa: E731
    print(f"  per device: params {gib(r['param_bytes_per_device'])}, optimizer state "
          f"{gib(r['opt_state_bytes_per_device'])}, step arguments "
          f"{gib(r['memory']['argument_bytes'])}, temporaries {gib(r['memory']['temp_bytes'])}")
  print(json.dumps({name: {"mesh": r["mesh"], **r["memory"]} for name, r in out.items()}))


if __name__ == "__main__":
  flags.DEFINE_string("config", None, "Run config (configs/...py[:arg]).", required=True)
  flags.DEFINE_string("parent", DEFAULT_PARENT, "Pretraining config of a fine-tuning stage's "
                      "model.")
  flags.DEFINE_integer("devices", 8, "Fake CPU devices (0 = every device JAX sees).")
  flags.DEFINE_string("mesh", "", "Mesh override, e.g. data=2,fsdp=2,tensor=2.")
  if "--devices=0" not in sys.argv and "XLA_FLAGS" not in os.environ:
    n = next((a.split("=")[1] for a in sys.argv if a.startswith("--devices=")), "8")
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  app.run(main)
