"""Benchmark: our harness against EleutherAI's lm-evaluation-harness, item by item.

  pip install -e ".[parity]"     # lm-eval and accelerate (beside the test extra)
  python benchmarks/lm_eval_parity.py --checkpoint=runs/chain/base --hellaswag_items=500

1. exports the checkpoint to a Hugging Face LlamaForCausalLM directory (train/hf_convert.py);
2. writes lm-eval task YAMLs over the shared HellaSwag and ARC-Easy files
   (`dataset_path: json` + `data_files`, the prompt formats of data/benchmarks.py:
   eval/lm_eval_tasks.py, shared with the lmlife adapter's parity checks);
3. runs `lm_eval --model hf` on CPU in float32, offline (HF_DATASETS_OFFLINE=1,
   HF_HUB_OFFLINE=1, --include_path), with --log_samples: HellaSwag's first
   `--hellaswag_items` items (--limit) and all of ARC-Easy (or `--arc_items`);
4. scores the same items with eval.run (our checkpoint, our JAX model and tokenizer);
5. compares every (item, choice) log-likelihood and the acc / acc_norm aggregates.
Last line: one JSON object with `items`, `max_abs_loglik_diff`, `acc_ours`, `acc_lm_eval`,
`acc_norm_ours`, `acc_norm_lm_eval` (over both tasks; per task beside them).
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from lm_eval_hf import run_lm_eval_hf  # noqa: E402  (benchmarks/, beside this script)

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", "runs/chain/base", "Language-model checkpoint.")
flags.DEFINE_string("out", "runs/lm_eval_parity", "Work directory.")
flags.DEFINE_integer("hellaswag_items", 500, "HellaSwag items (the shared file's first).")
flags.DEFINE_integer("arc_items", 0, "ARC-Easy items (the file's first; 0 = all).")
flags.DEFINE_integer("batch_size", 16, "Batch size of both harnesses.")

TASKS = ("hellaswag", "arc_easy")  # lm-eval task names: eval.lm_eval_tasks.MC_TASKS


def run_lm_eval(hf_dir: str, out: str, task: str, limit: int) -> list[dict]:
  """lm-eval's per-sample records of one task (its --log_samples file)."""
  from eval.lm_eval_tasks import MC_TASKS
  name = MC_TASKS[task][0]
  try:
    _, samples = run_lm_eval_hf(hf_dir, out, [name], os.path.join(out, "tasks"),
                                batch_size=FLAGS.batch_size, log_name=f"lm_eval_{task}.log",
                                limit=limit)
  except RuntimeError as e:
    sys.exit(str(e))
  return samples[name]


def main(argv):
  del argv
  import numpy as np
  from absl import logging
  logging.set_verbosity(logging.ERROR)
  from data import benchmarks as tasks_lib
  from eval.loading import load_checkpoint
  from eval.loglik import LoglikScorer
  from eval.lm_tasks import score_multiple_choice
  from eval.lm_eval_tasks import write_task_yamls
  from train.hf_convert import export_checkpoint
  out = os.path.abspath(FLAGS.out)
  os.makedirs(os.path.join(out, "tasks"), exist_ok=True)
  hf_dir = os.path.join(out, "hf_model")
  export_checkpoint(FLAGS.checkpoint, hf_dir)
  write_task_yamls(os.path.join(out, "tasks"))
  limits = {"hellaswag": FLAGS.hellaswag_items, "arc_easy": FLAGS.arc_items}
  start = time.perf_counter()
  theirs = {task: run_lm_eval(hf_dir, out, task, limits[task]) for task in TASKS}
  lm_eval_s = time.perf_counter() - start
  loaded = load_checkpoint(FLAGS.checkpoint)
  scorer = LoglikScorer(loaded, FLAGS.batch_size)
  summary, diffs, totals = {}, [], {"acc": [[], []], "acc_norm": [[], []]}
  start = time.perf_counter()
  for task in TASKS:
    items = tasks_lib.MC_READERS[task](tasks_lib.task_path(task))[:limits[task] or None]
    ours_summary, ours = score_multiple_choice(scorer, task, items)
    if len(ours) != len(theirs[task]):
      sys.exit(f"{task}: {len(ours)} items here, {len(theirs[task])} in lm-eval")
    task_diffs = []
    for mine, other in zip(ours, theirs[task]):
      lls = [float(r[0]) for r in other["filtered_resps"]]
      task_diffs.append(np.max(np.abs(np.asarray(mine["loglik"]) - lls)))
      for metric in ("acc", "acc_norm"):
        totals[metric][0].append(mine[metric])
        totals[metric][1].append(float(other[metric]))
    diffs.extend(task_diffs)
    ours_acc = [r["acc"] for r in ours]
    summary[task] = {
        "items": len(ours), "max_abs_loglik_diff": float(np.max(task_diffs)),
        "acc_ours": float(np.mean(ours_acc)),
        "acc_lm_eval": float(np.mean([float(o["acc"]) for o in theirs[task]])),
        "acc_norm_ours": float(np.mean([r["acc_norm"] for r in ours])),
        "acc_norm_lm_eval": float(np.mean([float(o["acc_norm"]) for o in theirs[task]])),
        "items_with_different_acc": int(sum(
            r["acc"] != float(o["acc"]) for r, o in zip(ours, theirs[task]))),
        "items_with_different_acc_norm": int(sum(
            r["acc_norm"] != float(o["acc_norm"]) for r, o in zip(ours, theirs[task]))),
    }
    print(f"{task}: {summary[task]}", flush=True)
  result = {
      "items": len(diffs), "max_abs_loglik_diff": float(np.max(diffs)),
      "acc_ours": float(np.mean(totals["acc"][0])),
      "acc_lm_eval": float(np.mean(totals["acc"][1])),
      "acc_norm_ours": float(np.mean(totals["acc_norm"][0])),
      "acc_norm_lm_eval": float(np.mean(totals["acc_norm"][1])),
      **{f"{task}_{k}": v for task, s in summary.items() for k, v in s.items()},
      "lm_eval_seconds": round(lm_eval_s, 1),
      "ours_seconds": round(time.perf_counter() - start, 1),
  }
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
