"""Tests for data/sft_rows.py, data/sft_pipeline.py and default_sft_data_config.

Truncation and drop counts on constructed examples, pack vs pad content, the batch
contract, exact resume, 2-host sharding, full validation coverage, and the builder
on real shared SFT files.
"""

import gzip
import json

import numpy as np
import pytest

from data import sft_pipeline, sft_rows
from data.chat import ASSISTANT, CHAT_MARKERS, USER, ChatTemplate
from data.config import default_sft_data_config
from data.row_pipeline import RowPipeline, RowValidationSet
from data.sft_pipeline import build_sft_pipelines
from data.sft_rows import build_rows, first_fit, fit_example
from data.readers import resolve_data_path
from data.tokenizer import Tokenizer, train_tokenizer

KEYS = ("tokens", "targets", "positions", "segment_ids", "loss_mask")


@pytest.fixture(scope="module")
def template(tmp_path_factory):
  """A char tokenizer (with the chat markers) trained on a few KB of Alpaca."""
  tmp = tmp_path_factory.mktemp("sft")
  with open(resolve_data_path("sft/alpaca_subset.jsonl"), encoding="utf-8") as f:
    records = [json.loads(next(f)) for _ in range(60)]
  path = tmp / "alpaca.txt"
  path.write_text("\n".join(r["instruction"] + "\n" + r["output"] for r in records))
  return ChatTemplate(Tokenizer.from_file(train_tokenizer(
      [str(path)], str(tmp / "c.model"), 0, "char", byte_fallback=True,
      user_defined_symbols=CHAT_MARKERS)))


def _chat(user, assistant):
  return [{"role": USER, "content": user}, {"role": ASSISTANT, "content": assistant}]


def _conversations(n, seed=0):
  rng = np.random.default_rng(seed)
  words = ["red", "blue", "a", "cat", "sat", "on", "the", "mat", "why", "not"]
  return [_chat(f"q{i} " + " ".join(rng.choice(words, rng.integers(0, 6))),
                " ".join(rng.choice(words, rng.integers(1, 8)))) for i in range(n)]


def _examples_in_rows(batches):
  """Every segment of every row as (tokens, targets, loss_mask) tuples, checked."""
  out = []
  for batch in batches:
    for row in range(batch["tokens"].shape[0]):
      seg = batch["segment_ids"][row]
      real = seg > 0
      # Padding only at the end of the row, all zeros and no loss.
      assert np.all(real[:-1] >= real[1:])
      for key in KEYS:
        assert not np.any(batch[key][row][~real])
      ids = seg[real]
      if not ids.size:  # A padding row (validation's last batch).
        continue
      assert ids[0] == 1 and np.all(np.diff(ids) >= 0) and np.all(np.diff(ids) <= 1)
      for s in np.unique(ids):
        where = np.flatnonzero(seg == s)
        tokens, targets = batch["tokens"][row][where], batch["targets"][row][where]
        np.testing.assert_array_equal(batch["positions"][row][where], np.arange(where.size))
        # Inside a segment each target is the next input: nothing crosses a boundary.
        np.testing.assert_array_equal(tokens[1:], targets[:-1])
        out.append((tuple(tokens), tuple(targets),
                    tuple(batch["loss_mask"][row][where])))
  return out


def _expected_examples(template, conversations):
  out = []
  for conversation in conversations:
    ids, mask = template.encode(conversation)
    out.append((tuple(ids[:-1]), tuple(ids[1:]), tuple(mask[1:])))
  return out


# --------------------------------------------------------------------------- truncation
def test_truncation_keeps_prompt_end_and_whole_response(template):
  tok = template.tokenizer
  ids, mask = template.encode(_chat("start " + "x" * 40 + " the question?", "yes sir"))
  kept_ids, kept_mask, status = fit_example(ids, mask, 30)
  assert status == "truncated_prompt" and len(kept_ids) == 30
  text = tok.decode(kept_ids)
  assert text.endswith(" the question?<|end|><|assistant|>yes sir<|end|>")
  assert "start" not in text
  np.testing.assert_array_equal(kept_ids, ids[-30:])
  assert kept_mask.sum() == mask.sum()  # Every response token still has its loss.


def test_long_response_is_cut_at_its_end_or_dropped(template):
  tok = template.tokenizer
  ids, mask = template.encode(_chat("hi?", "abcdefghijklmnopqrstuvwxyz" * 2))
  kept_ids, kept_mask, status = fit_example(ids, mask, 20, min_response_tokens=3)
  assert status == "truncated_response"
  assert tok.decode(kept_ids) == "<|user|>hi?<|end|><|assistant|>abcdefghijklmn"
  assert kept_mask.sum() == 14 and kept_mask[:6].sum() == 0
  # The prompt takes 6 tokens, leaving 20 - 6 = 14 for the response.
  assert fit_example(ids, mask, 20, min_response_tokens=15)[2] == "dropped_too_long"
  assert fit_example(ids, mask, 20, min_response_tokens=14)[2] == "truncated_response"


def test_counts_of_each_status(template):
  conversations = [
      _chat("short", "ok"),                             # kept
      _chat("p" * 30, "ok"),                            # prompt cut
      _chat("q", "r" * 40),                             # response cut
      _chat("p" * 30, "r" * 40),                        # prompt leaves < 5: dropped
      [{"role": USER, "content": "nobody answers"}],    # no loss token
      _chat("another", "fine"),                         # kept
  ]
  rows, counts = build_rows(conversations, template, seq_len=24, packing="pad",
                            min_response_tokens=5)
  assert {k: counts[k] for k in sft_rows.STATUSES} == {
      "kept": 2, "truncated_prompt": 1, "truncated_response": 1,
      "dropped_too_long": 1, "dropped_no_response": 1, "dropped_long_response": 0}
  assert counts["examples"] == len(conversations) and counts["rows"] == rows.num_rows == 4
  # max_response_tokens drops examples whose response (content + <|end|>) is longer,
  # before any truncation: "r" * 40 is 41 tokens, "ok" 3.
  _, capped = build_rows(conversations, template, seq_len=24, packing="pad",
                         min_response_tokens=5, max_response_tokens=40)
  assert capped["dropped_long_response"] == 2 and capped["truncated_response"] == 0
  assert capped["kept"] == 2 and capped["truncated_prompt"] == 1
  # Response + <|end|> each, and 25 - 4 (prompt) tokens of the cut response.
  assert counts["loss_tokens"] == len("ok") + 1 + len("ok") + 1 + 25 - 4 + len("fine") + 1


# --------------------------------------------------------------------------- packing
def test_first_fit_matches_naive_first_fit():
  assert first_fit([5, 3, 4, 2, 1], 6).tolist() == [0, 1, 2, 1, 0]
  rng = np.random.default_rng(0)
  sizes = rng.integers(1, 17, 500).tolist()
  room, naive = [], []
  for size in sizes:
    b = next((i for i, r in enumerate(room) if r >= size), len(room))
    if b == len(room):
      room.append(16)
    room[b] -= size
    naive.append(b)
  assert first_fit(sizes, 16).tolist() == naive


def test_pack_and_pad_hold_the_same_examples(template):
  conversations = _conversations(40)
  expected = sorted(_expected_examples(template, conversations))
  got = {}
  for mode in ("pack", "pad"):
    rows, counts = build_rows(conversations, template, seq_len=96, packing=mode)
    assert counts["kept"] == len(conversations)
    batches = list(RowValidationSet(rows)(8))
    got[mode] = _examples_in_rows(batches)
    assert sorted(got[mode]) == expected
    assert sum(b["loss_mask"].sum() for b in batches) == counts["loss_tokens"]
    if mode == "pad":
      assert rows.num_rows == len(conversations)
  assert max(len(_examples_in_rows([b])) for b in RowValidationSet(
      build_rows(conversations, template, seq_len=96)[0])(8)) > 8  # Rows hold several.
  assert build_rows(conversations, template, seq_len=96)[1]["rows"] < len(conversations)


# --------------------------------------------------------------------------- iteration
def _rows(template, n=30, seq_len=32, packing="pad"):
  return build_rows(_conversations(n), template, seq_len=seq_len, packing=packing,
                    shuffle_seed=0)[0]


def _row_keys(batch):
  return [batch["tokens"][i].tobytes() + batch["loss_mask"][i].tobytes()
          for i in range(batch["tokens"].shape[0])]


def test_epochs_visit_every_row_once_in_a_new_order(template):
  rows = _rows(template, n=12)
  pipeline = RowPipeline(rows, global_batch_size=4, seed=3)
  epochs = [[k for _ in range(3) for k in _row_keys(next(pipeline))] for _ in range(3)]
  all_rows = sorted(_row_keys(next(iter(RowValidationSet(rows)(12)))))
  for epoch in epochs:
    assert sorted(epoch) == all_rows
  assert epochs[0] != epochs[1] != epochs[2]
  batch = next(pipeline)
  assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == {
      **{k: ((4, 32), "int32") for k in KEYS[:4]}, "loss_mask": ((4, 32), "float32")}


def test_resume_continues_with_the_next_batch(template):
  rows = _rows(template, n=30)
  # 30 rows, 4 per step: the batches after the state cross two epoch ends.
  first = RowPipeline(rows, global_batch_size=4, seed=1, prefetch=2)
  for _ in range(5):
    next(first)
  state = first.get_state()
  want = [next(first) for _ in range(20)]
  fresh = RowPipeline(rows, global_batch_size=4, seed=1, prefetch=2)
  next(fresh)  # Its own position must not matter.
  fresh.set_state(state)
  for expected in want:
    got = next(fresh)
    for key in KEYS:
      np.testing.assert_array_equal(got[key], expected[key])
  with pytest.raises(ValueError, match="seed"):
    RowPipeline(rows, global_batch_size=4, seed=2).set_state(state)
  with pytest.raises(ValueError, match="rows_fingerprint"):
    RowPipeline(_rows(template, n=31), global_batch_size=4, seed=1).set_state(state)


def test_two_hosts_interleave_into_the_global_batch(template):
  rows = _rows(template, n=25)
  single = RowPipeline(rows, global_batch_size=6, seed=0)
  hosts = [RowPipeline(rows, global_batch_size=6, seed=0, process_index=h,
                       process_count=2) for h in range(2)]
  for _ in range(12):  # About three epochs.
    whole = next(single)
    parts = [next(h) for h in hosts]
    for key in KEYS:
      np.testing.assert_array_equal(parts[0][key], whole[key][0::2])
      np.testing.assert_array_equal(parts[1][key], whole[key][1::2])


def test_validation_covers_every_example_once_on_two_hosts(template):
  conversations = _conversations(37, seed=5)
  rows, _ = build_rows(conversations, template, seq_len=96, packing="pack")
  per_host = [list(RowValidationSet(rows, process_index=h, process_count=2)(4))
              for h in range(2)]
  assert len(per_host[0]) == len(per_host[1]) == -(-rows.num_rows // 4)
  assert rows.num_rows % 4  # The last global batch is padded.
  padding_rows = sum(int(np.sum(b["segment_ids"].max(axis=1) == 0))
                     for batches in per_host for b in batches)
  assert padding_rows == 4 * len(per_host[0]) - rows.num_rows
  seen = _examples_in_rows(per_host[0]) + _examples_in_rows(per_host[1])
  assert sorted(seen) == sorted(_expected_examples(template, conversations))


# --------------------------------------------------------------------------- builder
def test_build_sft_pipelines_on_shared_files(template):
  cfg = default_sft_data_config()
  cfg.update(sources="sft/dolly_hhrlhf_1k.jsonl,sft/gsm8k_train.jsonl.gz:gsm8k",
             seq_len=128, val_fraction=0.1, min_response_tokens=8)
  train, val, stats = build_sft_pipelines(cfg, template, global_batch_size=8)
  with gzip.open(resolve_data_path("sft/gsm8k_train.jsonl.gz"), "rt") as f:
    total = 1000 + sum(1 for _ in f)
  assert stats["train/examples"] + stats["val/examples"] == total
  assert 0.08 < stats["val/examples"] / total < 0.12
  for split in ("train", "val"):
    assert sum(stats[f"{split}/{k}"] for k in sft_rows.STATUSES) == stats[
        f"{split}/examples"]
  assert stats["train/truncated_prompt"] + stats["train/truncated_response"] > 0
  assert train.num_rows == stats["train/rows"] and val.num_rows == stats["val/rows"]
  batch = next(train)
  assert batch["tokens"].shape == (8, 128) and batch["loss_mask"].sum() > 0
  # Loss lands only on targets inside real segments.
  assert np.all(batch["segment_ids"][batch["loss_mask"] > 0] > 0)
  assert sum(b["loss_mask"].sum() for b in val(16)) == stats["val/loss_tokens"]
  assert "truncated" in sft_pipeline.format_stats(stats)
  cfg.packing = "stack"
  with pytest.raises(ValueError, match="packing='stack'"):
    build_sft_pipelines(cfg, template, global_batch_size=8)
