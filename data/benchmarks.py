"""Benchmark readers: the shared evaluation files as log-likelihood requests.

(Data, not evaluation: `eval/` scores these items, `data/curate/` decontaminates against
them and `data/tfds_builders.py` serves them as TFDS datasets. No jax here.)

Every multiple-choice task becomes a list of `Item`s: one document with one or more
contexts, the continuations to score, and the gold index. The prompt formats are
lm-evaluation-harness's (the `default` configs of its hellaswag, arc_easy, piqa,
winogrande, mmlu and lambada_openai tasks), applied to the fields of the shared files:

  hellaswag      "{activity_label}: {ctx}"          -> " {ending}" x 4
  arc_easy/arc_challenge  "{query}\\nAnswer:"        -> " {choice}"  (query = "Question: ...")
  piqa           "Question: {goal}\\nAnswer:"         -> " {sol1}", " {sol2}" (labels file)
  winogrande     "{sentence up to the blank, filled with option i}" -> " {rest}" (partial
                 scoring: the same continuation under each filled context; acc only)
  mmlu           subject header + k dev examples + "{question}\\nA. ..\\nD. ..\\nAnswer:"
                 -> " A" .. " D" (k = `mmlu_shots`, 5 by default; acc only)
  lambada        "{context}" -> " {last word}" (acc = greedy, perplexity of the word)

The shared HellaSwag file is a cleaned text dump (its README): `ctx` is lm-eval's
preprocessed ctx except that ctx_b is not capitalised, so absolute numbers differ slightly
from the published ones; the parity benchmark runs lm-eval on the same file and format.

A row that does not parse or lacks a field raises ValueError naming the file, the line and
the field, so a malformed row never silently changes an aggregate.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import re
from typing import Any, Callable, Iterator

from data.readers import jsonl_records, read_text, resolve_data_path

EVAL_FILES = {
    "hellaswag": "eval/hellaswag_val_shared.jsonl.gz",
    "arc_easy": "eval/arc_easy_test_shared.jsonl",
    "arc_challenge": "eval/arc_challenge_test_shared.jsonl",
    "piqa": "eval/piqa_valid_shared.jsonl",
    "winogrande": "eval/winogrande_dev_shared.jsonl",
    "lambada": "eval/lambada_openai_shared.jsonl.gz",
    "mmlu": "eval/mmlu",
    "gsm8k": "eval/gsm8k_test_shared.jsonl",
    "wikitext2": "pretrain/wikitext2_tokens_test.txt",
}


@dataclasses.dataclass
class Item:
  """One scored document: a context per choice (or one shared) and the continuations."""
  doc_id: str
  contexts: list[str]        # one per choice (winogrande) or one for all
  continuations: list[str]   # one per choice, or one for all contexts
  gold: int
  choices: list[str]         # the choice texts lm-eval normalises acc_norm by

  def requests(self) -> list[tuple[str, str]]:
    n = max(len(self.contexts), len(self.continuations))
    ctx = self.contexts * n if len(self.contexts) == 1 else self.contexts
    cont = self.continuations * n if len(self.continuations) == 1 else self.continuations
    return list(zip(ctx, cont))


def read_jsonl(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
  """(line number, record) of a .jsonl[.gz] file of JSON objects; a bad line names the file
  and line (`data.readers.jsonl_records`)."""
  return jsonl_records(path, objects_only=True)


def field(record: dict, name: str, kind: type | tuple, where: str) -> Any:
  """record[name], checked to be of `kind` (a list must be non-empty)."""
  if name not in record:
    raise ValueError(f"{where}: missing field {name!r}")
  value = record[name]
  if isinstance(value, bool) or not isinstance(value, kind) or (
      isinstance(value, list) and not value):
    expected = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
    raise ValueError(f"{where}: field {name!r} is {value!r}, expected a non-empty {expected}"
                     if isinstance(value, list) else
                     f"{where}: field {name!r} is {value!r}, expected {expected}")
  return value


def _gold(value: Any, n: int, where: str, name: str) -> int:
  try:
    gold = int(value)
  except (TypeError, ValueError):
    gold = -1
  if isinstance(value, bool) or not 0 <= gold < n or str(gold) != str(value).strip():
    raise ValueError(f"{where}: field {name!r} is {value!r}, expected an index in [0, {n})")
  return gold


def _strings(values: list, where: str, name: str) -> list[str]:
  if not all(isinstance(v, str) for v in values):
    raise ValueError(f"{where}: field {name!r} must be a list of strings")
  return values


def hellaswag(path: str) -> list[Item]:
  items = []
  for n, r in read_jsonl(path):
    where = f"{path}:{n}"
    endings = _strings(field(r, "endings", list, where), where, "endings")
    context = f"{field(r, 'activity_label', str, where)}: {field(r, 'ctx', str, where)}"
    items.append(Item(str(r.get("val_index", n)), [context], [" " + e for e in endings],
                      _gold(field(r, "label", (int, str), where), len(endings), where, "label"),
                      endings))
  return items


def arc(path: str) -> list[Item]:
  items = []
  for n, r in read_jsonl(path):
    where = f"{path}:{n}"
    choices = _strings(field(r, "choices", list, where), where, "choices")
    items.append(Item(str(n), [field(r, "query", str, where) + "\nAnswer:"],
                      [" " + c for c in choices],
                      _gold(field(r, "gold", (int, str), where), len(choices), where, "gold"),
                      choices))
  return items


def piqa(path: str) -> list[Item]:
  labels_path = path.replace(".jsonl", "-labels.lst")
  if not os.path.exists(labels_path):
    raise ValueError(f"{path}: the labels file {labels_path} is missing")
  # newline=None: lines end as in a file opened in text mode (\n, \r\n or \r).
  labels = [line.strip() for line in io.StringIO(read_text(labels_path), newline=None)]
  items = []
  for n, r in read_jsonl(path):
    where = f"{path}:{n}"
    if n > len(labels):
      raise ValueError(f"{labels_path}: no label for line {n} of {path}")
    sols = [field(r, "sol1", str, where), field(r, "sol2", str, where)]
    items.append(Item(str(n), [f"Question: {field(r, 'goal', str, where)}\nAnswer:"],
                      [" " + s for s in sols],
                      _gold(labels[n - 1], 2, f"{labels_path}:{n}", "label"), sols))
  return items


def winogrande(path: str) -> list[Item]:
  items = []
  for n, r in read_jsonl(path):
    where = f"{path}:{n}"
    options = _strings(field(r, "context_options", list, where), where, "context_options")
    rest = field(r, "continuation", str, where)
    items.append(Item(str(n), options, [" " + rest.strip()],
                      _gold(field(r, "gold", (int, str), where), len(options), where, "gold"),
                      options))
  return items


def lambada(path: str) -> list[Item]:
  items = []
  for n, r in read_jsonl(path):
    where = f"{path}:{n}"
    word = field(r, "continuation", str, where).strip()
    if not word:
      raise ValueError(f"{where}: field 'continuation' is empty")
    items.append(Item(str(n), [field(r, "context", str, where).rstrip()], [" " + word], 0,
                      [word]))
  return items


MMLU_COLUMNS = ("question", "choice0", "choice1", "choice2", "choice3", "answer")
LETTERS = ("A", "B", "C", "D")


def _mmlu_rows(path: str) -> list[tuple[int, dict[str, str]]]:
  # newline="": the csv module sees line ends as written (as `open(newline="")` would).
  with io.StringIO(read_text(path), newline="") as f:
    reader = csv.DictReader(f)
    if tuple(reader.fieldnames or ()) != MMLU_COLUMNS:
      raise ValueError(f"{path}:1: header {reader.fieldnames}, expected {list(MMLU_COLUMNS)}")
    rows = []
    for row in reader:
      where = f"{path}:{reader.line_num}"
      if None in row or any(row[c] is None for c in MMLU_COLUMNS):
        raise ValueError(f"{where}: expected {len(MMLU_COLUMNS)} columns")
      _gold(row["answer"], 4, where, "answer")
      rows.append((reader.line_num, row))
  return rows


def _mmlu_question(row: dict[str, str]) -> str:
  lines = [row["question"].strip()] + [f"{l}. {row[f'choice{i}']}"
                                        for i, l in enumerate(LETTERS)]
  return "\n".join(lines) + "\nAnswer:"


def mmlu(path: str, shots: int = 5) -> list[Item]:
  """57 subjects: test rows scored with `shots` dev examples of the same subject."""
  test_dir, dev_dir = os.path.join(path, "test"), os.path.join(path, "dev")
  if not os.path.isdir(test_dir):
    raise ValueError(f"{test_dir} does not exist")
  items = []
  for name in sorted(os.listdir(test_dir)):
    if not name.endswith("_test.csv"):
      continue
    subject = name[:-len("_test.csv")]
    dev = _mmlu_rows(os.path.join(dev_dir, f"{subject}_dev.csv"))[:shots] if shots else []
    header = ("The following are multiple choice questions (with answers) about "
              f"{subject.replace('_', ' ')}.\n\n")
    examples = "".join(f"{_mmlu_question(r)} {LETTERS[int(r['answer'])]}\n\n" for _, r in dev)
    for line, row in _mmlu_rows(os.path.join(test_dir, name)):
      items.append(Item(f"{subject}:{line}", [header + examples + _mmlu_question(row)],
                        [" " + l for l in LETTERS], int(row["answer"]), list(LETTERS)))
  return items


GSM8K_ANSWER = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


def gsm8k(path: str) -> list[tuple[str, str, str]]:
  """(doc id, question, gold final number) of each problem."""
  out = []
  for n, r in read_jsonl(path):
    where = f"{path}:{n}"
    match = GSM8K_ANSWER.search(field(r, "answer", str, where))
    if not match:
      raise ValueError(f"{where}: field 'answer' has no '#### <number>' final answer")
    out.append((str(n), field(r, "question", str, where), normalize_number(match.group(1))))
  return out


def normalize_number(text: str) -> str:
  """"1,234.50" -> "1234.5"; the form final answers are compared in."""
  text = text.replace(",", "").replace("$", "").strip().rstrip(".")
  try:
    value = float(text)
  except ValueError:
    return text
  return str(int(value)) if value == int(value) else repr(value)


LAST_NUMBER = re.compile(r"-?\$?[\d,]*\.?\d+")


def last_number(text: str) -> str | None:
  """The last number in a generated answer (after '####' if the model wrote one)."""
  marked = GSM8K_ANSWER.search(text)
  if marked:
    return normalize_number(marked.group(1))
  found = LAST_NUMBER.findall(text)
  return normalize_number(found[-1]) if found else None


MC_READERS: dict[str, Callable[..., list[Item]]] = {
    "hellaswag": hellaswag, "arc_easy": arc, "arc_challenge": arc, "piqa": piqa,
    "winogrande": winogrande, "mmlu": mmlu, "lambada": lambada,
}


def task_path(task: str, data_dir: str | None = None) -> str:
  """The file (or directory, for mmlu) of `task`: under `data_dir`, else the data dir."""
  rel = EVAL_FILES[task]
  return os.path.join(data_dir, rel) if data_dir else resolve_data_path(rel)
