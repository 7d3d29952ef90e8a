"""Curation files: atomic writes, JSON, TFRecord examples and the per-process tokenizer cache."""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Mapping

from data.tokenizer import Tokenizer


def atomic_write(path: str, text: str) -> None:
  """Writes `text` to `path` by rename, so a killed run never leaves half a file."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def tf_example(features: Mapping[str, Any]) -> bytes:
  """A serialized `tf.train.Example`: str values as bytes features, others as int64 lists."""
  # Imported here: TensorFlow is heavy and only the write and mix phases need it.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out = {}
  for key, value in features.items():
    if isinstance(value, str):
      out[key] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[value.encode()]))
    else:
      out[key] = tf.train.Feature(int64_list=tf.train.Int64List(value=value))
  # deterministic=True: map fields in key order, else the bytes vary between processes.
  return tf.train.Example(features=tf.train.Features(feature=out)).SerializeToString(
      deterministic=True)


@functools.lru_cache(maxsize=4)
def cached_tokenizer(path: str) -> Tokenizer:
  """The tokenizer at `path`, loaded once per process (a pool worker tokenizes many shards)."""
  return Tokenizer.from_file(path)
