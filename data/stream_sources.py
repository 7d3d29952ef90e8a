"""Where the streaming pretraining pipeline's documents come from: the tokenized TFRecord
shards of a curation run (`data.source = "curated"`) or a TFDS split tokenized on the fly
(`data.source = "tfds"`); `build_stream_pipelines` makes this host's `StreamPipeline` and
`StreamValidationSet` (data/stream_pipeline.py) from either.

  curated  Sorted `tokenized/train-*.tfrecord`; file i belongs to stream i % S. Every epoch
           e a stream reads its files in an order shuffled by (seed, stream, e), through a
           deterministic interleave of `data.cycle_length` files; records are parsed to
           their `tokens` (eos included by data.curate). Validation: the val files in
           order, every pair once.
  tfds     `tfds.even_splits(data.tfds_train_split, S)`: stream s reads its part with
           shuffled files (ReadConfig seeded by (seed, s), reshuffled every epoch) and
           `data.cycle_length` files interleaved; the text feature `data.field` is
           tokenized in tf.data (`tf.numpy_function` over the run's tokenizer, eos
           appended if `data.add_eos`). Validation: `data.tfds_val_split` in file order.
           The tokenizer comes from `data.tokenizer.path`, or is trained on the first
           `data.tokenizer.train_sample_docs` training documents
           (`tfds_sample_documents`), since the split may not fit in memory.

Both seed the file order from (seed, stream, epoch), so a stream's documents do not depend
on how many hosts read the streams.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from typing import Any

import numpy as np
import tensorflow as tf

from data import tfds_readers
from data.stream_pipeline import (Parser, RecordSource, StreamPipeline,
                                  StreamValidationSet, describe_files, owned_streams)
from data.tokenized import CuratedShards

TOKENS_FEATURE = "tokens"


# ---------------------------------------------------------------------------------- curated
def file_records(files: list[str], *, seed: int, stream: int,
                 cycle_length: int) -> RecordSource:
  """One stream's records: every epoch its files in a new seeded order, interleaved."""

  def make() -> tf.data.Dataset:
    names = tf.constant(files)
    key = tf.constant([seed, stream], tf.int64)

    def epoch(e):
      order = tf.argsort(tf.random.stateless_uniform(
          [len(files)], seed=tf.random.experimental.stateless_fold_in(key, e)))
      return tf.data.Dataset.from_tensor_slices(tf.gather(names, order)).interleave(
          tf.data.TFRecordDataset, cycle_length=max(1, min(cycle_length, len(files))),
          block_length=1)  # Sequential interleave: deterministic, checkpointable.

    return tf.data.Dataset.counter().flat_map(epoch)

  return make


def parse_tokens(records: tf.Tensor) -> tf.RaggedTensor:
  """Serialized tf.train.Examples -> their int64 `tokens` lists, ragged [K, None]."""
  spec = {TOKENS_FEATURE: tf.io.RaggedFeature(tf.int64)}
  return tf.io.parse_example(records, spec)[TOKENS_FEATURE]


def files_fingerprint(files: list[str]) -> str:
  """Names and sizes of the files: a changed corpus refuses an old iterator state."""
  text = "\n".join(f"{os.path.basename(f)}:{os.path.getsize(f)}" for f in files)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------- tfds
def text_parser(tokenizer: Any, add_eos: bool) -> Parser:
  """UTF-8 texts -> token ids (eos appended if `add_eos`), in tf.data via numpy_function."""
  eos = tokenizer.eos_id

  def encode(texts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids = tokenizer.encode_batch([t.decode("utf-8") for t in texts])
    if add_eos:
      ids = [i + [eos] for i in ids]
    lengths = np.asarray([len(i) for i in ids], np.int64)
    flat = np.fromiter(itertools.chain.from_iterable(ids), np.int64, int(lengths.sum()))
    return flat, lengths

  def parse(records: tf.Tensor) -> tf.RaggedTensor:
    # stateful=False: a pure function of its input, so the iterator can be checkpointed.
    flat, lengths = tf.numpy_function(encode, [records], [tf.int64, tf.int64],
                                      stateful=False)
    flat.set_shape([None])
    lengths.set_shape([None])
    return tf.RaggedTensor.from_row_lengths(flat, lengths)

  return parse


def _tfds_text(name: str, split: str, field: str, data_dir: str | None,
               read_config: Any = None, shuffle_files: bool = False) -> tf.data.Dataset:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  ds = tfds.load(name, split=split, data_dir=data_dir, shuffle_files=shuffle_files,
                 read_config=read_config)
  if field not in ds.element_spec:
    raise ValueError(f"TFDS {name}[{split}] has no feature {field!r} "
                     f"(has: {sorted(ds.element_spec)})")
  return ds.map(lambda example: example[field])


def tfds_records(data_cfg: Any, *, seed: int, stream: int, streams: int) -> RecordSource:
  """Stream `stream` of S: its even split of the training split, repeated, file order
  reshuffled every epoch."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  split = tfds.even_splits(data_cfg.tfds_train_split, n=streams)[stream]

  def make() -> tf.data.Dataset:
    config = tfds.ReadConfig(shuffle_seed=(seed * 1_000_003 + stream) % 2**31,
                             shuffle_reshuffle_each_iteration=True,
                             interleave_cycle_length=max(1, data_cfg.cycle_length),
                             interleave_block_length=1,
                             enable_ordering_guard=False)  # shuffling on purpose
    return _tfds_text(data_cfg.tfds_name, split, data_cfg.field or "text",
                      data_cfg.tfds_data_dir or None, config, shuffle_files=True).repeat()

  return make


def tfds_num_examples(data_cfg: Any, split: str) -> int:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(data_cfg.tfds_name, data_dir=data_cfg.tfds_data_dir or None)
  builder.download_and_prepare()
  return int(builder.info.splits[split].num_examples)


def tfds_sample_documents(data_cfg: Any) -> list[str]:
  """The first `data.tokenizer.train_sample_docs` training documents (file order): what
  a tokenizer for a streamed TFDS source is trained on."""
  limit = int(data_cfg.tokenizer.get("train_sample_docs", 0)) or None
  docs = tfds_readers.read_tfds(data_cfg.tfds_name, data_cfg.tfds_train_split,
                                data_cfg.field or "text", data_cfg.tfds_data_dir or None)
  return list(itertools.islice(docs, limit))


def tfds_val_chars(data_cfg: Any) -> int:
  """Characters in the validation split (the bits-per-character denominator)."""
  if not data_cfg.tfds_val_split:
    return 0
  ds = _tfds_text(data_cfg.tfds_name, data_cfg.tfds_val_split, data_cfg.field or "text",
                  data_cfg.tfds_data_dir or None)
  return int(ds.reduce(tf.constant(0, tf.int64), lambda n, t: n + tf.cast(
      tf.strings.length(t, unit="UTF8_CHAR"), tf.int64)))


# ---------------------------------------------------------------------------------- build
def build_stream_pipelines(data_cfg: Any, tokenizer: Any, *, global_batch_size: int,
                           process_index: int = 0, process_count: int = 1,
                           curated: CuratedShards | None = None,
                           ) -> tuple[StreamPipeline, StreamValidationSet]:
  """This host's streaming training pipeline and validation set.

  Args:
    data_cfg: The data ConfigDict (`seq_len`, `seed`, `prefetch`, `streams`,
      `shuffle_buffer`, `cycle_length`; for TFDS `tfds_name`, `tfds_data_dir`,
      `tfds_train_split`, `tfds_val_split`, `field`, `add_eos`).
    tokenizer: The run's tokenizer (curated: the shards' own).
    global_batch_size: Training rows per step over all hosts.
    process_index: This host's index.
    process_count: Number of hosts.
    curated: The curated shards to read; None reads the TFDS source.

  Returns:
    (train pipeline, validation set).
  """
  seed, streams = int(data_cfg.seed), int(data_cfg.streams) or process_count
  if curated is not None:
    files = curated.train_files
    owned = owned_streams(streams, len(files), global_batch_size, process_index,
                          process_count, f"training files in {os.path.dirname(files[0])}")
    mine = {s: files[s::streams] for s in owned}
    sources = [file_records(mine[s], seed=seed, stream=s,
                            cycle_length=int(data_cfg.cycle_length)) for s in owned]
    parse = parse_tokens
    source_fingerprint = files_fingerprint(files)
    host_files = [f for s in owned for f in mine[s]]
    describe = describe_files(host_files)
    val_files = curated.val_files

    def val_records():
      return tf.data.TFRecordDataset(val_files)

    val_parse, val_pairs = parse_tokens, curated.val_pairs
  else:
    num = tfds_num_examples(data_cfg, data_cfg.tfds_train_split)
    owned = owned_streams(streams, num, global_batch_size, process_index, process_count,
                          f"examples in TFDS {data_cfg.tfds_name}")
    sources = [tfds_records(data_cfg, seed=seed, stream=s, streams=streams) for s in owned]
    parse = text_parser(tokenizer, bool(data_cfg.add_eos))
    source_fingerprint = f"tfds:{data_cfg.tfds_name}:{data_cfg.tfds_train_split}:{num}"
    host_files = []
    describe = (f"TFDS {data_cfg.tfds_name}[{data_cfg.tfds_train_split}] parts "
                f"{list(owned)} of {streams}")
    val_split = data_cfg.tfds_val_split

    def val_records():
      if not val_split:
        return tf.data.Dataset.from_tensor_slices(tf.zeros([0], tf.string))
      return _tfds_text(data_cfg.tfds_name, val_split, data_cfg.field or "text",
                        data_cfg.tfds_data_dir or None)

    val_parse, val_pairs = parse, None
  train = StreamPipeline(
      sources, parse, stream_ids=list(owned), seq_len=data_cfg.seq_len,
      global_batch_size=global_batch_size, streams=streams, seed=seed,
      shuffle_buffer=int(data_cfg.shuffle_buffer), prefetch=data_cfg.prefetch,
      process_index=process_index, process_count=process_count,
      fingerprint=tokenizer.fingerprint, source_fingerprint=source_fingerprint,
      files=host_files, describe=describe)
  val = StreamValidationSet(val_records, val_parse, seq_len=data_cfg.seq_len,
                            process_index=process_index, process_count=process_count,
                            num_pairs=val_pairs)
  return train, val
