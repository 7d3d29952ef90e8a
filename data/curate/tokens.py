"""The curation's token transforms: the tokenizer (trained on a sample of the training
split, or a given model), token ids per document, and the writing of sorted shards.

Beam does not order elements, so every output file is written by `WriteShards`: its
records grouped by file, sorted by a deterministic key, written by rename
(`files.write_tfrecord`); the same input gives byte-identical files for any number of
workers.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Any, Iterable, Iterator, Mapping, Sequence

import apache_beam as beam
import numpy as np

from data import corpus
from data.curate import files
from data.tokenizer import Tokenizer, train_tokenizer

Key = tuple[int, int, int]


def sample_hash(text: str) -> int:
  """The order of the tokenizer's training sample: the smallest hashes are taken."""
  return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def train_model(sample: Sequence[tuple[int, Key, str]], tok: Mapping[str, Any]) -> bytes:
  """A SentencePiece model (bytes) trained on the sampled documents, in document order."""
  symbols = [s.strip() for s in tok.get("user_defined_symbols", "").split(",") if s.strip()]
  with tempfile.TemporaryDirectory() as tmp:
    text_path = os.path.join(tmp, "train.txt")
    with open(text_path, "w", encoding="utf-8") as f:
      for _, _, text in sorted(sample, key=lambda x: x[1]):
        f.write(text + "\n")  # the trainer reads lines; joining loses nothing
    model_path = os.path.join(tmp, "tokenizer.model")
    train_tokenizer([text_path], model_path, vocab_size=tok["vocab_size"],
                    model_type=tok.get("model_type", "bpe"),
                    byte_fallback=tok.get("byte_fallback", False),
                    user_defined_symbols=symbols)
    with open(model_path, "rb") as f:
      return f.read()


class TokenizerModel(beam.PTransform):
  """The tokenizer as a singleton PCollection of model bytes: `tokenizer_path` read, else
  trained on the `sample_docs` training documents (not validation) with the smallest
  `sample_hash`; written to `<workdir>/tokenizer.model`."""

  def __init__(self, tok: Mapping[str, Any], workdir: str):
    super().__init__()
    self.tok, self.workdir = dict(tok), workdir

  def expand(self, docs):
    tok = self.tok
    if tok.get("tokenizer_path"):
      model = (docs.pipeline
               | "Path" >> beam.Create([os.path.expanduser(tok["tokenizer_path"])])
               | "ReadModel" >> beam.Map(files.read_bytes))
    else:
      val_fraction = float(tok.get("val_fraction", 0.0))
      model = (docs
               | "TrainSplit" >> beam.Filter(
                   lambda d: not corpus.is_validation_document(d[2], val_fraction))
               | "Hash" >> beam.Map(lambda d: (sample_hash(d[2]), d[0], d[2]))
               | "Sample" >> beam.combiners.Top.Of(int(tok.get("sample_docs", 200_000)),
                                                   reverse=True)
               | "Train" >> beam.Map(train_model, tok))
    path = files.join(self.workdir, "tokenizer.model")
    written = model | "Write" >> beam.Map(lambda b: (files.write_bytes(path, b), path)[1])
    return model, written


class Tokenize(beam.DoFn):
  """(key, provenance, text) -> (key, token ids + eos, is validation, characters), the
  model a side input (bytes; the Tokenizer built once per worker). Documents of fewer
  than two tokens (no next-token target) are dropped."""

  def __init__(self, add_eos: bool, val_fraction: float):
    self.add_eos, self.val_fraction = add_eos, val_fraction
    self._model = self._tok = None

  def process(self, doc: tuple[Key, str, str], model: bytes
              ) -> Iterator[tuple[Key, np.ndarray, bool, int]]:
    if self._model is not model:
      self._tok, self._model = Tokenizer.from_bytes(model), model
    key, _, text = doc
    ids = self._tok.encode(text) + ([self._tok.eos_id] if self.add_eos else [])
    if len(ids) >= 2:
      yield key, np.asarray(ids, np.int32), \
          corpus.is_validation_document(text, self.val_fraction), len(text)


def _write(shard: tuple[str, Iterable[Any]]) -> Iterator[tuple[str, int]]:
  path, records = shard
  rows = sorted(r for r in records if r is not None)  # (sort key, serialized record)
  yield path, files.write_tfrecord(path, (record for _, record in rows))


class WriteShards(beam.PTransform):
  """(file path, (sort key, serialized record)) -> one TFRecord file per path, records in
  sort-key order; every path of `paths` is written, empty or not. Output: (path, count)."""

  def __init__(self, paths: Sequence[str]):
    super().__init__()
    self.paths = list(paths)

  def expand(self, records):
    every = records.pipeline | "Every" >> beam.Create([(p, None) for p in self.paths])
    return ((records, every)
            | "All" >> beam.Flatten()
            | "ByFile" >> beam.GroupByKey()
            | "Write" >> beam.FlatMap(_write))
