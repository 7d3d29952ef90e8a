"""Benchmark: the whole chain to a reward model on the shared HH pairs, and its accuracy.

  python benchmarks/reward_hh.py --root=runs/chain

runs, each stage only if `<root>/<stage>` has not finished it yet:
  python -m train.pretrain --config=configs/pretrain/english_bpe.py --workdir=<root>/base
  python -m train.sft --config=configs/sft/chat.py --workdir=<root>/sft \
      --config.init_from=<root>/base
  python -m rlhf.reward --config=configs/reward/hh.py --workdir=<root>/rm \
      --config.init_from=<root>/sft
  python -m eval.reward --checkpoint=<root>/rm --split=val

then reports the reward model's accuracy on the held-out 10% of the HH prompts with a
bootstrap 95% interval and the "longer wins" / "shorter wins" baselines on the same pairs.
Stage wall times are kept in `<root>/minutes.json` (summed over attempts, so a chain
interrupted and resumed still counts every minute it ran); `minutes` is pretraining + SFT
+ reward model. `--stages` limits what may run (e.g. `--stages=rm` to retrain only the
reward model after changing its config; earlier stages must then exist).
Last line: one JSON object with `val_accuracy`, `ci_low`, `ci_high`, `longer_baseline`,
`shorter_baseline`, `minutes` (and the per-stage minutes).
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

FLAGS = flags.FLAGS
flags.DEFINE_string("root", "runs/chain", "Directory holding the base, sft and rm workdirs.")
flags.DEFINE_list("stages", ["base", "sft", "rm"], "Stages that may run if unfinished.")
flags.DEFINE_multi_string("rm_flag", [], "Extra flags for the reward-model run.")

STAGES = {
    "base": ("train.pretrain", "configs/pretrain/english_bpe.py", None),
    "sft": ("train.sft", "configs/sft/chat.py", "base"),
    "rm": ("rlhf.reward", "configs/reward/hh.py", "sft"),
}


def main(argv):
  del argv
  from launch.stages import Chain, run_json
  chain = Chain(FLAGS.root)
  for name, (module, config, parent) in STAGES.items():
    cmd = ["-m", module, f"--config={config}", f"--workdir={chain.workdir(name)}"]
    if parent:
      cmd.append(f"--config.init_from={chain.workdir(parent)}")
    chain.ensure(name, cmd + (FLAGS.rm_flag if name == "rm" else []),
                 allowed=name in FLAGS.stages)
  start = time.perf_counter()
  result = run_json(["-m", "eval.reward", f"--checkpoint={chain.workdir('rm')}",
                     "--split=val"])
  minutes = chain.minutes
  train_minutes = [minutes.get(name) for name in STAGES]
  summary = {
      "val_accuracy": round(result["accuracy"], 4),
      "ci_low": round(result["ci_low"], 4), "ci_high": round(result["ci_high"], 4),
      "longer_baseline": round(result["longer_baseline"], 4),
      "shorter_baseline": round(result["shorter_baseline"], 4),
      "minutes": (round(sum(train_minutes), 1) if None not in train_minutes else None),
      **{f"minutes_{name}": round(minutes[name], 1) for name in STAGES if name in minutes},
      "eval_minutes": round((time.perf_counter() - start) / 60, 2),
      "num_val_pairs": result["num_pairs"],
  }
  print(json.dumps(summary))


if __name__ == "__main__":
  app.run(main)
