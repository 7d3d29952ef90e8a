"""Tests for data/preferences.py and data/preference_pipeline.py: the readers on real HH
lines, counted skips of bad records, the split by prompt, truncation, the score index and
the [B, 2, T] batches.
"""

import gzip
import json
import os

import numpy as np
import pytest

from data import corpus, preferences
from data.chat import ChatTemplate, render
from data.preference_pipeline import build_rows, encode_pair
from data.preferences import PreferencePair, read_source, split_pairs
from data.row_pipeline import RowPipeline, RowValidationSet
from data.readers import resolve_data_path
from data.tokenizer import Tokenizer

HH = "preference/hh_rlhf_harmless_base_test_shared.jsonl.gz"


def _hh_records():
  with gzip.open(resolve_data_path(HH), "rt") as f:
    return [json.loads(line) for line in f]


def _write_jsonl(path, records):
  with open(path, "w") as f:
    for r in records:
      f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
  return str(path)


@pytest.fixture(scope="module")
def hh_file():
  return read_source(HH)


def test_hh_pairs_split_into_the_shared_prompt_and_the_final_responses(hh_file):
  records = _hh_records()
  assert hh_file.format == "hh" and hh_file.records == len(records) == 1313
  assert len(hh_file.pairs) + sum(hh_file.skipped.values()) == 1313
  by_key = {p.key: p for p in hh_file.pairs}
  multi_turn = 0
  for record in records:
    cut = record["chosen"].rfind("\n\nAssistant:")
    pair = by_key.get(record["chosen"][:cut])
    if pair is None or pair.chosen != record["chosen"][cut + len("\n\nAssistant:"):].strip():
      continue
    # The prompt re-rendered in HH form is the transcript's prefix, turn by turn.
    rebuilt = "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}"
                      for m in pair.prompt)
    assert " ".join(rebuilt.split()) == " ".join(record["chosen"][:cut].split())
    assert record["rejected"].endswith(pair.rejected)
    assert pair.prompt[-1]["role"] == "user"
    multi_turn += len(pair.prompt) >= 3
  assert multi_turn > 100  # harmless-base is mostly multi-turn red-teaming dialogue


def test_hh_responses_mentioning_human_are_kept_whole(hh_file):
  # The split is on the LAST "\n\nAssistant:" header, so the word "Human" (or a turn-like
  # line) inside a response never cuts it.
  mentions = [p for p in hh_file.pairs if "Human" in p.chosen or "Human" in p.rejected]
  assert mentions, "the shared file has responses that mention 'Human'"
  records = {corpus.preference_prefix(r["chosen"]): r for r in _hh_records()}
  for pair in mentions:
    record = records[pair.key]
    side = "chosen" if "Human" in pair.chosen else "rejected"
    assert record[side].rstrip().endswith(getattr(pair, side).rstrip())


def test_bad_records_are_counted_not_kept(tmp_path):
  good = {"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!",
          "rejected": "\n\nHuman: Hi there\n\nAssistant: Go away."}
  path = _write_jsonl(tmp_path / "p.jsonl", [
      good,
      {"chosen": good["chosen"]},                                          # missing field
      {"chosen": "\n\nHuman: no reply", "rejected": "\n\nHuman: none"},    # no assistant
      {"chosen": good["chosen"], "rejected": good["chosen"]},              # identical
      {"chosen": good["chosen"], "rejected": "\n\nHuman: Hi there\n\nAssistant:  "},  # empty
      {"chosen": good["chosen"], "rejected": "\n\nHuman: Other\n\nAssistant: x"},     # mismatch
      {"chosen": "junk\n\nAssistant: a", "rejected": "junk\n\nAssistant: b"},  # malformed
      good,                                                                # duplicate
      {"chosen": 3, "rejected": "x"},                                      # not a string
  ])
  f = read_source(path)
  assert [(p.prompt, p.chosen, p.rejected) for p in f.pairs] == [
      (({"role": "user", "content": "Hi there"},), "Hello!", "Go away.")]
  assert f.skipped == {"missing_field": 2, "no_assistant_turn": 1, "malformed": 1,
                       "prompt_mismatch": 1, "empty_response": 1, "identical": 1,
                       "duplicate": 1}
  assert f.records == 9


def test_generic_and_sharegpt_formats(tmp_path):
  generic = _write_jsonl(tmp_path / "g.jsonl", [
      {"prompt": "2+2?", "chosen": "4", "rejected": "5", "margin": 1.5},
      {"prompt": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Capital of France?"}],
       "chosen": [{"role": "assistant", "content": "Paris"}],
       "rejected": [{"role": "assistant", "content": "Lyon"}]},
      {"prompt": "x", "chosen": "a", "rejected": "b", "margin": "big"},  # bad margin
  ])
  f = read_source(generic)
  assert f.format == "prompt_chosen_rejected" and f.skipped["missing_field"] == 1
  first, second = f.pairs
  assert first.margin == 1.5 and first.prompt == ({"role": "user", "content": "2+2?"},)
  assert [m["role"] for m in second.prompt] == ["system", "user"]
  assert (second.chosen, second.rejected) == ("Paris", "Lyon")
  assert second.key == render(second.prompt)
  sharegpt = _write_jsonl(tmp_path / "s.jsonl", [
      {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"},
                         {"from": "human", "value": "Joke?"}],
       "chosen": {"from": "gpt", "value": "Knock knock."},
       "rejected": {"from": "gpt", "value": "No."}, "system": "Be fun."},
      {"conversations": [{"from": "gpt", "value": "I start"}],  # ends with the assistant
       "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}},
  ])
  f = read_source(sharegpt + ":sharegpt")
  assert f.format == "sharegpt" and f.skipped["malformed"] == 1
  (pair,) = f.pairs
  assert [m["role"] for m in pair.prompt] == ["system", "user", "assistant", "user"]
  assert (pair.chosen, pair.rejected) == ("Knock knock.", "No.")


def test_unreadable_files_are_errors_naming_the_file(tmp_path):
  unknown = _write_jsonl(tmp_path / "u.jsonl", [{"text": "a"}, {"text": "b"}])
  with pytest.raises(ValueError, match=r"u\.jsonl: no record has the fields.*'text'"):
    read_source(unknown)
  broken = _write_jsonl(tmp_path / "b.jsonl", ['{"chosen": "a"', "{}"])
  with pytest.raises(ValueError, match=r"b\.jsonl:1: malformed JSON"):
    read_source(broken)
  all_bad = _write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "chosen": "a",
                                                 "rejected": "a"}])
  with pytest.raises(ValueError, match=r"a\.jsonl: no usable preference pair.*identical"):
    read_source(all_bad)
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    read_source(str(tmp_path / "nope.jsonl"))


def test_tfds_source(tmp_path):
  import tensorflow_datasets as tfds

  rows = [("Name a fruit.", "Apple.", "Rock."), ("Say hi.", "Hi!", "Hi!")]

  class TinyPreferenceTest(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      text = tfds.features.Text()
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"prompt": text, "chosen": text, "rejected": text}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i, (p, c, r) in enumerate(rows):
        yield i, {"prompt": p, "chosen": c, "rejected": r}

  TinyPreferenceTest(data_dir=str(tmp_path)).download_and_prepare()
  f = read_source("tfds:tiny_preference_test", tfds_data_dir=str(tmp_path))
  assert f.format == "prompt_chosen_rejected" and f.records == 2
  assert [(p.prompt[0]["content"], p.chosen, p.rejected) for p in f.pairs] == [rows[0]]
  assert f.skipped["identical"] == 1


def test_split_keeps_prompts_on_one_side_and_matches_the_corpus_hold_out(hh_file):
  train, val, branches = split_pairs(hh_file.pairs, 0.1, seed=0)
  train_keys, val_keys = {p.key for p in train}, {p.key for p in val}
  assert not train_keys & val_keys
  assert len(train) + len(val) + branches == len(hh_file.pairs)
  assert 0.05 < len(val) / len(hh_file.pairs) < 0.15
  assert not any(k.startswith(tuple(val_keys)) for k in train_keys)
  # Exactly the prefixes the English pretraining corpus holds out for the reward model.
  _, corpus_val = corpus.split_preference_prefixes(
      [corpus.preference_prefix(r["chosen"]) for r in _hh_records()], 0.1, 0)
  assert val_keys <= set(corpus_val)
  # A pair follows its key: the same prompt with other responses lands on the same side.
  twin = val[0]._replace(chosen="other", rejected="answers")
  _, val2, _ = split_pairs([twin, *hh_file.pairs], 0.1, seed=0)
  assert twin in val2


def test_train_parts_are_prompt_disjoint_halves(hh_file):
  train, _, _ = split_pairs(hh_file.pairs, 0.1, seed=0)
  a, b = (preferences.select_part(train, part) for part in ("a", "b"))
  keys_a, keys_b = {p.key for p in a}, {p.key for p in b}
  assert not keys_a & keys_b and len(a) + len(b) == len(train)
  assert 0.4 < len(a) / len(train) < 0.6
  assert preferences.select_part(train, "") == train
  with pytest.raises(ValueError, match="train_part='c'"):
    preferences.select_part(train, "c")


@pytest.fixture(scope="module")
def template(tmp_path_factory):
  from data.chat import CHAT_MARKERS
  from data.tokenizer import train_tokenizer
  text = tmp_path_factory.mktemp("tok") / "t.txt"
  text.write_text("".join(chr(c) for c in range(32, 127)) * 3 + "\nhello world\n")
  path = str(text.parent / "char.model")
  train_tokenizer([str(text)], path, model_type="char", vocab_size=0,
                  user_defined_symbols=list(CHAT_MARKERS))
  return ChatTemplate(Tokenizer.from_file(path))


def _pair(prompt, chosen, rejected, margin=0.0):
  msgs = ({"role": "user", "content": prompt},)
  return PreferencePair(msgs, chosen, rejected, render(msgs), margin)


def test_long_prompts_lose_their_start_and_responses_stay_whole(template):
  pair = _pair("x" * 40 + "QUESTION", "yes indeed", "no")
  full, full_prompt, status = encode_pair(pair, template, seq_len=100)
  assert status == "kept" and full_prompt == len(full[1]) - len("no") - 1
  sides, prompt_len, status = encode_pair(pair, template, seq_len=30, min_prompt_tokens=5)
  assert status == "truncated_prompt"
  assert max(len(s) for s in sides) == 30
  assert prompt_len == len(sides[0]) - len("yes indeed") - 1
  # The same (end of the) prompt on both sides; both responses whole, then <|end|>.
  assert list(sides[0][:prompt_len]) == list(sides[1][:prompt_len]) == \
      list(full[0][len(full[0]) - len(sides[0]):][:prompt_len])
  assert template.tokenizer.decode(sides[0][:prompt_len].tolist()).endswith(
      "QUESTION<|end|><|assistant|>")
  for ids, text in zip(sides, ("yes indeed", "no")):
    assert ids[-1] == template.end_id
    assert template.tokenizer.decode(ids[prompt_len:-1].tolist()) == text
  assert encode_pair(pair, template, seq_len=30, min_prompt_tokens=25) == (
      None, 0, "dropped_too_long")


def test_rows_give_pairs_score_indices_and_padding(template):
  pairs = [_pair("hi", "a long answer", "no"), _pair("q?", "b", "cc", margin=0.5),
           _pair("z" * 200, "r", "s")]
  rows, counts = build_rows(pairs, template, seq_len=32, min_prompt_tokens=40)
  assert counts == {"kept": 2, "truncated_prompt": 0, "dropped_too_long": 1, "pairs": 3}
  assert rows.source_index.tolist() == [0, 1]
  (batch,) = list(RowValidationSet(rows)(4))
  assert batch["tokens"].shape == (4, 2, 32) and batch["score_index"].shape == (4, 2)
  assert batch["pair_mask"].tolist() == [1, 1, 0, 0]
  assert batch["margin"].tolist() == [0, 0.5, 0, 0]
  for b in range(2):
    for s in range(2):
      end = batch["score_index"][b, s]
      assert batch["tokens"][b, s, end] == template.end_id
      assert batch["segment_ids"][b, s].tolist() == [1] * (end + 1) + [0] * (31 - end)
      assert batch["positions"][b, s, :end + 1].tolist() == list(range(end + 1))
      start = batch["response_start"][b, s]
      assert batch["tokens"][b, s, start - 1] == template.role_id("assistant")
      response = "a long answer" if (b, s) == (0, 0) else ["no", "b", "cc"][2 * b + s - 1]
      assert template.tokenizer.decode(batch["tokens"][b, s, start:end].tolist()) == response
  # Training batches hold whole pairs and resume exactly.
  pipe = RowPipeline(rows, global_batch_size=2, seed=1)
  first = [next(pipe) for _ in range(3)]
  state = pipe.get_state()
  nxt = next(pipe)
  fresh = RowPipeline(rows, global_batch_size=2, seed=1)
  fresh.set_state(state)
  np.testing.assert_array_equal(next(fresh)["tokens"], nxt["tokens"])
  assert all(sorted(b["margin"].tolist()) == [0, 0.5] for b in first)


def test_hh_file_encodes_with_the_english_tokenizer_lengths(hh_file, template):
  # Real data through the whole reader + encoder: counts add up, every kept row's score
  # index is the end-of-turn token.
  rows, counts = build_rows(hh_file.pairs[:200], template, seq_len=256)
  assert counts["kept"] + counts["truncated_prompt"] + counts["dropped_too_long"] == 200
  assert rows.num_rows == counts["kept"] + counts["truncated_prompt"]
  ends = rows.tokens[np.arange(rows.num_rows)[:, None], np.arange(2)[None], rows.lengths - 1]
  assert (ends == template.end_id).all()
  assert os.path.basename(hh_file.path) == os.path.basename(HH)
  assert preferences.SKIP_REASONS == tuple(hh_file.skipped)
