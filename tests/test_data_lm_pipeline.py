"""Tests for data/lm_pipeline.py, data/packing.py and data/config.py.

Covers the batch contract, nanoGPT windows on tinyshakespeare, exact resume, 2-host
sharding and full validation coverage.
"""

import collections
import json
import time

import numpy as np
import pytest
import tensorflow as tf

from data import packing
from data import documents
from data.config import default_data_config, get_or_train_tokenizer
from data.lm_pipeline import (LMPipeline, ValidationSet, build_lm_pipelines,
                              tokenize_documents)
from data.tokenizer import Tokenizer, train_tokenizer

KEYS = ("tokens", "targets", "positions", "segment_ids", "loss_mask")


def _short_docs(n, seed=0):
  rng = np.random.default_rng(seed)
  words = ["to", "be", "or", "not", "that", "is", "the", "question", "whether"]
  return [" ".join(rng.choice(words, size=rng.integers(1, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def jsonl_setup(tmp_path_factory):
  """A jsonl corpus of short documents and a char tokenizer trained on it."""
  tmp = tmp_path_factory.mktemp("jsonl")
  path = tmp / "docs.jsonl"
  path.write_text("".join(json.dumps({"text": d}) + "\n" for d in _short_docs(200)))
  tok = Tokenizer.from_file(train_tokenizer([str(path)], str(tmp / "c.model"), 0, "char"))
  cfg = default_data_config()
  cfg.update(source="jsonl", path=str(path), seq_len=16, val_fraction=0.25)
  return cfg, tok


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory):
  cfg = default_data_config()
  train_docs, val_docs = documents.load_split_documents(cfg)
  out = tmp_path_factory.mktemp("run") / "tokenizer.model"
  tok = get_or_train_tokenizer(cfg, train_docs, str(out))
  return cfg, tok, train_docs, val_docs


def _take(pipeline, n):
  return [next(pipeline) for _ in range(n)]


def _rows(batch):
  """Each row of a batch as a hashable tuple over all keys."""
  return [tuple(batch[k][i].tobytes() for k in KEYS) for i in range(len(batch["tokens"]))]


def _window_start(data, tokens, targets):
  """The start i of the window data[i:i+len+1] equal to (tokens, last target)."""
  (where,) = np.nonzero(np.all(
      np.lib.stride_tricks.sliding_window_view(data, 8) == tokens[:8], axis=1))
  matches = [int(i) for i in where if np.array_equal(data[i:i + len(tokens)], tokens)
             and np.array_equal(data[i + 1:i + len(tokens) + 1], targets)]
  assert len(matches) == 1, matches
  return matches[0]


def _doc_streams(docs, tok):
  return [tok.encode(d) + [tok.eos_id] for d in docs]


def test_batch_contract_on_short_documents(jsonl_setup):
  cfg, tok = jsonl_setup
  train_docs, _ = documents.load_split_documents(cfg)
  train, _ = build_lm_pipelines(cfg, tok, global_batch_size=8)
  # Every segment must be a contiguous slice of one document: encode streams as text.
  streams = [",".join(map(str, s)) + "," for s in _doc_streams(train_docs, tok)]
  seq = cfg.seq_len
  for batch in _take(train, 20):
    assert set(batch) == set(KEYS)
    for key in KEYS:
      assert batch[key].shape == (8, seq)
      assert batch[key].dtype == (np.float32 if key == "loss_mask" else np.int32)
    np.testing.assert_array_equal(batch["loss_mask"], batch["segment_ids"] > 0)
    for i in range(8):
      seg, pos = batch["segment_ids"][i], batch["positions"][i]
      real = seg > 0
      # Padding only at the end; segment ids count 1, 2, ... without gaps.
      assert np.all(real[:real.sum()]) and not np.any(real[real.sum():])
      assert seg[0] == 1 and np.all(np.diff(seg[real]) >= 0)
      assert np.all(np.diff(seg[real]) <= 1)
      for segment in np.unique(seg[real]):
        idx = np.flatnonzero(seg == segment)
        np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))
        toks, tgts = batch["tokens"][i][idx], batch["targets"][i][idx]
        # Targets are the next tokens within the segment ...
        np.testing.assert_array_equal(tgts[:-1], toks[1:])
        # ... and the whole piece (inputs + last target) lies inside one document.
        piece = ",".join(map(str, list(toks) + [tgts[-1]])) + ","
        assert any(piece in stream for stream in streams)
      assert np.all(batch["tokens"][i][~real] == 0)
    assert np.all(batch["positions"][batch["segment_ids"] == 0] == 0)
  # Several short documents are packed per row.
  assert batch["segment_ids"].max() > 2


def test_epoch_uses_every_pair_once_with_random_offsets(jsonl_setup):
  cfg, tok = jsonl_setup
  train_docs, _ = documents.load_split_documents(cfg)
  corpus = tokenize_documents(train_docs + ["to be or not " * 20], tok, add_eos=True)
  # One row per batch: the first num_rows rows are exactly epoch 0.
  layout = packing.train_layout(tf.constant(corpus.doc_starts),
                                tf.constant(corpus.doc_lengths - 1), 16, 0,
                                tf.constant(0, tf.int64), True)
  pipeline = LMPipeline(corpus, seq_len=16, global_batch_size=1, prefetch=0)
  rows = _take(pipeline, int(layout.num_rows))
  pairs = collections.Counter(
      (int(t), int(g)) for b in rows
      for t, g, m in zip(b["tokens"][0], b["targets"][0], b["loss_mask"][0]) if m)
  expected = collections.Counter()
  for start, length in zip(corpus.doc_starts, corpus.doc_lengths):
    doc = corpus.tokens[start:start + length]
    expected.update(zip(doc[:-1].tolist(), doc[1:].tolist()))
  assert pairs == expected


def test_shakespeare_char_rows_are_nanogpt_windows(shakespeare):
  cfg, tok, train_docs, _ = shakespeare
  data = np.asarray(tok.encode(train_docs[0]), np.int32)  # nanoGPT's train_data
  fixed = cfg.copy_and_resolve_references()
  fixed.random_offset = False
  start = time.time()
  train, _ = build_lm_pipelines(fixed, tok, global_batch_size=12,
                                documents=(train_docs, []))
  assert time.time() - start < 10  # Building for 1 MB of text takes seconds.
  # nanoGPT's windows at multiples of 64: x = data[i:i+64], y = data[i+1:i+65].
  aligned = {data[i:i + 65].tobytes(): i for i in range(0, len(data) - 64, 64)}
  starts = set()
  for batch in _take(train, 30):
    assert batch["loss_mask"].min() == 1.0 and batch["segment_ids"].max() == 1
    np.testing.assert_array_equal(batch["positions"][0], np.arange(64))
    for tokens, targets in zip(batch["tokens"], batch["targets"]):
      np.testing.assert_array_equal(tokens[1:], targets[:-1])
      starts.add(aligned[np.append(tokens, targets[-1]).astype(np.int32).tobytes()])
  assert len(starts) == 30 * 12  # Shuffled windows, none repeated within an epoch.
  assert train.tokens_per_batch == 12 * 64
  assert train.num_train_tokens == len(data) + 1  # + eos


def test_random_offsets_vary_by_epoch_and_keep_windows_whole(shakespeare):
  _, tok, train_docs, _ = shakespeare
  data = np.asarray(tok.encode(train_docs[0]), np.int32)
  corpus = tokenize_documents(train_docs, tok, add_eos=True)
  pipeline = LMPipeline(corpus, seq_len=64, global_batch_size=12, prefetch=0)
  phases = set()
  for batch in _take(pipeline, 2):
    for tokens, targets, mask in zip(batch["tokens"], batch["targets"],
                                     batch["loss_mask"]):
      if not mask.all():
        continue  # The one packed row of the epoch's head and tail pieces.
      phases.add(_window_start(data, tokens, targets) % 64)
  assert len(phases) == 1  # One offset per document per epoch.
  # Offsets are stateless functions of (seed, epoch): in [0, 64), varying by
  # epoch, and 0 for documents that fit in one row.
  doc_pairs = tf.constant([10**6, 64, 5], tf.int64)
  offsets = np.stack([packing.chunk_offsets(doc_pairs, 64, 0, tf.constant(e, tf.int64),
                                            True).numpy() for e in range(20)])
  assert offsets[:, 0].min() >= 0 and offsets[:, 0].max() < 64
  assert len(set(offsets[:, 0])) > 5
  assert np.all(offsets[:, 1:] == 0)
  assert offsets[0, 0] in phases


def test_exact_resume_across_epoch_boundary(jsonl_setup):
  _, tok = jsonl_setup
  corpus = tokenize_documents(["to be or", "not", "that is the"], tok, add_eos=True)
  kwargs = dict(seq_len=8, global_batch_size=4, seed=3, prefetch=2)
  original = LMPipeline(corpus, **kwargs)
  # A tiny corpus has only a few rows per epoch, so every batch crosses an epoch
  # end; resuming after 15 batches also crosses a fetch of steps_per_fetch batches.
  assert corpus.num_targets < 4 * 8 and original.steps_per_fetch == 16
  states, reference = {}, []
  for consumed in (0, 3, 15):
    reference += _take(original, consumed - len(reference))
    states[consumed] = original.get_state()
  reference += _take(original, 5)
  fresh = LMPipeline(corpus, **kwargs)
  for consumed, state in states.items():
    fresh.set_state(state)
    for want, got in zip(reference[consumed:consumed + 5], _take(fresh, 5)):
      for key in KEYS:
        np.testing.assert_array_equal(want[key], got[key])
  # A state from a differently configured pipeline is refused, naming the field.
  other = LMPipeline(corpus, **{**kwargs, "seed": 4})
  with pytest.raises(ValueError, match="seed"):
    other.set_state(states[3])


def test_two_hosts_make_up_the_global_batch(jsonl_setup):
  cfg, tok = jsonl_setup
  train_docs, _ = documents.load_split_documents(cfg)
  docs = (train_docs[:20], [])
  corpus = tokenize_documents(docs[0], tok, add_eos=True)
  rows_per_epoch = [int(packing.num_rows(
      tf.constant(corpus.doc_lengths - 1), 16,
      packing.chunk_offsets(tf.constant(corpus.doc_lengths - 1), 16, cfg.seed,
                            tf.constant(e, tf.int64), True))) for e in range(8)]
  # Epoch boundaries fall mid-batch and at odd row counts: the hard case.
  assert sum(rows_per_epoch[:4]) < 40 * 6 and any(n % 2 for n in rows_per_epoch[:4])
  single, _ = build_lm_pipelines(cfg, tok, global_batch_size=6, documents=docs)
  hosts = [build_lm_pipelines(cfg, tok, global_batch_size=6, process_index=h,
                              process_count=2, documents=docs)[0] for h in range(2)]
  assert hosts[0].per_host_batch_size == 3
  for _ in range(40):
    union = sorted(_rows(next(hosts[0])) + _rows(next(hosts[1])))
    assert union == sorted(_rows(next(single)))
  with pytest.raises(ValueError, match="global_batch_size=7.*process_count=2"):
    build_lm_pipelines(cfg, tok, global_batch_size=7, process_index=0,
                       process_count=2, documents=docs)


def test_validation_covers_every_target_once(shakespeare):
  cfg, tok, _, val_docs = shakespeare
  corpus = tokenize_documents(val_docs, tok, add_eos=True)
  val = ValidationSet(corpus, seq_len=cfg.seq_len)
  stream = np.asarray(_doc_streams(val_docs, tok)[0], np.int32)
  batches = list(val(32))
  assert len(batches) == val.num_batches(32) == -(-val.num_rows // 32)
  tokens = np.concatenate([b["tokens"] for b in batches])
  targets = np.concatenate([b["targets"] for b in batches])
  mask = np.concatenate([b["loss_mask"] for b in batches]).astype(bool)
  assert mask.sum() == len(stream) - 1 == val.num_targets
  # Fixed windows in order: flattening the real slots gives back the stream.
  np.testing.assert_array_equal(tokens[mask], stream[:-1])
  np.testing.assert_array_equal(targets[mask], stream[1:])
  assert np.all(np.concatenate([b["segment_ids"] for b in batches])[~mask] == 0)
  assert list(val(32))[0]["tokens"].tobytes() == batches[0]["tokens"].tobytes()


def test_validation_is_sharded_and_padded_per_host(jsonl_setup):
  cfg, tok = jsonl_setup
  _, val_docs = documents.load_split_documents(cfg)
  corpus = tokenize_documents(val_docs, tok, add_eos=True)
  single = list(ValidationSet(corpus, seq_len=16)(6))
  per_host = [list(ValidationSet(corpus, seq_len=16, process_index=h, process_count=2)(6))
              for h in range(2)]
  assert len(per_host[0]) == len(per_host[1]) == len(single)
  for a, b, whole in zip(per_host[0], per_host[1], single):
    assert sorted(_rows(a) + _rows(b)) == sorted(_rows(whole))
  total = sum(b["loss_mask"].sum() for h in per_host for b in h)
  assert total == corpus.num_targets == sum(len(d) for d in val_docs)  # chars + eos - 1
  assert single[-1]["loss_mask"][-1].sum() == 0  # The last global batch is padded.


def test_get_or_train_tokenizer_order(tmp_path, shakespeare):
  cfg, tok, train_docs, _ = shakespeare
  out = tmp_path / "run.model"
  trained = get_or_train_tokenizer(cfg, ["abc\nd"], str(out))
  assert trained.vocab_size == 5 + 4  # a b c d \n + the four specials
  # A resumed run reloads its own tokenizer instead of retraining.
  assert get_or_train_tokenizer(cfg, train_docs, str(out)).fingerprint == trained.fingerprint
  given = cfg.copy_and_resolve_references()
  given.tokenizer.path = str(tmp_path / "given.model")
  tok.save(given.tokenizer.path)
  assert get_or_train_tokenizer(given, [], str(out)).fingerprint == tok.fingerprint
