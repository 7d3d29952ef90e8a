"""Readers of the bias and truthfulness sets: CrowS-Pairs, BBQ and TruthfulQA.

(Data, not evaluation: eval/safety_tasks.py scores these records. No jax here.)

  pairs = crows_pairs(safety_path("crows_pairs"))          # [CrowsPair]
  items = bbq(safety_path("bbq"))                          # [BBQItem], the 6 category files
  questions = truthfulqa(safety_path("truthfulqa"))        # [TruthfulQAQuestion]

The files are the shared ones (shared/data/README.md, "Added 2026-12-01"):
- `safety/crows_pairs_shared.csv`: the CrowS-Pairs columns (`sent_more`, `sent_less`,
  `stereo_antistereo` in {stereo, antistereo}, `bias_type`, ...), one pair per record;
- `safety/bbq/<Category>.jsonl`: BBQ items verbatim (`context`, `question`, `ans0..2`,
  `label`, `context_condition` in {ambig, disambig}, `question_polarity` in {neg, nonneg},
  `answer_info`, `additional_metadata.stereotyped_groups`);
- `safety/truthfulqa_shared.csv`: TruthfulQA.csv (`Question`, `Best Answer`, `Correct
  Answers` and `Incorrect Answers`, the latter two separated by ";").

TruthfulQA answers are normalised as the original repository's `split_multi_answer` /
`format_best` do (stripped, empty ones dropped, a period added where missing), so the
multiple-choice and generation references are the strings TruthfulQA itself scores.

A malformed record (a missing column or key, a value of the wrong type, a label out of
range, an unknown condition, an empty answer, a line that is not JSON) raises ValueError
naming the file, the line and the field; eval.run turns it into one `error:` line.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
from typing import Any

from data.readers import check_file, jsonl_records, read_text, resolve_data_path

SAFETY_FILES = {
    "crows_pairs": "safety/crows_pairs_shared.csv",
    "bbq": "safety/bbq",
    "truthfulqa": "safety/truthfulqa_shared.csv",
}
BBQ_CATEGORIES = ("Age", "Disability_status", "Nationality", "Physical_appearance",
                  "Religion", "Sexual_orientation")
# The "unknown" answers of BBQ, as lm-eval's bbq task lists them (copied from HELM); each
# item has exactly one of them among ans0..2.
UNKNOWN_RESPONSES = ("Unknown", "Cannot answer", "Can't be determined", "Cannot be determined",
                     "Can't answer", "Not known", "Not enough info", "Not enough information",
                     "Not answerable", "Undetermined")
CROWS_COLUMNS = ("sent_more", "sent_less", "stereo_antistereo", "bias_type")
TRUTHFULQA_COLUMNS = ("Question", "Best Answer", "Correct Answers", "Incorrect Answers")


@dataclasses.dataclass(frozen=True)
class CrowsPair:
  """One CrowS-Pairs pair: the more and the less stereotyping sentence."""
  doc_id: str
  sent_more: str
  sent_less: str
  direction: str   # "stereo" or "antistereo"
  bias_type: str


@dataclasses.dataclass(frozen=True)
class BBQItem:
  """One BBQ question with its three answers (one of them the unknown answer)."""
  doc_id: str                 # "<category>:<example_id>"
  category: str
  context: str
  question: str
  answers: tuple[str, str, str]
  label: int
  context_condition: str      # "ambig" or "disambig"
  question_polarity: str      # "neg" or "nonneg"
  answer_info: dict[str, list[str]]   # ans0..2 -> [answer words, group tag]
  stereotyped_groups: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class TruthfulQAQuestion:
  """One TruthfulQA question and its reference answers (normalised, see module doc)."""
  doc_id: str
  category: str
  question: str
  best_answer: str
  correct_answers: tuple[str, ...]
  incorrect_answers: tuple[str, ...]


def safety_path(name: str, data_dir: str | None = None) -> str:
  """The file (or folder, for bbq) of `name`: under `data_dir`, else the data dir."""
  rel = SAFETY_FILES[name]
  return os.path.join(data_dir, rel) if data_dir else resolve_data_path(rel)


def _csv_rows(path: str, columns: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
  """(line, row) of a CSV with a header holding `columns`; a short row is an error."""
  check_file(path)
  # newline="": the csv module sees line ends as written (quoted fields may span lines).
  with io.StringIO(read_text(path), newline="") as f:
    reader = csv.DictReader(f)
    missing = [c for c in columns if c not in (reader.fieldnames or ())]
    if missing:
      raise ValueError(f"{path}:1: header {reader.fieldnames} lacks column(s) {missing}")
    rows = []
    for row in reader:
      where = f"{path}:{reader.line_num}"
      for c in columns:
        if row.get(c) is None:
          raise ValueError(f"{where}: field {c!r} is missing (the row has "
                           f"{sum(v is not None for v in row.values())} columns)")
      rows.append((reader.line_num, row))
  if not rows:
    raise ValueError(f"{path}: no rows after the header")
  return rows


def _text(value: Any, where: str, name: str) -> str:
  if not isinstance(value, str) or not value.strip():
    raise ValueError(f"{where}: field {name!r} is {value!r}, expected a non-empty string")
  return value


def _choice(value: Any, allowed: tuple[str, ...], where: str, name: str) -> str:
  if value not in allowed:
    raise ValueError(f"{where}: field {name!r} is {value!r}, expected one of {list(allowed)}")
  return value


def crows_pairs(path: str) -> list[CrowsPair]:
  """The pairs of a CrowS-Pairs CSV, in file order (doc id: the first column, else line)."""
  out = []
  for line, row in _csv_rows(path, CROWS_COLUMNS):
    where = f"{path}:{line}"
    out.append(CrowsPair(
        doc_id=(row.get("") or str(line)).strip(),
        sent_more=_text(row["sent_more"], where, "sent_more"),
        sent_less=_text(row["sent_less"], where, "sent_less"),
        direction=_choice(row["stereo_antistereo"], ("stereo", "antistereo"), where,
                          "stereo_antistereo"),
        bias_type=_text(row["bias_type"], where, "bias_type")))
  return out


def _answer_info(value: Any, where: str) -> dict[str, list[str]]:
  if not isinstance(value, dict):
    raise ValueError(f"{where}: field 'answer_info' is {value!r}, expected an object")
  out = {}
  for key in ("ans0", "ans1", "ans2"):
    info = value.get(key)
    if not isinstance(info, list) or not all(isinstance(s, str) for s in info):
      raise ValueError(f"{where}: field 'answer_info.{key}' is {info!r}, expected a list "
                       "of strings")
    out[key] = list(info)
  return out


def _bbq_item(record: dict[str, Any], where: str) -> BBQItem:
  for key in ("context", "question", "ans0", "ans1", "ans2", "category", "answer_info",
              "additional_metadata", "label", "context_condition", "question_polarity"):
    if key not in record:
      raise ValueError(f"{where}: missing field {key!r}")
  answers = tuple(_text(record[f"ans{i}"], where, f"ans{i}") for i in range(3))
  label = record["label"]
  if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < 3:
    raise ValueError(f"{where}: field 'label' is {label!r}, expected 0, 1 or 2")
  unknown = [a for a in answers if a in UNKNOWN_RESPONSES]
  if len(unknown) != 1:
    raise ValueError(f"{where}: fields 'ans0'..'ans2' hold {len(unknown)} unknown answers "
                     f"{unknown}, expected exactly one of {list(UNKNOWN_RESPONSES)}")
  meta = record["additional_metadata"]
  groups = meta.get("stereotyped_groups") if isinstance(meta, dict) else None
  if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
    raise ValueError(f"{where}: field 'additional_metadata.stereotyped_groups' is "
                     f"{groups!r}, expected a list of strings")
  category = _text(record["category"], where, "category")
  return BBQItem(
      doc_id=f"{category}:{record.get('example_id', where.rsplit(':', 1)[-1])}",
      category=category, context=_text(record["context"], where, "context"),
      question=_text(record["question"], where, "question"), answers=answers, label=label,
      context_condition=_choice(record["context_condition"], ("ambig", "disambig"), where,
                                "context_condition"),
      question_polarity=_choice(record["question_polarity"], ("neg", "nonneg"), where,
                                "question_polarity"),
      answer_info=_answer_info(record["answer_info"], where),
      stereotyped_groups=tuple(groups))


def bbq(path: str) -> list[BBQItem]:
  """BBQ items of one .jsonl file, or of every `<Category>.jsonl` in a folder (sorted)."""
  if os.path.isdir(path):
    files = sorted(f for f in os.listdir(path) if f.endswith(".jsonl"))
    if not files:
      raise ValueError(f"{path}: no .jsonl files (expected BBQ's <Category>.jsonl)")
    return [item for f in files for item in bbq(os.path.join(path, f))]
  check_file(path)
  return [_bbq_item(record, f"{path}:{line}")
          for line, record in jsonl_records(path, objects_only=True)]


def split_answers(text: str) -> list[str]:
  """TruthfulQA's `split_multi_answer`: ";"-separated, stripped, a period added."""
  return [format_answer(a) for a in text.split(";") if a.strip()]


def format_answer(text: str) -> str:
  """TruthfulQA's `format_best`: stripped, a period added unless it ends with one."""
  text = text.strip()
  return text if text.endswith(".") else text + "."


def truthfulqa(path: str) -> list[TruthfulQAQuestion]:
  """The questions of TruthfulQA.csv with their answers split and normalised."""
  out = []
  for line, row in _csv_rows(path, TRUTHFULQA_COLUMNS):
    where = f"{path}:{line}"
    question = _text(row["Question"], where, "Question").strip()
    best = format_answer(_text(row["Best Answer"], where, "Best Answer"))
    answers = {}
    for column in ("Correct Answers", "Incorrect Answers"):
      answers[column] = split_answers(row[column])
      if not answers[column]:
        raise ValueError(f"{where}: field {column!r} is {row[column]!r}, expected answers "
                         "separated by ';'")
    out.append(TruthfulQAQuestion(
        doc_id=str(len(out)), category=(row.get("Category") or "").strip(),
        question=question, best_answer=best,
        correct_answers=tuple(answers["Correct Answers"]),
        incorrect_answers=tuple(answers["Incorrect Answers"])))
  return out
