"""Curation inputs: one source of a curation config -> documents, with held-out rules applied.

Kinds (`KINDS`; see `read_source`): text, jsonl, sft, transcript, tfds. A source's `path`
may be a glob: `source_files` expands it (sorted; matching nothing is an error), and each
file is read on its own (`read_file`: one unit of parallel reading, with the held-out rules
applied per file). Bad input is counted per file (`BAD_KEYS`) and skipped, never fatal:
the jsonl kinds read through `data.readers.jsonl_records(on_bad="count")`, text through
`data.readers.read_text`; a file that cannot be read (permission denied, a corrupt or
truncated .gz) counts as `unreadable`, keeping the records read before the failure.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Callable, Iterator, Mapping, MutableMapping

from apache_beam.io.filesystems import FileSystems

import tensorflow_datasets as tfds

from data import corpus, readers, sft_sources, tfds_readers
from data.config import default_data_config

KINDS = ("text", "jsonl", "sft", "transcript", "tfds")
BAD_KEYS = (*readers.BAD_LINE_KINDS, "missing_field", "unparseable", "unreadable")
# What reading a file that is not fully readable raises (gzip: OSError, EOFError, zlib).
UNREADABLE = (OSError, EOFError, zlib.error)
Counts = MutableMapping[str, int]
# (text, provenance) pairs and how many documents a held-out rule removed.
Pieces = tuple[list[tuple[str, str]], int]


@dataclasses.dataclass
class Document:
  doc_id: str        # "<source>/<index>" ("<source>/<file>/<index>" for several files)
  source: str
  text: str
  provenance: str    # "path:line" (jsonl), "path#n" (n-th piece of a text file), "tfds:..."


def held_out_config(cfg: Any) -> dict[str, Any]:
  """The config's `held_out` fractions and seeds, else the pretraining corpus's defaults."""
  d = default_data_config()
  h = dict(cfg.get("held_out", {}) or {})
  return {"sft_val_fraction": h.get("sft_val_fraction", d.corpus_sft_val_fraction),
          "sft_seed": h.get("sft_seed", d.corpus_sft_seed),
          "pref_val_fraction": h.get("pref_val_fraction", d.corpus_pref_val_fraction),
          "pref_seed": h.get("pref_seed", d.corpus_pref_seed)}


def _objects(path: str, counts: Counts) -> Iterator[tuple[int, Any]]:
  try:
    yield from readers.jsonl_records(path, objects_only=True, on_bad="count",
                                     bad_counts=counts)
  except UNREADABLE:
    counts["unreadable"] += 1


def _text(source: Mapping[str, Any], path: str, counts: Counts, h: Mapping[str, Any]
          ) -> Pieces:
  del h  # no held-out rule: text files under eval/ are refused as sources instead
  split = source.get("split", "paragraphs")
  try:
    text = readers.read_text(path, on_bad="count", bad_counts=counts)  # the readable rest
  except UNREADABLE:
    counts["unreadable"] += 1
    text = ""
  if split == "file":
    pieces = [text]
  elif split == "lines":
    pieces = text.split("\n")
  elif split == "articles":  # WikiText: one document per " = Title = " article
    pieces = readers.split_wikitext_articles(text)
  elif split == "paragraphs":
    pieces = text.split("\n\n")
  else:
    raise ValueError(f"source {source['name']!r}: split={split!r}, expected file, lines, "
                     "articles or paragraphs")
  return [(p, f"{path}#{n}") for n, p in enumerate(pieces) if p.strip()], 0


def _tfds(source: Mapping[str, Any], spec: str, counts: Counts, h: Mapping[str, Any],
          tfds_data_dir: str) -> Pieces:
  del h
  ds_name, _, split = spec[len("tfds:"):].partition(":")
  field = source.get("text_field", "text")
  ds = tfds_readers.load_tfds(ds_name, split or "train", tfds_data_dir)
  if field not in ds.element_spec:
    raise ValueError(f"source {source['name']!r}: TFDS {ds_name} has no feature {field!r} "
                     f"(has: {sorted(ds.element_spec)})")
  out = []
  for n, example in enumerate(tfds.as_numpy(ds)):
    try:
      out.append((example[field].decode("utf-8"), f"{spec}#{n}"))
    except UnicodeDecodeError:
      counts["undecodable"] += 1
  return out, 0


def _jsonl(source: Mapping[str, Any], path: str, counts: Counts, h: Mapping[str, Any]
           ) -> Pieces:
  del h
  fields = list(source.get("text_fields") or [source.get("text_field", "text")])
  out = []
  for number, record in _objects(path, counts):
    if not all(isinstance(record.get(f), str) for f in fields):
      counts["missing_field"] += 1
      continue
    out.append(("\n\n".join(record[f] for f in fields if record[f]), f"{path}:{number}"))
  return out, 0


def _sft(source: Mapping[str, Any], path: str, counts: Counts, h: Mapping[str, Any]
         ) -> Pieces:
  fmt, kept = source.get("format"), []
  for number, record in _objects(path, counts):
    fmt = fmt or sft_sources.detect_format(record)
    try:
      if fmt is None:
        raise ValueError("no known format")
      sft_sources.check_record(path, number, record, fmt)
    except ValueError:
      counts["missing_field"] += 1
      continue
    messages = sft_sources.record_to_conversation(record, fmt)
    if messages is None:
      counts["unparseable"] += 1
      continue
    kept.append((messages, f"{path}:{number}"))
  _, val = sft_sources.split_examples([m for m, _ in kept], h["sft_val_fraction"],
                                      h["sft_seed"])
  held_ids = {id(m) for m in val}
  out = [(corpus.render_dialogue(m), provenance) for m, provenance in kept
         if id(m) not in held_ids]
  return out, len(kept) - len(out)


def _transcript(source: Mapping[str, Any], path: str, counts: Counts, h: Mapping[str, Any]
                ) -> Pieces:
  del source
  chosen: dict[str, str] = {}
  for number, record in _objects(path, counts):
    if not isinstance(record.get("chosen"), str):
      counts["missing_field"] += 1
      continue
    chosen.setdefault(record["chosen"], f"{path}:{number}")
  _, val = corpus.split_preference_prefixes(
      [corpus.preference_prefix(t) for t in chosen], h["pref_val_fraction"], h["pref_seed"])
  held_set, held_starts, held, out = set(val), tuple(val), 0, []
  for transcript, provenance in chosen.items():
    if corpus.preference_prefix(transcript) in held_set or transcript.startswith(held_starts):
      held += 1
      continue
    messages = sft_sources.parse_transcript(transcript)
    if messages is None:
      counts["unparseable"] += 1
    else:
      out.append((corpus.render_dialogue(messages), provenance))
  return out, held


_FILE_KINDS: dict[str, Callable[..., Pieces]] = {
    "text": _text, "jsonl": _jsonl, "sft": _sft, "transcript": _transcript}


def source_kind(source: Mapping[str, Any]) -> str:
  """The source's `kind`, else guessed from its path (tfds:, .jsonl, else text)."""
  kind, spec = source.get("kind") or "", source["path"]
  if not kind:
    kind = "tfds" if spec.startswith("tfds:") else ("jsonl" if ".jsonl" in spec else "text")
  if kind not in KINDS:
    raise ValueError(f"source {source['name']!r}: kind={kind!r}, expected one of {KINDS}")
  return kind


def source_files(source: Mapping[str, Any]) -> list[str]:
  """The files of a source: its `path` (a file or a glob, under the data directory when
  relative; local or any Beam filesystem such as gs://) expanded and sorted; a tfds source
  is one unit, its spec. Raises ValueError when nothing matches or a match is an
  evaluation file."""
  spec = source["path"]
  if source_kind(source) == "tfds":
    return [spec]
  pattern = readers.resolve_data_path(spec)
  matched = FileSystems.match([pattern])[0].metadata_list
  paths = sorted(m.path for m in matched)
  if not paths:
    raise ValueError(f"no file matches {pattern}")
  for path in paths:
    corpus.check_not_held_out(path)  # evaluation files are never training sources
  return paths


def read_file(source: Mapping[str, Any], path: str, bad: dict[str, dict[str, int]],
              held_out: Mapping[str, Any] | None = None, tfds_data_dir: str = ""
              ) -> Pieces:
  """(text, provenance) pairs of one file of `source` (see `read_source`) and how many
  documents its held-out rule removed; problems are counted in bad[path] (`BAD_KEYS`)."""
  counts = bad.setdefault(path, {k: 0 for k in BAD_KEYS})
  h = dict(held_out or held_out_config({}))
  kind = source_kind(source)
  if kind == "tfds":
    return _tfds(source, path, counts, h, tfds_data_dir)
  return _FILE_KINDS[kind](source, path, counts, h)


def doc_id(name: str, file_index: int, index: int, num_files: int) -> str:
  """"<source>/<index>", or "<source>/<file>/<index>" when the source has several files."""
  return f"{name}/{index}" if num_files == 1 else f"{name}/{file_index}/{index}"


def read_source(source: Mapping[str, Any], bad: dict[str, dict[str, int]],
                held_out: Mapping[str, Any] | None = None, tfds_data_dir: str = ""
                ) -> tuple[list[Document], int]:
  """Documents of one source (every file of its glob, in order), and how many its
  held-out rules removed.

  `source`: {"name", "path", "kind"} with kind (`KINDS`)
    text        "split": paragraphs | articles | lines | file
    jsonl       "text_field" (default "text"), or "text_fields": several, joined by a
                blank line
    sft         instruction/chat records (format detected as in data/sft_sources.py),
                rendered as "User: ...\\nAssistant: ..." dialogue; the conversations the
                SFT stage holds out are left out (`held_out` sft_val_fraction, sft_seed)
    transcript  HH preference pairs: each distinct `chosen` transcript, without the
                reward model's validation prefixes (pref_val_fraction, pref_seed)
    tfds        "path" = "tfds:name[:split]" (split default train), "text_field"
  Problems are counted in bad[path] (`BAD_KEYS`) per file.
  """
  name, paths = source["name"], source_files(source)
  docs, held = [], 0
  for f, path in enumerate(paths):
    pieces, h = read_file(source, path, bad, held_out, tfds_data_dir)
    held += h
    docs += [Document(doc_id(name, f, n, len(paths)), name, text, provenance)
             for n, (text, provenance) in enumerate(pieces)]
  return docs, held
