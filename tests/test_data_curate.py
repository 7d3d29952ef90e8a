"""Tests for data/curate/: each stage removes what it should on a hand-made corpus, bad input
is counted per file, output is byte-identical across runs and worker counts, and a killed
run completes without duplicates."""

import glob
import gzip
import hashlib
import json
import os
import shutil

import pytest

from data.readers import resolve_data_path


def _paragraphs(n):
  """Real prose: WikiText-2 validation paragraphs of 80+ words that pass the quality rules
  of configs/data/shared.py (so only the planted documents are filtered)."""
  from configs.data.shared import get_config
  from data.filters import quality_failure
  rules = dict(get_config().quality.rules)
  with open(resolve_data_path("pretrain/wikitext2_tokens_valid.txt")) as f:
    paras = [p.strip() for p in f.read().split("\n") if len(p.split()) >= 80]
  return [p for p in paras if quality_failure(p, rules) is None][:n]


@pytest.fixture
def corpus(tmp_path):
  with gzip.open(resolve_data_path("eval/hellaswag_val_shared.jsonl.gz"), "rt") as f:
    item = json.loads(f.readline())
  hellaswag = f"{item['activity_label']}: {item['ctx']} {item['endings'][item['label']]}"
  paras = _paragraphs(20)
  base = paras[0]
  w = base.split()
  near = " ".join(w[:40] + ["palace"] + w[41:])  # one word changed: Jaccard ~0.9
  docs = paras[1:11] + [
      base, base.upper(), near,                               # exact and near duplicates
      "# $ % & * ( ) " * 30,                                  # junk: quality
      paras[11] + " Write to jane.doe@example.com today.",    # PII
      paras[12] + " " + hellaswag + " " + paras[13],          # contaminated
  ]
  path = tmp_path / "docs.jsonl"
  with open(path, "wb") as f:
    for d in docs:
      f.write(json.dumps({"text": d}).encode() + b"\n")
    f.write(b"[1, 2, 3]\n")                 # not an object
    f.write(b'{"body": "no text field"}\n')  # missing field
    f.write(b'{"text": "\xff\xfe broken"}\n')  # undecodable
  text = tmp_path / "book.txt"
  text.write_text("\n\n".join(paras[14:18]))
  return str(path), str(text), near


def _config(paths, **overrides):
  from configs.data.shared import get_config
  c = get_config()
  c.sources = [{"name": "docs", "path": paths[0], "kind": "jsonl", "text_field": "text"},
               {"name": "book", "path": paths[1], "kind": "text", "split": "paragraphs"}]
  c.num_shards = 3
  c.decontaminate.eval_tasks = ["hellaswag"]
  c.update(overrides)
  return c


def _digest(workdir):
  h = hashlib.sha256()
  for path in sorted(glob.glob(os.path.join(workdir, "curated", "*.tfrecord"))):
    with open(path, "rb") as f:
      h.update(f.read())
  return h.hexdigest()


def _read(workdir):
  import tensorflow as tf
  files = sorted(glob.glob(os.path.join(workdir, "curated", "*.tfrecord")))
  out = []
  for raw in tf.data.TFRecordDataset(files):
    ex = tf.train.Example.FromString(raw.numpy())
    out.append({k: ex.features.feature[k].bytes_list.value[0].decode() for k in
                ("text", "source", "provenance")})
  return out


def test_stages_remove_what_they_should_and_count_bad_input(corpus, tmp_path):
  from data.curate import Curator
  workdir = str(tmp_path / "run")
  report = Curator(_config(corpus), workdir).run(workers=1)
  docs = report["per_source"]["docs"]
  assert docs["input"] == 16
  from data.filters import jaccard
  assert jaccard(corpus[2], _paragraphs(1)[0]) > 0.8
  assert docs["quality"] == 1 and docs["decontaminate"] == 1
  assert docs["exact_dedup"] == 1 and docs["near_dedup"] == 1 and docs["pii_scrubbed"] == 1
  assert docs["output"] == 16 - 4
  assert report["per_source"]["book"]["output"] == 4
  bad = report["bad_input"][corpus[0]]
  assert bad == {"undecodable": 1, "not_an_object": 1, "missing_field": 1, "not_json": 0,
                 "unparseable": 0}
  out = _read(workdir)
  assert len(out) == 16 and len({r["text"] for r in out}) == 16
  assert any("<EMAIL>" in r["text"] for r in out)
  assert not any("jane.doe" in r["text"] for r in out)
  # Of the original, its upper-case copy and its near copy, exactly one is left (the first
  # in shard order).
  base = _paragraphs(1)[0]
  assert sum(r["text"] in (base, base.upper(), corpus[2]) for r in out) == 1
  assert all(r["provenance"].startswith(corpus[0] + ":") or r["source"] == "book"
             for r in out)
  assert os.path.exists(os.path.join(workdir, "report.md"))
  assert report["examples"]["quality"]["docs"][0]["text"].startswith("# $ %")
  assert os.path.getsize(os.path.join(workdir, "report.png")) > 1000


@pytest.mark.cli
def test_rerun_is_byte_identical_and_a_killed_run_completes(corpus, tmp_path):
  from data.curate import Curator
  one = str(tmp_path / "one")
  Curator(_config(corpus), one).run(workers=1)
  two = str(tmp_path / "two")
  Curator(_config(corpus), two).run(workers=2)
  assert _digest(one) == _digest(two)
  # "Kill" after phase 1 of some shards: remove later outputs and one shard's marker.
  os.remove(os.path.join(one, "stage1", "shard-00001.stats.json"))
  os.remove(os.path.join(one, "dedup.json"))
  shutil.rmtree(os.path.join(one, "curated"))
  Curator(_config(corpus), one).run(workers=1)
  assert _digest(one) == _digest(two)
  assert len(_read(one)) == 16


def test_empty_sources_are_refused(tmp_path):
  from data.curate import Curator
  from configs.data.shared import get_config
  c = get_config()
  c.sources = []
  with pytest.raises(ValueError, match="config.sources is empty"):
    Curator(c, str(tmp_path))


def _write_jsonl(path, lines):
  with open(path, "wb") as f:
    for line in lines:
      f.write(line if isinstance(line, bytes) else json.dumps(line).encode())
      f.write(b"\n")
  return str(path)


def test_instruction_and_preference_sources_keep_the_held_out_rules_and_count_bad_input(
    tmp_path):
  from data import corpus, sft_sources
  from data.curate import read_source
  records = [{"instruction": f"Describe item number {i} of the list in a sentence.",
              "input": "", "output": f"Item {i} is a fine thing that people like."}
             for i in range(40)]
  sft = _write_jsonl(tmp_path / "sft.jsonl", records + [
      [1, 2], {"instruction": "no output field"}, b"{not json", b"\xff\xfe"])
  bad = {}
  held = {"sft_val_fraction": 0.25, "sft_seed": 0, "pref_val_fraction": 0.3, "pref_seed": 0}
  docs, held_out = read_source({"name": "a", "path": sft, "kind": "sft"}, bad, held)
  assert bad[sft] == {"undecodable": 1, "not_json": 1, "not_an_object": 1,
                      "missing_field": 1, "unparseable": 0}
  # The SFT stage's own split decides which conversations stay out.
  convs = [sft_sources.record_to_conversation(r, "alpaca") for r in records]
  train, val = sft_sources.split_examples(convs, 0.25, 0)
  assert held_out == len(val) > 0
  assert [d.text for d in docs] == [corpus.render_dialogue(c) for c in train]
  assert docs[0].provenance.startswith(sft + ":")
  pairs = [{"chosen": f"\n\nHuman: question {i}?\n\nAssistant: answer {i}.",
            "rejected": f"\n\nHuman: question {i}?\n\nAssistant: no."} for i in range(30)]
  hh = _write_jsonl(tmp_path / "hh.jsonl", pairs + [{"rejected": "only"},
                                                     {"chosen": "no turns here"}])
  docs, held_out = read_source({"name": "h", "path": hh, "kind": "transcript"}, bad, held)
  _, val = corpus.split_preference_prefixes(
      [corpus.preference_prefix(p["chosen"]) for p in pairs], 0.3, 0)
  assert held_out == len(val) > 0 and len(docs) == 30 - len(val)
  assert bad[hh]["missing_field"] == 1 and bad[hh]["unparseable"] == 1
  assert all(d.text.startswith("User: question") for d in docs)
  with pytest.raises(ValueError, match="evaluation set"):
    read_source({"name": "t", "path": "pretrain/wikitext2_tokens_test.txt"}, {})


def test_mixture_shares_follow_the_temperature_rule_and_are_realised():
  from data.curate import mixture_shares, realise_mixture
  assert mixture_shares({"a": 900, "b": 100}, temperature=2.0) == pytest.approx(
      {"a": 0.75, "b": 0.25})  # sqrt(900) : sqrt(100) = 30 : 10
  assert mixture_shares({"a": 900, "b": 100}, temperature=1.0) == pytest.approx(
      {"a": 0.9, "b": 0.1})
  assert mixture_shares({"a": 5, "b": 1}, {"a": 1, "b": 3}) == {"a": 0.25, "b": 0.75}
  with pytest.raises(ValueError, match=r"unknown sources \['c'\].*without a weight \['b'\]"):
    mixture_shares({"a": 5, "b": 1}, {"a": 1, "c": 3})
  lengths = {"a": [10 + i % 7 for i in range(900)], "b": [12] * 100}
  picked = realise_mixture(lengths, {"a": 0.25, "b": 0.75}, 10_000, seed=0)
  tokens = {n: sum(lengths[n][i] for i in idx) for n, idx in picked.items()}
  assert tokens["a"] / 10_000 == pytest.approx(0.25, abs=0.002)
  assert tokens["b"] / 10_000 == pytest.approx(0.75, abs=0.002)
  # b is upsampled: whole epochs repeat every document equally often (6 full epochs).
  counts = [picked["b"].count(i) for i in range(100)]
  assert min(counts) >= 6 and max(counts) <= 7
  assert len(set(picked["a"])) == len(picked["a"])  # a is subsampled: no repeats


@pytest.mark.cli
def test_tokenized_mixture_feeds_pretraining_and_cluster_mode_matches(corpus, tmp_path):
  from conftest import pretrain_cmd, run_cmd, read_metrics
  from data.curate import Curator, PHASES
  from data.tokenized import load_tokenized
  cfg = _config(corpus)
  cfg.tokenize.vocab_size = 400
  cfg.tokenize.val_fraction = 0.2
  cfg.mixture.weights = {"docs": 1.0, "book": 1.0}
  one = str(tmp_path / "one")
  report = Curator(cfg, one).run(workers=1, log=lambda s: None)
  tok, train, val, info = load_tokenized(one)
  t = report["tokens"]["per_source"]
  assert t["book"]["share"] == pytest.approx(0.5, abs=0.08)  # whole documents of ~200 tokens
  assert t["book"]["epochs"] > 1 > t["docs"]["epochs"]       # book upsampled, docs not
  assert train.num_tokens == info["train_tokens"] == sum(r["tokens"] for r in t.values())
  assert val.num_tokens > 0 and set(train.tokens[train.doc_starts + train.doc_lengths - 1]
                                    .tolist()) == {tok.eos_id}
  # Cluster mode: two "processes" phase by phase give the same bytes as one.
  two = str(tmp_path / "two")
  with pytest.raises(RuntimeError, match="phase 'split' is incomplete"):
    Curator(cfg, two).run(phases=["filter"], log=lambda s: None)
  for phase in PHASES:
    for index in (0, 1):
      Curator(cfg, two).run(phases=[phase], process_index=index, process_count=2,
                            log=lambda s: None)
  for sub in ("curated", "tokenized"):
    for path in sorted(glob.glob(os.path.join(one, sub, "*"))):
      with open(path, "rb") as a, open(path.replace(one, two), "rb") as b:
        assert a.read() == b.read(), path
  # The english_bpe pretraining config takes the curated output as its corpus.
  run = str(tmp_path / "pretrain")
  out = run_cmd(pretrain_cmd(
      run, config=f"configs/pretrain/english_bpe.py:runlocal=true,curated={one}"))
  assert out.returncode == 0, out.stderr[-3000:]
  assert any("eval/loss" in r for r in read_metrics(run)), out.stdout[-2000:]
  from train.checkpoint import read_tokenizer
  assert read_tokenizer(os.path.join(run, "checkpoints")) == tok.to_bytes()
