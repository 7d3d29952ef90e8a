"""Benchmark: the streaming pretraining input (data/stream_pipeline.py) on synthetic shards.

  python benchmarks/stream_pipeline.py [--tokens=8000000] [--files=8] [--streams=2]
      [--seq_lens=256,2048] [--batch_tokens=65536] [--seconds=10]

Writes a curated-format directory (`--files` TFRecord shards of random documents of 200 to
1,800 ids from a 32k vocabulary, `--tokens` in all) in a temporary folder, then for each
seq_len builds this host's pipeline (1 process, `--streams` streams, shuffle buffer 1,000
documents, 4 files interleaved per stream) with batch_tokens / seq_len rows per step and
pulls steps for `--seconds` after a warm-up of 5 steps, with nothing else running (the
rate the input can feed a train step at).

  rows_per_sec_T    packed rows of seq_len T per second (1 process)
  tokens_per_sec_T  token slots per second (rows x T)
  state_bytes_T     size of the iterator state blob after the run (what a checkpoint holds)

Last line: one JSON object with these keys for every seq_len.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

FLAGS = flags.FLAGS
flags.DEFINE_integer("tokens", 8_000_000, "Training tokens in the synthetic corpus.")
flags.DEFINE_integer("files", 8, "Training shards.")
flags.DEFINE_integer("streams", 2, "data.streams.")
flags.DEFINE_string("seq_lens", "256,2048", "Comma-separated seq_len values to time.")
flags.DEFINE_integer("batch_tokens", 65536, "Token slots per step (rows = this / seq_len).")
flags.DEFINE_float("seconds", 10.0, "Seconds of steps timed per seq_len.")


def main(argv):
  del argv
  from data.config import default_data_config
  from data.stream_sources import build_stream_pipelines
  from data.tokenized import curated_shards
  from stream_fixtures import char_tokenizer, write_curated

  rng = np.random.default_rng(0)
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    tok = char_tokenizer(os.path.join(tmp, "c.model"))
    per_file = FLAGS.tokens // FLAGS.files
    shards = []
    for _ in range(FLAGS.files):
      docs, total = [], 0
      while total < per_file:
        docs.append(np.append(rng.integers(4, 32_000, size=int(rng.integers(200, 1800))), 2))
        total += len(docs[-1])
      shards.append(docs)
    directory = write_curated(os.path.join(tmp, "curated"), shards, shards[0][:50], tok)
    for seq_len in (int(t) for t in FLAGS.seq_lens.split(",")):
      cfg = default_data_config()
      cfg.update(dict(source="curated", curated_dir=directory, seq_len=seq_len,
                      streams=FLAGS.streams, shuffle_buffer=1000, cycle_length=4))
      curated = curated_shards(directory)
      batch = FLAGS.batch_tokens // seq_len
      train, _ = build_stream_pipelines(cfg, curated.tokenizer, global_batch_size=batch,
                                        curated=curated)
      for _ in range(5):
        next(train)
      steps, start = 0, time.perf_counter()
      while time.perf_counter() - start < FLAGS.seconds:
        next(train)
        steps += 1
      seconds = time.perf_counter() - start
      results[f"rows_per_sec_{seq_len}"] = round(steps * batch / seconds, 1)
      results[f"tokens_per_sec_{seq_len}"] = round(steps * batch * seq_len / seconds)
      results[f"state_bytes_{seq_len}"] = len(train.get_state())
      print(f"seq_len {seq_len}: {results[f'rows_per_sec_{seq_len}']:,} rows/s, "
            f"{results[f'tokens_per_sec_{seq_len}']:,} tokens/s, state "
            f"{results[f'state_bytes_{seq_len}']:,} bytes", flush=True)
  print(json.dumps(results))


if __name__ == "__main__":
  app.run(main)
