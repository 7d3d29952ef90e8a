"""Tests for data/chat.py, Tokenizer.with_pieces and data/sft_sources.py.

The tokenizer is a small BPE model trained on the first lines of the shared Alpaca
subset, with the chat markers as user-defined symbols; the readers run on the real
shared SFT and HH-RLHF files.
"""

import gzip
import json

import numpy as np
import pytest

from data import sft_sources
from data.chat import (ASSISTANT, CHAT_MARKERS, END_OF_TURN, ROLE_TOKENS, SYSTEM, USER,
                       ChatTemplate, get_template, render)
from data.readers import resolve_data_path
from data.tokenizer import Tokenizer, train_tokenizer

ALPACA = resolve_data_path("sft/alpaca_subset.jsonl")
DOLLY = resolve_data_path("sft/dolly_hhrlhf_1k.jsonl")
GSM8K = resolve_data_path("sft/gsm8k_train.jsonl.gz")
HH = resolve_data_path("preference/hh_rlhf_harmless_base_test_shared.jsonl.gz")

CONVERSATION = [
    {"role": SYSTEM, "content": "You are terse."},
    {"role": USER, "content": "Name a color."},
    {"role": ASSISTANT, "content": "Blue, like the sky."},
    {"role": USER, "content": "Another one?"},
    {"role": ASSISTANT, "content": "Green.\nDone"},
]


def _raw_lines(path, n):
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8") as f:
    return [json.loads(next(f)) for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("chat")
  lines = [json.loads(line) for line in open(ALPACA, encoding="utf-8").readlines()[:60]]
  path = tmp / "alpaca.txt"
  path.write_text("\n".join(r["instruction"] + "\n" + r["output"] for r in lines))
  return tmp, str(path)


@pytest.fixture(scope="module")
def tokenizer(corpus):
  tmp, path = corpus
  return Tokenizer.from_file(train_tokenizer(
      [path], str(tmp / "bpe.model"), 700, "bpe", byte_fallback=True,
      user_defined_symbols=CHAT_MARKERS))


@pytest.fixture(scope="module")
def plain_tokenizer(corpus):
  tmp, path = corpus
  return Tokenizer.from_file(train_tokenizer([path], str(tmp / "char.model"), 0, "char"))


# --------------------------------------------------------------------------- template
def test_two_turn_conversation_mask_is_exactly_the_assistant_tokens(tokenizer):
  template = ChatTemplate(tokenizer)
  marker = {m: tokenizer.encode(m)[0] for m in CHAT_MARKERS}
  want_ids, want_mask = [], []
  for message in CONVERSATION:
    content = tokenizer.encode(message["content"])
    is_assistant = message["role"] == ASSISTANT
    want_ids += [marker[ROLE_TOKENS[message["role"]]], *content, marker[END_OF_TURN]]
    want_mask += [0] + [int(is_assistant)] * (len(content) + 1)
  ids, mask = template.encode(CONVERSATION)
  assert ids.dtype == np.int32 and mask.dtype == np.float32
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_array_equal(mask, want_mask)
  # The masked tokens decode to exactly the assistant replies, each with its end.
  assert tokenizer.decode(ids[mask > 0]) == "Blue, like the sky.<|end|>Green.\nDone<|end|>"
  # Markers are user-defined pieces, so encoding the rendered text gives the same ids.
  assert tokenizer.encode(render(CONVERSATION)) == ids.tolist()
  assert tokenizer.decode(ids) == render(CONVERSATION)


def test_prompt_ids_and_decode_response(tokenizer):
  template = get_template("chat", tokenizer)
  prompt = CONVERSATION[:4]
  ids = template.prompt_ids(prompt)
  np.testing.assert_array_equal(
      ids, [*template.encode(prompt)[0], tokenizer.encode(ROLE_TOKENS[ASSISTANT])[0]])
  generated = tokenizer.encode("Green.") + [template.end_id] + tokenizer.encode("junk")
  assert template.decode_response(generated) == "Green."
  assert template.decode_response(tokenizer.encode("no end")) == "no end"
  assert template.decode_response([tokenizer.eos_id] + tokenizer.encode("x")) == ""


def test_template_errors(tokenizer, plain_tokenizer):
  template = ChatTemplate(tokenizer)
  with pytest.raises(ValueError, match="'narrator'"):
    template.encode([{"role": "narrator", "content": "Once"}])
  with pytest.raises(ValueError, match="content"):
    template.encode([{"role": USER}])
  with pytest.raises(ValueError,
                     match=r"Unknown chat template 'llama'.*\['auto', 'chat', 'jinja'\]"):
    get_template("llama", tokenizer)
  with pytest.raises(ValueError, match=r"<\|assistant\|>.*with_pieces"):
    ChatTemplate(plain_tokenizer)


def test_with_pieces_keeps_ids_and_appends_single_id_markers(plain_tokenizer):
  old = plain_tokenizer
  new = old.with_pieces([*CHAT_MARKERS, "\n", CHAT_MARKERS[0]])  # "\n" exists already.
  assert new.vocab_size == old.vocab_size + len(CHAT_MARKERS)
  for i in range(old.vocab_size):
    assert new.id_to_piece(i) == old.id_to_piece(i)
  for offset, marker in enumerate(CHAT_MARKERS):
    assert new.encode(marker) == [old.vocab_size + offset]
    assert new.id_to_piece(old.vocab_size + offset) == marker
  text = "".join(json.loads(line)["output"] + "\n"
                 for line in open(ALPACA, encoding="utf-8").readlines()[:20])
  assert new.encode(text) == old.encode(text)
  assert new.decode(old.encode(text)) == old.decode(old.encode(text))
  # Markers inside text stay single ids and the text around them is unchanged.
  mixed = new.encode("Hi<|user|>there<|end|>")
  assert mixed == old.encode("Hi") + [new.encode("<|user|>")[0]] + old.encode("there") + [
      new.encode("<|end|>")[0]]
  ChatTemplate(new)  # Now complete.
  assert new.with_pieces(CHAT_MARKERS).fingerprint == new.fingerprint
  assert old.encode("<|end|>") != new.encode("<|end|>")  # The original is untouched.


# --------------------------------------------------------------------------- readers
def test_alpaca_reader_on_real_lines():
  raw = _raw_lines(ALPACA, 3)
  got = sft_sources.read_sft_file(ALPACA)
  assert got.format == "alpaca" and got.skipped == 0
  assert len(got.conversations) == sum(1 for _ in open(ALPACA, encoding="utf-8"))
  for record, conversation in zip(raw, got.conversations):
    user = record["instruction"] + ("\n\n" + record["input"] if record["input"] else "")
    assert conversation == [{"role": USER, "content": user},
                            {"role": ASSISTANT, "content": record["output"]}]
  assert raw[0]["input"] and not raw[1]["input"]  # Both branches are covered above.


def test_prompt_response_reader_strips_the_alpaca_wrapper():
  raw = _raw_lines(DOLLY, 3)
  got = sft_sources.read_sft_file(DOLLY)
  assert got.format == "prompt_response" and len(got.conversations) == 1000
  for record, conversation in zip(raw, got.conversations):
    head, rest = record["prompt"].split("### Instruction:\n", 1)
    instruction = rest[:rest.index("\n\n### Response:\n")]
    assert head.startswith("Below is an instruction")
    assert conversation == [{"role": USER, "content": instruction},
                            {"role": ASSISTANT, "content": record["response"]}]
  # Anything not wrapped exactly is kept as it is.
  odd = "### Instruction:\nwhat?\n\n### Response:\n"
  assert sft_sources.unwrap_alpaca_prompt(odd) == odd


def test_gsm8k_reader_on_gzip():
  raw = _raw_lines(GSM8K, 2)
  got = sft_sources.read_sft_file(GSM8K)
  assert got.format == "gsm8k"
  for record, conversation in zip(raw, got.conversations):
    assert conversation == [{"role": USER, "content": record["question"]},
                            {"role": ASSISTANT, "content": record["answer"]}]


def test_hh_transcripts_parse_and_round_trip():
  got = sft_sources.read_sft_file(HH)
  with gzip.open(HH, "rt", encoding="utf-8") as f:
    transcripts = [json.loads(line)["chosen"] for line in f]
  assert got.format == "transcript"
  assert len(got.conversations) + got.skipped == len(transcripts)
  assert 0 < got.skipped < len(transcripts) // 100
  by_text = set(transcripts)
  for conversation in got.conversations:
    roles = [m["role"] for m in conversation]
    assert roles == [USER, ASSISTANT] * (len(roles) // 2)
    back = "".join(f"\n\n{'Human' if m['role'] == USER else 'Assistant'}: {m['content']}"
                   for m in conversation)
    assert back in by_text


def test_unparseable_transcripts_are_counted_skips(tmp_path):
  good = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: ciao"
  bad = ["just text", "\n\nAssistant: first\n\nHuman: second",
         "\n\nHuman: a\n\nHuman: b\n\nAssistant: c", "\n\nHuman: a\n\nAssistant: b\n\nHuman: c",
         "\n\nHuman: a\n\nAssistant:   ", "preamble\n\nHuman: a\n\nAssistant: b"]
  path = tmp_path / "t.jsonl"
  path.write_text("".join(json.dumps({"text": t}) + "\n" for t in [good, *bad, good]))
  got = sft_sources.read_sft_file(str(path))
  assert got.skipped == len(bad)
  assert got.conversations == [[{"role": USER, "content": "hi"},
                                 {"role": ASSISTANT, "content": "hello"},
                                 {"role": USER, "content": "bye"},
                                 {"role": ASSISTANT, "content": "ciao"}]] * 2
  path.write_text(json.dumps({"text": bad[0]}) + "\n")
  with pytest.raises(ValueError, match="No conversations.*1 records skipped"):
    sft_sources.read_sft_file(str(path))


def test_missing_fields_name_file_line_and_fields(tmp_path):
  path = tmp_path / "bad.jsonl"
  records = [{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c",
                                                                 "output": "d"},
             {"instruction": "e", "input": "f"}]
  path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
  with pytest.raises(ValueError, match=rf"{path}:3: .*\['output'\].*'alpaca'"):
    sft_sources.read_sft_file(str(path))
  with pytest.raises(ValueError, match=rf"{GSM8K}:1: .*\['prompt', 'response'\]"):
    sft_sources.read_sft_file(GSM8K, format="prompt_response")
  path.write_text(json.dumps({"question": "q", "answer": 3}) + "\n")
  with pytest.raises(ValueError, match=rf"{path}:1: field 'answer' is int"):
    sft_sources.read_sft_file(str(path))
  path.write_text("\n" + json.dumps({"title": "x"}) + "\n")
  with pytest.raises(ValueError, match=rf"{path}:2: cannot detect.*\['title'\]"):
    sft_sources.read_sft_file(str(path))
  with pytest.raises(ValueError, match="Unknown SFT format 'csv'"):
    sft_sources.read_sft_file(str(path), format="csv")


def test_source_specs_and_reading_them():
  assert sft_sources.parse_source_specs("a.jsonl:gsm8k, b.jsonl,,c.jsonl:auto") == [
      ("a.jsonl", "gsm8k"), ("b.jsonl", "auto"), ("c.jsonl", "auto")]
  assert sft_sources.parse_source_specs(["/x:y/z.jsonl"]) == [("/x:y/z.jsonl", "auto")]
  conversations, files = sft_sources.read_sft_sources(
      "sft/dolly_hhrlhf_1k.jsonl:prompt_response,sft/gsm8k_train.jsonl.gz")
  assert [f.format for f in files] == ["prompt_response", "gsm8k"]
  assert len(conversations) == 1000 + len(files[1].conversations)


def test_split_by_prompt_hash_is_deterministic_and_disjoint():
  conversations = sft_sources.read_sft_file(ALPACA).conversations
  # The same prompt with another answer must follow its twin into the same split.
  twins = [[c[0], {"role": ASSISTANT, "content": "another answer"}]
           for c in conversations[:300]]
  examples = conversations + twins
  train, val = sft_sources.split_examples(examples, 0.1, seed=0)
  assert len(train) + len(val) == len(examples)
  assert abs(len(val) / len(examples) - 0.1) < 0.02
  train_keys = {sft_sources.prompt_key(c) for c in train}
  val_keys = {sft_sources.prompt_key(c) for c in val}
  assert not train_keys & val_keys
  assert sft_sources.split_examples(examples, 0.1, seed=0) == (train, val)
  _, other_val = sft_sources.split_examples(examples, 0.1, seed=1)
  assert other_val != val
  # Order-independent: the split of a conversation does not depend on the others.
  _, val_reversed = sft_sources.split_examples(examples[::-1], 0.1, seed=0)
  assert val_reversed == val[::-1]
  with pytest.raises(ValueError, match="val_fraction"):
    sft_sources.split_examples(examples, 1.0)
