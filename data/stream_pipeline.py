"""The streaming pretraining pipeline: document streams read from disk -> packed LM batches,
per host, with the corpus never held in memory.

`StreamPipeline` has the interface of `lm_pipeline.LMPipeline` (an infinite iterator of
per-host Batch dicts, `get_state`/`set_state`) and `StreamValidationSet` that of
`lm_pipeline.ValidationSet`; the batch contract is the same (see data/lm_pipeline.py): every
slot of a row holds an (input, target) pair of one document, so `loss_mask` is 0 only on
padding (training rows have none). Where the documents come from (tokenized TFRecord shards
of data/curate, a TFDS split tokenized on the fly) is data/stream_sources.py's business:
this module takes, per stream, a function returning an infinite dataset of serialized
records and a parser from a batch of records to a ragged [K, None] batch of token ids.

Decisions:
- Streams. The training data is split into S streams (`data.streams`; shards i with
  i % S == s, or `tfds.even_splits`). Host h of P owns streams [h S/P, (h+1) S/P) and every
  stream gives global_batch / S rows per step, so the hosts' batches concatenated in host
  order are exactly the 1-process global batch (in stream order) and a host opens only its
  own files. The same S on any number of hosts (dividing S) sees the same global batches.
- Per stream: records (file order reshuffled every epoch by the source) -> a seeded
  shuffle buffer of `data.shuffle_buffer` documents -> batches of documents parsed to
  ragged token ids -> `pack_rows`: concat-and-chunk into rows of `seq_len` pairs. A
  document longer than the room left in a row continues in the next row as a new segment;
  positions restart at 0 per segment. Packing is a `tf.data` scan whose carry is the < 1
  row left over, vectorised over each document batch (no per-token or per-document ops).
  The shuffle buffer runs on across epochs, so a few documents of epoch e + 1 may come
  before the last ones of epoch e (an epoch is not a hard boundary, as in most streaming
  LM loaders); without shuffling, an epoch is exactly every pair once.
- Exact resume: the tf.data iterator checkpoint holds each stream's file and offset, the
  shuffle buffer (shuffle_buffer serialized documents: the bulk of the state, e.g. ~1-2 MB
  per 1,000 documents of ~500 tokens), the packer's carry and the prefetch buffer; the
  fetched-but-not-served steps go next to it (data/pipeline_state.py). `set_state` checks
  seq_len, batch, seed, streams, host layout, tokenizer and the source's fingerprint.
- Memory is bounded by the shuffle buffer, the interleave's open files, one fetch in
  flight plus the prefetch buffer; it does not grow with the corpus (tests/
  test_data_stream_memory.py measures it).
- Validation reads its records once, in order, packs them the same way (the last row
  padded) and gives host h the global rows h, h + P, ...; the last global batch is
  padded with rows of loss_mask 0 so every host yields the same number of batches. The
  number of rows must be known up front (`num_pairs`; counted by one pass if not given).
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import tensorflow as tf

from data.packing import PAD_TOKEN
from data.pipeline_state import (Batch, FetchingPipeline, check_sharding,
                                 steps_per_fetch)

# The pipeline is CPU work; TF must not grab the accelerator that JAX trains on.
try:
  tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError):  # Devices already initialised: nothing to hide now.
  pass

# A function of no arguments returning a dataset of serialized records (tf.string scalars).
RecordSource = Callable[[], tf.data.Dataset]
# A batch of records (tf.string [K]) -> their documents' token ids (int64 ragged [K, None]).
Parser = Callable[[tf.Tensor], tf.RaggedTensor]
DOCS_PER_PARSE = 64  # Records per parse call: amortises tf.data's per-element cost.


def owned_streams(streams: int, num_items: int, global_batch_size: int,
                  process_index: int, process_count: int, what: str) -> range:
  """The streams host `process_index` reads, after checking the layout.

  Args:
    streams: S, the number of streams (`data.streams`; 0 = process_count).
    num_items: Files (or examples) the streams are cut from.
    global_batch_size: Rows per step over all hosts.
    process_index: This host.
    process_count: P, the number of hosts.
    what: Names the items in errors (e.g. "training files in DIR").

  Raises:
    ValueError: S not a multiple of P, the batch not a multiple of S, or fewer items
      than streams.
  """
  streams = streams or process_count
  check_sharding(global_batch_size, process_index, process_count, "global_batch_size")
  if streams % process_count:
    raise ValueError(f"data.streams={streams} must be a multiple of the number of "
                     f"processes ({process_count})")
  if global_batch_size % streams:
    raise ValueError(f"train.batch_size={global_batch_size} must be a multiple of "
                     f"data.streams={streams} (every stream gives the same rows per step)")
  if num_items < streams:
    raise ValueError(f"data.streams={streams} needs at least as many {what} (has "
                     f"{num_items}); lower data.streams or write more shards")
  per_host = streams // process_count
  return range(process_index * per_host, (process_index + 1) * per_host)


def _row_tensors(inputs: tf.Tensor, targets: tf.Tensor, starts: tf.Tensor,
                 valid: tf.Tensor) -> dict[str, tf.Tensor]:
  """The batch tensors of rows: [R, T] inputs, targets, segment-start flags, valid flags."""
  seq_len = tf.shape(inputs)[1]
  # A segment starts where a document starts and at every row's first slot.
  first_col = tf.equal(tf.range(seq_len), 0)[None, :]                  # [1, T]
  new_segment = tf.logical_and(tf.logical_or(starts, first_col), valid)  # [R, T]
  segment_ids = tf.cumsum(tf.cast(new_segment, tf.int32), axis=1)
  # Position = slot - the slot where its segment started (over the flattened rows).
  flat_new = tf.reshape(new_segment, [-1])
  slot = tf.range(tf.size(flat_new))
  segment_start = tf.gather(tf.boolean_mask(slot, flat_new),
                            tf.maximum(tf.cumsum(tf.cast(flat_new, tf.int32)) - 1, 0))
  positions = tf.reshape(slot - segment_start, tf.shape(inputs))
  zero, pad = tf.constant(0, tf.int32), tf.constant(PAD_TOKEN, tf.int32)
  return {
      "tokens": tf.where(valid, inputs, pad),
      "targets": tf.where(valid, targets, pad),
      "positions": tf.where(valid, positions, zero),
      "segment_ids": tf.where(valid, segment_ids, zero),
      "loss_mask": tf.cast(valid, tf.float32),
  }


def pack_rows(doc_batches: tf.data.Dataset, seq_len: int) -> tf.data.Dataset:
  """Concat-and-chunk packing of document batches into rows (module doc).

  Args:
    doc_batches: Elements (docs, flush): docs int64 ragged [K, None] token ids (documents
      with fewer than 2 tokens have no pair and are skipped), flush a bool scalar: emit
      the left-over pairs as a last, padded row (validation's end).
    seq_len: Slots per row.

  Returns:
    A dataset of single rows (the batch keys, each [seq_len]).
  """
  empty = (tf.zeros([0], tf.int32), tf.zeros([0], tf.int32), tf.zeros([0], tf.bool))

  def step(carry, element):
    docs, flush = element
    docs = tf.ragged.boolean_mask(docs, docs.row_lengths() >= 2)
    docs = tf.cast(docs, tf.int32)
    inputs = tf.concat([carry[0], docs[:, :-1].flat_values], 0)
    targets = tf.concat([carry[1], docs[:, 1:].flat_values], 0)
    first = tf.equal(tf.ragged.range(docs.row_lengths() - 1).flat_values, 0)
    starts = tf.concat([carry[2], first], 0)
    n = tf.size(inputs)
    rows = tf.where(flush, (n + seq_len - 1) // seq_len, n // seq_len)
    used = tf.minimum(rows * seq_len, n)
    pad = rows * seq_len - used  # > 0 only when flushing.
    valid = tf.concat([tf.ones([used], tf.bool), tf.zeros([pad], tf.bool)], 0)

    def cut(x, fill):
      head = tf.concat([x[:used], tf.fill([pad], fill)], 0)
      return tf.reshape(head, [rows, seq_len])

    out = _row_tensors(cut(inputs, 0), cut(targets, 0), cut(starts, False),
                       tf.reshape(valid, [rows, seq_len]))
    return (inputs[used:], targets[used:], starts[used:]), out

  return doc_batches.scan(empty, step).unbatch()


def stream_rows(records: tf.data.Dataset, parse: Parser, *, seq_len: int,
                shuffle_buffer: int, shuffle_seed: int) -> tf.data.Dataset:
  """One training stream: records -> shuffled documents -> packed rows (infinite)."""
  if shuffle_buffer > 1:
    records = records.shuffle(shuffle_buffer, seed=shuffle_seed)
  docs = records.batch(DOCS_PER_PARSE).map(lambda r: (parse(r), tf.constant(False)))
  return pack_rows(docs, seq_len)


class StreamPipeline(FetchingPipeline):
  """Infinite iterator over this host's training batches from document streams.

  `get_state()` after k batches, then `set_state()` on a fresh pipeline built from the
  same sources, config and host layout, continues with batch k + 1.
  """

  def __init__(self, sources: Sequence[RecordSource], parse: Parser, *,
               stream_ids: Sequence[int], seq_len: int, global_batch_size: int,
               streams: int, seed: int = 0, shuffle_buffer: int = 1000,
               prefetch: int = 2, process_index: int = 0, process_count: int = 1,
               fingerprint: str = "", source_fingerprint: str = "",
               files: Sequence[str] = (), describe: str = ""):
    """Builds the pipeline.

    Args:
      sources: This host's streams, in stream order: each returns the stream's
        infinite dataset of records (every epoch, files in a new order).
      parse: Records -> token ids (see `Parser`).
      stream_ids: The global index of each of `sources` (from `owned_streams`).
      seq_len: Tokens per row.
      global_batch_size: Rows per step over all hosts.
      streams: S, the number of streams over all hosts.
      seed: Seeds the document shuffle (the sources seed their file order).
      shuffle_buffer: Documents in each stream's shuffle buffer (<= 1: no shuffle).
      prefetch: Fetches prepared in the background; -1 = AUTOTUNE, 0 = none.
      process_index: This host's index.
      process_count: Number of hosts.
      fingerprint: The tokenizer's fingerprint; `set_state` refuses another.
      source_fingerprint: Identifies the data (file names and sizes, TFDS split).
      files: The files this host reads, in stream order (empty for TFDS).
      describe: What this host reads, for the log (e.g. its file names).
    """
    if seq_len <= 0:
      raise ValueError(f"seq_len={seq_len} must be positive")
    self.per_host_batch_size = check_sharding(
        global_batch_size, process_index, process_count, "global_batch_size")
    if len(sources) != len(stream_ids) or len(sources) * process_count != streams:
      raise ValueError(f"{len(sources)} sources for streams {list(stream_ids)} do not fit "
                       f"{streams} streams over {process_count} processes")
    self.global_batch_size = global_batch_size
    self.seq_len = seq_len
    self.stream_ids = list(stream_ids)
    self.files = list(files)
    self.describe = describe
    self.steps_per_fetch = steps_per_fetch(self.per_host_batch_size, seq_len)
    rows_per_step = global_batch_size // streams
    meta = {
        "seq_len": seq_len, "global_batch_size": global_batch_size, "seed": seed,
        "streams": streams, "shuffle_buffer": shuffle_buffer,
        "process_index": process_index, "process_count": process_count,
        "fingerprint": fingerprint, "source_fingerprint": source_fingerprint,
        "steps_per_fetch": self.steps_per_fetch,
    }
    per_stream = [
        stream_rows(source(), parse, seq_len=seq_len, shuffle_buffer=shuffle_buffer,
                    shuffle_seed=_stream_seed(seed, s))
        .batch(rows_per_step * self.steps_per_fetch, drop_remainder=True)
        for source, s in zip(sources, stream_ids)]
    spf = self.steps_per_fetch

    def interleave_streams(*fetches):
      # Each fetch: [spf * r, T] rows of one stream -> step k takes r rows of each
      # stream, in stream order: [spf, streams_here, r, T] -> [spf * per_host, T].
      return {k: tf.reshape(tf.stack([tf.reshape(f[k], [spf, rows_per_step, seq_len])
                                      for f in fetches], axis=1), [-1, seq_len])
              for k in fetches[0]}

    ds = tf.data.Dataset.zip(tuple(per_stream)).map(interleave_streams)
    if prefetch:
      ds = ds.prefetch(tf.data.AUTOTUNE if prefetch < 0 else prefetch)
    self._start(ds, meta)


def _stream_seed(seed: int, stream: int) -> int:
  """The shuffle seed of one stream: distinct per (seed, stream), fits an int64."""
  return (seed * 1_000_003 + stream * 7_919 + 1) % (2**62)


class StreamValidationSet:
  """The validation records packed in order; `val(eval_batch_size)` is one full pass.

  Same interface as `lm_pipeline.ValidationSet`: every validation pair exactly once over
  all hosts; `eval_batch_size` is the global batch.
  """

  def __init__(self, records: RecordSource, parse: Parser, *, seq_len: int,
               process_index: int = 0, process_count: int = 1,
               num_pairs: int | None = None):
    """Builds the validation set.

    Args:
      records: Returns the validation records, in a fixed order, once.
      parse: Records -> token ids.
      seq_len: Slots per row.
      process_index: This host's index.
      process_count: Number of hosts.
      num_pairs: Validation (input, target) pairs (sum of document lengths - 1), if
        known (curated info.json); None counts them in one pass.
    """
    self.seq_len = seq_len
    self._records, self._parse = records, parse
    self._host, self._hosts = process_index, process_count
    if num_pairs is None:
      num_pairs = int(self._docs().reduce(
          tf.constant(0, tf.int64),
          lambda total, d: total + tf.reduce_sum(tf.maximum(d[0].row_lengths() - 1, 0))))
    self.num_targets = num_pairs
    self.num_rows = -(-num_pairs // seq_len)

  def _docs(self) -> tf.data.Dataset:
    docs = self._records().batch(DOCS_PER_PARSE).map(
        lambda r: (self._parse(r).with_row_splits_dtype(tf.int64), tf.constant(False)))
    # One last, empty element that flushes the packer's left-over pairs.
    flush = tf.data.Dataset.from_tensors((tf.RaggedTensor.from_row_lengths(
        tf.zeros([0], tf.int64), tf.zeros([0], tf.int64)), tf.constant(True)))
    return docs.concatenate(flush)

  def num_batches(self, eval_batch_size: int) -> int:
    """Batches each host yields per pass."""
    return -(-self.num_rows // eval_batch_size)

  def __call__(self, eval_batch_size: int) -> Iterator[Batch]:
    per_host = check_sharding(eval_batch_size, self._host, self._hosts,
                              "eval_batch_size")
    if not self.num_rows:
      return iter(())
    padded_rows = self.num_batches(eval_batch_size) * eval_batch_size
    rows = pack_rows(self._docs(), self.seq_len)
    zeros = tf.zeros([self.seq_len], tf.int32)
    padding = {"tokens": zeros, "targets": zeros, "positions": zeros,
               "segment_ids": zeros, "loss_mask": tf.zeros([self.seq_len], tf.float32)}
    rows = rows.concatenate(
        tf.data.Dataset.from_tensors(padding).repeat(padded_rows - self.num_rows))
    host = self._host
    ds = rows.batch(self._hosts, drop_remainder=True).map(
        lambda r: {k: v[host] for k, v in r.items()})
    return ds.batch(per_host).prefetch(2).as_numpy_iterator()


def describe_files(files: Sequence[str]) -> str:
  """A short list of file names for logs: 'a, b, c' or 'a, b, ... (N files)'."""
  names = [f.rsplit("/", 1)[-1] for f in files]
  return ", ".join(names) if len(names) <= 6 else \
      f"{', '.join(names[:3])}, ..., {names[-1]} ({len(names)} files)"

