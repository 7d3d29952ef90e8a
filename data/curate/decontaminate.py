"""Decontamination against the evaluation sets: the n-gram index of every scored request,
built in the pipeline (`DecontaminationIndex`) and passed to the filter as a side input."""

from __future__ import annotations

import os
from typing import Iterable, Iterator, Sequence

import apache_beam as beam
import numpy as np

from data import benchmarks, filters, readers


def eval_texts(eval_tasks: Sequence[str], ngram: int, data_dir: str | None = None
               ) -> list[str]:
  """Texts whose n-grams are exactly those of every scored request (context +
  continuation) of the tasks, without repeating a context once per choice: each distinct
  context once, then each continuation after the context's last n-1 words (every n-gram
  that reaches into the continuation starts there). `data_dir`: where the evaluation
  files are (default: the data directory, `data.readers.resolve_data_path`)."""
  texts: dict[str, None] = {}
  for task in eval_tasks:
    path = benchmarks.task_path(task, data_dir)
    reader = benchmarks.MC_READERS[task]
    for item in (reader(path, 0) if task == "mmlu" else reader(path)):
      for context, continuation in item.requests():
        texts[context] = None
        texts[filters.word_tail(context, ngram - 1) + continuation] = None
  return list(texts)


class _UniqueHashes(beam.CombineFn):
  """uint64 arrays -> one sorted array of their distinct values. Arrays are collected and
  made unique once at the end (doing it per input would be quadratic);
  only past `_FOLD` pending entries are they folded early, to bound the memory."""

  _FOLD = 1 << 24

  def create_accumulator(self) -> list[np.ndarray]:
    return []

  def add_input(self, acc: list[np.ndarray], hashes: np.ndarray) -> list[np.ndarray]:
    acc.append(hashes)
    if len(acc) % 1024 == 0 and sum(len(a) for a in acc) > self._FOLD:
      acc[:] = [filters.sorted_unique(np.concatenate(acc))]
    return acc

  def merge_accumulators(self, accs: Iterable[list[np.ndarray]]) -> list[np.ndarray]:
    return [a for acc in accs for a in acc]

  def compact(self, acc: list[np.ndarray]) -> list[np.ndarray]:
    # What travels between workers.
    return [filters.sorted_unique(np.concatenate(acc))] if acc else []

  def extract_output(self, acc: list[np.ndarray]) -> np.ndarray:
    return filters.sorted_unique(np.concatenate(acc)) if acc else np.zeros([0], np.uint64)


class DecontaminationIndex(beam.PTransform):
  """The evaluation n-gram index, built in parallel: tasks -> their texts (`eval_texts`,
  per task, in chunks) -> n-gram hashes per chunk -> one sorted unique uint64 array (a singleton
  PCollection, the filter's side input; `decontaminator` wraps it)."""

  def __init__(self, eval_tasks: Sequence[str], ngram: int):
    super().__init__()
    self.eval_tasks, self.ngram = list(eval_tasks), ngram
    # The launcher's data directory ($LM_DATA_DIR), which remote workers do not inherit.
    self.data_dir = os.environ.get(readers.LM_DATA_DIR_ENV) or None

  def expand(self, pbegin):
    return (pbegin
            | "Tasks" >> beam.Create(self.eval_tasks)
            | "Texts" >> beam.FlatMap(_text_chunks, self.ngram, self.data_dir)
            | "Spread" >> beam.Reshuffle()
            | "Hash" >> beam.Map(_chunk_hashes, self.ngram)
            | "Union" >> beam.CombineGlobally(_UniqueHashes()))


_CHUNK = 2000  # texts per element: Beam's per-element cost stays small beside the hashing


def _text_chunks(task: str, ngram: int, data_dir: str | None) -> Iterator[list[str]]:
  texts = eval_texts([task], ngram, data_dir)
  for i in range(0, len(texts), _CHUNK):
    yield texts[i:i + _CHUNK]


def _chunk_hashes(texts: Sequence[str], ngram: int) -> np.ndarray:
  return filters.ngram_hash_set(texts, ngram)


def decontaminator(index: np.ndarray, ngram: int) -> filters.Decontaminator:
  """A `filters.Decontaminator` over a built index."""
  deco = filters.Decontaminator([], ngram)
  deco.index = index
  return deco
