"""A multi-source pretraining corpus with held-out rules (`config.data.source = "corpus"`).

`data.corpus_sources` is a comma-separated list of `path[:kind]` entries, resolved
under the data dir (`readers.resolve_data_path`). Kinds (`KINDS`):

  text        plain UTF-8 text. WikiText-style files are split into articles at
              their title lines (` = Title = `, one "=" on each side; section
              lines ` = = Section = = ` stay inside their article). A file with
              no title line is split into paragraphs at blank lines instead, so
              that the hash split below can still divide it.
  sft         an instruction/chat jsonl file read with `sft_sources.read_sft_file`
              (format detected per file). Each conversation becomes one document
              rendered as plain dialogue, "User: ...\\nAssistant: ..." (see
              `render_dialogue`), NOT with the chat marker tokens: the base model
              learns English and turn-taking, and the SFT stage still teaches the
              chat format (markers, where the loss is, ending a turn with <|end|>).
  transcript  an HH-RLHF preference file ({"chosen", "rejected"} jsonl[.gz]): one
              document per distinct `chosen` transcript (the rejected reply is
              never trained on), rendered like an sft conversation. Transcripts
              that do not parse (`sft_sources.parse_transcript`) are skipped and
              counted.
The kind defaults to text for `.txt` files, transcript for jsonl files whose first
record has both "chosen" and "rejected", else sft.

Held-out rules (what later stages evaluate on never reaches pretraining):
- `pretrain/wikitext2_tokens_test.txt` is a later issue's evaluation set, and
  everything under `eval/` is an evaluation set: naming one as a source is an error.
- sft: the conversations the SFT stage holds out are left out. They are found with
  the SFT stage's own rule, `sft_sources.split_examples(conversations,
  corpus_sft_val_fraction, corpus_sft_seed)`, whose defaults are the SFT data
  config's (`default_sft_data_config()`): a held-out SFT prompt never appears in
  the pretraining text. The split is a per-conversation hash, so it does not matter
  which files the SFT run combines; excluding a larger fraction with the same seed
  excludes a superset, so an SFT run may hold out less, never more.
- transcript: the reward-model stage splits the HH pairs into train/validation by
  conversation prefix with `split_preference_prefixes` (below); only the train
  side is used here. The RM stage must use the same function (with
  `corpus_pref_val_fraction`, `corpus_pref_seed`), else its validation pairs may
  have been pretrained on. A train-side transcript that starts with a validation
  prefix (a conversation branching from a held-out prompt: 1 of the 1,313 pairs at
  the defaults) is left out too, so no validation prompt is in the text.
- The pretraining validation split: after exact duplicates are dropped, a document
  is in validation when a hash of its text falls below `val_fraction`. It does not
  depend on position or source order, so validation covers every source, and equal
  documents can never straddle the split.

`load_corpus_split(data_cfg)` returns `(train_docs, val_docs)` and prints one line
per source (documents and characters kept, held out, skipped).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, NamedTuple, Sequence

from data import readers, sft_sources
from data.chat import ASSISTANT, SYSTEM, USER, Message
from data.config import default_sft_data_config
from data.readers import split_wikitext_articles

KINDS = ("text", "sft", "transcript")
# Evaluation data: refused as training sources (paths relative to the data dir).
HELD_OUT_FILES = ("pretrain/wikitext2_tokens_test.txt",)
HELD_OUT_DIRS = ("eval",)
# The final assistant turn of an HH transcript starts here; what precedes is the prefix.
PREFERENCE_ASSISTANT_TURN = "\n\nAssistant:"
DIALOGUE_NAMES = {SYSTEM: "System", USER: "User", ASSISTANT: "Assistant"}
# Salts the validation hash (`is_validation_document`); fixed, so the pretraining split
# does not move with data.seed. data/curate/ splits its tokenized output with it too.
VAL_SALT = "corpus-val"


class CorpusSource(NamedTuple):
  """One `corpus_sources` entry: an unresolved path and its kind."""
  path: str
  kind: str


class SourceDocuments(NamedTuple):
  """The documents read from one source, with what its held-out rule removed."""
  source: CorpusSource
  docs: list[str]
  held_out: int  # Conversations / transcripts left out by a held-out rule.
  skipped: int   # Records that did not parse.


def unit_hash(*parts: Any) -> float:
  """A deterministic number in [0, 1) from sha256 of the parts (joined by NUL)."""
  key = "\0".join(str(p) for p in parts).encode("utf-8")
  return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2.0**64


def _check_fraction(name: str, value: float) -> float:
  if not 0.0 <= value < 1.0:
    raise ValueError(f"{name} must be in [0, 1), got {value}")
  return float(value)


def parse_corpus_sources(spec: str | Sequence[str]) -> list[CorpusSource]:
  """Parses "path[:kind]" entries; a missing kind is inferred from the file.

  Raises:
    ValueError: No entries, an unknown kind after the last ":" (for a path that
      itself holds a ":", name the kind), or a held-out evaluation file.
    FileNotFoundError: A file (whose kind is inferred) does not exist.
  """
  entries = spec.split(",") if isinstance(spec, str) else list(spec)
  out = []
  for entry in (e.strip() for e in entries):
    if not entry:
      continue
    path, sep, kind = entry.rpartition(":")
    if not sep or "/" in kind:  # No kind, or the ":" belongs to the path.
      path, kind = entry, ""
    if kind and kind not in KINDS:
      raise ValueError(f"Corpus source {entry!r}: unknown kind {kind!r}; "
                       f"expected one of {KINDS}")
    check_not_held_out(path)
    out.append(CorpusSource(path, kind or infer_kind(readers.resolve_data_path(path))))
  if not out:
    raise ValueError(f"No corpus sources in {spec!r} (set data.corpus_sources)")
  return out


def check_not_held_out(path: str) -> None:
  """Raises ValueError if `path` is an evaluation file (`HELD_OUT_*`)."""
  resolved = os.path.realpath(readers.resolve_data_path(path))
  for held in HELD_OUT_FILES:
    if (resolved == os.path.realpath(readers.resolve_data_path(held))
        or os.path.basename(resolved) == os.path.basename(held)):
      raise ValueError(
          f"Corpus source {path!r} is {held}, the held-out evaluation set; it must "
          "never be trained on (use pretrain/wikitext2_tokens_valid.txt instead)")
  for held in HELD_OUT_DIRS:
    directory = os.path.realpath(readers.resolve_data_path(held))
    if resolved.startswith(directory + os.sep):
      raise ValueError(f"Corpus source {path!r} is under {held}/, which holds "
                       "evaluation sets; they must never be trained on")


def _first_record(path: str) -> Any:
  readers.check_file(path)
  for _, record in readers.jsonl_records(path):
    return record
  raise ValueError(f"No records in {path}")


def _is_preference_record(record: Any) -> bool:
  return isinstance(record, dict) and "chosen" in record and "rejected" in record


def infer_kind(path: str) -> str:
  """text for `.txt`; transcript for chosen/rejected jsonl; else sft."""
  if path.endswith(".txt"):
    return "text"
  return "transcript" if _is_preference_record(_first_record(path)) else "sft"


def render_dialogue(messages: Sequence[Message]) -> str:
  """Plain-text dialogue: "User: ...\\nAssistant: ..." (one line break between turns)."""
  return "\n".join(f"{DIALOGUE_NAMES[m['role']]}: {m['content']}" for m in messages)


def preference_prefix(transcript: str) -> str:
  """The prompt prefix of an HH transcript: everything before its final assistant turn.

  The chosen and rejected transcripts of a pair share it. A transcript without an
  assistant turn is its own prefix.
  """
  cut = transcript.rfind(PREFERENCE_ASSISTANT_TURN)
  return transcript if cut < 0 else transcript[:cut]


def split_preference_prefixes(prefixes: Sequence[str], val_fraction: float,
                              seed: int = 0) -> tuple[list[str], list[str]]:
  """Deterministic train/validation split of preference pairs by prompt prefix.

  The reward-model stage and this corpus must both use this function, so the RM's
  validation pairs are never pretrained on. Usage: `train, val =
  split_preference_prefixes([preference_prefix(p["chosen"]) for p in pairs], 0.1)`,
  then a pair is in validation iff its prefix is in `set(val)`. A prefix goes to
  validation when `unit_hash(seed, prefix) < val_fraction`, so pairs sharing a
  prefix stay together and file order does not matter.

  Args:
    prefixes: Prompt prefixes (`preference_prefix`), duplicates allowed.
    val_fraction: Expected fraction of distinct prefixes in validation, in [0, 1).
    seed: Changes which prefixes go to validation.

  Returns:
    (train, val): the distinct prefixes of each side, in first-seen order.
  """
  _check_fraction("val_fraction", val_fraction)
  train, val = [], []
  for prefix in dict.fromkeys(prefixes):
    (val if unit_hash(seed, prefix) < val_fraction else train).append(prefix)
  return train, val


def read_text_documents(path: str) -> SourceDocuments:
  """A text source: articles (or paragraphs) of the file."""
  docs = split_wikitext_articles(next(readers.read_text_file(path)))
  return SourceDocuments(CorpusSource(path, "text"), docs, 0, 0)


def read_sft_documents(path: str, val_fraction: float, seed: int) -> SourceDocuments:
  """An sft source: the SFT stage's train conversations rendered as dialogue.

  Raises:
    ValueError: A preference file (use kind transcript, so its own held-out rule
      applies), or anything `read_sft_file` raises.
  """
  if _is_preference_record(_first_record(path)):
    raise ValueError(f"{path} holds preference pairs (chosen/rejected); name it as "
                     f"'{path}:transcript' so the reward model's held-out pairs stay out")
  sft = sft_sources.read_sft_file(path)
  train, held = sft_sources.split_examples(sft.conversations, val_fraction, seed)
  return SourceDocuments(CorpusSource(path, "sft"), [render_dialogue(c) for c in train],
                         len(held), sft.skipped)


def read_transcript_documents(path: str, val_fraction: float,
                              seed: int) -> SourceDocuments:
  """A transcript source: distinct `chosen` transcripts on the RM's train side.

  Raises:
    ValueError: A record without a string "chosen" field (naming path:line), or no
      records (see `readers`).
  """
  readers.check_file(path)
  chosen: dict[str, None] = {}
  for line_no, record in readers.jsonl_records(path):
    if not isinstance(record, dict) or not isinstance(record.get("chosen"), str):
      raise ValueError(f"{path}:{line_no}: transcript records need a string 'chosen' "
                       "field (HH-RLHF preference format)")
    chosen[record["chosen"]] = None
  if not chosen:
    raise ValueError(f"No records in {path}")
  _, val = split_preference_prefixes([preference_prefix(t) for t in chosen],
                                     val_fraction, seed)
  held, held_starts = set(val), tuple(val)
  docs, held_out, skipped = [], 0, 0
  for transcript in chosen:
    # Also out: a train-side conversation that branches from a held-out prompt (it
    # starts with that prompt, whose final turn it answers differently or goes on).
    if preference_prefix(transcript) in held or transcript.startswith(held_starts):
      held_out += 1
      continue
    messages = sft_sources.parse_transcript(transcript)
    if messages is None:
      skipped += 1
    else:
      docs.append(render_dialogue(messages))
  return SourceDocuments(CorpusSource(path, "transcript"), docs, held_out, skipped)


def read_source(source: CorpusSource, data_cfg: Any) -> SourceDocuments:
  """Reads one source with its held-out rule (`data_cfg` supplies the fractions)."""
  check_not_held_out(source.path)
  path = readers.resolve_data_path(source.path)
  if source.kind == "text":
    result = read_text_documents(path)
  elif source.kind == "sft":
    fraction, seed = _sft_split(data_cfg)
    result = read_sft_documents(path, fraction, seed)
  elif source.kind == "transcript":
    fraction = float(getattr(data_cfg, "corpus_pref_val_fraction", 0.1))
    result = read_transcript_documents(
        path, _check_fraction("corpus_pref_val_fraction", fraction),
        int(getattr(data_cfg, "corpus_pref_seed", 0)))
  else:
    raise ValueError(f"Unknown corpus source kind {source.kind!r}; expected {KINDS}")
  if not result.docs:
    raise ValueError(f"Corpus source {source.path!r} ({source.kind}) gave no documents")
  return result._replace(source=source)


def _sft_split(data_cfg: Any) -> tuple[float, int]:
  """(corpus_sft_val_fraction, corpus_sft_seed), else the SFT data config's values."""
  sft_cfg = default_sft_data_config()
  fraction = float(getattr(data_cfg, "corpus_sft_val_fraction", sft_cfg.val_fraction))
  seed = int(getattr(data_cfg, "corpus_sft_seed", sft_cfg.seed))
  return _check_fraction("corpus_sft_val_fraction", fraction), seed


def split_documents(docs: Sequence[str],
                    val_fraction: float) -> tuple[list[str], list[str]]:
  """Train/validation split by a hash of each document's text, order kept."""
  _check_fraction("val_fraction", val_fraction)
  train, val = [], []
  for doc in docs:
    (val if is_validation_document(doc, val_fraction) else train).append(doc)
  return train, val


def is_validation_document(text: str, val_fraction: float) -> bool:
  """Whether a document is held out for validation: a salted hash of its text < fraction."""
  return unit_hash(VAL_SALT, text) < val_fraction


def load_corpus(data_cfg: Any) -> list[SourceDocuments]:
  """Reads every source of `data_cfg.corpus_sources` with its held-out rule."""
  return [read_source(s, data_cfg)
          for s in parse_corpus_sources(getattr(data_cfg, "corpus_sources", ""))]


def load_corpus_split(data_cfg: Any) -> tuple[list[str], list[str]]:
  """The corpus's (train_docs, val_docs): held-out rules, dedup, hash split.

  Args:
    data_cfg: The data config (`default_data_config()` layout): `corpus_sources`,
      `corpus_sft_val_fraction`, `corpus_sft_seed`, `corpus_pref_val_fraction`,
      `corpus_pref_seed`, `val_fraction`.

  Returns:
    (train_docs, val_docs), each in source order. Prints one line per source.
  """
  val_fraction = float(getattr(data_cfg, "val_fraction", 0.1))
  seen: set[str] = set()
  train, val, lines = [], [], []
  for result in load_corpus(data_cfg):
    unique = [d for d in dict.fromkeys(result.docs) if d not in seen]
    seen.update(unique)
    t, v = split_documents(unique, val_fraction)
    train += t
    val += v
    lines.append(
        f"  {result.source.path} ({result.source.kind}): {len(t)} train / {len(v)} val "
        f"docs, {sum(map(len, t)):,} / {sum(map(len, v)):,} chars; "
        f"{result.held_out} held out, {len(result.docs) - len(unique)} duplicates, "
        f"{result.skipped} unparseable")
  print(f"Corpus: {len(train)} train docs ({sum(map(len, train)):,} chars), {len(val)} "
        f"val docs ({sum(map(len, val)):,} chars)\n" + "\n".join(lines), flush=True)
  return train, val
