"""Token-id corpora: `TokenizedCorpus`, `tokenize_documents`; and the tokenized output of a
curation run (`data/curate/`): `curated_shards` (the tokenizer, info.json and the shard file
lists, checked; what pretraining with `config.data.source = "curated"` streams from, see
data/stream_sources.py) and `load_tokenized` (the whole output in memory: for tests and
small corpora only).

Only `load_tokenized` needs TensorFlow (the shards are TFRecords); it imports it when called,
so this module stays light for `data.curate`'s worker processes.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any, Sequence

import numpy as np

from data.tokenizer import Tokenizer

_ENCODE_CHUNK_DOCS = 4096  # Bounds the Python lists alive during tokenization.


@dataclasses.dataclass(frozen=True)
class TokenizedCorpus:
  """Documents' token ids concatenated, with per-document start and length."""
  tokens: np.ndarray       # int32 [N]
  doc_starts: np.ndarray   # int64 [D]
  doc_lengths: np.ndarray  # int64 [D], every length >= 2 (at least one target)

  @property
  def num_tokens(self) -> int:
    return int(self.tokens.size)

  @property
  def num_targets(self) -> int:
    """Next-token targets (pairs) in the corpus: sum of (length - 1)."""
    return int(np.sum(self.doc_lengths - 1))


def tokenize_documents(docs: Sequence[str], tokenizer: Tokenizer,
                       add_eos: bool) -> TokenizedCorpus:
  """Tokenizes documents (eos appended if `add_eos`) into one array.

  Documents with fewer than 2 tokens have no next-token target and are dropped.
  """
  pieces, lengths = [], []
  for begin in range(0, len(docs), _ENCODE_CHUNK_DOCS):
    for ids in tokenizer.encode_batch(docs[begin:begin + _ENCODE_CHUNK_DOCS]):
      if add_eos:
        ids.append(tokenizer.eos_id)
      if len(ids) >= 2:
        pieces.append(np.asarray(ids, np.int32))
        lengths.append(len(ids))
  tokens = np.concatenate(pieces) if pieces else np.zeros([0], np.int32)
  doc_lengths = np.asarray(lengths, np.int64)
  doc_starts = np.concatenate([[0], np.cumsum(doc_lengths)[:-1]]).astype(np.int64)
  return TokenizedCorpus(tokens, doc_starts[:len(lengths)], doc_lengths)


def _read_tfrecords(files: Sequence[str]) -> TokenizedCorpus:
  """The `tokens` lists of every record of `files`, in file order."""
  # Imported here: TensorFlow is heavy and only reading the shards needs it.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  spec = {"tokens": tf.io.VarLenFeature(tf.int64)}
  pieces = [tf.sparse.to_dense(tf.io.parse_single_example(raw, spec)["tokens"]).numpy()
            for raw in tf.data.TFRecordDataset(files)]
  lengths = np.asarray([len(p) for p in pieces], np.int64)
  tokens = (np.concatenate(pieces) if pieces else np.zeros([0])).astype(np.int32)
  starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) \
      if len(pieces) else np.zeros([0], np.int64)
  return TokenizedCorpus(tokens, starts, lengths)


@dataclasses.dataclass(frozen=True)
class CuratedShards:
  """A finished curation run's tokenized output, checked but not read."""
  tokenizer: Tokenizer
  info: dict[str, Any]     # tokenized/info.json
  train_files: list[str]   # tokenized/train-*.tfrecord, sorted
  val_files: list[str]     # tokenized/val-*.tfrecord, sorted

  @property
  def val_pairs(self) -> int:
    """Validation (input, target) pairs: every document gives its length - 1."""
    return int(self.info["val_tokens"]) - int(self.info["val_documents"])


def curated_shards(curated_dir: str) -> CuratedShards:
  """The tokenizer, info.json and shard lists of a curation run's tokenized output.

  Raises:
    FileNotFoundError: `curated_dir` holds no finished curation output.
    ValueError: The tokenizer is not the one the shards were made with, or the shard
      files are not the ones info.json lists.
  """
  info_path = os.path.join(curated_dir, "tokenized", "info.json")
  if not os.path.exists(info_path):
    raise FileNotFoundError(
        f"{curated_dir} holds no finished curation output ({info_path} is missing); run "
        f"`python -m data.curate --config=configs/data/<name>.py --workdir={curated_dir}` "
        "with tokenize.enabled=True first")
  with open(info_path, encoding="utf-8") as f:
    info = json.load(f)
  tok = Tokenizer.from_file(os.path.join(curated_dir, info["tokenizer"]))
  if tok.fingerprint != info["tokenizer_fingerprint"]:
    raise ValueError(f"{curated_dir}/{info['tokenizer']} is not the tokenizer the shards "
                     "were made with (fingerprint differs)")
  shard_dir = os.path.join(curated_dir, "tokenized")
  train = sorted(glob.glob(os.path.join(shard_dir, "train-*.tfrecord")))
  val = sorted(glob.glob(os.path.join(shard_dir, "val-*.tfrecord")))
  listed = info.get("train_files")
  if isinstance(listed, int) and listed != len(train):
    raise ValueError(f"{shard_dir}: {len(train)} train-*.tfrecord files, info.json "
                     f"says train_files={listed}")
  if not train:
    raise ValueError(f"{shard_dir} holds no train-*.tfrecord files")
  return CuratedShards(tok, info, train, val)


def load_tokenized(curated_dir: str
                   ) -> tuple[Tokenizer, TokenizedCorpus, TokenizedCorpus, dict[str, Any]]:
  """The tokenized output of a curation run, all in memory: (tokenizer, train
  TokenizedCorpus, validation TokenizedCorpus, info). Raises as `curated_shards` does.
  Pretraining streams the shards instead (data/stream_sources.py)."""
  shards = curated_shards(curated_dir)
  info = shards.info
  train = _read_tfrecords(shards.train_files)
  val = _read_tfrecords(shards.val_files)
  if train.num_tokens != info["train_tokens"] or val.num_tokens != info["val_tokens"]:
    raise ValueError(f"{curated_dir}/tokenized: the shards hold {train.num_tokens} train / "
                     f"{val.num_tokens} validation tokens, info.json says "
                     f"{info['train_tokens']} / {info['val_tokens']}")
  return shards.tokenizer, train, val, info
