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
import subprocess
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


def finished(workdir: str) -> bool:
  """True when the run's last configured step is checkpointed."""
  from train import checkpoint as ckpt_lib
  try:
    meta = ckpt_lib.read_metadata(workdir)
  except Exception:  # noqa: BLE001 - no (readable) checkpoint yet
    return False
  return meta["step"] >= meta["config"]["train"]["num_steps"]


def run_stage(name: str, root: str, minutes: dict) -> None:
  module, config, parent = STAGES[name]
  workdir = os.path.join(root, name)
  cmd = [sys.executable, "-m", module, f"--config={config}", f"--workdir={workdir}"]
  if parent:
    cmd.append(f"--config.init_from={os.path.join(root, parent)}")
  if name == "rm":
    cmd += FLAGS.rm_flag
  print("$ " + " ".join(cmd), flush=True)
  start = time.perf_counter()
  with open(os.path.join(root, f"{name}.log"), "a") as log:
    rc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
  minutes[name] = minutes.get(name, 0.0) + (time.perf_counter() - start) / 60
  with open(os.path.join(root, "minutes.json"), "w") as f:
    json.dump(minutes, f, indent=1)
  if rc != 0:
    sys.exit(f"{name} failed (rc={rc}); see {os.path.join(root, name + '.log')}")
  print(f"{name}: done, {minutes[name]:.1f} min in all", flush=True)


def main(argv):
  del argv
  root = os.path.abspath(FLAGS.root)
  os.makedirs(root, exist_ok=True)
  path = os.path.join(root, "minutes.json")
  minutes = json.load(open(path)) if os.path.exists(path) else {}
  for name in STAGES:
    if finished(os.path.join(root, name)):
      print(f"{name}: finished ({minutes.get(name, float('nan')):.1f} min recorded)")
    elif name in FLAGS.stages:
      run_stage(name, root, minutes)
    else:
      sys.exit(f"{name} is not finished in {root} and --stages={FLAGS.stages} excludes it")
  start = time.perf_counter()
  out = subprocess.run([sys.executable, "-m", "eval.reward",
                        f"--checkpoint={os.path.join(root, 'rm')}", "--split=val"],
                       cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  print(out.stdout.strip())
  if out.returncode != 0:
    sys.exit("eval.reward failed")
  result = json.loads(out.stdout.strip().splitlines()[-1])
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
