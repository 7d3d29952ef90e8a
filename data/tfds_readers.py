"""TFDS readers: datasets as (index, record) pairs or as documents, local builders included.

Importing this module registers the project's builders (`data/tfds_builders.py`:
lm_tiny_shakespeare, lm_wikitext2, lm_instructions/*, lm_hh_preferences, lm_eval_sets/*), so
their names resolve like any catalogue dataset. `tfds.load` builds a dataset that is not in
`data_dir` yet: a local builder reads the files under the data dir, a catalogue dataset is
downloaded (which needs internet). So TFDS is only read where a config names it: pretraining
`data.source="tfds"` or `data.fallback_tfds`, SFT / preference `data.sources` entries
"tfds:...", curation sources "tfds:...".
"""

from __future__ import annotations

from typing import Any, Iterator

import tensorflow_datasets as tfds

# Imported for its side effect: it registers the lm_* builders with TFDS.
from data import tfds_builders  # pylint: disable=unused-import


def load_tfds(name: str, split: str, data_dir: str | None = None):
  """`tfds.load(name, split)` in file order (a `tf.data.Dataset` of feature dicts).

  Args:
    name: A TFDS name, e.g. "lm_tiny_shakespeare" or "lm_instructions/alpaca".
    split: A split spec, e.g. "train".
    data_dir: The TFDS data directory; None or "" uses the TFDS default.

  Returns:
    The dataset.
  """
  return tfds.load(name, split=split, data_dir=data_dir or None, shuffle_files=False)


def _decode(value: Any, where: str) -> Any:
  """Bytes -> str (an error naming `where` if not UTF-8), arrays -> lists, recursively."""
  if isinstance(value, bytes):
    try:
      return value.decode("utf-8")
    except UnicodeDecodeError as e:
      raise ValueError(f"{where}: feature is not UTF-8 text (byte 0x{value[e.start]:02x} at "
                       f"offset {e.start})") from e
  if isinstance(value, dict):
    return {k: _decode(v, f"{where} {k!r}") for k, v in value.items()}
  if hasattr(value, "tolist"):
    value = value.tolist()
  return [_decode(v, where) for v in value] if isinstance(value, list) else value


def tfds_records(name: str, split: str, data_dir: str | None = None
                 ) -> Iterator[tuple[int, Any]]:
  """TFDS examples as (index, record) with bytes decoded and nested features as lists."""
  for index, example in enumerate(tfds.as_numpy(load_tfds(name, split, data_dir)), start=1):
    record = _decode(example, f"TFDS {name}[{split}] example {index}")
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
  ds = load_tfds(name, split, data_dir)
  if field not in ds.element_spec:
    raise ValueError(
        f"TFDS {name}[{split}] has no feature {field!r} "
        f"(has: {sorted(ds.element_spec)})")

  def generate() -> Iterator[str]:
    for index, example in enumerate(tfds.as_numpy(ds), start=1):
      value = example[field]
      yield (_decode(value, f"TFDS {name}[{split}] example {index} {field!r}")
             if isinstance(value, bytes) else str(value))

  return generate()
