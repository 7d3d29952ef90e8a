"""Document sources: local text files, jsonl files and TFDS, plus the train/val split.

Every reader yields plain `str` documents and fails loudly on bad input, naming the
file (and for jsonl the 1-based line number) so a typo in a config is found at once:

- missing file              -> FileNotFoundError naming the path;
- empty file / no documents -> ValueError naming the path;
- malformed jsonl line      -> ValueError "path:line: ...";
- jsonl record without the requested field -> ValueError naming path, line and field.

Relative data paths are resolved by `resolve_data_path` under `$LM_DATA_DIR`, or else
under `../shared/data` next to the repository root, so configs can say
`pretrain/tinyshakespeare.txt` and work on a laptop, in CI and on a TPU VM alike.

`load_split_documents(data_cfg)` turns a data config (see `data/config.py`) into
`(train_docs, val_docs)`; `source="corpus"` delegates to `data/corpus.py` (several
sources with held-out rules).
"""

from __future__ import annotations

import gzip
import json
import os
from typing import Any, Iterator, Sequence

LM_DATA_DIR_ENV = "LM_DATA_DIR"
# The repository root is the parent of this package; shared data sits beside it.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA_DIR = os.path.normpath(os.path.join(_REPO_ROOT, "..", "shared", "data"))


def resolve_data_path(path: str) -> str:
  """Resolves a data path; existence is checked by the readers, not here.

  Args:
    path: An absolute path (returned unchanged) or a path relative to the data
      directory: `$LM_DATA_DIR` if set, else `../shared/data` relative to the
      repository root. `~` is expanded.

  Returns:
    The resolved path.
  """
  path = os.path.expanduser(path)
  if os.path.isabs(path):
    return path
  data_dir = os.environ.get(LM_DATA_DIR_ENV) or DEFAULT_DATA_DIR
  return os.path.join(data_dir, path)


def _check_file(path: str) -> None:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Data file not found: {path}")
  if os.path.getsize(path) == 0:
    raise ValueError(f"Data file is empty: {path}")


def _split_text(text: str, split_on: str) -> list[str]:
  if not split_on:
    return [text] if text else []
  return [piece for piece in text.split(split_on) if piece]


def _read_text(path: str) -> str:
  _check_file(path)
  with open(path, "r", encoding="utf-8") as f:
    return f.read()


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
    ValueError: The file is empty or holds no document.
  """
  docs = _split_text(_read_text(path), split_on)
  if not docs:
    raise ValueError(f"No documents in {path} (split_on={split_on!r})")
  return iter(docs)


def _open_maybe_gzip(path: str):
  if path.endswith(".gz"):
    return gzip.open(path, "rt", encoding="utf-8")
  return open(path, "r", encoding="utf-8")


def _jsonl_records(path: str) -> Iterator[tuple[int, Any]]:
  """Yields (1-based line number, parsed record) for non-blank lines."""
  with _open_maybe_gzip(path) as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        yield line_no, json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_no}: malformed JSON line ({e.msg})") from e


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
    ValueError: Empty file, malformed line, record without `field` (or not a
      string), or no records at all.
  """
  _check_file(path)

  def generate() -> Iterator[str]:
    count = 0
    for line_no, record in _jsonl_records(path):
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


def load_tfds(name: str, split: str, data_dir: str | None = None):
  """`tfds.load` with the project's local builders registered (data/tfds_builders.py:
  lm_tiny_shakespeare, lm_wikitext2, lm_instructions/*, lm_hh_preferences,
  lm_eval_sets/*), so their names resolve like any catalogue dataset."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from data import tfds_builders  # pylint: disable=g-import-not-at-top,unused-import
  return tfds.load(name, split=split, data_dir=data_dir or None, shuffle_files=False)


def tfds_records(name: str, split: str, data_dir: str | None = None
                 ) -> Iterator[tuple[int, Any]]:
  """TFDS examples as (index, record) with bytes decoded and nested features as lists."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  def decode(value: Any) -> Any:
    if isinstance(value, bytes):
      return value.decode("utf-8")
    if isinstance(value, dict):
      return {k: decode(v) for k, v in value.items()}
    if hasattr(value, "tolist"):
      value = value.tolist()
    return [decode(v) for v in value] if isinstance(value, list) else value

  for index, example in enumerate(tfds.as_numpy(load_tfds(name, split, data_dir)), start=1):
    record = decode(example)
    # A TFDS Sequence of dicts arrives as a dict of lists: back to a list of dicts.
    for k, v in list(record.items()):
      if isinstance(v, dict) and v and all(isinstance(x, list) for x in v.values()):
        record[k] = [dict(zip(v, items)) for items in zip(*v.values())]
    yield index, record


def read_tfds(name: str, split: str, field: str,
              data_dir: str | None = None) -> Iterator[str]:
  """Reads one text feature of a TFDS split as documents.

  Args:
    name: TFDS dataset name, e.g. "tiny_shakespeare".
    split: Split spec, e.g. "train" or "validation".
    field: The text feature, e.g. "text".
    data_dir: TFDS data directory; None uses the TFDS default.

  Returns:
    An iterator over the decoded (UTF-8) documents.

  Raises:
    Whatever `tfds.load` raises when the data is neither prepared nor
    downloadable; ValueError if `field` is not a feature of the dataset.
  """
  # Imported here: it is slow to import and only this reader needs it.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  ds = load_tfds(name, split, data_dir)
  if field not in ds.element_spec:
    raise ValueError(
        f"TFDS {name}[{split}] has no feature {field!r} "
        f"(has: {sorted(ds.element_spec)})")

  def generate() -> Iterator[str]:
    for example in tfds.as_numpy(ds):
      value = example[field]
      yield value.decode("utf-8") if isinstance(value, bytes) else str(value)

  return generate()


def _get(cfg: Any, name: str, default: Any) -> Any:
  """Reads an optional config field, so partial configs (tests, scripts) work."""
  return getattr(cfg, name, default) if cfg is not None else default


def _split_fraction(n: int, val_fraction: float) -> int:
  """Index where train ends: nanoGPT's `int(n * 0.9)` for val_fraction=0.1."""
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
  return int(n * (1.0 - val_fraction))


def _load_text_split(path: str, split_on: str,
                     val_fraction: float) -> tuple[list[str], list[str]]:
  # Splitting characters before documents reproduces nanoGPT's 90/10 split exactly.
  text = _read_text(path)
  cut = _split_fraction(len(text), val_fraction)
  return _split_text(text[:cut], split_on), _split_text(text[cut:], split_on)


def _load_jsonl_split(path: str, field: str,
                      val_fraction: float) -> tuple[list[str], list[str]]:
  docs = list(read_jsonl(path, field))
  cut = _split_fraction(len(docs), val_fraction)
  return docs[:cut], docs[cut:]


def _load_tfds_split(cfg: Any, name: str, field: str) -> tuple[list[str], list[str]]:
  data_dir = _get(cfg, "tfds_data_dir", "") or None
  train = list(read_tfds(name, _get(cfg, "tfds_train_split", "train"), field, data_dir))
  val_split = _get(cfg, "tfds_val_split", "validation")
  val = list(read_tfds(name, val_split, field, data_dir)) if val_split else []
  return train, val


def _load_text_or_fallback(cfg: Any, split_on: str,
                           val_fraction: float) -> tuple[list[str], list[str]]:
  """Local text file first, then the `fallback_tfds` dataset, else one clear error."""
  path = resolve_data_path(_get(cfg, "path", ""))
  fallback = _get(cfg, "fallback_tfds", "")
  if os.path.isfile(path) or not fallback:
    return _load_text_split(path, split_on, val_fraction)
  try:
    # A TFDS text dataset has its own splits; val_fraction does not apply.
    return _load_tfds_split(cfg, fallback, "text")
  except Exception as e:  # pylint: disable=broad-except
    # Any TFDS failure (not prepared, offline, missing module) ends in one message.
    raise FileNotFoundError(
        f"No training data: the local file {path} does not exist and the TFDS "
        f"fallback {fallback!r} could not be loaded ({type(e).__name__}: {e}). "
        f"Either put the file there, set ${LM_DATA_DIR_ENV} to the directory "
        f"holding it, or pass --config.data.path=/abs/path/to/file.txt; or make "
        f"TFDS {fallback!r} available (internet access for the download, or "
        f"prepared data under --config.data.tfds_data_dir).") from e


def load_split_documents(data_cfg: Any) -> tuple[list[str], list[str]]:
  """Loads the train and validation documents a data config describes.

  Args:
    data_cfg: Anything with attribute access (usually the `data` ConfigDict from
      `data.config.default_data_config()`): `source` ("text" | "jsonl" | "tfds" |
      "corpus"), `path`, `field`, `split_on`, `val_fraction`, `fallback_tfds`,
      `tfds_name`, `tfds_data_dir`, `tfds_train_split`, `tfds_val_split`, and for
      "corpus" the `corpus_*` fields (see `data/corpus.py`).

  Returns:
    (train_docs, val_docs). Text files are split at character
    `int(len(text) * (1 - val_fraction))` before being cut into documents;
    jsonl files put the last `val_fraction` of records into val; TFDS uses its
    named splits; a corpus splits its documents by hash, after its held-out rules
    (`data.corpus.load_corpus_split`).

  Raises:
    ValueError: Unknown source, bad val_fraction, or an empty training split.
    FileNotFoundError: The data cannot be found (see `read_*` and the fallback).
  """
  source = _get(data_cfg, "source", "text")
  field = _get(data_cfg, "field", "text") or "text"
  val_fraction = float(_get(data_cfg, "val_fraction", 0.1))
  if source == "text":
    train, val = _load_text_or_fallback(
        data_cfg, _get(data_cfg, "split_on", ""), val_fraction)
  elif source == "jsonl":
    train, val = _load_jsonl_split(
        resolve_data_path(_get(data_cfg, "path", "")), field, val_fraction)
  elif source == "tfds":
    name = _get(data_cfg, "tfds_name", "")
    if not name:
      raise ValueError("data.source='tfds' needs data.tfds_name")
    train, val = _load_tfds_split(data_cfg, name, field)
  elif source == "corpus":
    # Imported here: data.corpus imports this module (and the SFT readers).
    from data import corpus  # pylint: disable=g-import-not-at-top
    train, val = corpus.load_corpus_split(data_cfg)
  elif source == "curated":
    raise ValueError("data.source='curated' is already tokenized: train.pretrain reads it "
                     "with data.curate.load_tokenized(data.curated_dir)")
  else:
    raise ValueError(
        f"Unknown data.source {source!r}; expected text, jsonl, tfds, corpus or curated")
  if not train:
    raise ValueError(f"The training split is empty (source={source!r}, "
                                      f"val_fraction={val_fraction})")
  return train, val


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
