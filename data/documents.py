"""Pretraining documents: a data config -> (train_docs, val_docs), one loader per source kind.

`load_split_documents(data_cfg)` looks `data.source` up in `SOURCE_KINDS`:

  text     `data.path`, a UTF-8 text file, split at character
           `int(len(text) * (1 - val_fraction))` (nanoGPT's 90/10) before it is cut into
           documents at `data.split_on`.
  jsonl    `data.path`, a jsonl[.gz] file; `data.field` of each record is a document, the
           last `val_fraction` of the records are validation.
  tfds     `data.tfds_name` with its own named splits (`data.tfds_train_split`,
           `data.tfds_val_split`); a catalogue dataset not yet in `data.tfds_data_dir` is
           downloaded (data/tfds_readers.py).
  corpus   several sources with held-out rules (data/corpus.py).
  curated  refused here: already tokenized, streamed by `data.stream_sources`.

A missing `data.path` is an error at once, naming the path and the field. TFDS is tried
instead only when the config asks for it with `data.fallback_tfds` (a TFDS name, "" by
default): a download attempt offline takes minutes to fail and leaves partial files.

A new kind of pretraining source is one function `(data_cfg) -> (train, val)` added to
`SOURCE_KINDS`.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from data import corpus, readers, tfds_readers

Split = tuple[list[str], list[str]]


def _get(cfg: Any, name: str, default: Any) -> Any:
  """Reads an optional config field, so partial configs (tests, scripts) work."""
  return getattr(cfg, name, default) if cfg is not None else default


def _val_fraction(cfg: Any) -> float:
  return float(_get(cfg, "val_fraction", 0.1))


def _data_path(cfg: Any) -> str:
  """`data.path` resolved; FileNotFoundError naming the field and path if there is no file."""
  field = _get(cfg, "path", "")
  path = readers.resolve_data_path(field)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"data.path: no file {path} (data.path={field!r}; relative paths resolve under "
        f"${readers.LM_DATA_DIR_ENV}, else {readers.DEFAULT_DATA_DIR}). Put the file there, "
        f"set ${readers.LM_DATA_DIR_ENV} to the directory holding it, or pass "
        "--config.data.path=/abs/path/to/file; to read a TFDS dataset instead, set "
        "--config.data.source=tfds --config.data.tfds_name=NAME, or "
        "--config.data.fallback_tfds=NAME to use it when the file is missing")
  return path


def _read_tfds_splits(cfg: Any, name: str, field: str) -> Split:
  data_dir = _get(cfg, "tfds_data_dir", "") or None
  train = list(tfds_readers.read_tfds(name, _get(cfg, "tfds_train_split", "train"), field,
                                      data_dir))
  val_split = _get(cfg, "tfds_val_split", "validation")
  val = list(tfds_readers.read_tfds(name, val_split, field, data_dir)) if val_split else []
  return train, val


def _tfds_fallback(cfg: Any, fallback: str) -> Split:
  """The `data.fallback_tfds` text dataset, else one error naming both options."""
  path = readers.resolve_data_path(_get(cfg, "path", ""))
  try:
    # A TFDS text dataset has its own splits; val_fraction does not apply.
    return _read_tfds_splits(cfg, fallback, "text")
  except Exception as e:  # pylint: disable=broad-except
    # Any TFDS failure (not prepared, offline, missing module) ends in one message.
    raise FileNotFoundError(
        f"No training data: the local file {path} (data.path) does not exist and the TFDS "
        f"fallback {fallback!r} (data.fallback_tfds) could not be loaded "
        f"({type(e).__name__}: {e}). Either put the file there, set "
        f"${readers.LM_DATA_DIR_ENV} to the directory holding it, or pass "
        f"--config.data.path=/abs/path/to/file.txt; or make TFDS {fallback!r} available "
        "(internet access for the download, or prepared data under "
        "--config.data.tfds_data_dir).") from e


def text_split(cfg: Any) -> Split:
  """source="text": `data.path` cut at the val_fraction character (or `data.fallback_tfds`)."""
  fallback = _get(cfg, "fallback_tfds", "")
  path = readers.resolve_data_path(_get(cfg, "path", ""))
  if fallback and not os.path.isfile(path):
    return _tfds_fallback(cfg, fallback)
  path = _data_path(cfg)
  readers.check_file(path)
  split_on = _get(cfg, "split_on", "")
  # Splitting characters before documents reproduces nanoGPT's 90/10 split exactly.
  text = readers.read_text(path)
  cut = readers.train_end_index(len(text), _val_fraction(cfg))
  return readers.split_text(text[:cut], split_on), readers.split_text(text[cut:], split_on)


def jsonl_split(cfg: Any) -> Split:
  """source="jsonl": `data.field` of each record of `data.path`; the last records are val."""
  docs = list(readers.read_jsonl(_data_path(cfg), _get(cfg, "field", "text") or "text"))
  cut = readers.train_end_index(len(docs), _val_fraction(cfg))
  return docs[:cut], docs[cut:]


def tfds_split(cfg: Any) -> Split:
  """source="tfds": `data.field` of `data.tfds_name`'s train and validation splits."""
  name = _get(cfg, "tfds_name", "")
  if not name:
    raise ValueError("data.source='tfds' needs data.tfds_name")
  return _read_tfds_splits(cfg, name, _get(cfg, "field", "text") or "text")


def refuse_curated(cfg: Any) -> Split:
  """source="curated" is tokenized already; pretraining reads it another way."""
  del cfg
  raise ValueError("data.source='curated' is already tokenized: train.pretrain streams it "
                   "with data.stream_sources.build_stream_pipelines")


SOURCE_KINDS: dict[str, Callable[[Any], Split]] = {
    "text": text_split, "jsonl": jsonl_split, "tfds": tfds_split,
    "corpus": corpus.load_corpus_split, "curated": refuse_curated,
}


def load_split_documents(data_cfg: Any) -> Split:
  """Loads the train and validation documents a data config describes.

  Args:
    data_cfg: Anything with attribute access (usually the `data` ConfigDict from
      `data.config.default_data_config()`): `source` (a key of `SOURCE_KINDS`), `path`,
      `field`, `split_on`, `val_fraction`, `fallback_tfds`, `tfds_name`, `tfds_data_dir`,
      `tfds_train_split`, `tfds_val_split`, and for "corpus" the `corpus_*` fields (see
      `data/corpus.py`).

  Returns:
    (train_docs, val_docs) (see the module doc for each kind's split).

  Raises:
    ValueError: Unknown source, bad val_fraction, unreadable data, or an empty training
      split.
    FileNotFoundError: The data cannot be found (naming `data.path` and the path).
  """
  source = _get(data_cfg, "source", "text")
  if source not in SOURCE_KINDS:
    raise ValueError(f"Unknown data.source {source!r}; expected one of "
                     f"{', '.join(SOURCE_KINDS)}")
  train, val = SOURCE_KINDS[source](data_cfg)
  if not train:
    raise ValueError(f"The training split is empty (source={source!r}, "
                     f"val_fraction={_val_fraction(data_cfg)})")
  return train, val
