"""Tests for serve/api_generation.py (incremental detokenization, stop strings, logprob
attribution) and serve/schemas.py (request parsing into 400s), without a model.

The decoder in most tests is byte-level UTF-8 (`bytes(ids).decode(errors="replace")`): one
token per byte, so a multi-byte character arrives in pieces and the held-back tail is
exercised the way a byte-fallback or byte-level BPE tokenizer exercises it.
"""

import asyncio
import json
import shutil

import pytest

from data.hf_tokenizer import tokenizer_from_hf_dir
from data.readers import resolve_data_path

from serve.api_generation import Outcome, Piece, TextAssembler, generate
from serve.engine import Finished, TokenEvent
from serve.schemas import APIError, ChatRequest, CompletionRequest, parse_body


def utf8(ids):
  return bytes(ids).decode("utf-8", errors="replace")


def push_all(assembler, text):
  pieces = [assembler.push(b) for b in text.encode("utf-8")]
  return pieces, assembler.finish()


def test_multibyte_characters_are_held_until_complete():
  text = "caf\u00e9 \u20ac5 \U0001f600!"
  pieces, rest = push_all(TextAssembler(utf8), text)
  assert "".join(pieces) + rest == text
  assert not any("\ufffd" in p for p in pieces)
  # The 4-byte emoji comes out in one piece, when its last byte arrives.
  assert "\U0001f600" in pieces


@pytest.mark.parametrize("stops,expected", [
    (["lo w"], "hel"),              # spans several tokens
    (["xyz", "o"], "hell"),          # the earliest of several stops wins
    (["world", "lo"], "hel"),
    (["hello world!"], "hello world"),  # a partial match at the end is not a stop
    (["zzz"], "hello world"),
])
def test_stop_strings_cut_the_text_before_them(stops, expected):
  a = TextAssembler(utf8, stops)
  pieces, rest = push_all(a, "hello world")
  assert "".join(pieces) + rest == expected
  assert a.final_text == expected
  assert (a.stop_at is not None) == (expected != "hello world")


def test_a_possible_stop_string_is_held_back_until_decided():
  a = TextAssembler(utf8, ["</answer>"])
  emitted = [a.push(b) for b in b"ok </ans"]
  assert "".join(emitted) == "ok "  # "</ans" could begin the stop string
  assert a.push(ord("x")) == "</ansx"  # it did not
  for b in b"</answer> tail":
    a.push(b)
  assert a.final_text == "ok </ansx" and a.finish() == ""


STREAM_TEXTS = ["  Hello, world!  Two  spaces\n\nand newlines ",
                "emoji 🤗🌤 family 👨‍👩‍👧 CJK 日本語の文章 中文 한국어 café €5",
                "ctrl \x00\x07\x1b[0m\x7f tab\t 'LL 123456789"]


@pytest.mark.parametrize("family", ["llama2_sentencepiece", "llama3_tiktoken"])
def test_streamed_text_equals_the_whole_decode_with_real_tokenizers(family, tmp_path):
  """The windowed decode gives what decoding all ids at once gives, piece by piece, with
  SentencePiece's leading spaces and byte fallback (Llama-2) and byte-level BPE (Llama-3)."""
  if family == "llama2_sentencepiece":
    source, config = "tokenizers/tokenizer.llama2", {"bos_token": "<s>", "eos_token": "</s>"}
  else:
    source, config = "tokenizers/tokenizer_llama3.tiktoken", {
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
  shutil.copy(resolve_data_path(source), tmp_path / "tokenizer.model")
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
  tok = tokenizer_from_hf_dir(str(tmp_path))
  calls = []
  decode = lambda ids: calls.append(len(ids)) or tok.decode(ids)
  for text in STREAM_TEXTS:
    ids = tok.encode(text)
    calls.clear()
    a = TextAssembler(decode)
    pieces = [a.push(i) for i in ids]
    assert "".join(pieces) + a.finish() == tok.decode(ids)
    # A decode's length does not grow with the answer (the quadratic whole-list decode did).
    assert max(calls) <= 12, (len(ids), max(calls))


class FakeHandle:
  """An engine handle replaying fixed events (records cancel())."""

  def __init__(self, events):
    self.id, self._events, self.cancelled = "fake", events, False

  def listen(self, callback):
    for event in self._events:
      callback([event])

  def cancel(self):
    self.cancelled = True


def collect(handle, **kw):
  async def run():
    return [item async for item in generate(handle, utf8, **kw)]
  return asyncio.run(run())


def test_generate_attributes_tokens_to_pieces_and_drops_end_ids():
  text = "h\u00e9!"
  ids = list(text.encode("utf-8"))  # h, 0xC3, 0xA9, !
  events = [TokenEvent(t, -0.5 * (i + 1), [(t, -0.1)]) for i, t in enumerate(ids)]
  events += [TokenEvent(0, -9.0, None), Finished("stop", 3, len(ids) + 1)]
  items = collect(FakeHandle(events), end_ids=(0,), prompt_tokens=3)
  pieces, out = [i for i in items if isinstance(i, Piece)], items[-1]
  assert [p.text for p in pieces] == ["h", "\u00e9", "!"]
  # The two bytes of the e-acute are attributed to the piece that shows it.
  assert [[e.token for e in p.tokens] for p in pieces] == [[ids[0]], ids[1:3], [ids[3]]]
  assert [p.offsets for p in pieces] == [[0], [1, 1], [2]]
  assert isinstance(out, Outcome) and out.text == text and out.finish_reason == "stop"
  assert out.completion_tokens == len(ids) + 1 and len(out.tokens) == len(ids)


def test_generate_cancels_the_request_at_a_stop_string():
  events = [TokenEvent(t, None, None) for t in b"abc STOP def"]
  handle = FakeHandle(events + [Finished("cancelled", 2, len(events))])
  items = collect(handle, stops=["STOP"])
  assert handle.cancelled
  assert "".join(i.text for i in items[:-1]) == "abc " == items[-1].text
  assert items[-1].finish_reason == "stop" and len(items[-1].tokens) == 4


def test_generate_reports_an_engine_error():
  out = collect(FakeHandle([Finished("error", 2, 0, "boom")]))[-1]
  assert out.finish_reason == "error" and out.error == "boom" and out.text == ""


@pytest.mark.parametrize("raw,param", [
    (b"{not json", None),
    (b"[1, 2]", None),
    (b'{"messages": []}', "messages"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}',
     "temperature"),
    (b'{"messages": [{"role": "robot", "content": "hi"}]}', "messages[0].role"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 21}',
     "top_logprobs"),
])
def test_malformed_chat_bodies_are_400_naming_the_field(raw, param):
  with pytest.raises(APIError) as e:
    parse_body(raw, ChatRequest)
  assert e.value.status == 400 and e.value.param == param
  assert set(e.value.body["error"]) == {"message", "type", "param", "code"}


def test_request_fields_and_unsupported_ones():
  chat = parse_body(b'{"messages": [{"role": "developer", "content": [{"type": "text", '
                    b'"text": "a"}, {"type": "text", "text": "b"}]}], "n": 2, "stop": "x", '
                    b'"max_completion_tokens": 7, "tools": [{}]}', ChatRequest)
  assert chat.messages[0].plain() == {"role": "system", "content": "ab"}
  assert chat.stop_strings() == ["x"] and chat.token_limit() == 7
  assert len(chat.unsupported()) == 2  # n and tools
  nulls = parse_body(b'{"messages": [{"role": "user", "content": "a"}], "temperature": null, '
                     b'"top_p": null, "stop": null, "n": null, "max_tokens": null}', ChatRequest)
  assert (nulls.temperature, nulls.top_p, nulls.n, nulls.stop_strings()) == (1.0, 1.0, 1, [])
  text = parse_body(b'{"prompt": [5, 6], "logprobs": 2, "echo": true}', CompletionRequest)
  assert text.prompt == [5, 6] and text.unsupported() == ["echo"]
  with pytest.raises(APIError):
    parse_body(b'{"prompt": "a", "stop": ["1", "2", "3", "4", "5"]}',
               CompletionRequest).stop_strings()
