"""Benchmark: lm-eval through the lmlife adapter against the built-in harness, item by item.

  python benchmarks/safety_parity.py                          # runs/chain/base, or a tiny model
  python benchmarks/safety_parity.py --checkpoint=runs/sft --mc_items=500 --gsm8k_items=50

Checkpoint: `--checkpoint`; without it runs/chain/base when that exists, else a tiny random
model built here (`<out>/tiny`: a 300-piece BPE on tiny Shakespeare, `Trainer.init_state`),
so the script runs on a clean checkout. Everything is offline (HF_DATASETS_OFFLINE=1,
HF_HUB_OFFLINE=1); tasks read the shared files by path (eval/lm_eval_tasks.py).

Sections (each prints a table and returns its figures; the last line merges them):
1. `mc_parity`: HellaSwag and ARC-Easy (the first `--mc_items` of each) through lm-eval's
   evaluator (`simple_evaluate`, `log_samples`) with the lmlife adapter, against the
   built-in harness (eval.lm_tasks.score_multiple_choice) on the same checkpoint: the
   requests (lm-eval's rendering of the YAML prompts vs data/benchmarks.py), every
   (item, choice) log-likelihood, and per-item acc / acc_norm.
2. `lm_eval_only`: tasks the built-in harness has no reader for, run through the adapter:
   lm-eval's own LAMBADA cloze (its acc and perplexity recomputed here from requests
   rebuilt by hand from the passages) and gsm8k (generate_until; its exact match as
   lm-eval filters and scores it).
3. `safety_tasks`: CrowS-Pairs, BBQ and TruthfulQA (eval/safety_tasks.py) on the model
   exported to Hugging Face against `lm_eval --model hf` running lm-eval's own
   crows_pairs_english and bbq definitions on the local files, and TruthfulQA MC against a
   hand computation on transformers' forward pass (benchmarks/safety_lm_eval.py;
   --skip_safety leaves it out).

Last line: one JSON object with `adapter_max_abs_loglik_diff` (over every choice of
section 1), `adapter_acc_equal` (1 when every item's acc and acc_norm agree, else 0),
`lm_eval_only_tasks` (tasks of section 2 that ran), and the figures behind them.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import sys
import time
from typing import Any, Callable

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from absl import app, flags  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from safety_lm_eval import safety_parity  # noqa: E402  (section 3)

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", "", "Language-model checkpoint (default: runs/chain/base "
                    "if present, else a tiny random model built in --out).")
flags.DEFINE_string("out", "runs/safety_parity", "Work directory (task YAMLs, tiny model).")
flags.DEFINE_integer("mc_items", 200, "HellaSwag and ARC-Easy items (each file's first).")
flags.DEFINE_integer("lambada_items", 200, "LAMBADA cloze items.")
flags.DEFINE_integer("gsm8k_items", 20, "gsm8k items (generation: slow on CPU).")
flags.DEFINE_integer("gsm8k_fewshot", 0, "gsm8k shots (-1 = the task's 5).")
flags.DEFINE_integer("batch_size", 32, "Sequences per forward pass / generate call.")
flags.DEFINE_integer("crows_items", 200, "CrowS-Pairs pairs (the shared file's first).")
flags.DEFINE_integer("bbq_per_category", 20, "BBQ items per category (each file's first).")
flags.DEFINE_integer("truthfulqa_items", 10, "TruthfulQA questions scored by hand.")
flags.DEFINE_bool("skip_safety", False, "Leave out section 3 (lm-eval hf on the export).")


def build_tiny_checkpoint(out: str) -> str:
  """A random tiny language model with a BPE tokenizer, saved as a checkpoint: its workdir."""
  from configs import common
  from data.readers import resolve_data_path
  from data.tokenizer import Tokenizer, train_tokenizer
  from model.config import ModelConfig
  from train.losses import lm_loss
  from train.trainer import Trainer
  workdir = os.path.join(out, "tiny")
  if os.path.isdir(os.path.join(workdir, "checkpoints")):
    return workdir
  os.makedirs(workdir, exist_ok=True)
  text_path = os.path.join(out, "tiny_text.txt")
  with open(resolve_data_path("pretrain/tinyshakespeare.txt"), encoding="utf-8") as f:
    text = f.read()[:100_000]
  with open(text_path, "w", encoding="utf-8") as f:
    f.write(text)
  tok = Tokenizer.from_file(train_tokenizer([text_path], os.path.join(out, "tiny_tok.model"),
                                            300, "bpe"))
  config = common.base_config()
  config.model = common.model_config("tiny", vocab_size=0)
  config.data.path = text_path
  config.train.update(dict(batch_size=8, num_steps=1, checkpoint_every=0,
                           async_checkpoint=False, peak_flops=1e9))
  model_cfg = ModelConfig.from_dict({**config.model.to_dict(), "vocab_size": tok.vocab_size,
                                     "max_seq_len": 128, "init_std": 0.1})
  trainer = Trainer(config, workdir, model_cfg, lm_loss, tokenizer_bytes=tok.to_bytes(),
                    tokenizer_fingerprint=tok.fingerprint)
  trainer.save(trainer.init_state())
  trainer.checkpointer.wait()
  trainer.close()
  return workdir


def evaluate(lm: Any, manager: Any, task: str, limit: int, **kwargs: Any) -> dict[str, Any]:
  import lm_eval
  return lm_eval.simple_evaluate(model=lm, tasks=[task], limit=limit or None,
                                 log_samples=True, task_manager=manager,
                                 bootstrap_iters=0, verbosity="WARNING", **kwargs)


def table(rows: list[dict[str, Any]]) -> str:
  keys = list(rows[0])
  lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
  for r in rows:
    lines.append("| " + " | ".join(f"{v:.6g}" if isinstance(v, float) else str(v)
                                   for v in r.values()) + " |")
  return "\n".join(lines)


# ------------------------------------------------------------------------------ sections
def mc_parity(lm: Any, manager: Any) -> dict[str, Any]:
  """Section 1: lm-eval + adapter vs the built-in harness on HellaSwag and ARC-Easy."""
  import numpy as np
  from data import benchmarks as tasks_lib
  from eval.lm_eval_tasks import MC_TASKS
  from eval.lm_tasks import score_multiple_choice
  rows, diffs, equal = [], [], True
  for task in ("hellaswag", "arc_easy"):
    name = MC_TASKS[task][0]
    start = time.perf_counter()
    theirs = sorted(evaluate(lm, manager, name, FLAGS.mc_items)["samples"][name],
                    key=lambda s: s["doc_id"])
    lm_eval_s = time.perf_counter() - start
    items = tasks_lib.MC_READERS[task](tasks_lib.task_path(task))[:FLAGS.mc_items]
    start = time.perf_counter()
    _, ours = score_multiple_choice(lm.scorer, task, items)
    ours_s = time.perf_counter() - start
    if len(ours) != len(theirs):
      sys.exit(f"{task}: {len(ours)} items in the built-in harness, {len(theirs)} in lm-eval")
    task_diffs, requests_differ, acc_differ, norm_differ = [], 0, 0, 0
    for item, mine, other in zip(items, ours, theirs):
      requests_differ += [tuple(a) for a in other["arguments"]] != item.requests()
      lls = np.array([r[0] for r in other["filtered_resps"]])
      task_diffs.append(float(np.max(np.abs(lls - np.asarray(mine["loglik"])))))
      acc_differ += float(other["acc"]) != mine["acc"]
      norm_differ += float(other["acc_norm"]) != mine["acc_norm"]
    diffs += task_diffs
    equal = equal and not (acc_differ or norm_differ or requests_differ)
    rows.append({"task": task, "items": len(ours),
                 "max_abs_loglik_diff": max(task_diffs),
                 "acc_builtin": float(np.mean([r["acc"] for r in ours])),
                 "acc_lm_eval": float(np.mean([float(o["acc"]) for o in theirs])),
                 "acc_norm_builtin": float(np.mean([r["acc_norm"] for r in ours])),
                 "acc_norm_lm_eval": float(np.mean([float(o["acc_norm"]) for o in theirs])),
                 "items_acc_differ": acc_differ, "items_acc_norm_differ": norm_differ,
                 "items_requests_differ": requests_differ,
                 "lm_eval_s": round(lm_eval_s, 1), "builtin_s": round(ours_s, 1)})
  print("## lm-eval (lmlife adapter) vs the built-in harness\n" + table(rows), flush=True)
  out: dict[str, Any] = {"adapter_max_abs_loglik_diff": max(diffs),
                         "adapter_acc_equal": int(equal), "adapter_choices": len(diffs)}
  for r in rows:
    out.update({f"{r['task']}_{k}": v for k, v in r.items() if k != "task"})
  return out


def _lambada_requests(n: int) -> list[tuple[str, str]]:
  """lm-eval's lambada_openai_cloze prompt, rebuilt by hand from the shared passages."""
  from data.benchmarks import EVAL_FILES
  from data.readers import resolve_data_path
  with gzip.open(resolve_data_path(EVAL_FILES["lambada"]), "rt", encoding="utf-8") as f:
    rows = [json.loads(line) for _, line in zip(range(n), f)]
  out = []
  for row in rows:
    words = (row["context"].rstrip() + " " + row["continuation"].strip()).split(" ")
    out.append((" ".join(words[:-1]) + " ____. ->", " " + words[-1]))
  return out


def lm_eval_only(lm: Any, manager: Any) -> dict[str, Any]:
  """Section 2: lm-eval tasks without a built-in reader (LAMBADA cloze, gsm8k)."""
  import numpy as np
  rows, out = [], {}
  name = "lmlife_lambada_openai_cloze"
  start = time.perf_counter()
  result = evaluate(lm, manager, name, FLAGS.lambada_items)
  seconds = time.perf_counter() - start
  agg, samples = result["results"][name], sorted(result["samples"][name],
                                                 key=lambda s: s["doc_id"])
  requests = _lambada_requests(len(samples))
  expected = lm.scorer.loglikelihood(requests)
  lls = np.array([ll for ll, _ in expected])
  figures = {"items": len(samples), "acc": agg["acc,none"],
             "acc_recomputed": float(np.mean([g for _, g in expected])),
             "log_perplexity": math.log(agg["perplexity,none"]),
             "log_perplexity_recomputed": float(-lls.mean()),
             "prompts_equal": int([tuple(s["arguments"][0]) for s in samples] == requests),
             "seconds": round(seconds, 1)}
  rows.append({"task": name, **figures})
  out.update({f"lambada_cloze_{k}": v for k, v in figures.items()})
  name = "lmlife_gsm8k"
  start = time.perf_counter()
  result = evaluate(lm, manager, name, FLAGS.gsm8k_items,
                    num_fewshot=None if FLAGS.gsm8k_fewshot < 0 else FLAGS.gsm8k_fewshot)
  agg = result["results"][name]
  figures = {"items": result["n-samples"][name]["effective"],
             "exact_match_strict": agg["exact_match,strict-match"],
             "exact_match_flexible": agg["exact_match,flexible-extract"],
             "seconds": round(time.perf_counter() - start, 1)}
  rows.append({"task": name, **figures})
  out.update({f"gsm8k_{k}": v for k, v in figures.items()})
  print("## lm-eval tasks with no built-in reader (through the adapter)", flush=True)
  for r in rows:
    print(table([r]), flush=True)
  out["lm_eval_only_tasks"] = len(rows)
  return out


def safety_tasks(lm: Any, manager: Any) -> dict[str, Any]:
  """Section 3 (benchmarks/safety_lm_eval.py) on the adapter's checkpoint."""
  del manager
  if FLAGS.skip_safety:
    return {}
  figures = safety_parity(lm.loaded.meta["checkpoint_path"],
                          os.path.join(os.path.abspath(FLAGS.out), "safety"),
                          FLAGS.crows_items, FLAGS.bbq_per_category, FLAGS.truthfulqa_items,
                          min(FLAGS.batch_size, 16))
  rows = [{"task": t, "ours vs": ref, "max |d loglik|": figures[f"{t}_max_abs_loglik_diff"],
           "max |d aggregate|": figures[f"{t}_max_abs_diff"]}
          for t, ref in (("crows_pairs", "lm_eval hf"), ("bbq", "lm_eval hf"),
                         ("truthfulqa", "transformers by hand"))]
  print(table(rows), flush=True)
  return figures


# Parity sections, run in order: fn(lm, task_manager) -> figures merged into the last line.
SECTIONS: list[Callable[[Any, Any], dict[str, Any]]] = [mc_parity, lm_eval_only, safety_tasks]


def main(argv):
  del argv
  from absl import logging
  logging.set_verbosity(logging.ERROR)
  from lm_eval.tasks import TaskManager
  from eval.loading import load_checkpoint
  from eval.lm_eval_adapter import LmlifeLM
  from eval.lm_eval_tasks import write_task_yamls
  out = os.path.abspath(FLAGS.out)
  os.makedirs(out, exist_ok=True)
  checkpoint = FLAGS.checkpoint or ("runs/chain/base" if os.path.isdir("runs/chain/base")
                                    else build_tiny_checkpoint(out))
  loaded = load_checkpoint(checkpoint)
  print(f"checkpoint: {loaded.meta['checkpoint_path']} ({loaded.model_cfg.num_params():,} "
        f"parameters, context {loaded.model_cfg.max_seq_len})", flush=True)
  lm = LmlifeLM(loaded=loaded, batch_size=FLAGS.batch_size)
  tasks_dir = os.path.join(out, "lm_eval_tasks")
  write_task_yamls(tasks_dir)
  manager = TaskManager(include_path=tasks_dir, include_defaults=False)  # lmlife_* only
  result: dict[str, Any] = {"checkpoint": loaded.meta["checkpoint_path"]}
  for section in SECTIONS:
    result.update(section(lm, manager))
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
