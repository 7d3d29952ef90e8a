"""Curation files: atomic writes through Beam's `FileSystems` (local paths and gs:// alike),
TFRecord shards, JSON, and the clearing of a previous run's outputs.

Every output file is written to `<path>.tmp-<random>` and renamed into place, so a reader
never sees half a file; `clear_outputs` removes a killed run's files (and tmp files) before
a run starts, markers first (see `data.curate`).
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from typing import Any, Iterable, Mapping

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

# What a run writes under its workdir; the markers (written last) are removed first.
MARKERS = ("report.json", "tokenized/info.json")
OUTPUT_FILES = ("report.md", "report.png", "tokenizer.model")
OUTPUT_DIRS = ("tokenized", "curated")


def join(*parts: str) -> str:
  return FileSystems.join(*parts)


def write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to `path` by rename (parent directories are made on local disks)."""
  tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
  with FileSystems.create(tmp, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    f.write(data)
  FileSystems.rename([tmp], [path])  # local: os.rename; gs://: copy + delete, both replace


def write_json(path: str, value: Any) -> None:
  write_bytes(path, json.dumps(value, indent=1).encode("utf-8"))


def read_bytes(path: str) -> bytes:
  with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    return f.read()


def read_json(path: str) -> Any:
  return json.loads(read_bytes(path).decode("utf-8"))


def exists(path: str) -> bool:
  return FileSystems.exists(path)


def tf_example(features: Mapping[str, Any]) -> bytes:
  """A serialized `tf.train.Example`: str values as bytes features, others as int64 lists."""
  # Imported here: TensorFlow is heavy and only the workers writing shards need it.
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


def write_tfrecord(path: str, records: Iterable[bytes]) -> int:
  """Writes serialized records as one TFRecord file at `path` (atomically); returns the
  count. Framed by TensorFlow in a local temporary file (TFRecord checksums are crc32c,
  which TensorFlow has and Beam's fallback here would lack), then copied into place."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  n = 0
  with tempfile.TemporaryDirectory() as tmp:
    local = os.path.join(tmp, "shard.tfrecord")
    with tf.io.TFRecordWriter(local) as writer:
      for record in records:
        writer.write(record)
        n += 1
    with open(local, "rb") as f:
      write_bytes(path, f.read())
  return n


def clear_outputs(workdir: str) -> None:
  """Deletes what a previous (maybe killed) run left: the markers first, so no reader
  takes the workdir for finished while the rest goes, then the other outputs and any
  `*.tmp-*` file at the top level."""
  def delete(paths: list[str]) -> None:
    paths = [p for p in paths if FileSystems.exists(p)]
    if paths:
      FileSystems.delete(paths)
  delete([join(workdir, m) for m in MARKERS])
  patterns = [join(workdir, d, "*") for d in OUTPUT_DIRS] + [join(workdir, "*.tmp-*")]
  delete([join(workdir, f) for f in OUTPUT_FILES] + [
      m.path for r in FileSystems.match(patterns) for m in r.metadata_list])
