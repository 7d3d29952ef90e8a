"""Language-model task runners of the evaluation harness (eval.run is the command line).

  summary, records = score_multiple_choice(scorer, "arc_easy", items)
  summary, records = score_perplexity(scorer, "wikitext2", read_texts(path, "text"))
  summary, records = score_gsm8k(loaded, problems, max_new_tokens=128, batch_size=32)

Each runner returns (summary, records): the task's figures (counts, metrics and their
standard errors) and one record per item with its scores / prediction / response, which
eval.run writes to results.json and `<task>.jsonl`. `scorer` is an `eval.loglik.LoglikScorer`
and `loaded` an `eval.loading.LoadedCheckpoint`.
"""

from __future__ import annotations

import math
import os
import re
import time
from typing import Any, Sequence

import numpy as np

from data import benchmarks as tasks_lib
from data.readers import read_text
from eval.sample import make_template, respond
from model.sampling import Sampler, SamplingConfig

MC_TASKS = ("hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "mmlu")
LM_TASKS = (*MC_TASKS, "lambada", "wikitext2", "gsm8k")
NO_ACC_NORM = ("mmlu", "winogrande")
_WIKITEXT_TITLE = re.compile(r" = [^=].* = ")


class Progress:
  """Prints "task: done/total items, items/s, ETA" at most every `every` seconds."""

  def __init__(self, task: str, every: float = 10.0):
    self.task, self.every, self.start, self.last = task, every, time.perf_counter(), 0.0

  def __call__(self, done: int, total: int) -> None:
    now = time.perf_counter()
    if now - self.last < self.every and done < total:
      return
    self.last = now
    rate = done / max(now - self.start, 1e-9)
    eta = (total - done) / rate if rate else float("nan")
    print(f"  {self.task}: {done}/{total} requests | {rate:.1f}/s | eta {eta:.0f}s", flush=True)


def stderr(values: Sequence[float]) -> float:
  """Standard error of the mean of `values` (0 for fewer than two)."""
  values = np.asarray(values, np.float64)
  return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


def score_multiple_choice(scorer: Any, task: str, items: list[tasks_lib.Item]
                          ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """acc / acc_norm (lm-eval's definitions) and the per-item records."""
  requests, owner = [], []
  for i, item in enumerate(items):
    for request in item.requests():
      requests.append(request)
      owner.append(i)
  scorer.progress = Progress(task)
  results = scorer.loglikelihood(requests)
  per_item: list[list[tuple[float, bool]]] = [[] for _ in items]
  for i, result in zip(owner, results):
    per_item[i].append(result)
  records, acc, acc_norm = [], [], []
  for item, res in zip(items, per_item):
    lls = np.array([r[0] for r in res])
    if task == "lambada":
      correct, norm = float(res[0][1]), None
    else:
      lengths = np.array([float(len(c)) for c in item.choices])
      correct = float(np.argmax(lls) == item.gold)
      norm = float(np.argmax(lls / lengths) == item.gold)
    acc.append(correct)
    if norm is not None:
      acc_norm.append(norm)
    records.append({"doc_id": item.doc_id, "gold": item.gold, "loglik": lls.tolist(),
                    "is_greedy": [bool(r[1]) for r in res], "acc": correct,
                    **({"acc_norm": norm} if norm is not None else {})})
  out: dict[str, Any] = {"items": len(items), "acc": float(np.mean(acc)),
                         "acc_stderr": stderr(acc)}
  if task == "lambada":
    lls = np.array([r["loglik"][0] for r in records])
    out["perplexity"] = float(math.exp(-lls.mean()))
  elif task not in NO_ACC_NORM:
    out.update(acc_norm=float(np.mean(acc_norm)), acc_norm_stderr=stderr(acc_norm))
  return out, records


def read_texts(path: str, text_field: str) -> list[str]:
  """Documents of a text file (the whole file) or a .jsonl[.gz] (one per line)."""
  if re.search(r"\.jsonl(\.gz)?$", path):
    return [tasks_lib.field(r, text_field, str, f"{path}:{n}")
            for n, r in tasks_lib.read_jsonl(path)]
  if not os.path.exists(path):
    raise ValueError(f"{path} does not exist")
  return [read_text(path)]  # not UTF-8: an error naming the file and line


def wikitext_articles(text: str) -> list[str]:
  """The articles of a WikiText file, the documents of lm-eval's document-level wikitext.

  An article starts at its title, a top-level heading line " = Title = " between blank
  lines (sections are " = = Title = = "; a table row such as " = National record " is
  no heading); text before the first title goes with the first article, so the articles
  joined are the file.
  """
  lines = text.splitlines(keepends=True)
  starts = [i for i, line in enumerate(lines)
            if _WIKITEXT_TITLE.fullmatch(line.rstrip("\n"))
            and (i == 0 or not lines[i - 1].strip())
            and i + 1 < len(lines) and not lines[i + 1].strip()]
  bounds = [0, *starts[1:], len(lines)]
  return ["".join(lines[a:b]) for a, b in zip(bounds, bounds[1:]) if a < b]


def score_perplexity(scorer: Any, task: str, texts: list[str]
                     ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """Token / word / byte perplexity and bits per byte of `texts` (rolling windows)."""
  scorer.progress = Progress(task)
  results = scorer.rolling_loglikelihood(texts)
  total = sum(r[0] for r in results)
  tokens = sum(r[1] for r in results)
  num_bytes = sum(len(t.encode("utf-8")) for t in texts)
  words = sum(len(re.split(r"\s+", t.strip())) for t in texts if t.strip())
  out = {"documents": len(texts), "tokens": tokens, "bytes": num_bytes, "words": words,
         "token_perplexity": math.exp(-total / max(tokens, 1)),
         "word_perplexity": math.exp(-total / max(words, 1)),
         "bits_per_byte": -total / max(num_bytes, 1) / math.log(2),
         "byte_perplexity": math.exp(-total / max(num_bytes, 1))}
  records = [{"doc_id": str(i), "loglik": r[0], "tokens": r[1]} for i, r in enumerate(results)]
  return out, records


def score_gsm8k(loaded: Any, problems: list[tuple[str, str, str]], max_new_tokens: int,
                batch_size: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """Greedy chat-template answers; exact match of the last number with the gold answer."""
  template = make_template("chat", loaded.tokenizer)
  sampler = Sampler(loaded.graphdef, loaded.model_cfg, mesh=loaded.mesh, rules=loaded.rules,
                    param_shardings=loaded.param_shardings)
  context = loaded.model_cfg.max_seq_len
  records, correct = [], []
  progress = Progress("gsm8k")
  for start in range(0, len(problems), batch_size):
    chunk = problems[start:start + batch_size]
    conversations, kept = [], []
    for doc_id, question, gold in chunk:
      ids = template.prompt_ids([{"role": "user", "content": question}])
      if len(ids) + max_new_tokens > context:  # counted as wrong, never dropped silently
        records.append({"doc_id": doc_id, "gold": gold, "prediction": None, "correct": 0.0,
                        "response": None, "skipped": "prompt too long for the context"})
        correct.append(0.0)
        continue
      conversations.append([{"role": "user", "content": question}])
      kept.append((doc_id, gold))
    if conversations:
      cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0,
                           prompt_bucket=64)
      outs = respond(sampler, loaded.params, template, conversations, cfg,
                     batch_size=batch_size)
      for (doc_id, gold), out in zip(kept, outs):
        prediction = tasks_lib.last_number(out["response"])
        ok = float(prediction == gold)
        correct.append(ok)
        records.append({"doc_id": doc_id, "gold": gold, "prediction": prediction,
                        "correct": ok, "response": out["response"]})
    progress(start + len(chunk), len(problems))
  return {"items": len(problems), "exact_match": float(np.mean(correct)),
          "exact_match_stderr": stderr(correct),
          "too_long": sum(1 for r in records if r.get("skipped"))}, records
