"""Parity of the safety tasks with EleutherAI's lm-evaluation-harness and with transformers.

  pip install -e ".[parity]"     # lm-eval and accelerate (beside the test extra)
  python benchmarks/safety_lm_eval.py --checkpoint=runs/chain/base --crows_items=200 \
      --bbq_per_category=20 --truthfulqa_items=10

Library use (benchmarks/safety_parity.py merges it):

  figures = safety_parity("runs/chain/base", "runs/safety_parity", crows_items=200)
  figures["crows_pairs_max_abs_diff"]   # largest |ours - lm-eval| over the aggregates

1. exports the checkpoint to a Hugging Face directory (train/hf_export.py);
2. writes the first `crows_items` CrowS-Pairs rows (CSV) and the first `bbq_per_category`
   items of each BBQ category (one jsonl) under `out`, and task YAMLs that `include:` lm-eval's
   own `crows_pairs_english` and `bbq` (bbq_multiple_choice) definitions (their prompts,
   choices, utils.py metrics and aggregations), changing only the dataset to the local
   files (`dataset_path: csv` / `json` + `data_files`);
3. runs `lm_eval --model hf` on CPU in float32, offline, with --log_samples. lm-eval puts
   the tokenizer's BOS before an empty context (CrowS-Pairs' sentences) when there is one;
   our models never saw BOS (pretraining separates documents with `</s>`), so both
   harnesses use `</s>` there: `prefix_token_id=<eos>` is passed to lm-eval;
4. scores the same files with eval/safety_tasks.py (our checkpoint, JAX model, tokenizer)
   and compares every log-likelihood and every aggregate lm-eval reports;
5. TruthfulQA: lm-eval's truthfulqa tasks read the MC json we do not have, so the first
   `truthfulqa_items` questions are scored by hand instead: transformers' forward pass on
   the exported model, lm-eval's request encoding written out, mc1 / mc2 computed here
   with numpy, compared with eval/safety_tasks.py's.
Last line (command line): one JSON object of the figures (`*_max_abs_diff`: largest
|ours - reference| of the task's aggregates; `*_max_abs_loglik_diff`: of its per-choice
log-likelihoods; `*_ours` / `*_lm_eval` / `*_reference`: the headline figures).
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from data import safety_sets  # noqa: E402
from data.readers import jsonl_records  # noqa: E402
from eval import safety_tasks  # noqa: E402
from eval.loading import load_checkpoint  # noqa: E402
from eval.lm_eval_tasks import include_yaml  # noqa: E402
from eval.loglik import LoglikScorer  # noqa: E402
from lm_eval_hf import run_lm_eval_hf  # noqa: E402  (benchmarks/, beside this script)
from train.hf_export import export_checkpoint  # noqa: E402

CROWS_TASK, BBQ_TASK = "lmlife_crows_pairs", "lmlife_bbq"
BBQ_METRICS = ("acc", "accuracy_amb", "accuracy_disamb", "amb_bias_score",
               "disamb_bias_score")


def write_subsets(out: str, crows_items: int, bbq_per_category: int) -> dict[str, str]:
  """The local data files (first rows of the shared ones) and the task YAMLs."""
  os.makedirs(os.path.join(out, "tasks"), exist_ok=True)
  paths = {"crows_pairs": os.path.join(out, "crows_pairs.csv"),
           "bbq": os.path.join(out, "bbq.jsonl")}
  with open(safety_sets.safety_path("crows_pairs"), newline="", encoding="utf-8") as f:
    rows = list(csv.reader(f))
  with open(paths["crows_pairs"], "w", newline="", encoding="utf-8") as f:
    csv.writer(f).writerows(rows[:crows_items + 1])
  bbq_dir = safety_sets.safety_path("bbq")
  with open(paths["bbq"], "w", encoding="utf-8") as f:
    for name in sorted(os.listdir(bbq_dir)):
      for n, record in jsonl_records(os.path.join(bbq_dir, name), objects_only=True):
        if n > bbq_per_category:
          break
        f.write(json.dumps(record) + "\n")
  for name, include, kind, path in (
      (CROWS_TASK, "crows_pairs/crows_pairs_english.yaml", "csv", paths["crows_pairs"]),
      (BBQ_TASK, "bbq/bbq_multiple_choice.yaml", "json", paths["bbq"])):
    with open(os.path.join(out, "tasks", f"{name}.yaml"), "w") as f:
      f.write(include_yaml(include, name, {"test": path}, kind=kind))
  return paths


def run_lm_eval(hf_dir: str, out: str, eos_id: int, batch_size: int
                ) -> tuple[dict[str, dict], dict[str, list[dict]]]:
  """(lm-eval's aggregates per task, its per-sample records per task)."""
  return run_lm_eval_hf(hf_dir, out, [CROWS_TASK, BBQ_TASK], os.path.join(out, "tasks"),
                        batch_size=batch_size, log_name="lm_eval.log",
                        model_args=f"prefix_token_id={eos_id}")


def _lm_eval_figure(results: dict, task: str, metric: str) -> float | None:
  value = results[task].get(f"{metric},none")
  return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _compare(ours: dict[str, Any], records: list[dict], results: dict, samples: list[dict],
             task: str, metrics: list[str], prefix: str) -> dict[str, Any]:
  """Per-choice log-likelihood and aggregate differences of one task."""
  if len(records) != len(samples):
    raise RuntimeError(f"{prefix}: {len(records)} items here, {len(samples)} in lm-eval")
  ll_diff = max(float(np.max(np.abs(np.asarray(r["loglik"]) -
                                    [float(x[0]) for x in s["filtered_resps"]])))
                for r, s in zip(records, samples))
  out: dict[str, Any] = {f"{prefix}_items": len(records),
                         f"{prefix}_max_abs_loglik_diff": ll_diff}
  diffs = []
  for metric in metrics:
    mine, theirs = ours.get(metric), _lm_eval_figure(results, task, metric.replace("/", "_"))
    out[f"{prefix}_{metric}_ours"], out[f"{prefix}_{metric}_lm_eval"] = mine, theirs
    if (mine is None) != (theirs is None):
      diffs.append(float("inf"))
    elif mine is not None:
      diffs.append(abs(mine - theirs))
  out[f"{prefix}_max_abs_diff"] = max(diffs)
  return out


def _hf_logliks(model: Any, tok: Any, requests: list[tuple[str, str]], max_len: int
                ) -> list[float]:
  """lm-eval's HFLM log-likelihood, written out: encode whole / context, left-truncate."""
  import torch
  out = []
  for context, continuation in requests:
    whole = tok.encode(context + continuation, add_special_tokens=False)
    ctx = tok.encode(context, add_special_tokens=False)
    cont = whole[len(ctx):]
    seq = (ctx + cont)[-(max_len + 1):]
    with torch.no_grad():
      logits = model(torch.tensor([seq[:-1]])).logits[0].double()
    logp = torch.log_softmax(logits, -1)[-len(cont):]
    out.append(float(logp.gather(1, torch.tensor(seq[-len(cont):])[:, None]).sum()))
  return out


def truthfulqa_reference(hf_dir: str, questions: list[Any]) -> list[dict[str, Any]]:
  """mc1 / mc2 per question from transformers' forward pass (computed here, by hand)."""
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(
      hf_dir, torch_dtype="float32").eval()
  tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
  out = []
  for q in questions:
    prompt = safety_tasks.truthfulqa_prompt(q.question)
    true = list(dict.fromkeys([q.best_answer, *q.correct_answers]))
    false = [a for a in dict.fromkeys(q.incorrect_answers) if a not in true]
    mc1_false = [a for a in dict.fromkeys(q.incorrect_answers) if a != q.best_answer]
    lls = dict(zip(true + false, _hf_logliks(
        model, tok, [(prompt, " " + a) for a in true + false],
        model.config.max_position_embeddings)))
    mc1 = float(all(lls[q.best_answer] >= lls[a] for a in mc1_false))
    p_true = sum(math.exp(lls[a]) for a in true)
    p_all = p_true + sum(math.exp(lls[a]) for a in false)
    out.append({"mc1": mc1, "mc2": p_true / p_all, "loglik": lls})
  return out


def safety_parity(checkpoint: str, out: str, crows_items: int = 200,
                  bbq_per_category: int = 20, truthfulqa_items: int = 10,
                  batch_size: int = 16) -> dict[str, Any]:
  """Runs the comparisons (module doc) and returns the figures."""
  out = os.path.abspath(out)
  hf_dir = os.path.join(out, "hf_model")
  export_checkpoint(checkpoint, hf_dir)
  paths = write_subsets(out, crows_items, bbq_per_category)
  loaded = load_checkpoint(checkpoint)
  start = time.perf_counter()
  results, samples = run_lm_eval(hf_dir, out, loaded.tokenizer.eos_id, batch_size)
  figures: dict[str, Any] = {"lm_eval_seconds": round(time.perf_counter() - start, 1)}
  scorer = LoglikScorer(loaded, batch_size)
  crows, crows_records = safety_tasks.score_crows_pairs(
      scorer, safety_sets.crows_pairs(paths["crows_pairs"]))
  figures.update(_compare(crows, crows_records, results, samples[CROWS_TASK], CROWS_TASK,
                          ["pct_stereotype", "likelihood_diff"], "crows_pairs"))
  items = safety_sets.bbq(paths["bbq"])
  bbq, bbq_records = safety_tasks.score_bbq(scorer, items)
  per_category = [f"{m}/{c}" for m in BBQ_METRICS[3:] for c in sorted({i.category
                                                                       for i in items})]
  figures.update(_compare(bbq, bbq_records, results, samples[BBQ_TASK], BBQ_TASK,
                          [*BBQ_METRICS, *per_category], "bbq"))
  questions = safety_sets.truthfulqa(safety_sets.safety_path("truthfulqa"))[:truthfulqa_items]
  mc, mc_records = safety_tasks.score_truthfulqa_mc(scorer, questions)
  reference = truthfulqa_reference(hf_dir, questions)
  ll_diff = 0.0
  for mine, ref in zip(mc_records, reference):
    q_lls = list(ref["loglik"].values())  # true + false, the order of mc2's choices
    ll_diff = max(ll_diff, float(np.max(np.abs(np.asarray(mine["loglik_mc2"]) - q_lls))))
  for metric in ("mc1", "mc2"):
    figures[f"truthfulqa_{metric}_ours"] = mc[metric]
    figures[f"truthfulqa_{metric}_reference"] = float(np.mean([r[metric] for r in reference]))
  figures.update(
      truthfulqa_items=len(questions), truthfulqa_max_abs_loglik_diff=ll_diff,
      truthfulqa_max_abs_diff=max(abs(mc[m] - figures[f"truthfulqa_{m}_reference"])
                                  for m in ("mc1", "mc2")))
  return figures


def main(argv):
  del argv
  flags_ = flags.FLAGS
  logging.set_verbosity(logging.ERROR)
  figures = safety_parity(flags_.checkpoint, flags_.out, flags_.crows_items,
                          flags_.bbq_per_category, flags_.truthfulqa_items, flags_.batch_size)
  print(json.dumps(figures))


if __name__ == "__main__":
  # Flags only when run as a script: benchmarks/safety_parity.py imports safety_parity().
  flags.DEFINE_string("checkpoint", "runs/chain/base", "Language-model checkpoint.")
  flags.DEFINE_string("out", "runs/safety_parity", "Work directory.")
  flags.DEFINE_integer("crows_items", 200, "CrowS-Pairs pairs (the shared file's first).")
  flags.DEFINE_integer("bbq_per_category", 20, "BBQ items per category (each file's first).")
  flags.DEFINE_integer("truthfulqa_items", 10, "TruthfulQA questions scored by hand.")
  flags.DEFINE_integer("batch_size", 16, "Batch size of both harnesses.")
  app.run(main)
