"""Benchmark: datatrove (Hugging Face's curation library) as the peer of data.curate.

  python benchmarks/curate_peer.py [--config=configs/data/shared.py] [--workers=1,2]
  [--word_tokenizer=whitespace|spacy] [--verbose]
  (needs `pip install -e .[peers]`: datatrove, orjson for its jsonl reader/writer, spaCy
  for its English word tokenizer, xxhash < 4 for its default n-gram hash)

The documents are exactly those data.curate's filters receive: every source of the config
read by `data.curate.inputs.read_source` with the config's held-out rules, written once
(timed separately: `read_seconds`) to two jsonl files of contiguous halves (`id`, `text`,
`source`); each worker count then runs datatrove 0.10.1 on them from scratch, as
`LocalPipelineExecutor`s with tasks = workers (the minhash bucket stage: one task per band):

  1 filter   JsonlReader -> GopherQualityFilter -> GopherRepetitionFilter -> RegexFilter
             (blocklist) -> PIIFormatter -> NGramsDecontFilter -> JsonlWriter
  2 minhash  MinhashDedupSignature  (JsonlReader of stage 1's output)
  3          MinhashDedupBuckets    (tasks = bands)
  4          MinhashDedupCluster    (1 task)
  5          JsonlReader -> MinhashDedupFilter -> JsonlWriter (uncompressed, like our shards)

Comparable to data.curate's filter + dedup phases:
- Gopher quality rules with the config's thresholds per source (`BySource` dispatches on the
  document's source to one GopherQualityFilter each: min/max words, mean word length,
  '#'/ellipsis-to-word ratio, bullet and ellipsis lines, alphabetic-word fraction);
  Gopher's stop-word rule is off (ours has none). GopherRepetitionFilter with only the two
  rules ours has: duplicate-line fraction 0.3 and the top-2-gram character fraction
  (0.2, or the source's override); its other repetition rules are off.
- Blocklist: a RegexFilter with the same whole-phrase, case-insensitive pattern as
  `filters.Blocklist`. PII: e-mails and all IPv4 addresses (not only public ones) replaced by
  <EMAIL> / <IP_ADDRESS>.
- Decontamination: 13-grams against the same evaluation texts (`data.curate.eval_texts` of
  the config's tasks). datatrove's NGramsDecontIndexer needs lighteval and its task
  registry (a hub download), so the index file (`*.index.hashes`, uint64) is written here,
  with the NGramsDecontFilter's own tokenizer, text normalisation and hash function;
  building it is inside the timed run, serial, as ours is.
- MinHash: word 5-grams, 11 bands x 11 rows (= `filters.lsh_bands(0.8, 128)`: our 128
  permutations with the 121 that banding uses), 64-bit xxhash shingles.
Words: by default every step splits on whitespace (`WhitespaceWords`, passed as the steps'
`language`, which datatrove allows): Gopher's rules then count the words ours count
(`text.split()`), and after datatrove's n-gram normalisation (lower case, punctuation
removed, digits folded) whitespace words are close to ours (`\w+` runs).
`--word_tokenizer=spacy` uses datatrove's English default instead (spaCy, blank "en"):
7x slower here (workers=1: 240 s, 84 docs/s on a busy machine) and harsher, since it counts
punctuation tokens as words in the alphabetic-word rule (3,448 of 7,222 Shakespeare
speeches fail it; 15,373 kept).

Not comparable (left out or different): our normalisation (NFC, control characters, HTML;
datatrove's FTFYFormatter is another fix); phone-number scrubbing (PIIFormatter has none);
exact dedup as its own step (identical texts of >= 5 words share every band here); MinHash
confirmation (datatrove removes every document that shares a band with an earlier one;
ours confirms a candidate by >= 0.8 signature agreement). datatrove's rules also decide
differently on short or raw text: its top-2-gram rule counts a 2-gram that occurs once
(1,061 short Shakespeare speeches fail it; ours, with repeats only: 74) and its
duplicate-line rule sees WikiText's whitespace-only lines, which our normalisation strips
(45 of 60 articles fail it), so it keeps about 18,370 documents where ours keeps about
19,420. Not in either figure: our write / tokenizer / tokenize / mix / report phases are in
curate_throughput.py's figure but have no datatrove counterpart here.

Last line: JSON with peer_docs_per_sec_N, peer_mb_per_sec_N, peer_seconds_N,
peer_kept_N for each worker count, peer_docs_per_sec (the largest worker count's),
documents, mb and read_seconds.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Any

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

try:
  from datatrove.executor import LocalPipelineExecutor
  from datatrove.pipeline.decont import NGramsDecontConfig, NGramsDecontFilter
  from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets,
                                                MinhashDedupCluster, MinhashDedupFilter,
                                                MinhashDedupSignature)
  from datatrove.pipeline.filters import (GopherQualityFilter, GopherRepetitionFilter,
                                          RegexFilter)
  from datatrove.pipeline.filters.base_filter import BaseFilter
  from datatrove.pipeline.formatters import PIIFormatter
  from datatrove.pipeline.readers import JsonlReader
  from datatrove.pipeline.writers import JsonlWriter
  from datatrove.utils.text import ngrams, simplify_text
  from datatrove.utils.word_tokenizers import WordTokenizer, load_word_tokenizer
except ImportError as e:  # the `peers` extra is not installed
  print(f"error: datatrove is not importable ({e}); pip install -e .[peers]", file=sys.stderr)
  sys.exit(2)

from data import filters
from data.curate import eval_texts
from data.curate.inputs import held_out_config, read_source

FLAGS = flags.FLAGS
flags.DEFINE_string("config", os.path.join(REPO, "configs/data/shared.py"),
                    "Curation config file (a configs/data/*.py).")
flags.DEFINE_string("workers", "1,2", "Comma-separated worker counts to time.")
flags.DEFINE_enum("word_tokenizer", "whitespace", ["whitespace", "spacy"],
                  "Words of every datatrove step: whitespace-separated (as data.filters' "
                  "Gopher rules count them) or datatrove's English default (spaCy).")
flags.DEFINE_bool("verbose", False, "Show datatrove's log on the console.")

NUM_FILES = 2  # input files: the most tasks a worker count here can use


def load_config(path: str) -> Any:
  spec = importlib.util.spec_from_file_location("curate_cfg", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def write_docs(cfg: Any, out_dir: str, num_files: int = NUM_FILES) -> dict[str, Any]:
  """The config's documents (held-out rules applied) -> `num_files` jsonl files of
  contiguous ranges in `out_dir`; returns documents, bytes (UTF-8 text) and seconds."""
  start = time.time()
  docs, bad = [], {}
  for source in cfg.sources:
    docs += read_source(source, bad, held_out_config(cfg), cfg.get("tfds_data_dir", ""))[0]
  os.makedirs(out_dir, exist_ok=True)
  n = len(docs)
  for i in range(num_files):
    with open(os.path.join(out_dir, f"docs-{i:05d}.jsonl"), "w", encoding="utf-8") as f:
      for d in docs[i * n // num_files:(i + 1) * n // num_files]:
        f.write(json.dumps({"id": d.doc_id, "text": d.text, "source": d.source},
                           ensure_ascii=False) + "\n")
  return {"documents": n, "bytes": sum(len(d.text.encode("utf-8")) for d in docs),
          "seconds": time.time() - start}


class WhitespaceWords(WordTokenizer):
  """Whitespace-separated words: the unit of data.filters' Gopher rules (`text.split()`);
  after datatrove's text normalisation (no punctuation) also that of its n-gram steps."""

  def __init__(self):
    super().__init__("whitespace")

  def word_tokenize(self, text: str) -> list[str]:
    return text.split()

  def sent_tokenize(self, text: str) -> list[str]:
    raise NotImplementedError("no step here splits sentences")

  def span_tokenize(self, text: str) -> list[tuple[int, int]]:
    raise NotImplementedError("no step here splits sentences")


def word_tokenizer(kind: str) -> WordTokenizer | str:
  """The `language` argument of the datatrove steps: a tokenizer, or "eng" (spaCy)."""
  return WhitespaceWords() if kind == "whitespace" else "eng"


class BySource(BaseFilter):
  """One datatrove filter per source (the config's per-source quality overrides)."""

  name = "by source"

  def __init__(self, per_source: dict[str, BaseFilter]):
    super().__init__()
    self.per_source = per_source

  def filter(self, doc):
    return self.per_source[doc.metadata["source"]].filter(doc)


def quality_steps(cfg: Any, language: WordTokenizer | str) -> list[BaseFilter]:
  """Gopher quality and repetition filters with the config's thresholds per source."""
  quality, repetition = {}, {}
  for source in cfg.sources:
    r = {**filters.QUALITY_DEFAULTS, **dict(cfg.quality.rules),
         **dict(source.get("quality") or {})}
    quality[source["name"]] = GopherQualityFilter(
        min_doc_words=r["min_words"], max_doc_words=r["max_words"],
        min_avg_word_length=r["min_mean_word_length"],
        max_avg_word_length=r["max_mean_word_length"],
        max_symbol_word_ratio=r["max_symbol_to_word_ratio"],
        max_bullet_lines_ratio=r["max_bullet_line_fraction"],
        max_ellipsis_lines_ratio=r["max_ellipsis_line_fraction"],
        max_non_alpha_words_ratio=r["min_alpha_word_fraction"], min_stop_words=None,
        language=language)
    repetition[source["name"]] = GopherRepetitionFilter(
        dup_line_frac=r["max_duplicate_line_fraction"], dup_para_frac=None,
        dup_line_char_frac=None, dup_para_char_frac=None,
        top_n_grams=((2, r["max_top_2gram_fraction"]),), dup_n_grams=(),
        language=language)
  return [BySource(quality), BySource(repetition)]


def write_decont_index(cfg: Any, index_dir: str, language: WordTokenizer | str
                       ) -> NGramsDecontFilter:
  """datatrove's decontamination filter over an index of the evaluation texts' n-grams,
  hashed as the filter hashes documents (what NGramsDecontIndexer would write)."""
  import numpy as np
  config = NGramsDecontConfig(n_grams=cfg.decontaminate.ngram, find_query_ngrams=True)
  decont = NGramsDecontFilter(index_dir, config=config, language=language)
  tokenizer = copy.copy(load_word_tokenizer(language))  # spaCy loads here, not in the step
  hashes = set()
  for text in eval_texts(list(cfg.decontaminate.eval_tasks), cfg.decontaminate.ngram):
    tokens = tokenizer.word_tokenize(simplify_text(text, config.norm_config))
    hashes.update(map(decont.hash_func, map(" ".join, ngrams(tokens, config.n_grams))))
  os.makedirs(index_dir, exist_ok=True)
  np.array(sorted(hashes), np.uint64).tofile(os.path.join(index_dir, "eval.index.hashes"))
  return decont


@contextlib.contextmanager
def stderr_to(path: str | None):
  """fd 2 -> `path` (datatrove's loguru sinks and its worker processes write there)."""
  if path is None:
    yield
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with open(path, "a") as f:
    os.dup2(f.fileno(), 2)
  try:
    yield
  except BaseException:
    sys.stderr.flush()
    os.dup2(saved, 2)
    with open(path, encoding="utf-8", errors="replace") as f:  # the log's tail, then raise
      sys.stderr.write("".join(f.readlines()[-30:]))
    raise
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)


def run_peer(docs_jsonl: str, workers: int, cfg: Any = None, workdir: str = "",
             words: str = "whitespace", quiet: bool = True) -> dict[str, Any]:
  """datatrove's filter + MinHash dedup pipeline on `docs_jsonl` (a folder of jsonl files,
  or one file; records `id`, `text`, `source`) with tasks = workers; `words`: whitespace or
  spacy (see the module doc). Returns documents, mb, seconds (wall: the decontamination
  index and every stage), docs_per_sec, mb_per_sec, after_filters, kept, the seconds per
  phase and the 1-minute load average before and after. With workers > 1 datatrove starts
  its tasks by forkserver, which imports the caller's main module: guard its script code
  with `if __name__ == "__main__"`."""
  cfg = cfg or load_config(os.path.join(REPO, "configs/data/shared.py"))
  own = not workdir
  workdir = workdir or tempfile.mkdtemp(prefix=f"peer_w{workers}_")
  os.makedirs(workdir, exist_ok=True)
  if os.path.isfile(docs_jsonl):
    src, pattern = os.path.dirname(docs_jsonl) or ".", os.path.basename(docs_jsonl)
  else:
    src, pattern = docs_jsonl, "*.jsonl"
  documents, nbytes = 0, 0
  for name in sorted(os.listdir(src)):
    if re.fullmatch(pattern.replace(".", r"\.").replace("*", ".*"), name):
      with open(os.path.join(src, name), encoding="utf-8") as f:
        for line in f:
          documents += 1
          nbytes += len(json.loads(line)["text"].encode("utf-8"))
  d = lambda *p: os.path.join(workdir, *p)  # noqa: E731
  bands, rows = filters.lsh_bands(cfg.near_dedup.threshold, cfg.near_dedup.num_perm)
  minhash = MinhashConfig(n_grams=cfg.near_dedup.ngram, num_buckets=bands,
                          hashes_per_bucket=rows)
  terms = sorted({t.strip().lower() for t in cfg.safety.blocklist if t.strip()}, key=len,
                 reverse=True)  # filters.Blocklist's pattern
  blocklist = r"(?i)\b(" + "|".join(map(re.escape, terms)) + r")\b"
  language = word_tokenizer(words)
  phases, start, load = {}, time.time(), os.getloadavg()[0]
  with stderr_to(d("datatrove.log") if quiet else None):
    t = time.time()
    decont = write_decont_index(cfg, d("decont_index"), language)
    phases["decont_index"] = time.time() - t
    stages = {
        "filter": ([JsonlReader(src, glob_pattern=pattern, recursive=False),
                    *quality_steps(cfg, language), RegexFilter(blocklist),
                    PIIFormatter(only_remove_public_ips=False, email_replacement="<EMAIL>",
                                 ip_replacement="<IP_ADDRESS>"),
                    decont, JsonlWriter(d("filtered"), compression=None)], workers),
        "signatures": ([JsonlReader(d("filtered")),
                        MinhashDedupSignature(d("signatures"), config=minhash,
                                              language=language)], workers),
        "buckets": ([MinhashDedupBuckets(d("signatures"), d("buckets"), config=minhash)],
                    bands),
        "cluster": ([MinhashDedupCluster(d("buckets"), d("remove_ids"), config=minhash)], 1),
        "dedup": ([JsonlReader(d("filtered")), MinhashDedupFilter(d("remove_ids")),
                   JsonlWriter(d("output"), compression=None)], workers),
    }
    for name, (pipeline, tasks) in stages.items():
      t = time.time()
      LocalPipelineExecutor(pipeline, tasks=tasks, workers=min(workers, tasks),
                            logging_dir=d("logs", name)).run()
      phases[name] = time.time() - t
  seconds = time.time() - start
  kept = sum(sum(1 for _ in open(os.path.join(d("output"), f), encoding="utf-8"))
             for f in os.listdir(d("output")))
  filtered = sum(sum(1 for _ in open(os.path.join(d("filtered"), f), encoding="utf-8"))
                 for f in os.listdir(d("filtered")))
  if own:
    shutil.rmtree(workdir)
  mb = nbytes / 1e6
  return {"documents": documents, "mb": round(mb, 3), "seconds": round(seconds, 2),
          "docs_per_sec": round(documents / seconds, 1),
          "mb_per_sec": round(mb / seconds, 4), "after_filters": filtered, "kept": kept,
          "phases": {k: round(v, 2) for k, v in phases.items()},
          "load_avg_1m": [round(load, 2), round(os.getloadavg()[0], 2)]}


def main(argv):
  del argv
  if not os.path.isfile(FLAGS.config):
    print(f"error: --config: no such file {FLAGS.config}", file=sys.stderr)
    sys.exit(2)
  if not re.fullmatch(r"[1-9]\d*(,[1-9]\d*)*", FLAGS.workers):
    print(f"error: --workers={FLAGS.workers!r}: expected positive integers, comma-separated",
          file=sys.stderr)
    sys.exit(2)
  cfg = load_config(FLAGS.config)
  tmp = tempfile.mkdtemp(prefix="curate_peer_")
  try:
    read = write_docs(cfg, os.path.join(tmp, "docs"))
    print(f"read {read['documents']} documents ({read['bytes'] / 1e6:.2f} MB) in "
          f"{read['seconds']:.1f}s (not in the figures)", flush=True)
    out = {"documents": read["documents"], "mb": round(read["bytes"] / 1e6, 3),
           "read_seconds": round(read["seconds"], 1)}
    workers = [int(w) for w in FLAGS.workers.split(",")]
    for w in workers:
      r = run_peer(os.path.join(tmp, "docs"), w, cfg, os.path.join(tmp, f"w{w}"),
                   FLAGS.word_tokenizer, quiet=not FLAGS.verbose)
      print(f"datatrove workers={w}: {r['documents']} documents ({r['mb']:.2f} MB) in "
            f"{r['seconds']:.1f}s -> {r['docs_per_sec']:.0f} docs/s, "
            f"{r['mb_per_sec']:.3f} MB/s; {r['after_filters']} after filters, "
            f"{r['kept']} kept; phases {r['phases']}; load average {r['load_avg_1m']}",
            flush=True)
      out.update({f"peer_docs_per_sec_{w}": r["docs_per_sec"],
                  f"peer_mb_per_sec_{w}": r["mb_per_sec"],
                  f"peer_seconds_{w}": r["seconds"], f"peer_kept_{w}": r["kept"],
                  f"peer_phases_{w}": r["phases"], f"load_avg_1m_{w}": r["load_avg_1m"]})
    out["peer_docs_per_sec"] = out[f"peer_docs_per_sec_{max(workers)}"]
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  print(json.dumps(out))


if __name__ == "__main__":
  app.run(main)
