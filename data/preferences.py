"""Preference-pair readers: jsonl files and TFDS datasets -> (prompt, chosen, rejected).

A `PreferencePair` is a prompt (chat messages ending with a user turn) and the two final
assistant responses, `chosen` preferred over `rejected`. Formats (`FORMATS`), detected from
the first record that has any format's fields, or named explicitly:

  hh               {"chosen", "rejected"}: full "\\n\\nHuman: ...\\n\\nAssistant: ..."
                   transcripts that differ only in the last assistant turn (Anthropic
                   HH-RLHF). Each is cut at its LAST "\\n\\nAssistant:"; the text before
                   must be the same in both (the shared prompt), the rest is the response.
  prompt_chosen_rejected
                   {"prompt", "chosen", "rejected"[, "margin"]}: prompt a string (one user
                   turn) or a message list; chosen/rejected strings, or message lists whose
                   last message is the assistant's (TRL's conversational format).
  sharegpt         {"conversations": [{"from", "value"}, ...], "chosen": {"from", "value"},
                   "rejected": {...}[, "system"]}: LLaMA-Factory's sharegpt preference
                   format; "from" is human/user, gpt/assistant or system.

Sources are "path[:format]" (relative paths under $LM_DATA_DIR, else ../shared/data) or
"tfds:name[:split]" (a TFDS dataset whose features are one of the formats' fields; split
defaults to "train").

Decisions:
- Bad records are counted per reason (`SKIP_REASONS`) and reported, never kept and never
  fatal one by one: preference data is noisy (the shared HH file has transcripts that do
  not parse) and a reward model should not stop on one. A file where no record has any
  format's fields, malformed JSON, or a file without a single usable pair is an error
  naming the file (and line).
- Dropped and counted: a missing or non-string field, a transcript with no assistant turn
  or malformed turns, chosen/rejected transcripts whose prompts differ, an empty
  response, identical responses, and an exact repeat of an earlier pair.
- The prompt key (`PreferencePair.key`) decides the train/validation split. For HH it is the
  raw transcript prefix (`data.corpus.preference_prefix`), so the split is exactly the one
  the pretraining corpus holds out (`data.corpus.split_preference_prefixes`); for the other
  formats it is the rendered prompt.
- Whitespace: HH turns are stripped as in the SFT transcript reader; other formats keep
  their text as given (only emptiness is checked on the stripped text).
"""

from __future__ import annotations

import collections
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Sequence

from data import corpus, readers, tfds_readers
from data.chat import ASSISTANT, SYSTEM, USER, render
from data.sft_sources import TURN_RE

FORMAT_FIELDS: Mapping[str, tuple[str, ...]] = {
    "sharegpt": ("conversations", "chosen", "rejected"),
    "prompt_chosen_rejected": ("prompt", "chosen", "rejected"),
    "hh": ("chosen", "rejected"),
}
FORMATS = tuple(FORMAT_FIELDS)
SKIP_REASONS = ("missing_field", "no_assistant_turn", "malformed", "prompt_mismatch",
                "empty_response", "identical", "duplicate")
SHAREGPT_ROLES = {"human": USER, "user": USER, "gpt": ASSISTANT, "assistant": ASSISTANT,
                  "system": SYSTEM}
ASSISTANT_TURN = "\n\nAssistant:"


class PreferencePair(NamedTuple):
  """One comparison: `chosen` is preferred to `rejected` as the answer to `prompt`."""
  prompt: tuple[Mapping[str, str], ...]  # Chat messages, the last one the user's.
  chosen: str
  rejected: str
  key: str            # The split key (see the module doc).
  margin: float = 0.0  # Optional per-pair margin of the loss (0 = none).


class PreferenceFile(NamedTuple):
  """The pairs read from one source, with the skipped records counted by reason."""
  path: str
  format: str
  pairs: list[PreferencePair]
  skipped: dict[str, int]
  records: int


class _Skip(Exception):
  """A record that is dropped and counted under `reason`."""

  def __init__(self, reason: str):
    super().__init__(reason)
    self.reason = reason


def detect_format(record: Any) -> str | None:
  """The first format whose fields `record` has (sharegpt, then prompt_chosen_rejected)."""
  if not isinstance(record, Mapping):
    return None
  return next((f for f, fields in FORMAT_FIELDS.items() if all(k in record for k in fields)),
              None)


def _string(record: Mapping[str, Any], field: str) -> str:
  value = record.get(field)
  if not isinstance(value, str):
    raise _Skip("missing_field")
  return value


def parse_prompt_turns(prefix: str) -> list[dict[str, str]]:
  """An HH prefix ("\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...") -> messages.

  Raises _Skip("malformed") unless turns alternate from Human, end with Human, and none is
  empty.
  """
  headers = list(TURN_RE.finditer(prefix))
  if not headers or prefix[:headers[0].start()].strip() or len(headers) % 2 == 0:
    raise _Skip("malformed")
  messages = []
  for i, header in enumerate(headers):
    end = headers[i + 1].start() if i + 1 < len(headers) else len(prefix)
    content = prefix[header.end():end].strip()
    if header.group(1) != ("Human" if i % 2 == 0 else "Assistant") or not content:
      raise _Skip("malformed")
    messages.append({"role": USER if i % 2 == 0 else ASSISTANT, "content": content})
  return messages


def _split_transcript(text: str) -> tuple[str, str]:
  cut = text.rfind(ASSISTANT_TURN)
  if cut < 0:
    raise _Skip("no_assistant_turn")
  return text[:cut], text[cut + len(ASSISTANT_TURN):].strip()


def _hh_pair(record: Mapping[str, Any]) -> PreferencePair:
  (prefix, chosen), (other, rejected) = (_split_transcript(_string(record, k))
                                         for k in ("chosen", "rejected"))
  if prefix != other:
    raise _Skip("prompt_mismatch")
  key = corpus.preference_prefix(record["chosen"])
  return PreferencePair(tuple(parse_prompt_turns(prefix)), chosen, rejected, key)


def _messages(value: Any, role_key: str = "role", content_key: str = "content",
              roles: Mapping[str, str] | None = None) -> list[dict[str, str]]:
  if not isinstance(value, list) or not value:
    raise _Skip("missing_field")
  out = []
  for m in value:
    if not (isinstance(m, Mapping) and isinstance(m.get(content_key), str)):
      raise _Skip("missing_field")
    role = m.get(role_key)
    role = roles.get(role) if roles else role
    if role not in (SYSTEM, USER, ASSISTANT):
      raise _Skip("malformed")
    out.append({"role": role, "content": m[content_key]})
  return out


def _response(value: Any, **kwargs: Any) -> str:
  """A response field: a string, or messages whose last one is the assistant's."""
  if isinstance(value, str):
    return value
  if isinstance(value, Mapping):
    value = [value]
  messages = _messages(value, **kwargs)
  if messages[-1]["role"] != ASSISTANT:
    raise _Skip("no_assistant_turn")
  return messages[-1]["content"]


def _check_prompt(prompt: list[dict[str, str]]) -> tuple[dict[str, str], ...]:
  if not prompt or prompt[-1]["role"] != USER:
    raise _Skip("malformed")
  return tuple(prompt)


def _generic_pair(record: Mapping[str, Any]) -> PreferencePair:
  raw = record.get("prompt")
  prompt = ([{"role": USER, "content": raw}] if isinstance(raw, str) else _messages(raw))
  prompt = _check_prompt(prompt)
  margin = record.get("margin", 0.0)
  if isinstance(margin, bool) or not isinstance(margin, (int, float)):
    raise _Skip("missing_field")
  return PreferencePair(prompt, _response(record.get("chosen")),
                        _response(record.get("rejected")), render(prompt), float(margin))


def _sharegpt_pair(record: Mapping[str, Any]) -> PreferencePair:
  kw = dict(role_key="from", content_key="value", roles=SHAREGPT_ROLES)
  prompt = _messages(record.get("conversations"), **kw)
  system = record.get("system")
  if isinstance(system, str) and system:
    prompt = [{"role": SYSTEM, "content": system}] + prompt
  prompt = _check_prompt(prompt)
  return PreferencePair(prompt, _response(record.get("chosen"), **kw),
                        _response(record.get("rejected"), **kw), render(prompt))


PARSERS = {"hh": _hh_pair, "prompt_chosen_rejected": _generic_pair,
           "sharegpt": _sharegpt_pair}


def record_to_pair(record: Any, fmt: str) -> PreferencePair:
  """One record -> a pair; raises `_Skip(reason)` for a record that must be dropped."""
  if not isinstance(record, Mapping):
    raise _Skip("missing_field")
  pair = PARSERS[fmt](record)
  if not pair.chosen.strip() or not pair.rejected.strip():
    raise _Skip("empty_response")
  if pair.chosen == pair.rejected:
    raise _Skip("identical")
  return pair


def read_records(where: str, records: Iterable[tuple[int, Any]],
                 format: str = "auto") -> PreferenceFile:  # pylint: disable=redefined-builtin
  """Parses (line number, record) pairs of one source (see the module doc for the rules).

  Raises:
    ValueError: Unknown format name, no record with any format's fields, or no usable pair
      (each names `where`).
  """
  if format != "auto" and format not in FORMATS:
    raise ValueError(f"Unknown preference format {format!r}; expected 'auto' or one of "
                     f"{FORMATS}")
  fmt = None if format == "auto" else format
  pairs, seen, total = [], set(), 0
  skipped: dict[str, int] = collections.Counter()
  first_keys = None
  for _, record in records:
    total += 1
    if fmt is None:
      fmt = detect_format(record)
      if fmt is None:
        first_keys = first_keys or (sorted(record) if isinstance(record, Mapping)
                                    else type(record).__name__)
        skipped["missing_field"] += 1
        continue
    try:
      pair = record_to_pair(record, fmt)
      identity = (render(pair.prompt), pair.chosen, pair.rejected)
      if identity in seen:
        raise _Skip("duplicate")
      seen.add(identity)
      pairs.append(pair)
    except _Skip as skip:
      skipped[skip.reason] += 1
  if fmt is None:
    expected = "; ".join(f"{f}: {list(k)}" for f, k in FORMAT_FIELDS.items())
    raise ValueError(f"{where}: no record has the fields of a preference format (first "
                     f"record has {first_keys}; expected {expected})")
  if not pairs:
    raise ValueError(f"{where}: no usable preference pair in {total} records (skipped: "
                     f"{dict(skipped)}; format {fmt})")
  return PreferenceFile(where, fmt, pairs, {r: skipped[r] for r in SKIP_REASONS}, total)


def _tfds_records(name: str, split: str, data_dir: str | None) -> Iterator[tuple[int, Any]]:
  return tfds_readers.tfds_records(name, split, data_dir)


def read_source(spec: str, tfds_data_dir: str = "") -> PreferenceFile:
  """Reads one source "path[:format]" or "tfds:name[:split]" (see the module doc)."""
  if spec.startswith("tfds:"):
    name, _, split = spec[len("tfds:"):].partition(":")
    return read_records(f"tfds:{name}[{split or 'train'}]",
                        _tfds_records(name, split or "train", tfds_data_dir))
  path, _, fmt = spec.rpartition(":")
  if not path or fmt not in FORMATS + ("auto",):
    path, fmt = spec, "auto"
  path = readers.resolve_data_path(path)
  readers.check_file(path)
  return read_records(path, readers.jsonl_records(path), fmt)


def read_sources(spec: str | Sequence[str], tfds_data_dir: str = ""
                 ) -> tuple[list[PreferencePair], list[PreferenceFile]]:
  """Reads every source of a comma-separated spec; returns (all pairs, per-source files)."""
  entries = spec.split(",") if isinstance(spec, str) else list(spec)
  files = [read_source(e.strip(), tfds_data_dir) for e in entries if e.strip()]
  if not files:
    raise ValueError(f"No preference sources in {spec!r}")
  return [p for f in files for p in f.pairs], files


def split_pairs(pairs: Sequence[PreferencePair], val_fraction: float, seed: int = 0
                ) -> tuple[list[PreferencePair], list[PreferencePair], int]:
  """Train/validation split by prompt key (`data.corpus.split_preference_prefixes`).

  Pairs sharing a key stay together. A train pair whose key starts with a validation key (a
  longer conversation branching from a held-out prompt) is dropped, as the pretraining
  corpus drops it, so no validation prompt is trained on in any form.

  Returns:
    (train, val, dropped branch count).
  """
  _, val_keys = corpus.split_preference_prefixes([p.key for p in pairs], val_fraction, seed)
  held, held_starts = set(val_keys), tuple(val_keys)
  train, val, branches = [], [], 0
  for pair in pairs:
    if pair.key in held:
      val.append(pair)
    elif held_starts and pair.key.startswith(held_starts):
      branches += 1
    else:
      train.append(pair)
  return train, val, branches


TRAIN_PARTS = ("", "a", "b")


def select_part(pairs: Sequence[PreferencePair], part: str, seed: int = 0
                ) -> list[PreferencePair]:
  """Half "a" or "b" of `pairs` by a seeded hash of the prompt key ("" = all).

  Two reward models trained on parts "a" and "b" of the same training split never share a
  prompt: one can judge a policy optimised against the other (PPO's second judge).
  """
  if part not in TRAIN_PARTS:
    raise ValueError(f"data.train_part={part!r}: expected one of {TRAIN_PARTS}")
  if not part:
    return list(pairs)
  return [p for p in pairs if (corpus.unit_hash(seed, "part", p.key) < 0.5) == (part == "a")]
