"""Trainable parameters and optimizer-state bytes: full fine-tuning vs LoRA, Qwen2.5-0.5B shape.

  python benchmarks/lora_memory.py [--rank=8] [--targets=attn,mlp] [--compile]

The shape is Qwen2.5-0.5B's (vocab 151936, hidden 896, 24 layers, 14 query / 2 kv heads of
64, SwiGLU 4864, tied embeddings, q/k/v biases: the `qwen2_5_0_5b` preset, 494,032,768
parameters as published). Everything is abstract: the
Trainer is built with workdir=None, and its state comes from `jax.eval_shape` of the
sharded init, so nothing is allocated. `--compile` also compiles one SFT train step (batch
1 x 256, one CPU device) for each and prints XLA's memory analysis (arguments, outputs,
temporaries), which shows the gradients too. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from configs import common  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from train.losses import lm_loss  # noqa: E402
from train.parent import lora_fields  # noqa: E402
from train.pretrain import lm_batch  # noqa: E402
from train.trainer import Trainer  # noqa: E402

# Qwen2.5-0.5B's real shape (the preset: q/k/v biases, tied embeddings), scanned layers.
QWEN25_05B = ModelConfig.preset("qwen2_5_0_5b", scan_layers=True).to_dict()


def _bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def measure(rank: int, targets: str, base_dtype: str, compile_step: bool) -> dict:
  """Abstract trainable-parameter count and optimizer-state bytes (and compiled memory)."""
  config = common.finetune_config("sft", "")
  config.lora = common.lora_config(rank=rank, targets=targets, base_dtype=base_dtype)
  config.train.batch_size = config.train.eval_batch_size = 1
  config.mesh = common.mesh_config(data=1)
  model_cfg = ModelConfig(**QWEN25_05B).replace(**lora_fields(config.lora))
  trainer = Trainer(config, None, model_cfg, lm_loss, devices=jax.devices()[:1])
  params = trainer.abstract_state.params
  trained = trainer.split(params)[0]
  out = {"trainable_params": sum(x.size for x in jax.tree.leaves(trained)),
         "total_params": sum(x.size for x in jax.tree.leaves(params)),
         "param_bytes": _bytes(params),
         "opt_state_bytes": _bytes(trainer.abstract_state.opt_state)}
  if compile_step:
    mem = trainer.lower(lm_batch(1, 256)).compile().memory_analysis()
    out.update(step_argument_bytes=mem.argument_size_in_bytes,
               step_temp_bytes=mem.temp_size_in_bytes)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rank", type=int, default=8)
  parser.add_argument("--targets", default="attn,mlp")
  parser.add_argument("--base_dtype", default="bfloat16")
  parser.add_argument("--compile", action="store_true")
  args = parser.parse_args()
  full = measure(0, args.targets, "", args.compile)
  low = measure(args.rank, args.targets, args.base_dtype, args.compile)
  print(f"Qwen2.5-0.5B shape (preset qwen2_5_0_5b): {full['total_params']:,} parameters")
  for name, m in (("full fine-tuning", full),
                  (f"LoRA r={args.rank} {args.targets}, base {args.base_dtype or 'f32'}", low)):
    line = (f"{name:>40}: trainable {m['trainable_params']:>12,} | params "
            f"{m['param_bytes'] / 2**20:8.1f} MiB | optimizer state "
            f"{m['opt_state_bytes'] / 2**20:8.1f} MiB")
    if args.compile:
      line += (f" | step arguments {m['step_argument_bytes'] / 2**20:8.1f} MiB, temporaries "
               f"{m['step_temp_bytes'] / 2**20:8.1f} MiB")
    print(line)
  ratio = low["opt_state_bytes"] / full["opt_state_bytes"]
  print(f"LoRA optimizer state / full: {ratio:.4%} (acceptance: <= 2%)")
  print(json.dumps({"full_trainable_params": full["trainable_params"],
                    "lora_trainable_params": low["trainable_params"],
                    "full_opt_state_bytes": full["opt_state_bytes"],
                    "lora_opt_state_bytes": low["opt_state_bytes"],
                    "full_param_bytes": full["param_bytes"],
                    "lora_param_bytes": low["param_bytes"],
                    "rank": args.rank, "targets": args.targets, "ratio": ratio}))


if __name__ == "__main__":
  main()
