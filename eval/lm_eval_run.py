"""Any lm-evaluation-harness task as an eval.run task (`--tasks=lm_eval:<name>`).

  python -m eval.run --checkpoint=runs/chain/base \
      --tasks=hellaswag,lm_eval:lmlife_lambada_openai_cloze,lm_eval:lmlife_gsm8k \
      [--lm_eval_include_path=my_tasks/] [--lm_eval_num_fewshot=0] [--limit=200]

The task runs through lm-eval's evaluator (`lm_eval.simple_evaluate`, its prompts,
filters and metrics) with the checkpoint eval.run already loaded, wrapped in the lmlife
adapter (eval.lm_eval_adapter); lm-eval's figures become the task's summary in
results.json / results.md, its per-sample log the task's jsonl.

Task names: any task lm-eval knows, the lmlife_* tasks over the shared files (their YAMLs
are written to `<output_dir>/lm_eval_tasks/` and always included; eval.lm_eval_tasks), and
the tasks of `--lm_eval_include_path` (comma-separated directories of task YAMLs). Runs
are offline: HF_DATASETS_OFFLINE / HF_HUB_OFFLINE are set, so a task whose dataset is on
the Hub and not in the local cache is an error naming it, never a download.

Metric names: lm-eval keys "<metric>,<filter>" become "<metric>" for the "none" filter
and "<metric>_<filter>" otherwise ("exact_match_strict-match"); the standard errors
follow as "<name>_stderr" (eval.run's table shows them as ±). A group task's subtasks
are prefixed "<subtask>/".
"""

from __future__ import annotations

import logging
import os
from typing import Any

# Offline before lm-eval (and through it `datasets` / `huggingface_hub`) read them at import:
# a task whose data is not local fails instead of downloading.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from eval.lm_eval_adapter import LmlifeLM  # noqa: E402
from eval.lm_eval_tasks import write_task_yamls  # noqa: E402

PREFIX = "lm_eval:"
BOOTSTRAP_ITERS = 1000  # stderr of bootstrapped metrics (perplexity); lm-eval: 100000
_SAMPLE_KEYS_DROPPED = ("doc", "doc_hash", "prompt_hash", "target_hash")
_TASK_MANAGERS: dict[tuple[str, ...], TaskManager] = {}


def metric_name(key: str) -> str:
  """lm-eval's "acc,none" -> "acc"; "exact_match_stderr,strict-match" ->
  "exact_match_strict-match_stderr"."""
  metric, _, filter_name = key.partition(",")
  if filter_name in ("", "none"):
    return metric
  if metric.endswith("_stderr"):
    return f"{metric[:-len('_stderr')]}_{filter_name}_stderr"
  return f"{metric}_{filter_name}"


def summarize(results: dict[str, Any], task: str) -> dict[str, Any]:
  """eval.run's summary of one simple_evaluate result: items, then float metrics."""
  per_task = results["results"]
  out: dict[str, Any] = {}
  counts = results.get("n-samples", {})
  out["items"] = sum(int(c.get("effective", 0)) for c in counts.values())
  for name, metrics in per_task.items():
    prefix = "" if len(per_task) == 1 or name == task else f"{name}/"
    for key, value in metrics.items():
      if "," in key and isinstance(value, (int, float)) and not isinstance(value, bool):
        out[prefix + metric_name(key)] = float(value)
  return out


def sample_records(results: dict[str, Any]) -> list[dict[str, Any]]:
  """lm-eval's per-sample log (without the documents and hashes), JSON-ready."""
  records = []
  for name, samples in results.get("samples", {}).items():
    for s in samples:
      record = {"task": name, **{k: v for k, v in s.items() if k not in _SAMPLE_KEYS_DROPPED}}
      records.append(_jsonable(record))
  return records


def _jsonable(value: Any) -> Any:
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, (str, int, float, bool)) or value is None:
    return value
  return float(value) if hasattr(value, "__float__") else str(value)


def task_manager(out_dir: str, include_path: str, data_dir: str | None) -> TaskManager:
  """lm-eval's task index with the lmlife_* YAMLs and `include_path` (built once)."""
  local = os.path.join(out_dir, "lm_eval_tasks")
  write_task_yamls(local, data_dir)
  paths = (local, *filter(None, (p.strip() for p in include_path.split(","))))
  for path in paths[1:]:
    if not os.path.isdir(path):
      raise ValueError(f"--lm_eval_include_path: {path} is not a directory")
  if paths not in _TASK_MANAGERS:
    _TASK_MANAGERS[paths] = TaskManager(include_path=list(paths))
  return _TASK_MANAGERS[paths]


def run_lm_eval_task(task: str, loaded: Any, out_dir: str, *, limit: int | None,
                     batch_size: int, include_path: str = "", data_dir: str | None = None,
                     num_fewshot: int | None = None
                     ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """Runs `lm_eval:<name>` on the loaded checkpoint; (summary, per-sample records).

  Raises:
    ValueError: an unknown task name (lm-eval's suggestions are in the message) or a
      dataset that is not available offline.
  """
  name = task[len(PREFIX):]
  manager = task_manager(out_dir, include_path, data_dir)
  if not manager.match_tasks([name]):
    raise ValueError(f"lm-eval knows no task {name!r} (with the lmlife_* tasks and "
                     f"--lm_eval_include_path={include_path!r})")
  logging.getLogger("lm_eval").setLevel(logging.WARNING)
  lm = LmlifeLM(loaded=loaded, batch_size=batch_size)
  try:
    results = lm_eval.simple_evaluate(
        model=lm, tasks=[name], limit=limit, num_fewshot=num_fewshot, log_samples=True,
        task_manager=manager, bootstrap_iters=BOOTSTRAP_ITERS, verbosity="WARNING")
  except (ConnectionError, FileNotFoundError) as e:  # offline and not cached, a bad path
    raise ValueError(f"lm-eval task {name}: {type(e).__name__}: {e}") from e
  return summarize(results, name), sample_records(results)
