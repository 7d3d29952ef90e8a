"""Tests for the Hugging Face tokenizer backend, HF directory import/export and Jinja templates.

Checked against independent implementations on the real tokenizer files of
../shared/data/tokenizers: `tiktoken` (Meta's reference encoder) and `transformers`'
`TikTokenConverter` for Llama-3's tiktoken file; `transformers`' SentencePiece backend (legacy,
as Llama-2 was trained) for Llama-2's model; `transformers`' `apply_chat_template` for the chat
templates (tests/chat_template_fixtures.py reproduces the Llama-3 and Qwen2.5 formats).
"""

import json
import os
import shutil

import numpy as np
import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe
import transformers
from transformers.convert_slow_tokenizer import TikTokenConverter
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

from data import tiktoken_convert
from data.chat import (CHAT_MARKERS, ChatTemplate, JinjaChatTemplate, get_template,
                       uses_project_markers)
from data.hf_backend import HFTokenizer
from data.hf_tokenizer import save_hf_tokenizer, tokenizer_from_hf_dir
from data.preference_pipeline import encode_pair
from data.preferences import PreferencePair
from data.readers import resolve_data_path
from data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from tests.chat_template_fixtures import (CONVERSATION, LLAMA3_TEMPLATE, QWEN25_TEMPLATE,
                                          QWEN_SPECIAL_TOKENS)

LLAMA3_FILE = resolve_data_path("tokenizers/tokenizer_llama3.tiktoken")
LLAMA2_FILE = resolve_data_path("tokenizers/tokenizer.llama2")
EXTRA = ["<|user|>Hi there<|end|>\n<|assistant|>", "<|begin_of_text|>x<|eot_id|>",
         "<s>[INST] hi [/INST]</s>", "<|im_start|>user\nhey<|im_end|>",
         "emoji 🤗🌤 family 👨‍👩‍👧 CJK 日本語の文章 中文 한국어", "ctrl \x00\x07\x1b[0m\x7f tab\t",
         "  two  spaces\n\n\nnewlines  ", " leading space", "", "\n", "   ", "'s 'LL 123456789"]


def _corpus_lines() -> list[str]:
  """A few thousand real lines: tiny Shakespeare, WikiText-2 validation, then EXTRA."""
  with open(resolve_data_path("pretrain/tinyshakespeare.txt"), encoding="utf-8") as f:
    lines = f.read().split("\n")[:2500]
  with open(resolve_data_path("pretrain/wikitext2_tokens_valid.txt"), encoding="utf-8") as f:
    lines += f.read().split("\n")[:1500]
  return lines + EXTRA


def _hf_dir(path, model_file, config) -> str:
  os.makedirs(path, exist_ok=True)
  shutil.copy(model_file, os.path.join(path, "tokenizer.model"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump(config, f)
  return str(path)


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
  """Llama-3-Instruct's layout: the tiktoken file as tokenizer.model, EOS <|eot_id|>."""
  path = _hf_dir(tmp_path_factory.mktemp("llama3"), LLAMA3_FILE, {
      "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
      "chat_template": LLAMA3_TEMPLATE, "added_tokens_decoder": {
          "128008": {"content": "<|eom_id|>", "special": True}}})
  return tokenizer_from_hf_dir(path)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
  """A Qwen2.5-style tokenizer.json: byte-level BPE, ChatML specials, no BOS, pad token."""
  path = tmp_path_factory.mktemp("qwen")
  text = tiktoken_convert.tiktoken_to_tokenizer_json(LLAMA3_FILE, QWEN_SPECIAL_TOKENS)
  (path / "tokenizer.json").write_text(text)
  (path / "tokenizer_config.json").write_text(json.dumps({
      "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
      "chat_template": [{"name": "default", "template": QWEN25_TEMPLATE}]}))
  return tokenizer_from_hf_dir(str(path))


@pytest.fixture(scope="module")
def tiktoken_llama3():
  specials = tiktoken_convert.llama3_special_tokens()
  return tiktoken.Encoding("llama3", pat_str=tiktoken_convert.LLAMA3_PATTERN,
                           mergeable_ranks=load_tiktoken_bpe(LLAMA3_FILE),
                           special_tokens={s: 128000 + i for i, s in enumerate(specials)})


def test_llama3_ids_and_special_tokens(llama3):
  assert isinstance(llama3, HFTokenizer) and llama3.vocab_size == 128256
  assert (llama3.bos_id, llama3.eos_id, llama3.pad_id, llama3.unk_id) == (128000, 128009, -1, -1)
  assert llama3.encode("<|end_of_text|><|start_header_id|><|end_header_id|>") == [
      128001, 128006, 128007]
  assert llama3.id_to_piece(128008) == "<|eom_id|>"  # renamed by added_tokens_decoder
  assert llama3.id_to_piece(128255) == "<|reserved_special_token_250|>"


def test_llama3_matches_tiktoken_and_transformers(llama3, tiktoken_llama3):
  lines = _corpus_lines()
  ours = llama3.encode_batch(lines)
  converter = TikTokenConverter(LLAMA3_FILE, extra_special_tokens=(
      tiktoken_convert.llama3_special_tokens())).converted()
  theirs = [e.ids for e in converter.encode_batch(lines, add_special_tokens=False)]
  for line, ids, hf_ids in zip(lines, ours, theirs):
    # tiktoken's own renaming would differ at 128008; no test line names that token.
    assert ids == tiktoken_llama3.encode(line, allowed_special="all"), repr(line)
    assert ids == hf_ids, repr(line)
    assert llama3.decode(ids) == line, repr(line)
  assert sum(map(len, ours)) > 50_000


@pytest.mark.slow  # ~30 s: transformers' SentencePiece backend encodes line by line in Python
def test_llama2_sentencepiece_matches_transformers(tmp_path):
  tok = tokenizer_from_hf_dir(_hf_dir(tmp_path, LLAMA2_FILE, {
      "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None}))
  assert isinstance(tok, Tokenizer)
  assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (32000, 1, 2, -1, 0)
  # transformers' SentencePiece-backed Llama tokenizer in its legacy mode (Llama-2's).
  theirs = SentencePieceBackend(vocab_file=LLAMA2_FILE, legacy=True, bos_token="<s>",
                                eos_token="</s>", unk_token="<unk>")
  for line in _corpus_lines():
    ids, hf_ids = tok.encode(line), theirs.encode(line, add_special_tokens=False)
    # SentencePiece encodes "<s>", "<unk>" as text (WikiText has "<unk>"); transformers and
    # encode_with_offsets (used for rendered templates) map them to their ids.
    if not any(s in line for s in ("<s>", "</s>", "<unk>")):
      assert ids == hf_ids, repr(line)
    assert tok.encode_with_offsets(line)[0] == hf_ids, repr(line)
    # Byte fallback makes every line round-trip (the dummy-prefix space is removed again).
    assert tok.decode(ids) == line, repr(line)


def test_bytes_round_trip_and_with_pieces(llama3, qwen):
  for tok in (llama3, qwen):
    again = load_tokenizer(tok.to_bytes())
    assert again.fingerprint == tok.fingerprint and again.chat_template == tok.chat_template
    assert again.encode(EXTRA[0]) == tok.encode(EXTRA[0])
  grown = llama3.with_pieces(["<|eot_id|>", *CHAT_MARKERS])
  assert grown.vocab_size == llama3.vocab_size + len(CHAT_MARKERS)
  assert [grown.encode(m) for m in CHAT_MARKERS] == [
      [llama3.vocab_size + i] for i in range(len(CHAT_MARKERS))]
  assert grown.encode(EXTRA[4]) == llama3.encode(EXTRA[4])
  assert llama3.with_pieces(["<|eot_id|>"]) is llama3
  assert load_tokenizer(grown.to_bytes()).fingerprint == grown.fingerprint


@pytest.mark.parametrize("name", ["llama3", "qwen"])
def test_template_matches_apply_chat_template_after_export(name, request, tmp_path):
  tok = request.getfixturevalue(name)
  template = get_template("auto", tok)
  assert isinstance(template, JinjaChatTemplate) and not uses_project_markers("auto", tok)
  ids, mask = template.encode(CONVERSATION)
  generation = save_hf_tokenizer(tok, template, str(tmp_path))
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  for n in (2, 3, 5):
    prompt = CONVERSATION[:n]
    assert template.render(prompt) == hf.apply_chat_template(prompt, tokenize=False)
    assert template.prompt_ids(prompt).tolist() == hf.apply_chat_template(
        prompt, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
  assert ids.tolist() == hf.apply_chat_template(CONVERSATION, return_dict=True)["input_ids"]
  # The loss mask is exactly each assistant content and its end-of-turn token.
  runs = np.split(np.flatnonzero(mask), np.flatnonzero(np.diff(np.flatnonzero(mask)) != 1) + 1)
  end = {"llama3": "<|eot_id|>", "qwen": "<|im_end|>"}[name]
  assert [tok.decode(ids[r]) for r in runs] == [
      m["content"] + end for m in CONVERSATION if m["role"] == "assistant"]
  expected_ends = {"llama3": [128009, 128001], "qwen": [128002, 128000]}[name]
  assert list(template.end_ids) == expected_ends == generation["eos_token_id"]
  assert generation["bos_token_id"] == {"llama3": 128000, "qwen": None}[name]
  assert generation["pad_token_id"] == {"llama3": None, "qwen": 128000}[name]
  assert template.decode_response([*tok.encode("Fine."), expected_ends[-1], 5]) == "Fine."


def test_preference_rows_come_from_the_same_rendering(qwen):
  template = get_template("auto", qwen)
  pair = PreferencePair(prompt=tuple(CONVERSATION[:2]), chosen="Blue.", rejected="Grey.",
                        key="k")
  (chosen, rejected), prompt_len, status = encode_pair(pair, template, 512)
  full, mask = template.encode([*CONVERSATION[:2], {"role": "assistant", "content": "Blue."}])
  assert status == "kept" and chosen.tolist() == full[:int(np.flatnonzero(mask)[-1]) + 1].tolist()
  assert chosen[:prompt_len].tolist() == rejected[:prompt_len].tolist()
  assert rejected[-1] == template.end_id and qwen.decode(rejected[prompt_len:]) == "Grey.<|im_end|>"


def test_project_template_exports_chat_ready(tmp_path):
  text = resolve_data_path("pretrain/tinyshakespeare.txt")
  tok = Tokenizer.from_file(train_tokenizer([text], str(tmp_path / "t.model"), vocab_size=600))
  assert uses_project_markers("auto", tok)
  tok = tok.with_pieces(CHAT_MARKERS)
  template = get_template("auto", tok)
  assert isinstance(template, ChatTemplate)
  generation = save_hf_tokenizer(tok, template, str(tmp_path / "hf"))
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
  conversation = [{**m, "content": m["content"].replace("<|end|>", "")} for m in CONVERSATION]
  assert hf.apply_chat_template(conversation, return_dict=True)["input_ids"] == (
      template.encode(conversation)[0].tolist())
  assert hf.apply_chat_template(conversation[:4], add_generation_prompt=True,
                                return_dict=True)["input_ids"] == (
      template.prompt_ids(conversation[:4]).tolist())
  assert generation == {"bos_token_id": 2, "eos_token_id": [template.end_id, 3],
                        "pad_token_id": 0}


def test_bad_input_names_file_and_field(tmp_path, llama3):
  with pytest.raises(ValueError, match=r"no tokenizer file") as e:
    tokenizer_from_hf_dir(str(tmp_path))
  assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)
  bad = _hf_dir(tmp_path / "bad", LLAMA3_FILE, {"eos_token": "<|nope|>"})
  with pytest.raises(ValueError, match=r"bad/tokenizer_config.json: field 'eos_token' = "
                     r"'<\|nope\|>' is not a token of .*bad/tokenizer.model$"):
    tokenizer_from_hf_dir(bad)
  broken = JinjaChatTemplate(llama3, LLAMA3_TEMPLATE.replace(
      "{{ content }}", "{% if message['role'] == 'user' and loop.index0 > 2 %}"
      "{{ raise_exception('roles must alternate') }}{% endif %}{{ content }}"))
  with pytest.raises(ValueError) as e:
    broken.encode(CONVERSATION)
  assert str(e.value) == ("tokenizer_config.json field 'chat_template' failed to render: "
                          "roles must alternate")
  with pytest.raises(ValueError, match=r"chat_template.*line 1"):
    JinjaChatTemplate(llama3, "{% for m in messages %}")
  with pytest.raises(ValueError, match="no chat template"):
    get_template("jinja", tokenizer_from_hf_dir(_hf_dir(tmp_path / "plain", LLAMA3_FILE, {})))
