"""Row pipelines: a fixed table of training rows -> shuffled, resumable, per-host batches.

Used by the SFT pipeline (`data/sft_pipeline.py`, rows of packed conversations) and the
preference pipeline (`data/preference_pipeline.py`, rows of chosen/rejected pairs). The
rows object only needs the `Rows` protocol: `num_rows`, `seq_len`, `fingerprint()` and
`materializer()`, a TF function from int64 [B] row indices to the batch tensors of those
rows (every tensor [B, ...]; indices >= num_rows give padding rows).

Decisions:
- Order: epoch e visits the rows in a stateless permutation of (seed, e); the
  row stream runs on across epochs. Host h keeps global rows h, h + P, ... of
  each global batch, as in `lm_pipeline`. Batch k is a pure function of k, so the
  iterator state is just the count of batches served (a few bytes of JSON);
  `set_state` rebuilds the tf.data pipeline from there.
- tf.data does the gathers in the background with prefetch, a block of steps
  per call (as in `lm_pipeline`: an eager next() costs ~1-2 ms).
- Validation: every validation row once, in order; the last global batch is
  padded with padding rows so every host yields the same number of batches.
"""

from __future__ import annotations

import json
from typing import Callable, Iterator, Protocol

import numpy as np
import tensorflow as tf

from data.pipeline_state import check_sharding, serve_next_step, steps_per_fetch

Batch = dict[str, np.ndarray]


class Rows(Protocol):
  """What a row pipeline needs from a table of rows."""

  @property
  def num_rows(self) -> int: ...

  @property
  def seq_len(self) -> int: ...

  def fingerprint(self) -> str: ...

  def materializer(self) -> Callable[[tf.Tensor], dict[str, tf.Tensor]]: ...


class RowPipeline:
  """Infinite iterator over this host's training batches of `rows`, with exact resume.

  `get_state()` after k batches, then `set_state()` on a fresh pipeline built
  from the same data, config and host layout, continues with batch k + 1.
  """

  def __init__(self, rows: Rows, *, global_batch_size: int, seed: int = 0,
               prefetch: int = 2, process_index: int = 0, process_count: int = 1,
               fingerprint: str = ""):
    """Builds the pipeline.

    Args:
      rows: The training rows (at least one).
      global_batch_size: Rows per step over all hosts.
      seed: Seeds the row order of every epoch.
      prefetch: Fetches (of `steps_per_fetch` batches) prepared in the
        background; -1 = AUTOTUNE, 0 = none.
      process_index: This host's index.
      process_count: Number of hosts.
      fingerprint: Identifies the tokenizer/config; `set_state` refuses a state
        saved with a different one (the rows' own fingerprint is checked too).
    """
    if rows.num_rows == 0:
      raise ValueError("The training split has no rows (every example dropped?)")
    self.per_host_batch_size = check_sharding(
        global_batch_size, process_index, process_count, "global_batch_size")
    self.global_batch_size = global_batch_size
    self.seq_len = rows.seq_len
    self.num_rows = rows.num_rows
    self.steps_per_fetch = steps_per_fetch(self.per_host_batch_size, self.seq_len)
    self._seed, self._prefetch = seed, prefetch
    self._host, self._hosts = process_index, process_count
    self._materialize = rows.materializer()
    self._meta = {
        "global_batch_size": global_batch_size, "seed": seed, "seq_len": self.seq_len,
        "process_index": process_index, "process_count": process_count,
        "num_rows": self.num_rows, "rows_fingerprint": rows.fingerprint(),
        "fingerprint": fingerprint,
    }
    self._start(0)

  @property
  def tokens_per_batch(self) -> int:
    """Token slots per global batch (all hosts, padding included)."""
    return self.global_batch_size * self.seq_len

  @property
  def steps_per_epoch(self) -> float:
    """Global steps per pass over the training rows."""
    return self.num_rows / self.global_batch_size

  def _row_index(self, j: tf.Tensor) -> tf.Tensor:
    """Row of this host's j-th row slot: global stream index -> (epoch, shuffle)."""
    step, within = j // self.per_host_batch_size, j % self.per_host_batch_size
    k = step * self.global_batch_size + self._host + within * self._hosts
    epoch, index = k // self.num_rows, k % self.num_rows
    seed = tf.stack([tf.constant(self._seed, tf.int64), epoch])
    return tf.random.experimental.index_shuffle(
        index, seed, tf.constant(self.num_rows - 1, tf.int64))

  def _start(self, step: int) -> None:
    """(Re)builds the tf.data iterator so that the next batch is batch `step`."""
    ds = tf.data.Dataset.counter(step * self.per_host_batch_size).map(self._row_index)
    ds = ds.batch(self.per_host_batch_size * self.steps_per_fetch).map(self._materialize)
    if self._prefetch:
      ds = ds.prefetch(tf.data.AUTOTUNE if self._prefetch < 0 else self._prefetch)
    self._iterator = iter(ds)
    self._fetched: Batch = {}
    self._served = 0
    self._step = step

  def __iter__(self) -> "RowPipeline":
    return self

  def __next__(self) -> Batch:
    self._step += 1
    return serve_next_step(self)

  def get_state(self) -> bytes:
    """The position (batches served) and the layout it is valid for, as JSON."""
    return json.dumps({"step": self._step, **self._meta}, sort_keys=True).encode()

  def set_state(self, state: bytes) -> None:
    """Continues after the last batch served when `state` was saved.

    Raises:
      ValueError: The state was saved by a pipeline with different data,
        batch size, seed or host layout.
    """
    saved = json.loads(state.decode())
    diff = {k: (saved.get(k), v) for k, v in self._meta.items() if saved.get(k) != v}
    if diff:
      raise ValueError("Data iterator state does not match this pipeline "
                       f"(field: (saved, current)): {diff}")
    self._start(int(saved["step"]))


class RowValidationSet:
  """The validation rows; `val(eval_batch_size)` iterates over one full pass.

  Same interface as `lm_pipeline.ValidationSet`: every validation row exactly
  once over all hosts; `eval_batch_size` is the global batch.
  """

  def __init__(self, rows: Rows, *, process_index: int = 0, process_count: int = 1):
    self.seq_len = rows.seq_len
    self.num_rows = rows.num_rows
    self._host, self._hosts = process_index, process_count
    self._materialize = rows.materializer() if rows.num_rows else None

  def num_batches(self, eval_batch_size: int) -> int:
    """Batches each host yields per pass."""
    return -(-self.num_rows // eval_batch_size)

  def __call__(self, eval_batch_size: int) -> Iterator[Batch]:
    per_host = check_sharding(eval_batch_size, self._host, self._hosts,
                              "eval_batch_size")
    if self._materialize is None:
      return iter(())
    padded_rows = self.num_batches(eval_batch_size) * eval_batch_size
    ds = tf.data.Dataset.range(self._host, padded_rows, self._hosts)
    ds = ds.batch(per_host).map(self._materialize)
    return ds.prefetch(2).as_numpy_iterator()
