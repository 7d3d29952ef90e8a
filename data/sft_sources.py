"""SFT readers: jsonl records of several public formats -> chat conversations.

A conversation is a list of `{"role", "content"}` messages (see `data.chat`).
Formats (`FORMATS`), detected from the first record's keys or named explicitly:

  alpaca           {"instruction", "output"[, "input"]}: user = instruction, or
                   instruction + "\\n\\n" + input when input is non-empty;
                   assistant = output. A missing "input" counts as empty.
  prompt_response  {"prompt", "response"} (e.g. sft/dolly_hhrlhf_1k.jsonl).
  gsm8k            {"question", "answer"}: the answer is kept verbatim, with its
                   `<<calc>>` annotations and final `#### <number>` line, which is
                   what GSM8K answer extraction looks for.
  transcript       {"text"} or {"chosen"}: an HH-RLHF style transcript
                   "\\n\\nHuman: ...\\n\\nAssistant: ..." -> alternating user and
                   assistant messages.

Decisions:
- prompt_response prompts wrapped in the Alpaca template ("Below is an
  instruction that describes a task. ... ### Instruction:\\n<x>\\n\\n### Response:\\n",
  all 1,000 records of dolly_hhrlhf_1k) are unwrapped to the bare instruction <x>:
  the chat markers already say who speaks, and a model fine-tuned on bare
  instructions is prompted the same way at generation time. Only an exact match
  of the wrapper's prefix and suffix is unwrapped; any other prompt is kept
  unchanged, so no data is lost to a guess.
- A transcript must start with a Human turn, alternate strictly, end with an
  Assistant turn and have no empty turn; anything else is skipped and counted
  (4 + 1 of the 1,313 HH harmless-base `chosen` transcripts), not an error,
  because such records are data noise rather than a config mistake.
- A record without its format's fields, or with a non-string field, is an
  error naming the file, the 1-based line and the expected fields: the file is
  not in the format the config says.
- `split_examples` assigns a conversation to validation by a seeded hash of its
  opening (everything before the first assistant turn), so equal prompts, and
  multi-turn conversations branching from the same opening, always land in the
  same split, independent of file order.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Mapping, NamedTuple, Sequence

from data import readers, tfds_readers
from data.chat import ASSISTANT, USER, Message, render

Conversation = list[dict[str, str]]

# Required fields per format; a transcript needs one of TRANSCRIPT_FIELDS instead.
FORMAT_FIELDS: Mapping[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "output"),
    "prompt_response": ("prompt", "response"),
    "gsm8k": ("question", "answer"),
    "transcript": (),
}
FORMATS = tuple(FORMAT_FIELDS)
TRANSCRIPT_FIELDS = ("text", "chosen")
ALPACA_PROMPT_PREFIX = (
    "Below is an instruction that describes a task. Write a response that "
    "appropriately completes the request.\n\n### Instruction:\n")
ALPACA_PROMPT_SUFFIX = "\n\n### Response:\n"
# A turn header at the start of the transcript or after a blank line.
TURN_RE = re.compile(r"(?:^|\n\n)(Human|Assistant):")


class SFTFile(NamedTuple):
  """The conversations read from one file."""
  path: str
  format: str
  conversations: list[Conversation]
  skipped: int  # Records that did not parse (transcripts), counted not raised.


def _expected(fmt: str) -> str:
  fields = FORMAT_FIELDS[fmt] or (f"one of {TRANSCRIPT_FIELDS}",)
  return f"format {fmt!r} expects fields {list(fields)}"


def detect_format(record: Any) -> str | None:
  """The format whose fields `record` has, or None."""
  if not isinstance(record, dict):
    return None
  for fmt, fields in FORMAT_FIELDS.items():
    if fields and all(f in record for f in fields):
      return fmt
  if any(f in record for f in TRANSCRIPT_FIELDS):
    return "transcript"
  return None


def _turn(role: str, content: str) -> dict[str, str]:
  return {"role": role, "content": content}


def unwrap_alpaca_prompt(prompt: str) -> str:
  """The bare instruction of an exactly Alpaca-wrapped prompt, else `prompt`."""
  if (prompt.startswith(ALPACA_PROMPT_PREFIX) and prompt.endswith(ALPACA_PROMPT_SUFFIX)
      and len(prompt) > len(ALPACA_PROMPT_PREFIX) + len(ALPACA_PROMPT_SUFFIX)):
    return prompt[len(ALPACA_PROMPT_PREFIX):-len(ALPACA_PROMPT_SUFFIX)]
  return prompt


def parse_transcript(text: str) -> Conversation | None:
  """Parses "\\n\\nHuman: ...\\n\\nAssistant: ..." into messages; None if malformed.

  Turn contents are stripped of surrounding whitespace. Malformed: text before
  the first turn, no turns, turns out of order, an empty turn, or a last turn
  that is not the assistant's.
  """
  headers = list(TURN_RE.finditer(text))
  if not headers or text[:headers[0].start()].strip():
    return None
  messages = []
  for i, header in enumerate(headers):
    expected = "Human" if i % 2 == 0 else "Assistant"
    end = headers[i + 1].start() if i + 1 < len(headers) else len(text)
    content = text[header.end():end].strip()
    if header.group(1) != expected or not content:
      return None
    messages.append(_turn(USER if expected == "Human" else ASSISTANT, content))
  return messages if messages[-1]["role"] == ASSISTANT else None


def record_to_conversation(record: Mapping[str, Any], fmt: str) -> Conversation | None:
  """One record of a known format -> messages (None: transcript did not parse).

  The caller has checked that the record holds the format's fields as strings.
  """
  if fmt == "alpaca":
    extra = record.get("input") or ""
    user = f"{record['instruction']}\n\n{extra}" if extra else record["instruction"]
    return [_turn(USER, user), _turn(ASSISTANT, record["output"])]
  if fmt == "prompt_response":
    return [_turn(USER, unwrap_alpaca_prompt(record["prompt"])),
            _turn(ASSISTANT, record["response"])]
  if fmt == "gsm8k":
    return [_turn(USER, record["question"]), _turn(ASSISTANT, record["answer"])]
  if fmt == "transcript":
    field = next(f for f in TRANSCRIPT_FIELDS if f in record)
    return parse_transcript(record[field])
  raise ValueError(f"Unknown SFT format {fmt!r}; expected one of {FORMATS}")


def check_record(path: str, line_no: int, record: Any, fmt: str) -> None:
  """Raises ValueError naming path:line unless `record` has `fmt`'s string fields."""
  if not isinstance(record, dict):
    raise ValueError(f"{path}:{line_no}: record is a {type(record).__name__}, not a "
                     f"JSON object; {_expected(fmt)}")
  if fmt == "transcript":
    fields = [f for f in TRANSCRIPT_FIELDS if f in record][:1]
    missing = [] if fields else [f"one of {TRANSCRIPT_FIELDS}"]
  else:
    fields = list(FORMAT_FIELDS[fmt])
    missing = [f for f in fields if f not in record]
    if fmt == "alpaca" and record.get("input") is not None:
      fields.append("input")  # Optional; absent or null means empty.
  if missing:
    raise ValueError(f"{path}:{line_no}: record is missing field(s) {missing}; "
                     f"{_expected(fmt)} (record has: {sorted(record)})")
  for field in fields:
    if not isinstance(record[field], str):
      raise ValueError(f"{path}:{line_no}: field {field!r} is "
                       f"{type(record[field]).__name__}, expected a string")


def read_sft_file(path: str, format: str = "auto") -> SFTFile:  # pylint: disable=redefined-builtin
  """Reads a jsonl (`.gz`: gzip) file of SFT records into conversations.

  Args:
    path: The file (not resolved; see `readers.resolve_data_path`).
    format: One of `FORMATS`, or "auto" to detect it from the first record.

  Returns:
    The `SFTFile`: its conversations in file order and the skipped count.

  Raises:
    FileNotFoundError: No such file.
    ValueError: Empty file, malformed JSON line, unknown format, a record
      without its format's fields (naming file, line and the fields), or no
      conversation at all.
  """
  if format != "auto" and format not in FORMATS:
    raise ValueError(f"Unknown SFT format {format!r}; expected 'auto' or one of {FORMATS}")
  # The same checks, line numbers and JSON errors as the pretraining jsonl reader.
  readers.check_file(path)
  return read_sft_records(path, readers.jsonl_records(path), format)


def read_sft_records(path: str, records: Any, format: str = "auto") -> SFTFile:  # pylint: disable=redefined-builtin
  """`read_sft_file` over (line number, record) pairs from anywhere (a file, TFDS);
  `path` names the origin in messages."""
  fmt = None if format == "auto" else format
  conversations, skipped = [], 0
  for line_no, record in records:
    if fmt is None:
      fmt = detect_format(record)
      if fmt is None:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        known = "; ".join(_expected(f) for f in FORMATS)
        raise ValueError(f"{path}:{line_no}: cannot detect the SFT format from the "
                         f"record's fields {keys} ({known})")
    check_record(path, line_no, record, fmt)
    conversation = record_to_conversation(record, fmt)
    if conversation is None:
      skipped += 1
    else:
      conversations.append(conversation)
  if not conversations:
    raise ValueError(f"No conversations in {path} (format={fmt or format!r}, "
                     f"{skipped} records skipped as unparseable)")
  return SFTFile(path, fmt, conversations, skipped)


def parse_source_specs(spec: str | Sequence[str]) -> list[tuple[str, str]]:
  """Parses `sources` config entries "path" or "path:format" into (path, format).

  Args:
    spec: A comma-separated string or a sequence of entries. The part after the
      last ":" is a format only if it is one of `FORMATS` or "auto"; otherwise
      the whole entry is the path and the format is "auto".

  Returns:
    (path, format) pairs, paths unresolved.
  """
  entries = spec.split(",") if isinstance(spec, str) else list(spec)
  out = []
  for entry in (e.strip() for e in entries):
    if not entry:
      continue
    path, _, fmt = entry.rpartition(":")
    if path and (fmt in FORMATS or fmt == "auto"):
      out.append((path, fmt))
    else:
      out.append((entry, "auto"))
  if not out:
    raise ValueError(f"No SFT sources in {spec!r}")
  return out


def read_sft_sources(spec: str | Sequence[str], tfds_data_dir: str = ""
                     ) -> tuple[list[Conversation], list[SFTFile]]:
  """Reads every source of a `sources` spec (paths resolved under the data dir; entries
  "tfds:name[/config][:split]" are TFDS datasets in `tfds_data_dir`).

  Returns:
    (all conversations in source order, the per-file `SFTFile`s).
  """
  files = []
  for path, fmt in parse_source_specs(spec):
    if path.startswith("tfds:"):  # "tfds:name[/config][:split]" (data/tfds_builders.py)
      name, _, split = path[len("tfds:"):].partition(":")
      files.append(read_sft_records(f"tfds:{name}[{split or 'train'}]", tfds_readers.tfds_records(
          name, split or "train", tfds_data_dir), fmt))
    else:
      files.append(read_sft_file(readers.resolve_data_path(path), fmt))
  return [c for f in files for c in f.conversations], files


def prompt_key(messages: Sequence[Message]) -> str:
  """The conversation's opening: rendered messages before the first assistant turn."""
  opening = []
  for message in messages:
    if message["role"] == ASSISTANT:
      break
    opening.append(message)
  return render(opening)


def split_examples(examples: Sequence[Sequence[Message]], val_fraction: float,
                   seed: int = 0) -> tuple[list[Any], list[Any]]:
  """Deterministic train/validation split by a seeded hash of each opening.

  Args:
    examples: Conversations.
    val_fraction: Expected fraction in validation, in [0, 1).
    seed: Changes which openings go to validation.

  Returns:
    (train, val), each in input order.
  """
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
  train, val = [], []
  for messages in examples:
    digest = hashlib.sha256(f"{seed}\0{prompt_key(messages)}".encode("utf-8")).digest()
    # The first 8 bytes as a uniform number in [0, 1).
    (val if int.from_bytes(digest[:8], "big") / 2.0**64 < val_fraction
     else train).append(messages)
  return train, val
