"""Streamed pretraining on curated shards (data.source="curated", data/stream_pipeline.py) as
2 `jax.distributed` processes on localhost (launch/local.py, one device each) logs the same
per-step losses as 1 process with 2 local devices, while each process reads only its own
shards (data.streams=2: shards 0, 2 to process 0; 1, 3 to process 1); and a run resumed from
its step-4 checkpoint (the streams' iterator state in it) repeats steps 5-8 exactly.
"""

import io
import os
import re
import shutil

import numpy as np
import pytest

from conftest import (eval_records, pretrain_cmd, run_cmd, subprocess_env, train_losses)
from data import readers
from launch.local import launch
from stream_fixtures import char_tokenizer, write_curated

CONFIG = "configs/pretrain/english_bpe.py:runlocal=true,curated={}"
FLAGS = ("--config.data.streams=2", "--config.data.shuffle_buffer=16",
         "--config.train.num_steps=8", "--config.train.log_every=1",
         "--config.train.eval_every=8", "--config.train.checkpoint_every=4",
         "--config.train.eval_batch_size=8")


@pytest.fixture(scope="module")
def shakespeare_shards(tmp_path_factory):
  """4 train shards and a val shard of tiny-Shakespeare paragraphs, char tokenized."""
  tmp = tmp_path_factory.mktemp("stream_run")
  text = next(readers.read_text_file(readers.resolve_data_path(
      "pretrain/tinyshakespeare.txt")))[:200_000]
  tok = char_tokenizer(str(tmp / "c.model"), text)
  docs = [np.asarray(tok.encode(p) + [tok.eos_id], np.int64)
          for p in text.split("\n\n") if p.strip()]
  val = docs[:40]
  train = [docs[40 + i::4] for i in range(4)]
  return write_curated(str(tmp / "curated"), train, val, tok,
                       val_chars=sum(len(d) for d in val))


@pytest.mark.cli
def test_two_processes_stream_disjoint_shards_with_the_same_losses(shakespeare_shards,
                                                                   tmp_path):
  config = CONFIG.format(shakespeare_shards)
  one = str(tmp_path / "one")
  out = run_cmd(pretrain_cmd(one, *FLAGS, config=config))
  assert out.returncode == 0, out.stdout[-5000:]
  # Stream 0's shards, then stream 1's.
  assert "Data: process 0 reads train-00000.tfrecord, train-00002.tfrecord, " \
      "train-00001.tfrecord, train-00003.tfrecord" in out.stdout, out.stdout[-3000:]

  two = str(tmp_path / "two")
  args = pretrain_cmd(two, *FLAGS, config=config, local_devices=None)[1:]
  sink = io.StringIO()
  code = launch(args, num_processes=2, local_devices=1, timeout=400, env=subprocess_env(),
                sink=sink)
  log = sink.getvalue()
  assert code == 0, log[-5000:]
  reads = dict(re.findall(r"\[\d\] Data: process (\d) reads (.*)", log))
  assert reads == {"0": "train-00000.tfrecord, train-00002.tfrecord",
                   "1": "train-00001.tfrecord, train-00003.tfrecord"}, log[-3000:]

  got, want = train_losses(two), train_losses(one)
  assert sorted(got) == sorted(want) == list(range(1, 9))
  diffs = {s: (got[s], want[s]) for s in want if abs(got[s] - want[s]) > 1e-5}
  assert not diffs, f"(2 processes, 1 process) losses differ: {diffs}"
  assert eval_records(two)[-1]["eval/loss"] == pytest.approx(
      eval_records(one)[-1]["eval/loss"], abs=1e-5)

  # Resume: the 1-process run from its step-4 checkpoint continues with the same batches.
  resumed = str(tmp_path / "resumed")
  shutil.copytree(one, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "8"))
  os.remove(os.path.join(resumed, "metrics.jsonl"))
  out = run_cmd(pretrain_cmd(resumed, *FLAGS, config=config))
  assert out.returncode == 0, out.stdout[-5000:]
  assert "checkpoints/4" in out.stdout and "step 5/8" in out.stdout, out.stdout[-3000:]
  again = train_losses(resumed)
  assert sorted(again) == [5, 6, 7, 8], again
  assert all(again[s] == pytest.approx(want[s], abs=1e-6) for s in range(5, 9)), (again, want)
