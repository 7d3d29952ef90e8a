"""The curation phases (`Curator`): split, filter, dedup, write, tokenizer, tokenize, mix,
report; each resumable, per unit (source or shard) or in one process (see `data.curate`)."""

from __future__ import annotations

import dataclasses
import functools
import json
import multiprocessing
import os
import shutil
import time
from typing import Any, Callable, Mapping, Sequence

import ml_collections
import numpy as np

from data import corpus, filters
from data.curate import decontaminate, files, inputs, mixture
from data.curate.report import StageCounts, write_report
from data.tokenizer import train_tokenizer

PHASES = ("split", "filter", "dedup", "write", "tokenizer", "tokenize", "mix", "report")


class Curator:
  """One curation run (config: configs/data/*.py `get_config()`)."""

  def __init__(self, cfg: Any, workdir: str):
    self.cfg, self.workdir = cfg, workdir
    self.sources = [dict(s) for s in cfg.sources]
    if not self.sources:
      raise ValueError("config.sources is empty")
    names = [s.get("name") for s in self.sources]
    if len(set(names)) != len(names) or not all(names):
      raise ValueError(f"config.sources: every source needs a distinct name, got {names}")
    for s in self.sources:
      if "/" in s["name"] or not s.get("path"):
        raise ValueError(f"config.sources: source {s['name']!r} needs a 'path' and a name "
                         "without '/'")
    if cfg.num_shards < 1:
      raise ValueError(f"config.num_shards must be >= 1, got {cfg.num_shards}")
    self.blocklist = filters.Blocklist(list(cfg.safety.blocklist))

  def path(self, *parts: str) -> str:
    return os.path.join(self.workdir, *parts)

  def shard_path(self, phase: str, shard: int, ext: str) -> str:
    return self.path(phase, f"shard-{shard:05d}.{ext}")

  def setting(self, section: str, field: str, default: Any) -> Any:
    c = self.cfg.get(section)
    return c.get(field, default) if c is not None else default

  # ------------------------------------------------------------------ split
  def split_source(self, index: int) -> None:
    source = self.sources[index]
    marker = self.path("split", source["name"], "stats.json")
    if os.path.exists(marker):
      return
    bad: dict[str, dict[str, int]] = {}
    docs, held = inputs.read_source(source, bad, inputs.held_out_config(self.cfg),
                             self.cfg.get("tfds_data_dir", ""))
    n, k = len(docs), self.cfg.num_shards
    for shard in range(k):
      part = docs[shard * n // k:(shard + 1) * n // k]
      files.atomic_write(self.path("split", source["name"], f"shard-{shard:05d}.jsonl"),
                    "".join(json.dumps(dataclasses.asdict(d), ensure_ascii=False) + "\n"
                            for d in part))
    files.atomic_write(marker, json.dumps({
        "docs": n, "held_out": held, "bad_input": bad,
        "bytes": sum(len(d.text.encode("utf-8")) for d in docs)}))

  def split_stats(self) -> dict[str, dict[str, Any]]:
    return {s["name"]: files.read_json(self.path("split", s["name"], "stats.json"))
            for s in self.sources}

  # ------------------------------------------------------------------ filter
  def decontaminator(self) -> filters.Decontaminator | None:
    if not self.cfg.decontaminate.enabled:
      return None
    os.makedirs(self.workdir, exist_ok=True)
    return decontaminate.load_decontaminator(tuple(self.cfg.decontaminate.eval_tasks),
                           self.cfg.decontaminate.ngram,
                           self.path("decontaminate_index.npy"))

  def quality_rules(self, source: Mapping[str, Any]) -> dict[str, Any]:
    """The config's rules with the source's own `quality` overrides on top."""
    return {**dict(self.cfg.quality.rules), **dict(source.get("quality") or {})}

  def filter_shard(self, shard: int) -> None:
    c = self.cfg
    stats_path = self.shard_path("stage1", shard, "stats.json")
    if os.path.exists(stats_path):
      return
    counts, examples, out = StageCounts(), {}, []
    near = filters.MinHasher(c.near_dedup.num_perm, c.near_dedup.ngram, c.seed)
    deco = self.decontaminator()
    for source in self.sources:
      rules = self.quality_rules(source)
      with open(self.path("split", source["name"], f"shard-{shard:05d}.jsonl"),
                encoding="utf-8") as f:
        docs = [inputs.Document(**json.loads(line)) for line in f]
      for doc in docs:
        counts.add(doc.source, "input", "kept", doc.text)
        text = filters.normalize(doc.text, c.normalize.strip_markup) \
            if c.normalize.enabled else doc.text
        removed = rule = None
        if not text:
          removed = "normalize"
        elif c.quality.enabled and (rule := filters.quality_failure(text, rules)):
          removed = "quality"
        elif c.safety.enabled and (rule := filters.safety_failure(text, self.blocklist)):
          removed = "safety"
        if removed is None and c.pii.enabled:
          text, found = filters.scrub_pii(text)
          if sum(found.values()):
            counts.add(doc.source, "pii", "scrubbed", text)
        if removed is None and deco is not None and deco.contaminated(text):
          removed = "decontaminate"
        if removed:
          counts.add(doc.source, removed, "removed", doc.text)
          ex = examples.setdefault(removed, {}).setdefault(doc.source, [])
          if len(ex) < c.examples_per_filter:
            why = ",".join(self.blocklist.matches(text)) if rule == "blocklist" else \
                rule or removed
            ex.append({"doc_id": doc.doc_id, "provenance": doc.provenance, "rule": why,
                       "text": doc.text[:300]})
          continue
        out.append({"doc_id": doc.doc_id, "source": doc.source, "provenance": doc.provenance,
                    "text": text, "exact": filters.exact_key(text),
                    "minhash": near.signature(text).tolist() if c.near_dedup.enabled else []})
    files.atomic_write(self.shard_path("stage1", shard, "jsonl"),
                  "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out))
    files.atomic_write(stats_path, json.dumps({"counts": counts.data, "examples": examples}))

  def stage1_rows(self, shard: int) -> list[dict[str, Any]]:
    with open(self.shard_path("stage1", shard, "jsonl"), encoding="utf-8") as f:
      return [json.loads(line) for line in f]

  # ------------------------------------------------------------------ dedup
  def deduplicate(self) -> dict[str, Any]:
    path = self.path("dedup.json")
    if os.path.exists(path):
      return files.read_json(path)
    c = self.cfg
    seen, kept, removed = {}, [], {"exact_dedup": [], "near_dedup": []}
    near = filters.NearDuplicates(c.near_dedup.threshold, c.near_dedup.num_perm,
                                  c.near_dedup.ngram, c.seed) if c.near_dedup.enabled else None
    for shard in range(c.num_shards):
      for r in self.stage1_rows(shard):
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
    files.atomic_write(path, json.dumps(result))
    return result

  @functools.cached_property
  def kept(self) -> set[str]:
    return set(self.deduplicate()["kept"])

  # ------------------------------------------------------------------ write
  def write_shard(self, shard: int) -> None:
    # Imported here: TensorFlow is heavy and only this phase needs it.
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    path = self.shard_path("curated", shard, "tfrecord")
    if os.path.exists(path):
      return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with tf.io.TFRecordWriter(tmp) as writer:
      for r in self.stage1_rows(shard):
        if r["doc_id"] in self.kept:
          writer.write(files.tf_example({k: r[k] for k in ("text", "source", "provenance")}))
    os.replace(tmp, path)

  # ------------------------------------------------------------------ tokenize
  def _tokenizing(self) -> bool:
    return bool(self.setting("tokenize", "enabled", False))

  def is_val(self, text: str) -> bool:
    # The pretraining corpus's rule (salted text hash), so both hold out the same documents.
    return corpus.is_validation_document(
        text, float(self.setting("tokenize", "val_fraction", 0.0)))

  def train_tokenizer(self) -> None:
    out = self.path("tokenizer.model")
    if os.path.exists(out):
      return
    t = self.cfg.tokenize
    if t.get("tokenizer_path"):
      shutil.copyfile(os.path.expanduser(t.tokenizer_path), out + ".tmp")
      os.replace(out + ".tmp", out)
      return
    text_path = self.path("tokenizer_train.txt")
    with open(text_path, "w", encoding="utf-8") as f:
      for shard in range(self.cfg.num_shards):
        for r in self.stage1_rows(shard):
          if r["doc_id"] in self.kept and not self.is_val(r["text"]):
            f.write(r["text"] + "\n")  # the trainer reads lines; joining loses nothing
    symbols = [s.strip() for s in t.get("user_defined_symbols", "").split(",") if s.strip()]
    train_tokenizer([text_path], out + ".tmp.model", vocab_size=t.vocab_size,
                    model_type=t.get("model_type", "bpe"),
                    byte_fallback=t.get("byte_fallback", False), user_defined_symbols=symbols)
    os.replace(out + ".tmp.model", out)
    os.remove(text_path)

  def tokenize_shard(self, shard: int) -> None:
    path = self.shard_path("tokens", shard, "npz")
    if os.path.exists(path):
      return
    tok = files.cached_tokenizer(self.path("tokenizer.model"))
    rows = [r for r in self.stage1_rows(shard) if r["doc_id"] in self.kept]
    ids = tok.encode_batch([r["text"] for r in rows]) if rows else []
    if self.setting("tokenize", "add_eos", True):
      ids = [x + [tok.eos_id] for x in ids]
    keep = [i for i, x in enumerate(ids) if len(x) >= 2]  # at least one next-token target
    names = [s["name"] for s in self.sources]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.npz"
    np.savez(tmp,
             tokens=np.concatenate([np.asarray(ids[i], np.int32) for i in keep])
             if keep else np.zeros([0], np.int32),
             lengths=np.asarray([len(ids[i]) for i in keep], np.int64),
             source=np.asarray([names.index(rows[i]["source"]) for i in keep], np.int32),
             val=np.asarray([self.is_val(rows[i]["text"]) for i in keep], bool),
             chars=np.asarray([len(rows[i]["text"]) for i in keep], np.int64))
    os.replace(tmp, path)

  def mix(self) -> dict[str, Any]:
    return mixture.write_mixture(self)

  # ------------------------------------------------------------------ the run
  def _units(self, phase: str) -> list[int]:
    return list(range(len(self.sources))) if phase == "split" else \
        list(range(self.cfg.num_shards))

  def _check_done(self, phase: str) -> None:
    """Raises unless every unit of `phase` has its marker (cluster mode barrier)."""
    marker = {"split": lambda u: self.path("split", self.sources[u]["name"], "stats.json"),
              "filter": lambda u: self.shard_path("stage1", u, "stats.json"),
              "write": lambda u: self.shard_path("curated", u, "tfrecord"),
              "tokenize": lambda u: self.shard_path("tokens", u, "npz"),
              "dedup": lambda u: self.path("dedup.json"),
              "tokenizer": lambda u: self.path("tokenizer.model")}[phase]
    units = self._units(phase) if phase not in ("dedup", "tokenizer") else [0]
    missing = [u for u in units if not os.path.exists(marker(u))]
    if missing:
      raise RuntimeError(f"phase {phase!r} is incomplete in {self.workdir}: units "
                         f"{missing} have no output; run --phase={phase} on every process "
                         "first")

  def run(self, workers: int = 1, phases: Sequence[str] = PHASES, process_index: int = 0,
          process_count: int = 1, log: Callable[[str], None] | None = None
          ) -> dict[str, Any] | None:
    """Runs `phases` (all by default) for this process; returns the report when the
    report phase ran here."""
    log = log or (lambda s: print(s, flush=True))
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
      raise ValueError(f"unknown phases {unknown}; expected some of {PHASES}")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    per_unit = {"split": "split_source", "filter": "filter_shard", "write": "write_shard",
                "tokenize": "tokenize_shard"}
    single = {"dedup": self.deduplicate, "tokenizer": self.train_tokenizer, "mix": self.mix,
              "report": self.report}
    needs = {"filter": "split", "dedup": "filter", "write": "dedup", "tokenizer": "dedup",
             "tokenize": "tokenizer", "mix": "tokenize", "report": "dedup"}
    report = None
    for phase in PHASES:
      if phase not in phases:
        continue
      if phase in ("tokenizer", "tokenize", "mix") and not self._tokenizing():
        continue
      if phase in needs:
        self._check_done(needs[phase])
      start = time.time()
      if phase == "filter":
        self.decontaminator()  # built once here, loaded by the pool workers
      if phase in per_unit:
        units = [u for u in self._units(phase) if u % process_count == process_index]
        if workers > 1 and len(units) > 1:
          with multiprocessing.get_context("spawn").Pool(min(workers, len(units))) as pool:
            pool.starmap(_run_unit, [(self.cfg.to_dict(), self.workdir, per_unit[phase], u)
                                     for u in units])
        else:
          for u in units:
            getattr(self, per_unit[phase])(u)
      elif process_index == 0:
        result = single[phase]()
        if phase == "report":
          report = result
      else:
        continue
      log(f"curate: phase {phase} done in {time.time() - start:.1f}s")
    return report


  # ------------------------------------------------------------------ report
  def report(self) -> dict[str, Any]:
    return write_report(self)


def _run_unit(cfg_dict: dict, workdir: str, method: str, unit: int) -> None:
  """One unit of a per-unit phase, in a pool worker (the config travels as a dict)."""
  getattr(Curator(ml_collections.ConfigDict(cfg_dict), workdir), method)(unit)
