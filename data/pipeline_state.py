"""What the fetching training pipelines share: host sharding checks, serving one step of a
multi-step fetch, and the resumable-iterator state blob.

`FetchingPipeline` is the base of `lm_pipeline.LMPipeline` (in-memory corpora) and
`stream_pipeline.StreamPipeline` (tokenized shards read from disk). A subclass builds a
tf.data dataset whose every element is one fetch: `steps_per_fetch * per_host_batch_size`
rows, every array [rows, ...]; then calls `_start(dataset, meta)`.

The state (`get_state`) is one tar blob of
  ckpt*        the tf.data iterator checkpoint (`tf.train.Checkpoint`): whatever the
               dataset's ops hold (counters, file names and offsets, shuffle buffers, packer
               carry-over, the prefetch buffer);
  pending.npz  the steps of the current fetch not yet handed out;
  meta.json    the fields that must match for the state to be valid (`set_state` refuses a
               state saved by a pipeline with other data, batch size, seed or host layout).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
from typing import Any

import numpy as np
import tensorflow as tf

Batch = dict[str, np.ndarray]
SLOTS_PER_FETCH = 65536  # Token slots per tf.data call (see lm_pipeline's module doc).
MAX_STEPS_PER_FETCH = 16
_STATE_META = "meta.json"
_STATE_PENDING = "pending.npz"  # Fetched steps not yet served.
_STATE_PREFIX = "ckpt"


def check_sharding(batch_size: int, process_index: int, process_count: int,
                   what: str) -> int:
  """Returns the per-host batch size, or raises naming the numbers."""
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in "
                     f"[0, process_count={process_count})")
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(f"{what}={batch_size} must be a positive multiple of "
                     f"process_count={process_count}")
  return batch_size // process_count


def steps_per_fetch(per_host_batch_size: int, seq_len: int) -> int:
  """Steps fetched per tf.data call: about SLOTS_PER_FETCH token slots, 1 to 16 steps."""
  return int(np.clip(SLOTS_PER_FETCH // (per_host_batch_size * seq_len), 1,
                     MAX_STEPS_PER_FETCH))


def serve_next_step(pipeline: Any) -> Batch:
  """The next step of a pipeline that fetches several steps per tf.data call.

  `pipeline` has `_iterator` (tf.data, yielding [steps_per_fetch * batch, ...] arrays),
  `_fetched` (the current fetch, [steps, batch, ...] numpy arrays) and `_served` (steps
  of it handed out); shared by the pretraining and SFT pipelines.
  """
  if pipeline._served >= len(pipeline._fetched.get("tokens", ())):
    lead = (pipeline.steps_per_fetch, pipeline.per_host_batch_size)
    pipeline._fetched = {k: v.numpy().reshape(lead + tuple(v.shape[1:]))
                         for k, v in next(pipeline._iterator).items()}
    pipeline._served = 0
  batch = {k: v[pipeline._served] for k, v in pipeline._fetched.items()}
  pipeline._served += 1
  return batch


class FetchingPipeline:
  """Infinite iterator over this host's training batches, with exact resume.

  `get_state()` after k batches, then `set_state()` on a fresh pipeline built from the
  same data, config and host layout, continues with batch k + 1. Subclasses set
  `per_host_batch_size`, `global_batch_size`, `seq_len`, `steps_per_fetch` and call
  `_start`.
  """
  per_host_batch_size: int
  global_batch_size: int
  seq_len: int
  steps_per_fetch: int

  def _start(self, dataset: tf.data.Dataset, meta: dict[str, Any]) -> None:
    self._meta = meta
    self._dataset = dataset
    self._iterator = iter(dataset)
    self._checkpoint = tf.train.Checkpoint(iterator=self._iterator)
    # Steps fetched from tf.data ([steps, batch, seq_len] arrays) and how many of them
    # have been served.
    self._fetched: Batch = {}
    self._served = 0

  @property
  def tokens_per_batch(self) -> int:
    """Token slots per global batch (all hosts, padding included)."""
    return self.global_batch_size * self.seq_len

  def __iter__(self) -> "FetchingPipeline":
    return self

  def __next__(self) -> Batch:
    return serve_next_step(self)

  def get_state(self) -> bytes:
    """Serializes the iterator position (tf.data checkpoint) into one blob."""
    buffer = io.BytesIO()
    with tempfile.TemporaryDirectory() as tmp, \
            tarfile.open(fileobj=buffer, mode="w") as tar:
      self._checkpoint.write(os.path.join(tmp, _STATE_PREFIX))
      with open(os.path.join(tmp, _STATE_META), "w") as f:
        json.dump(self._meta, f, sort_keys=True)
      pending = {k: v[self._served:] for k, v in self._fetched.items()}
      np.savez(os.path.join(tmp, _STATE_PENDING), **pending)
      for name in sorted(os.listdir(tmp)):
        tar.add(os.path.join(tmp, name), arcname=name)
    return buffer.getvalue()

  def set_state(self, state: bytes) -> None:
    """Restores a position saved by `get_state` of an identically built pipeline.

    Raises:
      ValueError: The state was saved by a pipeline with different data, batch size,
        seed or host layout (naming the fields).
    """
    with tempfile.TemporaryDirectory() as tmp:
      with tarfile.open(fileobj=io.BytesIO(state), mode="r") as tar:
        # Only the flat files get_state wrote; basename() keeps them inside tmp.
        for member in tar.getmembers():
          if member.isfile():
            with open(os.path.join(tmp, os.path.basename(member.name)), "wb") as f:
              f.write(tar.extractfile(member).read())
      with open(os.path.join(tmp, _STATE_META)) as f:
        saved = json.load(f)
      diff = {k: (saved.get(k), v) for k, v in self._meta.items()
              if saved.get(k) != v}
      if diff:
        raise ValueError("Data iterator state does not match this pipeline "
                         f"(field: (saved, current)): {diff}")
      self._checkpoint.read(os.path.join(tmp, _STATE_PREFIX)).assert_consumed()
      with np.load(os.path.join(tmp, _STATE_PENDING)) as pending:
        self._fetched = {k: pending[k] for k in pending.files}
      self._served = 0
