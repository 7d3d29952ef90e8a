"""Tests for data/corpus.py and configs/pretrain/english_bpe.py: sources, held-out rules,
the hash split, and the config's tokenizer (chat markers as single ids).

The corpus of the english_bpe config is read once per module (~1 s); the tokenizer is trained
once (~1 s); the runlocal variant runs through the CLI (~15 s).
"""

import gzip
import importlib.util
import json
import math
import os

import pytest

from conftest import REPO_ROOT, pretrain_cmd, read_metrics, run_cmd
from data import corpus, documents, readers
from data.chat import CHAT_MARKERS, ChatTemplate
from data.config import default_data_config, default_sft_data_config, get_or_train_tokenizer
from data.sft_sources import parse_transcript, read_sft_file, split_examples

CONFIG = "configs/pretrain/english_bpe.py"
HH = "preference/hh_rlhf_harmless_base_test_shared.jsonl.gz"
SFT_FILES = ("sft/alpaca_subset.jsonl", "sft/dolly_hhrlhf_1k.jsonl", "sft/gsm8k_train.jsonl.gz")


def _config(arg=None):
  spec = importlib.util.spec_from_file_location("english_bpe", os.path.join(REPO_ROOT, CONFIG))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.fixture(scope="module")
def data_cfg():
  return _config().data


@pytest.fixture(scope="module")
def per_source(data_cfg):
  return {r.source.path: r for r in corpus.load_corpus(data_cfg)}


@pytest.fixture(scope="module")
def split(data_cfg):
  return documents.load_split_documents(data_cfg)


@pytest.fixture(scope="module")
def train_text(split):
  """Every training document joined, for substring checks."""
  return "\0".join(split[0])


def _hh_chosen():
  with gzip.open(readers.resolve_data_path(HH), "rt", encoding="utf-8") as f:
    return list(dict.fromkeys(json.loads(line)["chosen"] for line in f if line.strip()))


# ------------------------------------------------------------------------------ sources
def test_every_source_is_read_and_counted(data_cfg, per_source, split, capsys):
  assert [s.kind for s in corpus.parse_corpus_sources(data_cfg.corpus_sources)] == \
      ["text", "sft", "sft", "sft", "transcript"]
  assert len(per_source["pretrain/wikitext2_tokens_valid.txt"].docs) == 60  # articles
  for path in SFT_FILES:
    result = per_source[path]
    total = len(read_sft_file(readers.resolve_data_path(path)).conversations)
    assert result.held_out > 0 and len(result.docs) + result.held_out == total, path
  hh = per_source[HH]
  assert hh.held_out > 0 and hh.skipped == 4
  assert len(hh.docs) + hh.held_out + hh.skipped == len(_hh_chosen()) == 1313
  documents.load_split_documents(data_cfg)
  log = capsys.readouterr().out
  train, val = split
  assert f"Corpus: {len(train)} train docs" in log
  for path in per_source:
    assert path in log
  # Every source reaches the training split: 8.4-9 MB of text in all.
  assert 8.4e6 < sum(map(len, train)) < 9.0e6


def test_conversations_are_plain_dialogue_without_chat_markers(per_source, train_text):
  assert per_source["sft/dolly_hhrlhf_1k.jsonl"].docs[0].startswith("User: ")
  assert "\nAssistant: " in per_source[HH].docs[0]
  assert "\n\nHuman:" not in per_source[HH].docs[0]
  for marker in CHAT_MARKERS:
    assert marker not in train_text, marker
  assert corpus.render_dialogue([{"role": "system", "content": "Be nice."},
                                 {"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": "Hello"}]) == \
      "System: Be nice.\nUser: Hi\nAssistant: Hello"


def test_wikitext_articles_and_paragraph_fallback():
  text = " \n = A = \n \n x \n \n = = Sec = = \n y \n = B = \n z \n"
  assert corpus.split_wikitext_articles(text) == [
      " = A = \n \n x \n \n = = Sec = = \n y \n", " = B = \n z \n"]
  assert corpus.split_wikitext_articles("one\ntwo\n\nthree\n \n") == ["one\ntwo", "three"]


def test_kinds_are_parsed_and_inferred():
  parsed = corpus.parse_corpus_sources(
      f"pretrain/tinyshakespeare.txt, {SFT_FILES[0]}, {HH}, {SFT_FILES[1]}:sft")
  assert [s.kind for s in parsed] == ["text", "sft", "transcript", "sft"]
  with pytest.raises(ValueError, match="unknown kind 'sfft'"):
    corpus.parse_corpus_sources(f"{SFT_FILES[0]}:sfft")
  with pytest.raises(ValueError, match="No corpus sources"):
    corpus.parse_corpus_sources(" , ")
  # A preference file read as sft would bypass the reward model's held-out split.
  cfg = default_data_config()
  cfg.source, cfg.corpus_sources = "corpus", f"{HH}:sft"
  with pytest.raises(ValueError, match=":transcript"):
    documents.load_split_documents(cfg)


def test_evaluation_files_are_refused(tmp_path):
  for spec in ("pretrain/wikitext2_tokens_test.txt", "pretrain/wikitext2_tokens_test.txt:text",
               readers.resolve_data_path("pretrain/wikitext2_tokens_test.txt"),
               f"pretrain/wikitext2_tokens_valid.txt,{tmp_path}/wikitext2_tokens_test.txt"):
    with pytest.raises(ValueError, match="held-out evaluation set"):
      corpus.parse_corpus_sources(spec)
  with pytest.raises(ValueError, match="under eval/"):
    corpus.parse_corpus_sources("eval/gsm8k_test_shared.jsonl:sft")
  cfg = default_data_config()
  cfg.source, cfg.corpus_sources = "corpus", "pretrain/wikitext2_tokens_test.txt"
  with pytest.raises(ValueError, match="wikitext2_tokens_test"):
    documents.load_split_documents(cfg)


# ------------------------------------------------------------------------------ held out
def test_no_held_out_sft_conversation_in_the_training_text(data_cfg, split, train_text):
  sft_cfg = default_sft_data_config()
  assert (data_cfg.corpus_sft_val_fraction, data_cfg.corpus_sft_seed) == \
      (sft_cfg.val_fraction, sft_cfg.seed)
  train_docs = set(split[0])
  for path in SFT_FILES:
    conversations = read_sft_file(readers.resolve_data_path(path)).conversations
    train, held = split_examples(conversations, sft_cfg.val_fraction, sft_cfg.seed)
    assert held, path

    def prompt(c):  # A user turn as the corpus renders it, with the turn that follows.
      return corpus.render_dialogue(c[:1]) + "\nAssistant: "

    leaked = [c for c in held if prompt(c) in train_text]
    assert not leaked, f"{path}: {len(leaked)} held-out prompts, e.g. {prompt(leaked[0])!r}"
    # The check can see a prompt: most train-side ones are in the training text (the
    # rest went to the pretraining validation split).
    seen = sum(corpus.render_dialogue(c) in train_docs for c in train)
    assert seen > 0.85 * len(train), path


def _render_prefix(prefix):
  messages = parse_transcript(prefix + "\n\nAssistant: x")
  return None if messages is None else corpus.render_dialogue(messages[:-1]) + "\nAssistant: "


def test_no_hh_validation_prefix_in_the_training_text(data_cfg, train_text):
  prefixes = [corpus.preference_prefix(t) for t in _hh_chosen()]
  train, val = corpus.split_preference_prefixes(
      prefixes, data_cfg.corpus_pref_val_fraction, data_cfg.corpus_pref_seed)
  assert 100 < len(val) < 200  # ~10% of 1,312 distinct prefixes
  rendered = [r for r in map(_render_prefix, val) if r]
  assert len(rendered) > 0.95 * len(val)
  leaked = [r for r in rendered if r in train_text]
  assert not leaked, f"{len(leaked)} held-out HH prompts, e.g. {leaked[0][:200]!r}"
  found = sum(r in train_text for r in map(_render_prefix, train) if r)
  assert found > 0.85 * len(train)


def test_split_preference_prefixes_is_a_stable_hash_split():
  prefixes = [f"\n\nHuman: question {i}" for i in range(2000)]
  train, val = corpus.split_preference_prefixes(prefixes + prefixes[:50], 0.1, seed=0)
  assert sorted(train + val) == sorted(prefixes)  # distinct, each once
  assert 150 < len(val) < 250
  again = corpus.split_preference_prefixes(list(reversed(prefixes)), 0.1, seed=0)
  assert set(again[1]) == set(val)  # order does not matter
  assert set(corpus.split_preference_prefixes(prefixes, 0.1, seed=1)[1]) != set(val)
  # Larger fraction, same seed: a superset (an RM run may hold out less, never more).
  assert set(val) <= set(corpus.split_preference_prefixes(prefixes, 0.2, seed=0)[1])
  chosen = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: good"
  rejected = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: bad"
  assert corpus.preference_prefix(chosen) == corpus.preference_prefix(rejected) == \
      "\n\nHuman: a\n\nAssistant: b\n\nHuman: c"


# ------------------------------------------------------------------------------ val split
def test_validation_split_is_disjoint_deterministic_and_covers_every_source(
    data_cfg, per_source, split):
  train, val = split
  assert not set(train) & set(val)
  assert len(set(train)) == len(train) and len(set(val)) == len(val)  # deduplicated
  for path, result in per_source.items():
    assert set(result.docs) & set(val), f"no validation document from {path}"
  chars = sum(map(len, val)) / (sum(map(len, val)) + sum(map(len, train)))
  assert 0.03 < chars < 0.08, chars  # val_fraction 0.05
  # By content hash, not position: reordering the sources or the documents moves nothing.
  reordered = data_cfg.copy_and_resolve_references()
  reordered.corpus_sources = ",".join(reversed(data_cfg.corpus_sources.split(",")))
  train2, val2 = documents.load_split_documents(reordered)
  assert set(train2) == set(train) and set(val2) == set(val)
  docs = per_source[HH].docs
  val_hh = set(corpus.split_documents(docs, 0.05)[1])
  assert val_hh and set(corpus.split_documents(docs[::-1], 0.05)[1]) == val_hh


def test_duplicates_are_dropped_across_sources(tmp_path, capsys):
  (tmp_path / "a.txt").write_text("p1\n\np2\n\np1", encoding="utf-8")
  (tmp_path / "b.txt").write_text("p2\n\np3", encoding="utf-8")
  cfg = default_data_config()
  cfg.source, cfg.val_fraction = "corpus", 0.0
  cfg.corpus_sources = f"{tmp_path}/a.txt,{tmp_path}/b.txt:text"
  assert documents.load_split_documents(cfg) == (["p1", "p2", "p3"], [])
  assert "1 train / 0 val docs, 2 / 0 chars; 0 held out, 1 duplicates" in capsys.readouterr().out


# ------------------------------------------------------------------------------ config
def test_config_tokenizer_reserves_the_chat_markers(data_cfg, split, tmp_path):
  assert data_cfg.tokenizer.user_defined_symbols.split(",") == list(CHAT_MARKERS)
  tok = get_or_train_tokenizer(data_cfg, split[0], str(tmp_path / "tokenizer.model"))
  assert tok.vocab_size == data_cfg.tokenizer.vocab_size == 4096
  for marker in CHAT_MARKERS:
    ids = tok.encode(f"x{marker}y")
    assert len(tok.encode(marker)) == 1 and tok.encode(marker)[0] in ids, marker
  ChatTemplate(tok)  # raises unless every marker is one piece
  text = split[1][0]
  assert tok.decode(tok.encode(text)) == text
  # The default config still trains without symbols: a marker is then several pieces.
  plain = default_data_config()
  plain.tokenizer.update(model_type="bpe", vocab_size=512)
  tok = get_or_train_tokenizer(plain, split[0][:300], str(tmp_path / "plain.model"))
  assert len(tok.encode(CHAT_MARKERS[0])) > 1


def test_runlocal_variant_is_small():
  config = _config("runlocal=true")
  assert config.data.source == "corpus" and config.train.num_steps <= 20
  assert config.model.num_layers <= 2 and config.model.max_seq_len >= config.data.seq_len


@pytest.mark.cli
def test_runlocal_trains(tmp_path):
  workdir = str(tmp_path / "run")
  out = run_cmd(pretrain_cmd(workdir, config=f"{CONFIG}:runlocal=true"))
  assert out.returncode == 0, out.stdout[-5000:]
  assert "Corpus:" in out.stdout
  evals = [r for r in read_metrics(workdir) if "eval/loss" in r]
  # Ten steps of a tiny model: already below the uniform guess over its 1024 pieces.
  assert evals and evals[-1]["eval/loss"] < math.log(1024)
