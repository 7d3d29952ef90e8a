"""Curation files: atomic writes through Beam's `FileSystems` (local paths and gs:// alike),
TFRecord shards of `tf.train.Example`s (encoded here, without TensorFlow: the worker
processes would each spend seconds importing it), JSON, and the clearing of a previous
run's outputs.

Every output file is written to `<path>.tmp-<random>` and renamed into place, so a reader
never sees half a file; `clear_outputs` removes a killed run's files (and tmp files) before
a run starts, markers first (see `data.curate`).
"""

from __future__ import annotations

import json
import struct
import uuid
from typing import Any, Iterable, Mapping, Sequence

import google_crc32c
import numpy as np

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


def _varint(n: int) -> bytes:
  out = bytearray()
  while n > 0x7F:
    out.append((n & 0x7F) | 0x80)
    n >>= 7
  out.append(n)
  return bytes(out)


def _packed_varints(values: Sequence[int]) -> bytes:
  """Non-negative ints as concatenated varints (vectorised: token lists are long)."""
  v = np.asarray(values, np.uint64)
  if v.size and v.max() >= 1 << 63:
    raise ValueError("int64 features here are token ids: negative values are unsupported")
  groups = np.stack([(v >> np.uint64(7 * k)) & np.uint64(0x7F) for k in range(10)], 1)
  size = np.maximum(1, 10 - np.argmax(groups[:, ::-1] != 0, axis=1)) * (v > 0) + (v == 0)
  k = np.arange(10)[None, :]
  groups = groups | ((k < size[:, None] - 1) * 0x80).astype(np.uint64)
  return groups.astype(np.uint8)[k < size[:, None]].tobytes()


def _field(number: int, payload: bytes) -> bytes:
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload  # wire type 2: bytes


def tf_example(features: Mapping[str, Any]) -> bytes:
  """A serialized `tf.train.Example` (what TensorFlow's deterministic serialisation gives,
  tested): str values as a one-value bytes_list, others as a packed int64_list of
  non-negative ints. Encoded here so the workers need not import TensorFlow."""
  entries = []
  for key in sorted(features):  # deterministic: map entries in key order
    value = features[key]
    if isinstance(value, str):
      feature = _field(1, _field(1, value.encode("utf-8")))           # bytes_list
    else:
      ints = _packed_varints(value)
      feature = _field(3, _field(1, ints) if ints else b"")          # int64_list
    entries.append(_field(1, _field(1, key.encode("utf-8")) + _field(2, feature)))
  return _field(1, b"".join(entries))  # Example.features


def _masked_crc32c(data: bytes) -> int:
  """TFRecord's checksum: crc32c (google-crc32c's C implementation), rotated and offset."""
  crc = google_crc32c.value(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(record: bytes) -> bytes:
  """One TFRecord frame: length, its checksum, the data, its checksum."""
  length = struct.pack("<Q", len(record))
  return (length + struct.pack("<I", _masked_crc32c(length)) + record +
          struct.pack("<I", _masked_crc32c(record)))


def write_tfrecord(path: str, records: Iterable[bytes]) -> int:
  """Writes serialized records as one TFRecord file at `path` (atomically); returns the
  count."""
  frames = [tfrecord(r) for r in records]
  write_bytes(path, b"".join(frames))
  return len(frames)


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
