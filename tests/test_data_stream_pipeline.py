"""Tests for data/stream_pipeline.py and data/stream_sources.py: the streamed pretraining
input (curated shards and TFDS) keeps the LM batch contract, covers every pair, splits files
over hosts so that the hosts' batches make up the 1-process global batch, resumes exactly
(also after a SIGKILL) and validates every pair once."""

import collections
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from conftest import REPO_ROOT, subprocess_env
from data.config import default_data_config
from data.stream_sources import build_stream_pipelines
from data.tokenized import curated_shards
from stream_fixtures import char_tokenizer, random_documents, write_curated

KEYS = ("tokens", "targets", "positions", "segment_ids", "loss_mask")


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
  """6 train shards of 40 random documents each (some of 1 token: no pair), 30 val docs."""
  tmp = tmp_path_factory.mktemp("curated")
  tok = char_tokenizer(str(tmp / "c.model"))
  shards = [random_documents(40, tok.vocab_size, tok.eos_id, seed=i) for i in range(6)]
  val = random_documents(30, tok.vocab_size, tok.eos_id, seed=99)
  return write_curated(str(tmp / "run"), shards, val, tok), shards, val


def _build(directory, batch=8, host=0, hosts=1, **data):
  cfg = default_data_config()
  cfg.update(dict(source="curated", curated_dir=directory, seq_len=16, prefetch=2,
                  shuffle_buffer=20, cycle_length=2, streams=2))
  cfg.update(data)
  shards = curated_shards(directory)
  return build_stream_pipelines(cfg, shards.tokenizer, global_batch_size=batch,
                                process_index=host, process_count=hosts, curated=shards)


def _take(pipeline, n):
  return [next(pipeline) for _ in range(n)]


def _pairs(batches):
  return collections.Counter(
      (int(t), int(g)) for b in batches
      for t, g, m in zip(b["tokens"].ravel(), b["targets"].ravel(), b["loss_mask"].ravel())
      if m)


def _doc_pairs(docs):
  return collections.Counter(p for d in docs for p in zip(d[:-1].tolist(), d[1:].tolist()))


def test_rows_keep_the_batch_contract(curated):
  directory, shards, _ = curated
  streams = [",".join(map(str, d)) + "," for docs in shards for d in docs]
  train, _ = _build(directory)
  segments, most = 0, 0
  for batch in _take(train, 30):
    for key in KEYS:
      assert batch[key].shape == (8, 16)
      assert batch[key].dtype == (np.float32 if key == "loss_mask" else np.int32)
    assert batch["loss_mask"].min() == 1  # Training rows are full: no padding.
    for i in range(8):
      seg, pos = batch["segment_ids"][i], batch["positions"][i]
      assert seg[0] == 1 and set(np.diff(seg)) <= {0, 1}
      segments, most = segments + seg.max(), max(most, seg.max())
      for s in np.unique(seg):
        idx = np.flatnonzero(seg == s)
        np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))
        toks, tgts = batch["tokens"][i][idx], batch["targets"][i][idx]
        np.testing.assert_array_equal(tgts[:-1], toks[1:])
        piece = ",".join(map(str, list(toks) + [tgts[-1]])) + ","
        assert any(piece in stream for stream in streams)
  # Documents (mean 40 pairs) continue across rows and short ones share a row.
  assert segments > 30 * 8 * 1.2 and most >= 3


def test_one_epoch_without_shuffle_is_every_pair_once(curated):
  directory, shards, _ = curated
  want = _doc_pairs([d for docs in shards for d in docs])
  total = sum(want.values())
  # One stream, one row per step: the first total / 16 rows are exactly epoch 0 (the last
  # row of the epoch is completed by epoch 1, so compare whole rows only).
  train, _ = _build(directory, batch=1, streams=1, shuffle_buffer=0)
  got = _pairs(_take(train, total // 16))
  assert not got - want and sum((want - got).values()) == total % 16


def test_hosts_read_disjoint_files_and_make_up_the_global_batch(curated):
  directory, _, _ = curated
  for streams in (2, 6):
    single, _ = _build(directory, batch=12, streams=streams)
    hosts = [_build(directory, batch=12, host=h, hosts=2, streams=streams)[0]
             for h in range(2)]
    assert hosts[0].per_host_batch_size == 6 and len(single.files) == 6
    read = [set(h.files) for h in hosts]
    assert not read[0] & read[1] and read[0] | read[1] == set(single.files), read
    # Several fetches and epochs: each stream's 3 shards are ~600 pairs = ~37 rows.
    for step in range(40):
      parts = [next(h) for h in hosts]
      whole = next(single)
      for key in KEYS:
        np.testing.assert_array_equal(
            np.concatenate([p[key] for p in parts]), whole[key], err_msg=f"{step} {key}")


@pytest.mark.parametrize("data, hosts, match", [
    ({"streams": 3}, 2, "data.streams=3 must be a multiple of the number of processes"),
    ({"streams": 3}, 1, "batch_size=8 must be a multiple of data.streams=3"),
    ({"streams": 8}, 1, "data.streams=8 needs at least as many training files.*has 6"),
])
def test_bad_stream_layouts_are_refused(curated, data, hosts, match):
  with pytest.raises(ValueError, match=match):
    _build(curated[0], hosts=hosts, **data)


def test_resume_continues_with_the_next_batches(curated):
  directory, _, _ = curated
  original, _ = _build(directory)
  assert original.steps_per_fetch == 16
  states, reference = {}, []
  # 0, mid-fetch, a fetch boundary, and past several epochs of each stream.
  for consumed in (0, 5, 16, 60):
    reference += _take(original, consumed - len(reference))
    states[consumed] = original.get_state()
  reference += _take(original, 20)
  for consumed, state in states.items():
    fresh, _ = _build(directory)
    fresh.set_state(state)
    for want, got in zip(reference[consumed:consumed + 20], _take(fresh, 20)):
      for key in KEYS:
        np.testing.assert_array_equal(want[key], got[key])
  for other in ({"seed": 1}, {"shuffle_buffer": 21}):
    with pytest.raises(ValueError, match=next(iter(other))):
      _build(directory, **other)[0].set_state(states[5])


_CHILD = textwrap.dedent("""
    import sys, time
    import numpy as np
    sys.path.insert(0, {tests!r})
    from test_data_stream_pipeline import _build
    train, _ = _build({directory!r})
    mode, path = sys.argv[1], sys.argv[2]
    if mode == "save":
      for _ in range(23):
        next(train)
      with open(path + ".tmp", "wb") as f:
        f.write(train.get_state())
      import os; os.rename(path + ".tmp", path)
      while True:  # Still "training" when it is killed.
        next(train)
        time.sleep(0.01)
    with open(path, "rb") as f:
      train.set_state(f.read())
    batches = [next(train) for _ in range(10)]
    np.savez(path + ".next.npz", **{{k: np.stack([b[k] for b in batches])
                                   for k in ("tokens", "targets", "segment_ids")}})
    """)


@pytest.mark.cli  # two child processes (~20 s): out of the default tier
def test_a_killed_process_resumes_from_its_saved_state(curated, tmp_path):
  directory, _, _ = curated
  script = tmp_path / "child.py"
  script.write_text(_CHILD.format(tests=os.path.join(REPO_ROOT, "tests"),
                                  directory=directory))
  state = str(tmp_path / "state.bin")
  env = subprocess_env()
  child = subprocess.Popen([sys.executable, str(script), "save", state], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  deadline = time.monotonic() + 120
  while not os.path.exists(state):
    assert child.poll() is None, child.stdout.read().decode()[-3000:]
    assert time.monotonic() < deadline, "the child never saved its state"
    time.sleep(0.05)
  child.send_signal(signal.SIGKILL)
  child.wait()
  out = subprocess.run([sys.executable, str(script), "load", state], env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
  assert out.returncode == 0, out.stdout.decode()[-3000:]
  reference = _take(_build(directory)[0], 33)[23:]
  with np.load(state + ".next.npz") as got:
    for key in got.files:
      np.testing.assert_array_equal(got[key], np.stack([b[key] for b in reference]))


def test_validation_covers_every_pair_once_per_host_and_padded(curated):
  directory, _, val_docs = curated
  stream = np.concatenate([d for d in val_docs if len(d) >= 2])
  _, val = _build(directory)
  pairs = sum(len(d) - 1 for d in val_docs)
  assert val.num_targets == pairs and val.num_rows == -(-pairs // 16)
  batches = list(val(8))
  assert len(batches) == val.num_batches(8)
  mask = np.concatenate([b["loss_mask"] for b in batches]).astype(bool)
  tokens = np.concatenate([b["tokens"] for b in batches])[mask]
  assert mask.sum() == pairs and batches[-1]["loss_mask"][-1].sum() == 0
  # Rows in document order: the real slots are every document's inputs, in order.
  inputs = np.concatenate([d[:-1] for d in val_docs if len(d) >= 2])
  np.testing.assert_array_equal(tokens, inputs)
  assert len(stream) - len(inputs) == sum(len(d) >= 2 for d in val_docs)
  per_host = [list(_build(directory, host=h, hosts=2)[1](8)) for h in range(2)]
  assert len(per_host[0]) == len(per_host[1]) == len(batches)
  for a, b, whole in zip(*per_host, batches):
    for key in KEYS:  # Host h holds global rows h, h + 2, ...
      np.testing.assert_array_equal(whole[key][0::2], a[key])
      np.testing.assert_array_equal(whole[key][1::2], b[key])


@pytest.mark.cli  # builds a TFDS dataset and tokenizes it in tf.data (~18 s)
def test_tfds_source_streams_per_host(tmp_path):
  """data.source="tfds": lm_wikitext2 (local builder) as 2 streams, tokenized in tf.data."""
  from data import stream_sources
  cfg = default_data_config()
  cfg.update(dict(source="tfds", tfds_name="lm_wikitext2", tfds_data_dir=str(tmp_path),
                  tfds_train_split="validation", tfds_val_split="test", seq_len=32,
                  streams=2, shuffle_buffer=8, cycle_length=1))
  cfg.tokenizer.train_sample_docs = 5
  sample = stream_sources.tfds_sample_documents(cfg)
  assert len(sample) == 5 and sample[0].startswith(" = ")
  tok = char_tokenizer(str(tmp_path / "c.model"), "".join(sample))

  def build(host, hosts):
    return build_stream_pipelines(cfg, tok, global_batch_size=4, process_index=host,
                                  process_count=hosts)

  single, val = build(0, 1)
  hosts = [build(h, 2)[0] for h in range(2)]
  assert hosts[0].describe.endswith("parts [0] of 2")
  reference = []
  for _ in range(5):
    whole = next(single)
    reference.append(whole)
    parts = [next(h) for h in hosts]
    for key in KEYS:
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
  assert reference[0]["loss_mask"].min() == 1 and reference[0]["tokens"].max() < tok.vocab_size
  state = hosts[0].get_state()
  after = [next(hosts[0]) for _ in range(3)]
  fresh = build(0, 2)[0]
  fresh.set_state(state)
  for want in after:
    np.testing.assert_array_equal(next(fresh)["tokens"], want["tokens"])
  assert val.num_targets > 0 and sum(b["loss_mask"].sum() for b in val(4)) == val.num_targets
