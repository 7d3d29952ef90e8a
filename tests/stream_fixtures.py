"""Test helpers: a curated directory in data.curate's output format, written directly.

`<dir>/tokenized/{train,val}-XXXXX.tfrecord` (tf.train.Example: int64 `tokens` with eos,
bytes `source`), `<dir>/tokenized/info.json` and `<dir>/tokenizer.model`, so streaming tests
do not depend on running data.curate.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np


def char_tokenizer(path: str, text: str = "abcdefghijklmnopqrstuvwxyz .,\n"):
  """A char SentencePiece model over `text`'s characters (trained once, saved at path)."""
  from data.tokenizer import Tokenizer, train_tokenizer
  src = path + ".txt"
  with open(src, "w", encoding="utf-8") as f:
    f.write(text * 20)
  return Tokenizer.from_file(train_tokenizer([src], path, 0, "char"))


def random_documents(n: int, vocab: int, eos: int, *, seed: int, mean_len: int = 40
                     ) -> list[np.ndarray]:
  """n documents of random ids in [4, vocab), lengths 1..2*mean_len, each ending in eos."""
  rng = np.random.default_rng(seed)
  return [np.append(rng.integers(4, vocab, size=int(rng.integers(1, 2 * mean_len))), eos)
          for _ in range(n)]


def write_shard(path: str, docs: Sequence[np.ndarray], source: bytes = b"synthetic") -> None:
  import tensorflow as tf
  with tf.io.TFRecordWriter(path) as writer:
    for doc in docs:
      writer.write(tf.train.Example(features=tf.train.Features(feature={
          "tokens": tf.train.Feature(int64_list=tf.train.Int64List(value=list(doc))),
          "source": tf.train.Feature(bytes_list=tf.train.BytesList(value=[source])),
      })).SerializeToString())


def write_curated(out: str, train_shards: Sequence[Sequence[np.ndarray]],
                  val_docs: Sequence[np.ndarray], tokenizer, val_chars: int = 0) -> str:
  """Writes a curated directory (module doc); returns `out`."""
  shard_dir = os.path.join(out, "tokenized")
  os.makedirs(shard_dir, exist_ok=True)
  tokenizer.save(os.path.join(out, "tokenizer.model"))
  for i, docs in enumerate(train_shards):
    write_shard(os.path.join(shard_dir, f"train-{i:05d}.tfrecord"), docs)
  write_shard(os.path.join(shard_dir, "val-00000.tfrecord"), val_docs)
  train_tokens = sum(len(d) for docs in train_shards for d in docs)
  info = {"tokenizer": "tokenizer.model", "tokenizer_fingerprint": tokenizer.fingerprint,
          "train_files": len(train_shards), "train_tokens": train_tokens,
          "train_documents": sum(len(docs) for docs in train_shards),
          "val_tokens": sum(len(d) for d in val_docs), "val_documents": len(val_docs),
          "val_chars": val_chars or sum(len(d) for d in val_docs),
          "per_source": {"synthetic": {"tokens": train_tokens}}}
  with open(os.path.join(shard_dir, "info.json"), "w") as f:
    json.dump(info, f)
  return out
