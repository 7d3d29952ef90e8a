"""Tests for data/curate/ (the Beam pipeline): on a hand-made corpus with planted duplicates
across sources, it keeps exactly what a sequential reference keeps (tests/curate_oracle.py),
counts bad input per file, flags empty sources and refuses globs that match nothing; its
output is byte-identical for 1 and 2 workers and after a killed run; the tokenized output
trains english_bpe."""

import glob
import gzip
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from data.readers import resolve_data_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _paragraphs(n):
  """Real prose: WikiText-2 validation paragraphs of 80+ words that pass the quality rules
  of configs/data/shared.py (so only the planted documents are filtered)."""
  from configs.data.shared import get_config
  from data.filters import quality_failure
  rules = dict(get_config().quality.rules)
  with open(resolve_data_path("pretrain/wikitext2_tokens_valid.txt")) as f:
    paras = [p.strip() for p in f.read().split("\n") if len(p.split()) >= 80]
  return [p for p in paras if quality_failure(p, rules) is None][:n]


def _one_word_changed(text, at=40, word="palace"):
  w = text.split()
  return " ".join(w[:at] + [word] + w[at + 1:])  # Jaccard of 5-grams ~0.9


def _write_jsonl(path, lines):
  with open(path, "wb") as f:
    for line in lines:
      f.write(line if isinstance(line, bytes) else json.dumps(line).encode())
      f.write(b"\n")
  return str(path)


def _make_corpus(root):
  """Sources: docs (jsonl: planted junk, PII, contamination, exact / near duplicates,
  bad lines), book (text paragraphs), more (a glob of three files: a cross-source exact
  duplicate of docs, a near duplicate of book, a truncated .gz), empty (no document)."""
  os.makedirs(os.path.join(root, "more"), exist_ok=True)
  with gzip.open(resolve_data_path("eval/hellaswag_val_shared.jsonl.gz"), "rt") as f:
    item = json.loads(f.readline())
  hellaswag = f"{item['activity_label']}: {item['ctx']} {item['endings'][item['label']]}"
  paras = _paragraphs(24)
  base = paras[0]
  docs = paras[1:11] + [
      base, base.upper(), _one_word_changed(base),           # exact and near duplicates
      "# $ % & * ( ) " * 30,                                  # junk: quality
      paras[11] + " Write to jane.doe@example.com today.",    # PII
      paras[12] + " " + hellaswag + " " + paras[13],          # contaminated
  ]
  docs_path = _write_jsonl(os.path.join(root, "docs.jsonl"), [{"text": d} for d in docs] + [
      b"[1, 2, 3]", b'{"body": "no text field"}', b'{"text": "\xff\xfe broken"}'])
  book = os.path.join(root, "book.txt")
  with open(book, "w") as f:
    f.write("\n\n".join(paras[14:18]))
  _write_jsonl(os.path.join(root, "more", "part-0.jsonl"),
               [{"text": paras[5].lower()}, {"text": paras[18]}])
  _write_jsonl(os.path.join(root, "more", "part-1.jsonl"),
               [{"text": _one_word_changed(paras[15], 30, "harbour")}, {"text": paras[19]}])
  whole = gzip.compress(b"".join(json.dumps({"text": p}).encode() + b"\n"
                                 for p in paras[20:24]))
  with open(os.path.join(root, "more", "part-2.jsonl.gz"), "wb") as f:
    f.write(whole[:len(whole) * 2 // 3])                   # truncated: unreadable
  empty = os.path.join(root, "empty.txt")
  with open(empty, "w") as f:
    f.write("\n\n\n")
  return {"docs": docs_path, "book": book, "more": os.path.join(root, "more", "part-*"),
          "empty": empty}


def _config(paths):
  from configs.data.shared import get_config
  c = get_config()
  c.sources = [{"name": "docs", "path": paths["docs"], "kind": "jsonl"},
               {"name": "book", "path": paths["book"], "kind": "text",
                "split": "paragraphs"},
               {"name": "more", "path": paths["more"], "kind": "jsonl"},
               {"name": "empty", "path": paths["empty"], "kind": "text"}]
  c.num_shards = 3
  c.decontaminate.eval_tasks = ["hellaswag"]
  c.tokenize.vocab_size = 400
  c.tokenize.val_fraction = 0.2
  c.mixture.weights = {"docs": 1.0, "book": 1.0, "more": 1.0, "empty": 1.0}
  return c


def _curated(workdir):
  import tensorflow as tf
  out = {}
  for raw in tf.data.TFRecordDataset(sorted(glob.glob(os.path.join(workdir, "curated",
                                                                    "*.tfrecord")))):
    ex = tf.train.Example.FromString(raw.numpy())
    get = lambda k: ex.features.feature[k].bytes_list.value[0].decode()
    assert (get("source"), get("provenance")) not in out
    out[(get("source"), get("provenance"))] = get("text")
  return out


def _files(workdir):
  """{relative path: bytes} of every file a run leaves."""
  out = {}
  for path in sorted(glob.glob(os.path.join(workdir, "**", "*"), recursive=True)):
    if os.path.isfile(path):
      with open(path, "rb") as f:
        out[os.path.relpath(path, workdir)] = f.read()
  return out


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
  """One corpus and one run with 2 workers, shared by the tests of this module."""
  from data.curate import run
  root = str(tmp_path_factory.mktemp("curate"))
  paths = _make_corpus(os.path.join(root, "corpus"))
  workdir = os.path.join(root, "two")
  report = run(_config(paths), workdir, workers=2, log=lambda s: None)
  return paths, workdir, report


def test_keeps_what_the_sequential_reference_keeps_and_counts_every_stage(curated):
  from curate_oracle import kept_documents
  paths, workdir, report = curated
  out = _curated(workdir)
  assert out == kept_documents(_config(paths))
  rows = report["per_source"]
  docs, more = rows["docs"], rows["more"]
  assert docs["input"] == 16 and docs["output"] == 16 - 4
  assert docs["quality"] == docs["decontaminate"] == docs["pii_scrubbed"] == 1
  assert docs["exact_dedup"] == docs["near_dedup"] == 1
  # Across sources: the later source loses its copy of docs (exact) and of book (near).
  assert more["files"] == 3 and more["exact_dedup"] == 1 and more["near_dedup"] == 1
  assert ("more", paths["more"].replace("part-*", "part-1.jsonl:1")) not in out
  assert rows["book"]["output"] == 4
  assert any("<EMAIL>" in t for t in out.values())
  assert not any("jane.doe" in t for t in out.values())
  assert report["examples"]["quality"]["docs"][0]["text"].startswith("# $ %")
  assert report["examples"]["exact_dedup"]["more"] == [
      {"doc_id": "more/0/0", "duplicate_of": "docs/4"}]


def test_bad_input_is_counted_per_file_and_empty_sources_are_flagged(curated):
  paths, workdir, report = curated
  bad = report["bad_input"]
  assert bad[paths["docs"]] == {"undecodable": 1, "not_an_object": 1, "missing_field": 1,
                                "not_json": 0, "unparseable": 0, "unreadable": 0}
  truncated = paths["more"].replace("part-*", "part-2.jsonl.gz")
  assert bad[truncated]["unreadable"] == 1
  assert report["empty_sources"] == ["empty"] and report["per_source"]["empty"]["input"] == 0
  assert "Sources that gave no document: empty" in open(os.path.join(workdir,
                                                                     "report.md")).read()
  assert os.path.getsize(os.path.join(workdir, "report.png")) > 1000


@pytest.mark.slow  # a second whole pipeline run (~12 s): with the kill/restart test
def test_one_worker_writes_the_same_bytes(curated, tmp_path):
  from data.curate import run
  paths, two, _ = curated
  one = str(tmp_path / "one")
  run(_config(paths), one, workers=1, log=lambda s: None)
  a, b = _files(one), _files(two)
  assert sorted(a) == sorted(b)
  assert {"tokenizer.model", "report.json", "tokenized/info.json",
          "tokenized/val-00000.tfrecord", "curated/shard-00002.tfrecord"} <= set(a)
  for name in a:
    assert a[name] == b[name], name


def test_a_glob_that_matches_nothing_is_refused_before_anything_is_written(tmp_path):
  from data.curate import plan
  cfg = _config({"docs": str(tmp_path / "a.jsonl"), "book": str(tmp_path / "b.txt"),
                 "more": str(tmp_path / "none-*.jsonl"), "empty": str(tmp_path / "e.txt")})
  for name in ("a.jsonl", "b.txt", "e.txt"):
    (tmp_path / name).write_text("x\n")
  with pytest.raises(ValueError, match=r"config\.sources\[2\]\.path: no file matches "
                     r".*none-\*\.jsonl"):
    plan(cfg, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
  cfg.sources = []
  with pytest.raises(ValueError, match="config.sources is empty"):
    plan(cfg, str(tmp_path / "run"))


def test_a_corrupt_gzip_is_counted_and_its_readable_records_kept(tmp_path):
  from data.curate import read_source
  lines = b"".join(json.dumps({"text": f"record {i} " * 20}).encode() + b"\n"
                   for i in range(200))
  whole = gzip.compress(lines)
  path = tmp_path / "x.jsonl.gz"
  path.write_bytes(whole[:len(whole) // 2])
  bad = {}
  docs, _ = read_source({"name": "x", "path": str(path), "kind": "jsonl"}, bad)
  assert bad[str(path)]["unreadable"] == 1 and 0 < len(docs) < 200
  assert [d.text for d in docs] == [f"record {i} " * 20 for i in range(len(docs))]


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
                      "missing_field": 1, "unparseable": 0, "unreadable": 0}
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


def test_examples_and_tfrecords_are_the_bytes_tensorflow_writes(tmp_path):
  import numpy as np
  import tensorflow as tf
  from data.curate import files

  def reference(features):
    return tf.train.Example(features=tf.train.Features(feature={
        k: tf.train.Feature(bytes_list=tf.train.BytesList(value=[v.encode()]))
        if isinstance(v, str) else tf.train.Feature(int64_list=tf.train.Int64List(value=v))
        for k, v in features.items()})).SerializeToString(deterministic=True)

  cases = [{"tokens": [0, 1, 127, 128, 16383, 16384, 2**21, 2**31 - 1, 2**40], "source": "a"},
           {"text": "héllo wörld " * 300, "source": "s", "provenance": "p.jsonl:7"},
           {"tokens": np.arange(3000, dtype=np.int32), "source": ""}, {"tokens": []}]
  records = [files.tf_example(c) for c in cases]
  assert records == [reference(c) for c in cases]
  ours, theirs = str(tmp_path / "ours.tfrecord"), str(tmp_path / "tf.tfrecord")
  assert files.write_tfrecord(ours, records) == 4
  with tf.io.TFRecordWriter(theirs) as writer:
    for r in records:
      writer.write(r)
  assert open(ours, "rb").read() == open(theirs, "rb").read()
  assert [r.numpy() for r in tf.data.TFRecordDataset(ours)] == records


def test_near_duplicates_resolve_in_document_order():
  from data.curate.transforms import resolve_near_duplicates
  a, b, c, d = (0, 0, 0), (0, 0, 1), (1, 0, 0), (2, 0, 0)
  # b duplicates a; c duplicates only b (removed), so c stays; d duplicates c.
  assert resolve_near_duplicates([(b, c), (a, b), (c, d)]) == [(b, a), (d, c)]


def _cli(cfg, workdir, *flags):
  """The CLI command for a config (written as a config file that loads its JSON)."""
  cfg_json = os.path.join(os.path.dirname(workdir), "cfg.json")
  with open(cfg_json, "w") as f:
    json.dump(cfg.to_dict(), f)
  cfg_py = os.path.join(os.path.dirname(workdir), "cfg.py")
  with open(cfg_py, "w") as f:
    f.write("import json\nimport ml_collections\n\n\ndef get_config():\n"
            f"  return ml_collections.ConfigDict(json.load(open({cfg_json!r})))\n")
  return [sys.executable, "-m", "data.curate", f"--config={cfg_py}",
          f"--workdir={workdir}", *flags]


@pytest.mark.cli
def test_cli_refuses_a_glob_that_matches_nothing(tmp_path):
  from conftest import run_cmd
  paths = _make_corpus(str(tmp_path / "corpus"))
  cfg = _config({**paths, "more": str(tmp_path / "nothing-*.jsonl")})
  out = run_cmd(_cli(cfg, str(tmp_path / "run")))
  assert out.returncode == 2, out.stdout[-2000:]
  assert out.stdout.strip().splitlines()[-1].startswith(
      "error: config.sources[2].path: no file matches")
  assert "Traceback" not in out.stdout and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_killed_run_restarts_to_the_same_bytes(curated, tmp_path):
  from conftest import REPO_ROOT, subprocess_env
  paths, reference, _ = curated
  workdir = str(tmp_path / "run")
  cmd = _cli(_config(paths), workdir, "--workers=2")
  proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=subprocess_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while not glob.glob(os.path.join(workdir, "curated", "*")) and time.time() < deadline:
    time.sleep(0.1)
  os.kill(proc.pid, signal.SIGKILL)  # the launcher; its worker processes lose their runner
  proc.wait()
  assert not os.path.exists(os.path.join(workdir, "report.json")), "finished before the kill"
  # Leftovers a restart must not take for output: a stale shard and a tmp file.
  os.makedirs(os.path.join(workdir, "tokenized"), exist_ok=True)
  open(os.path.join(workdir, "tokenized", "train-00099.tfrecord"), "wb").close()
  open(os.path.join(workdir, "tokenizer.model.tmp-dead"), "wb").close()
  out = subprocess.run(cmd, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  a, b = _files(workdir), _files(reference)
  assert sorted(a) == sorted(b)
  for name in a:
    assert a[name] == b[name], name


@pytest.mark.slow
def test_shared_corpora_keep_what_the_sequential_reference_keeps(tmp_path):
  from configs.data.shared import get_config
  from curate_oracle import kept_documents
  from data.curate import run
  cfg = get_config()
  cfg.tokenize.enabled = False
  run(cfg, str(tmp_path / "run"), workers=2, log=lambda s: None)
  out = _curated(str(tmp_path / "run"))
  assert len(out) > 19_000
  assert out == kept_documents(cfg)


@pytest.mark.cli
def test_tokenized_mixture_feeds_pretraining(curated, tmp_path):
  from conftest import pretrain_cmd, read_metrics, run_cmd
  from data.tokenized import load_tokenized
  _, workdir, report = curated
  tok, train, val, info = load_tokenized(workdir)
  t = report["tokens"]["per_source"]
  assert t["book"]["share"] == pytest.approx(1 / 3, abs=0.08)  # whole documents
  assert t["book"]["epochs"] > 1 > t["docs"]["epochs"]        # book upsampled, docs not
  assert train.num_tokens == info["train_tokens"] == sum(r["tokens"] for r in t.values())
  assert val.num_tokens > 0 and set(train.tokens[train.doc_starts + train.doc_lengths - 1]
                                    .tolist()) == {tok.eos_id}
  run = str(tmp_path / "pretrain")
  out = run_cmd(pretrain_cmd(
      run, config=f"configs/pretrain/english_bpe.py:runlocal=true,curated={workdir}"))
  assert out.returncode == 0, out.stderr[-3000:]
  assert any("eval/loss" in r for r in read_metrics(run)), out.stdout[-2000:]
  from train.checkpoint import read_tokenizer
  assert read_tokenizer(os.path.join(run, "checkpoints")) == tok.to_bytes()
