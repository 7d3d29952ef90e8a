"""Tests for data/tokenizer.py: lossless round trips, determinism, fixed specials, CLI."""

import json
import os
import subprocess
import sys

import pytest

from data import readers
from data.tokenizer import Tokenizer, train_tokenizer

SHAKESPEARE = "pretrain/tinyshakespeare.txt"
TRICKY = "  leading spaces\n\n\nthree newlines,   runs of  spaces tab\ntrailing  \n"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def shakespeare_path():
  return readers.resolve_data_path(SHAKESPEARE)


@pytest.fixture(scope="module")
def shakespeare_text(shakespeare_path):
  with open(shakespeare_path, encoding="utf-8") as f:
    return f.read()


@pytest.fixture(scope="module")
def char_tok(shakespeare_path, tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "char.model"
  return Tokenizer.from_file(train_tokenizer([shakespeare_path], str(path), 0, "char"))


@pytest.fixture(scope="module")
def bpe_tok(shakespeare_path, tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "bpe.model"
  return Tokenizer.from_file(train_tokenizer([shakespeare_path], str(path), 512, "bpe"))


def test_char_vocab_is_every_character_plus_four_specials(char_tok, shakespeare_text):
  chars = set(shakespeare_text)
  assert len(chars) == 65
  assert char_tok.vocab_size == 65 + 4
  pieces = {char_tok.id_to_piece(i) for i in range(4, char_tok.vocab_size)}
  # SentencePiece spells the space as U+2581.
  assert {p.replace("\u2581", " ") for p in pieces} == chars


@pytest.mark.parametrize("tok_name", ["char_tok", "bpe_tok"])
def test_round_trip_is_exact(tok_name, request, shakespeare_text):
  tok = request.getfixturevalue(tok_name)
  for text in (shakespeare_text, TRICKY, " x", "a\n", "\n\nb"):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
  assert tok.encode_batch(["ab", "\n c"]) == [tok.encode("ab"), tok.encode("\n c")]


def test_bpe_compresses_and_newline_is_one_token(bpe_tok, char_tok, shakespeare_text):
  sample = shakespeare_text[:5000]
  assert len(bpe_tok.encode(sample)) < 0.6 * len(char_tok.encode(sample))
  for tok in (bpe_tok, char_tok):
    assert tok.encode("\n") == [4]  # First user-defined piece, after the specials.


def test_special_ids_and_decode_ignores_pad(char_tok):
  assert (char_tok.pad_id, char_tok.unk_id, char_tok.bos_id, char_tok.eos_id) == (0, 1, 2, 3)
  assert [char_tok.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
  ids = char_tok.encode("To be")
  assert char_tok.decode([0, 0] + ids + [3, 0, 0]) == "To be"
  # Ids past the vocab (a model's padded vocab) decode visibly as unk, not raise.
  assert "\u2047" in char_tok.decode(ids + [char_tok.vocab_size + 7])


@pytest.mark.parametrize("model_type,vocab_size",
                         [("char", 0), ("bpe", 300), ("unigram", 200)])
def test_training_is_deterministic(tmp_path, shakespeare_text, model_type, vocab_size):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text(shakespeare_text[:100_000], encoding="utf-8")
  a = train_tokenizer([str(corpus)], str(tmp_path / "a.model"), vocab_size, model_type)
  b = train_tokenizer([str(corpus)], str(tmp_path / "b.model"), vocab_size, model_type)
  with open(a, "rb") as fa, open(b, "rb") as fb:
    assert fa.read() == fb.read()
  tok = Tokenizer.from_file(a)
  assert tok.decode(tok.encode(TRICKY)) == TRICKY


def test_bytes_round_trip_and_fingerprint(char_tok, bpe_tok):
  restored = Tokenizer.from_bytes(char_tok.to_bytes())
  assert restored.fingerprint == char_tok.fingerprint
  assert len(char_tok.fingerprint) == 64
  assert restored.encode("Hello\n there") == char_tok.encode("Hello\n there")
  assert bpe_tok.fingerprint != char_tok.fingerprint


def test_jsonl_input_and_byte_fallback(tmp_path):
  path = tmp_path / "docs.jsonl"
  path.write_text("\n".join(json.dumps({"body": f"doc {i}\n  two spaces"}) for i in range(50)))
  model = train_tokenizer([str(path)], str(tmp_path / "t.model"), 0, "char",
                          byte_fallback=True, jsonl_field="body")
  tok = Tokenizer.from_file(model)
  # Characters never seen in training still round-trip through byte pieces.
  assert tok.decode(tok.encode("doc Ω\n")) == "doc Ω\n"
  with pytest.raises(ValueError, match="'text'"):
    train_tokenizer([str(path)], str(tmp_path / "u.model"), 0, "char")


def test_bad_arguments_raise(tmp_path, shakespeare_path):
  with pytest.raises(ValueError, match="'bytes'"):
    train_tokenizer([shakespeare_path], str(tmp_path / "x.model"), 100, "bytes")
  with pytest.raises(ValueError, match="vocab_size=0"):
    train_tokenizer([shakespeare_path], str(tmp_path / "x.model"), 0, "bpe")
  with pytest.raises(FileNotFoundError, match="nope.txt"):
    train_tokenizer([str(tmp_path / "nope.txt")], str(tmp_path / "x.model"), 0, "char")


def test_cli_trains_and_reports(tmp_path, shakespeare_path):
  out = tmp_path / "cli.model"
  result = subprocess.run(
      [sys.executable, "-m", "data.tokenizer", f"--input={shakespeare_path}",
       f"--output={out}", "--model_type=char"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=True)
  assert "vocab_size=69" in result.stdout
  assert "round trip exact: True" in result.stdout
  assert Tokenizer.from_file(str(out)).vocab_size == 69
