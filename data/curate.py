"""The curation pipeline: sources -> filtered, deduplicated, sharded TFRecord documents.

  python -m data.curate --config=configs/data/shared.py --workdir=runs/curated [--workers=2]

Three phases, each resumable (a finished unit leaves a marker written last, by rename, so a
killed run redoes only unfinished units and never writes a unit twice):

  1. per shard, in a worker pool: read the shard's documents (document i of a source goes to
     shard hash(source, i) % num_shards), then the per-document stages in order:
     normalise -> quality -> safety -> PII scrub -> decontamination; survivors are written
     to `stage1/shard-XXXXX.jsonl` with their exact-duplicate key and MinHash signature,
     and the shard's counts to `stage1/shard-XXXXX.stats.json`;
  2. one process, shards in order: exact then near-duplicate removal across all sources
     (the first occurrence in shard order is kept); writes `dedup.json` (the kept ids);
  3. per shard: the kept documents as TFRecord `tf.train.Example`s (`text`, `source`,
     `provenance` = "path:line" or "path#document"), `curated/shard-XXXXX.tfrecord`.
Then `report.json` / `report.md`: documents and characters in and out of every stage per
source, and up to `examples_per_filter` removed documents per filter (their first 300
characters).

Bad input never crashes the run: an undecodable line (invalid UTF-8), a jsonl line that is
not a JSON object and a record without the text field are counted per file under
`bad_input` in the report and skipped. Everything is deterministic given the config.

Not yet here (issue 7, next): mixture weights, tokenized shards, the PNG chart, TFDS
builders, the throughput benchmark.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import json
import os
import sys
from typing import Any, Iterator, Mapping, Sequence

from data import filters

@dataclasses.dataclass
class Document:
  doc_id: str        # "<source>/<index>"
  source: str
  text: str
  provenance: str    # "path:line" (jsonl) or "path#n" (n-th document of a text file)


def _open_bytes(path: str):
  return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def read_source(source: Mapping[str, Any], bad: dict[str, dict[str, int]]
                ) -> Iterator[Document]:
  """Documents of one source: {"name", "path", "kind": "jsonl" | "text", "text_field",
  "split": "paragraphs" | "articles" | "file" | "lines"}; problems are counted in bad[path]."""
  from data.sources import resolve_data_path
  name, path = source["name"], resolve_data_path(source["path"])
  counts = bad.setdefault(path, {"undecodable": 0, "not_an_object": 0, "missing_field": 0,
                                 "not_json": 0})
  kind = source.get("kind") or ("jsonl" if ".jsonl" in path else "text")
  index = 0
  if kind == "jsonl":
    field = source.get("text_field", "text")
    with _open_bytes(path) as f:
      for number, raw in enumerate(f, 1):
        try:
          line = raw.decode("utf-8")
        except UnicodeDecodeError:
          counts["undecodable"] += 1
          continue
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          counts["not_json"] += 1
          continue
        if not isinstance(record, dict):
          counts["not_an_object"] += 1
          continue
        if not isinstance(record.get(field), str):
          counts["missing_field"] += 1
          continue
        yield Document(f"{name}/{index}", name, record[field], f"{path}:{number}")
        index += 1
    return
  with _open_bytes(path) as f:
    data = f.read()
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError:
    counts["undecodable"] += 1
    text = data.decode("utf-8", errors="ignore")  # counted; the readable rest is kept
  split = source.get("split", "paragraphs")
  if split == "file":
    pieces = [text]
  elif split == "lines":
    pieces = text.split("\n")
  elif split == "articles":  # WikiText: one document per " = Title = " article
    from data.corpus import split_wikitext_articles
    pieces = split_wikitext_articles(text)
  elif split == "paragraphs":
    pieces = text.split("\n\n")
  else:
    raise ValueError(f"source {name!r}: split={split!r}, expected file, lines, articles or "
                     "paragraphs")
  for n, piece in enumerate(pieces):
    if piece.strip():
      yield Document(f"{name}/{index}", name, piece, f"{path}#{n}")
      index += 1


def shard_of(doc_id: str, num_shards: int) -> int:
  return int.from_bytes(hashlib.sha1(doc_id.encode()).digest()[:8], "little") % num_shards


def _counter() -> dict[str, int]:
  return {"docs": 0, "chars": 0}


class StageCounts:
  """Per source: documents and characters entering each stage, and removed by it."""

  def __init__(self):
    self.data: dict[str, dict[str, dict[str, int]]] = {}

  def add(self, source: str, stage: str, what: str, text: str) -> None:
    c = self.data.setdefault(source, {}).setdefault(f"{stage}/{what}", _counter())
    c["docs"] += 1
    c["chars"] += len(text)

  def merge(self, other: Mapping[str, Any]) -> None:
    for source, stages in other.items():
      for key, c in stages.items():
        mine = self.data.setdefault(source, {}).setdefault(key, _counter())
        mine["docs"] += c["docs"]
        mine["chars"] += c["chars"]


def _atomic_write(path: str, text: str) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


class Curator:
  """One curation run (config: configs/data/*.py `get_config()`)."""

  def __init__(self, cfg: Any, workdir: str):
    self.cfg, self.workdir = cfg, workdir
    self.sources = [dict(s) for s in cfg.sources]
    if not self.sources:
      raise ValueError("config.sources is empty")
    names = [s["name"] for s in self.sources]
    if len(set(names)) != len(names):
      raise ValueError(f"config.sources: names must be distinct, got {names}")
    self.blocklist = filters.Blocklist(list(cfg.safety.blocklist))

  # ------------------------------------------------------------------ phase 1
  def decontaminator(self) -> filters.Decontaminator | None:
    if not self.cfg.decontaminate.enabled:
      return None
    return _decontaminator(tuple(self.cfg.decontaminate.eval_tasks),
                           self.cfg.decontaminate.ngram)

  def _shard_path(self, phase: str, shard: int, ext: str) -> str:
    return os.path.join(self.workdir, phase, f"shard-{shard:05d}.{ext}")

  def process_shard(self, shard: int) -> None:
    """Phase 1 for one shard (skipped when its stats file exists)."""
    c = self.cfg
    stats_path = self._shard_path("stage1", shard, "stats.json")
    if os.path.exists(stats_path):
      return
    os.makedirs(os.path.dirname(stats_path), exist_ok=True)
    counts, bad, examples = StageCounts(), {}, {}
    near = filters.MinHasher(c.near_dedup.num_perm, c.near_dedup.ngram, c.seed)
    deco = self.decontaminator()
    out = []
    for source in self.sources:
      for doc in read_source(source, bad):
        if shard_of(doc.doc_id, c.num_shards) != shard:
          continue
        counts.add(doc.source, "input", "kept", doc.text)
        text = filters.normalize(doc.text, c.normalize.strip_markup) \
            if c.normalize.enabled else doc.text
        removed = None
        if not text:
          removed = "normalize"
        elif c.quality.enabled and filters.quality_failure(text, dict(c.quality.rules)):
          removed = "quality"
        elif c.safety.enabled and filters.safety_failure(text, self.blocklist):
          removed = "safety"
        if removed is None and c.pii.enabled:
          text, found = filters.scrub_pii(text)
          if sum(found.values()):
            counts.add(doc.source, "pii", "scrubbed", text)
        if removed is None and deco is not None and deco.contaminated(text):
          removed = "decontaminate"
        if removed:
          counts.add(doc.source, removed, "removed", doc.text)
          ex = examples.setdefault(removed, [])
          if len(ex) < c.examples_per_filter:
            ex.append({"doc_id": doc.doc_id, "provenance": doc.provenance,
                       "text": doc.text[:300]})
          continue
        out.append({"doc_id": doc.doc_id, "source": doc.source, "provenance": doc.provenance,
                    "text": text, "exact": filters.exact_key(text),
                    "minhash": near.signature(text).tolist() if c.near_dedup.enabled else []})
    _atomic_write(self._shard_path("stage1", shard, "jsonl"),
                  "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out))
    _atomic_write(stats_path, json.dumps({"counts": counts.data, "bad_input": bad,
                                          "examples": examples}))  # the marker: last

  # ------------------------------------------------------------------ phase 2
  def _stage1(self, shard: int) -> list[dict[str, Any]]:
    with open(self._shard_path("stage1", shard, "jsonl"), encoding="utf-8") as f:
      return [json.loads(line) for line in f]

  def deduplicate(self) -> dict[str, Any]:
    path = os.path.join(self.workdir, "dedup.json")
    if os.path.exists(path):
      with open(path) as f:
        return json.load(f)
    import numpy as np
    c = self.cfg
    seen, kept, removed = {}, [], {"exact_dedup": [], "near_dedup": []}
    near = filters.NearDuplicates(c.near_dedup.threshold, c.near_dedup.num_perm,
                                  c.near_dedup.ngram, c.seed) if c.near_dedup.enabled else None
    for shard in range(c.num_shards):
      for r in self._stage1(shard):
        if c.exact_dedup.enabled and r["exact"] in seen:
          removed["exact_dedup"].append([r["doc_id"], seen[r["exact"]]])
          continue
        seen.setdefault(r["exact"], r["doc_id"])
        if near is not None:
          twin = near.add_signature(r["doc_id"], np.asarray(r["minhash"], np.uint64))
          if twin is not None:
            removed["near_dedup"].append([r["doc_id"], twin])
            continue
        kept.append(r["doc_id"])
    result = {"kept": kept, "removed": removed}
    _atomic_write(path, json.dumps(result))
    return result

  # ------------------------------------------------------------------ phase 3
  def write_shard(self, shard: int, kept: set[str]) -> None:
    import tensorflow as tf
    path = self._shard_path("curated", shard, "tfrecord")
    if os.path.exists(path):
      return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp"
    with tf.io.TFRecordWriter(tmp) as writer:
      for r in self._stage1(shard):
        if r["doc_id"] not in kept:
          continue
        feature = {k: tf.train.Feature(bytes_list=tf.train.BytesList(
            value=[r[k].encode("utf-8")])) for k in ("text", "source", "provenance")}
        writer.write(tf.train.Example(features=tf.train.Features(
            feature=feature)).SerializeToString())
    os.replace(tmp, path)

  # ------------------------------------------------------------------ the run
  def run(self, workers: int = 1) -> dict[str, Any]:
    shards = list(range(self.cfg.num_shards))
    if workers > 1:
      import multiprocessing
      with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pool.starmap(_process_shard, [(self.cfg.to_dict(), self.workdir, s) for s in shards])
    else:
      for s in shards:
        self.process_shard(s)
    dedup = self.deduplicate()
    kept = set(dedup["kept"])
    for s in shards:
      self.write_shard(s, kept)
    return self.report(dedup)

  def report(self, dedup: Mapping[str, Any]) -> dict[str, Any]:
    counts, bad, examples = StageCounts(), {}, {}
    for shard in range(self.cfg.num_shards):
      with open(self._shard_path("stage1", shard, "stats.json")) as f:
        stats = json.load(f)
      counts.merge(stats["counts"])
      for path, c in stats["bad_input"].items():
        mine = bad.setdefault(path, {k: 0 for k in c})
        for k, v in c.items():
          mine[k] = max(mine[k], v)  # every shard reads every file: the counts are equal
      for name, ex in stats["examples"].items():
        examples.setdefault(name, []).extend(ex)
    per_source = {s["name"]: {} for s in self.sources}
    for stage in ("exact_dedup", "near_dedup"):
      for doc_id, twin in dedup["removed"][stage]:
        source = doc_id.split("/")[0]
        per_source[source][stage] = per_source[source].get(stage, 0) + 1
        ex = examples.setdefault(stage, [])
        if len(ex) < self.cfg.examples_per_filter:
          ex.append({"doc_id": doc_id, "duplicate_of": twin})
    kept_by_source: dict[str, int] = {}
    for doc_id in dedup["kept"]:
      source = doc_id.split("/")[0]
      kept_by_source[source] = kept_by_source.get(source, 0) + 1
    table = {}
    for source in per_source:
      data = counts.data.get(source, {})
      row = {"input": data.get("input/kept", _counter())["docs"]}
      for stage in ("normalize", "quality", "safety", "decontaminate"):
        row[stage] = data.get(f"{stage}/removed", _counter())["docs"]
      row["pii_scrubbed"] = data.get("pii/scrubbed", _counter())["docs"]
      row["exact_dedup"] = per_source[source].get("exact_dedup", 0)
      row["near_dedup"] = per_source[source].get("near_dedup", 0)
      row["output"] = kept_by_source.get(source, 0)
      table[source] = row
    report = {"per_source": table, "bad_input": bad, "examples": examples,
              "config": self.cfg.to_dict()}
    _atomic_write(os.path.join(self.workdir, "report.json"), json.dumps(report, indent=1))
    cols = ["input", "normalize", "quality", "safety", "decontaminate", "pii_scrubbed",
            "exact_dedup", "near_dedup", "output"]
    lines = ["| source | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {s} | " + " | ".join(str(r[k]) for k in cols) + " |"
              for s, r in table.items()]
    _atomic_write(os.path.join(self.workdir, "report.md"), "\n".join(lines) + "\n")
    return report


@functools.lru_cache(maxsize=None)
def _decontaminator(eval_tasks: tuple[str, ...], ngram: int) -> filters.Decontaminator:
  """The n-gram index of the evaluation sets, built once per process (a pool worker
  processes several shards)."""
  from eval import tasks as tasks_lib
  texts = []
  for task in eval_tasks:
    path = tasks_lib.task_path(task)
    reader = tasks_lib.MC_READERS[task]
    for item in (reader(path, 0) if task == "mmlu" else reader(path)):
      texts.extend(context + continuation for context, continuation in item.requests())
  return filters.Decontaminator(texts, ngram)


def _process_shard(cfg_dict: dict, workdir: str, shard: int) -> None:
  import ml_collections
  Curator(ml_collections.ConfigDict(cfg_dict), workdir).process_shard(shard)


def main(argv: Sequence[str]) -> None:
  from absl import flags
  FLAGS = flags.FLAGS
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  try:
    report = Curator(FLAGS.config, FLAGS.workdir).run(FLAGS.workers)
  except (ValueError, OSError) as e:
    sys.exit("error: " + " ".join(str(e).split()))
  with open(os.path.join(FLAGS.workdir, "report.md")) as f:
    print(f.read())
  print(json.dumps({"per_source": report["per_source"], "bad_input": report["bad_input"]}))


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "configs/data/*.py", lock_config=True)
  flags.DEFINE_string("workdir", None, "Output directory.", required=True)
  flags.DEFINE_integer("workers", 1, "Worker processes for the per-shard phases.")
  app.run(main)
