"""lm-evaluation-harness task YAMLs over the shared evaluation files (offline, by path).

  paths = write_task_yamls("runs/lm_eval_tasks")   # {task name: yaml path}
  lm_eval ... --include_path runs/lm_eval_tasks --tasks lmlife_hellaswag,lmlife_gsm8k
  python -m eval.lm_eval_tasks --out=runs/lm_eval_tasks   # the same from the shell

lm-eval's own task YAMLs name Hugging Face Hub datasets, which an offline machine cannot
fetch. These YAMLs read the shared files instead (`dataset_path: json` with local
`data_files`, resolved through data.readers, so $LM_DATA_DIR is honoured); nothing is
copied. Two kinds:

- `lmlife_hellaswag`, `lmlife_arc_easy`: the built-in harness's prompt formats
  (data/benchmarks.py), so lm-eval and eval.lm_tasks score the very same requests item by
  item (the parity checks: tests/test_eval_lm_eval_adapter.py, benchmarks/lm_eval_parity.py,
  benchmarks/safety_parity.py).
- `lmlife_lambada_openai_cloze`, `lmlife_gsm8k`: lm-eval's OWN task definitions
  (`include:` of its lambada_openai_cloze.yaml and gsm8k.yaml: prompt, target, metrics,
  filters, generation settings), only pointed at the shared files. The built-in harness has
  no reader for either (its lambada is the plain last-word task, its gsm8k uses the chat
  template), so they run only through the lmlife adapter. The shared LAMBADA file holds
  `context` / `continuation`; `lambada_passages` (a `process_docs` hook) rebuilds the
  `text` field lm-eval's template splits (the file's README: passage = context + ' ' +
  continuation). gsm8k's few-shot examples come from the shared gsm8k train file.

The `process_docs` hook is named `eval.lm_eval_tasks.lambada_passages`, so this repository
must be importable where lm-eval loads the task (it is, in the lmlife venv).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import lm_eval

from data import benchmarks as tasks_lib
from data.readers import resolve_data_path

LM_EVAL_TASKS_DIR = os.path.join(os.path.dirname(lm_eval.__file__), "tasks")

MC_TEMPLATE = """task: {name}
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{text}"
doc_to_target: {target}
doc_to_choice: {choices}
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""

# Built-in task -> (lm-eval task name, doc_to_text, target field, choices field); the
# formats of data/benchmarks.py's readers.
MC_TASKS = {
    "hellaswag": ("lmlife_hellaswag", "{{activity_label}}: {{ctx}}", "label", "endings"),
    "arc_easy": ("lmlife_arc_easy", "{{query}}\\nAnswer:", "gold", "choices"),
}

INCLUDE_TEMPLATE = """include: {include}
task: {name}
tag: []
dataset_path: {kind}
dataset_name: null
dataset_kwargs:
  data_files:
{data_files}
{extra}"""

# Tasks lm-eval defines and the built-in harness has no reader for:
# name -> (lm-eval YAML under its tasks/ dir, {split: shared file}, extra YAML lines).
LM_EVAL_ONLY_TASKS = {
    "lmlife_lambada_openai_cloze": (
        "lambada_cloze/lambada_openai_cloze.yaml",
        {"test": tasks_lib.EVAL_FILES["lambada"]},
        "process_docs: !function eval.lm_eval_tasks.lambada_passages\n"),
    "lmlife_gsm8k": (
        "gsm8k/gsm8k.yaml",
        {"train": "sft/gsm8k_train.jsonl.gz", "test": tasks_lib.EVAL_FILES["gsm8k"]},
        ""),
}


def lambada_passages(dataset: Any) -> Any:
  """`process_docs` of the LAMBADA cloze task: adds lm-eval's `text` field (the passage)."""
  return dataset.map(lambda doc: {"text": doc["context"].rstrip() + " "
                                          + doc["continuation"].strip()})


def _data_path(rel: str, data_dir: str | None) -> str:
  return os.path.join(data_dir, rel) if data_dir else resolve_data_path(rel)


def include_yaml(include: str, name: str, data_files: dict[str, str], kind: str = "json",
                 extra: str = "") -> str:
  """The YAML of task `name`: lm-eval's own task `include` (a path under its tasks/ dir)
  with the data replaced by local files ({split: path}; `kind` "json" or "csv")."""
  files = "\n".join(f"    {split}: {path}" for split, path in data_files.items())
  return INCLUDE_TEMPLATE.format(include=os.path.join(LM_EVAL_TASKS_DIR, include), name=name,
                                 kind=kind, data_files=files, extra=extra)


def write_task_yamls(out_dir: str, data_dir: str | None = None) -> dict[str, str]:
  """Writes every lmlife_* task YAML into `out_dir` (an lm-eval --include_path).

  Args:
    out_dir: the directory to write (created if missing).
    data_dir: the evaluation data root (default: $LM_DATA_DIR or ../shared/data).

  Returns:
    {lm-eval task name: YAML path}.
  """
  os.makedirs(out_dir, exist_ok=True)
  texts = {}
  for task, (name, text, target, choices) in MC_TASKS.items():
    texts[name] = MC_TEMPLATE.format(name=name, path=tasks_lib.task_path(task, data_dir),
                                     text=text, target=target, choices=choices)
  for name, (include, files, extra) in LM_EVAL_ONLY_TASKS.items():
    texts[name] = include_yaml(include, name, {split: _data_path(rel, data_dir)
                                               for split, rel in files.items()}, extra=extra)
  paths = {}
  for name, text in texts.items():
    paths[name] = os.path.join(out_dir, f"{name}.yaml")
    with open(paths[name], "w", encoding="utf-8") as f:
      f.write(text)
  return paths


def main(argv: list[str]) -> None:
  """`python -m eval.lm_eval_tasks --out=DIR [--data_dir=DIR]`: writes the YAMLs."""
  args = dict(a.lstrip("-").split("=", 1) for a in argv if "=" in a)
  if set(args) - {"out", "data_dir"} or "out" not in args or len(args) != len(argv):
    print("error: usage: python -m eval.lm_eval_tasks --out=DIR [--data_dir=DIR]",
          file=sys.stderr)
    sys.exit(2)
  for name, path in write_task_yamls(args["out"], args.get("data_dir") or None).items():
    print(f"{name}: {path}")
  print(f"Use: --include_path {os.path.abspath(args['out'])}")


if __name__ == "__main__":
  main(sys.argv[1:])
