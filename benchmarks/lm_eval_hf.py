"""`lm_eval --model hf` on an exported model, offline, for the parity benchmarks
(benchmarks/lm_eval_parity.py, benchmarks/safety_lm_eval.py).

  results, samples = run_lm_eval_hf(hf_dir, out, ["lmlife_crows_pairs"], "tasks_dir",
                                    batch_size=16, log_name="lm_eval.log")

Runs lm-eval's own command line in a subprocess (CPU, float32, HF_DATASETS_OFFLINE /
HF_HUB_OFFLINE, --include_path, --log_samples), keeps its output in `<out>/<log_name>`, and
returns lm-eval's aggregates per task (`results_*.json`) and its per-sample records per task
(`samples_<task>_*.jsonl`, sorted by doc_id), the newest files of each.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys


def _newest(out: str, pattern: str) -> str:
  files = sorted(glob.glob(os.path.join(out, "lm_eval", "**", pattern), recursive=True),
                 key=os.path.getmtime)
  if not files:
    raise RuntimeError(f"lm_eval wrote no {pattern} under {out}/lm_eval")
  return files[-1]


def run_lm_eval_hf(hf_dir: str, out: str, tasks: list[str], include_path: str, *,
                   batch_size: int, log_name: str, model_args: str = "", limit: int = 0
                   ) -> tuple[dict[str, dict], dict[str, list[dict]]]:
  """(lm-eval's aggregates per task, its per-sample records per task); module doc.

  Raises:
    RuntimeError: lm_eval failed (the log's tail in the message) or wrote no results.
  """
  env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
             TOKENIZERS_PARALLELISM="false")
  cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
         f"pretrained={hf_dir},dtype=float32" + (f",{model_args}" if model_args else ""),
         "--tasks", ",".join(tasks), "--include_path", include_path,
         "--batch_size", str(batch_size), "--device", "cpu", "--log_samples",
         "--output_path", os.path.join(out, "lm_eval")]
  if limit:
    cmd += ["--limit", str(limit)]
  print("$ " + " ".join(cmd), flush=True)
  run = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True)
  with open(os.path.join(out, log_name), "w") as f:
    f.write(run.stdout)
  if run.returncode != 0:
    hint = (" (lm-eval refuses a continuation longer than the model's context: score fewer "
            "items or use a model with a longer context)"
            if "len(continuation_enc) <= self.max_length" in run.stdout else "")
    raise RuntimeError(f"lm_eval failed (rc={run.returncode}){hint}; see {out}/{log_name}:\n"
                       + run.stdout[-3000:])
  with open(_newest(out, "results_*.json")) as f:
    results = json.load(f)["results"]
  samples = {}
  for name in tasks:
    with open(_newest(out, f"samples_{name}_*.jsonl")) as f:
      samples[name] = sorted((json.loads(line) for line in f), key=lambda r: r["doc_id"])
  return results, samples
