"""Tests for data/curate.py: each stage removes what it should on a hand-made corpus, bad input
is counted per file, output is byte-identical across runs and worker counts, and a killed
run completes without duplicates."""

import glob
import gzip
import hashlib
import json
import os
import shutil

import pytest

from data.sources import resolve_data_path


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
  assert bad == {"undecodable": 1, "not_an_object": 1, "missing_field": 1, "not_json": 0}
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
  assert report["examples"]["quality"][0]["text"].startswith("# $ %")


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
