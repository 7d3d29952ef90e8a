"""Leaf readers: data paths, UTF-8 text files and jsonl files (this module imports no project code).

Every other reader in `data/` is built on these, so they all fail the same way, naming the
file (and the 1-based line where there is one) and what was expected:

- missing file              -> FileNotFoundError naming the path (`check_file`);
- empty file / no documents -> ValueError naming the path;
- bytes that are not UTF-8  -> ValueError "path: line 3 is not UTF-8 text (byte 0xff at
                               offset 12)" (offset: bytes from the start of the file, after
                               gzip decompression), never a bare UnicodeDecodeError;
- malformed jsonl line      -> ValueError "path:line: malformed JSON line (...)";
- jsonl record without the requested field -> ValueError naming path, line and field.

`jsonl_records` is the one jsonl reader. With `on_bad="count"` it counts undecodable, non-JSON
and (with `objects_only`) non-object lines in a dict and skips them instead (data curation
reports bad input rather than stopping on it).

A URL (`gs://...`) opens through Apache Beam's `FileSystems` (imported only then: it is
heavy), so a curation on Dataflow reads its sources from a bucket.

Relative data paths are resolved by `resolve_data_path` under `$LM_DATA_DIR`, or else under
`../shared/data` next to the repository root, so configs can say
`pretrain/tinyshakespeare.txt` and work on a laptop, in CI and on a TPU VM alike.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from typing import IO, Any, Iterator, MutableMapping, Sequence

LM_DATA_DIR_ENV = "LM_DATA_DIR"
# The repository root is the parent of this package; shared data sits beside it.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA_DIR = os.path.normpath(os.path.join(_REPO_ROOT, "..", "shared", "data"))
# What `on_bad="count"` counts: a line that is not UTF-8, not JSON, or not a JSON object.
BAD_LINE_KINDS = ("undecodable", "not_json", "not_an_object")
ON_BAD = ("raise", "count")
# A WikiText article title line (section titles have "= =" and do not match).
_TITLE_RE = re.compile(r"^ = [^=].* = $", re.MULTILINE)


def resolve_data_path(path: str) -> str:
  """Resolves a data path; existence is checked by the readers, not here.

  Args:
    path: An absolute path or a URL (returned unchanged) or a path relative to the data
      directory: `$LM_DATA_DIR` if set, else `../shared/data` relative to the
      repository root. `~` is expanded.

  Returns:
    The resolved path.
  """
  path = os.path.expanduser(path)
  if os.path.isabs(path) or "://" in path:
    return path
  data_dir = os.environ.get(LM_DATA_DIR_ENV) or DEFAULT_DATA_DIR
  return os.path.join(data_dir, path)


def check_file(path: str) -> None:
  """Raises FileNotFoundError (missing) or ValueError (empty), naming `path`."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Data file not found: {path}")
  if os.path.getsize(path) == 0:
    raise ValueError(f"Data file is empty: {path}")


def open_binary(path: str) -> IO[bytes]:
  """Opens a file for reading bytes; a `.gz` suffix means gzip. A URL (`gs://...`, the
  sources of a curation on Dataflow) opens through Apache Beam's `FileSystems`."""
  if "://" in path:
    # Imported here: Beam is heavy and only remote paths (data curation) need it.
    from apache_beam.io.filesystem import CompressionTypes  # pylint: disable=g-import-not-at-top
    from apache_beam.io.filesystems import FileSystems  # pylint: disable=g-import-not-at-top
    f = FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)
    return gzip.GzipFile(fileobj=f) if path.endswith(".gz") else f
  return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _not_utf8(path: str, bad_byte: int, line_no: int, offset: int) -> ValueError:
  """The error for bytes that are not UTF-8; `offset` counts bytes from the file's start."""
  return ValueError(f"{path}: line {line_no} is not UTF-8 text (byte 0x{bad_byte:02x} at "
                    f"offset {offset})")


def _check_on_bad(on_bad: str, bad_counts: MutableMapping[str, int] | None) -> None:
  if on_bad not in ON_BAD:
    raise ValueError(f"on_bad={on_bad!r}, expected one of {ON_BAD}")
  if on_bad == "count" and bad_counts is None:
    raise ValueError("on_bad='count' needs a bad_counts dict to count into")


def _count(bad_counts: MutableMapping[str, int], kind: str) -> None:
  bad_counts[kind] = bad_counts.get(kind, 0) + 1


def read_text(path: str, on_bad: str = "raise",
              bad_counts: MutableMapping[str, int] | None = None) -> str:
  """The whole file (`.gz`: decompressed) as UTF-8 text.

  Args:
    path: The file to read.
    on_bad: "raise": bytes that are not UTF-8 are a ValueError naming the file, the line
      and the byte. "count": they add 1 to `bad_counts["undecodable"]` and are dropped, the
      readable rest is returned.
    bad_counts: Where "count" counts.

  Returns:
    The text.

  Raises:
    ValueError: Undecodable bytes (with on_bad="raise").
    OSError: The file cannot be read (FileNotFoundError if missing).
  """
  _check_on_bad(on_bad, bad_counts)
  with open_binary(path) as f:
    data = f.read()
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    if on_bad == "count":
      _count(bad_counts, "undecodable")
      return data.decode("utf-8", errors="ignore")
    raise _not_utf8(path, data[e.start], data.count(b"\n", 0, e.start) + 1, e.start) from e


def split_text(text: str, split_on: str) -> list[str]:
  """`text` cut at `split_on` without empty pieces ("" = the whole text, if non-empty)."""
  if not split_on:
    return [text] if text else []
  return [piece for piece in text.split(split_on) if piece]


def split_wikitext_articles(text: str) -> list[str]:
  """Cuts text into articles starting at title lines (paragraphs if there are none).

  Articles are kept verbatim, title line included; whitespace-only pieces (the blank
  line before the first title) are dropped.
  """
  starts = [m.start() for m in _TITLE_RE.finditer(text)]
  if not starts:
    return [p for p in re.split(r"\n\s*\n", text) if p.strip()]
  bounds = [0, *starts, len(text)]
  pieces = (text[a:b] for a, b in zip(bounds[:-1], bounds[1:]))
  return [p for p in pieces if p.strip()]


def train_end_index(n: int, val_fraction: float) -> int:
  """Index where train ends: nanoGPT's `int(n * 0.9)` for val_fraction=0.1."""
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
  return int(n * (1.0 - val_fraction))


def read_text_file(path: str, split_on: str = "") -> Iterator[str]:
  """Reads a UTF-8 text file as documents.

  Args:
    path: The file to read (not resolved; pass it through `resolve_data_path`).
    split_on: Document separator. "" makes the whole file one document; otherwise
      the file is split on it and empty pieces are dropped.

  Returns:
    An iterator over the documents.

  Raises:
    FileNotFoundError: The file does not exist.
    ValueError: The file is empty, not UTF-8, or holds no document.
  """
  check_file(path)
  docs = split_text(read_text(path), split_on)
  if not docs:
    raise ValueError(f"No documents in {path} (split_on={split_on!r})")
  return iter(docs)


def jsonl_records(path: str, objects_only: bool = False, on_bad: str = "raise",
                  bad_counts: MutableMapping[str, int] | None = None
                  ) -> Iterator[tuple[int, Any]]:
  """Yields (1-based line number, parsed record) for the non-blank lines of a jsonl file.

  Args:
    path: A `.jsonl` file, or `.jsonl.gz` (gzip). Not checked to exist or be non-empty:
      call `check_file` first where that is an error.
    objects_only: A line that is not a JSON object is bad input too.
    on_bad: "raise": bad input is a ValueError naming the file and line. "count": each bad
      line adds 1 to `bad_counts[kind]` (kind in `BAD_LINE_KINDS`) and is skipped.
    bad_counts: Where "count" counts.

  Yields:
    (line number, record).
  """
  _check_on_bad(on_bad, bad_counts)
  offset = 0
  with open_binary(path) as f:
    # Bytes, decoded line by line: an undecodable line is found (and can be skipped)
    # without losing the others, and its offset is known.
    for line_no, raw in enumerate(f, start=1):
      line_offset, offset = offset, offset + len(raw)
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        if on_bad == "raise":
          raise _not_utf8(path, raw[e.start], line_no, line_offset + e.start) from e
        _count(bad_counts, "undecodable")
        continue
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        if on_bad == "raise":
          raise ValueError(f"{path}:{line_no}: malformed JSON line ({e.msg})") from e
        _count(bad_counts, "not_json")
        continue
      if objects_only and not isinstance(record, dict):
        if on_bad == "raise":
          raise ValueError(f"{path}:{line_no}: expected a JSON object, got "
                           f"{type(record).__name__}")
        _count(bad_counts, "not_an_object")
        continue
      yield line_no, record


def read_jsonl(path: str, field: str) -> Iterator[str]:
  """Reads one string field of every record of a jsonl (or jsonl.gz) file.

  Args:
    path: The file to read; a `.gz` suffix means gzip.
    field: The record key holding the document text.

  Returns:
    An iterator over the documents (the file is checked to exist and be non-empty
    before this returns; record errors surface while iterating).

  Raises:
    FileNotFoundError: The file does not exist.
    ValueError: Empty file, undecodable or malformed line, record without `field` (or not
      a string), or no records at all.
  """
  check_file(path)

  def generate() -> Iterator[str]:
    count = 0
    for line_no, record in jsonl_records(path):
      if not isinstance(record, dict) or field not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(
            f"{path}:{line_no}: record has no field {field!r} (has: {keys})")
      value = record[field]
      if not isinstance(value, str):
        raise ValueError(
            f"{path}:{line_no}: field {field!r} is "
            f"{type(value).__name__}, expected a string")
      count += 1
      yield value
    if count == 0:
      raise ValueError(f"No records in {path}")

  return generate()


def documents_from_files(paths: Sequence[str], jsonl_field: str = "text") -> Iterator[str]:
  """Yields the documents of several files: `.jsonl`/`.jsonl.gz` by field, else text.

  Used by tokenizer training so that every input file gets the same checks and
  error messages as the training pipeline.
  """
  for path in paths:
    if path.endswith((".jsonl", ".jsonl.gz")):
      yield from read_jsonl(path, jsonl_field)
    else:
      yield from read_text_file(path)
