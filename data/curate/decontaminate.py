"""Decontamination against the evaluation sets: the n-gram index of every scored request."""

from __future__ import annotations

import functools
import os
from typing import Sequence

import numpy as np

from data import benchmarks, filters


def eval_texts(eval_tasks: Sequence[str], ngram: int) -> list[str]:
  """Texts whose n-grams are exactly those of every scored request (context +
  continuation) of the tasks, without repeating a context once per choice: each distinct
  context once, then each continuation after the context's last n-1 words (every n-gram
  that reaches into the continuation starts there)."""
  texts: dict[str, None] = {}
  for task in eval_tasks:
    path = benchmarks.task_path(task)
    reader = benchmarks.MC_READERS[task]
    for item in (reader(path, 0) if task == "mmlu" else reader(path)):
      for context, continuation in item.requests():
        texts[context] = None
        texts[filters.word_tail(context, ngram - 1) + continuation] = None
  return list(texts)


@functools.lru_cache(maxsize=None)
def load_decontaminator(eval_tasks: tuple[str, ...], ngram: int,
                        index_path: str = "") -> filters.Decontaminator:
  """The n-gram index of the evaluation sets: loaded from `index_path` when it exists,
  else built (and saved there), once per process (a pool worker filters several shards)."""
  if index_path and os.path.exists(index_path):
    deco = filters.Decontaminator([], ngram)
    deco.index = np.load(index_path)
    return deco
  deco = filters.Decontaminator(eval_texts(eval_tasks, ngram), ngram)
  if index_path:
    tmp = f"{index_path}.tmp{os.getpid()}.npy"
    np.save(tmp, deco.index)
    os.replace(tmp, index_path)
  return deco
