"""Benchmark: data.filters' MinHash + LSH banding against datasketch's, on the shared corpora.

  python benchmarks/minhash_speed.py [--config=configs/data/shared.py] [--repeats=3]
  (datasketch: `pip install -e .[peers]`)

Documents: every source of the config read by `data.curate.inputs.read_source` with its
held-out rules, then `filters.normalize`d (what the curation computes signatures of; not
timed). Both sides hash the same shingles, `MinHasher.shingles` (lower-cased word 5-grams),
with 128 permutations; datasketch (2.x, `affine32` scheme, its default SHA-1 32-bit hash
of each shingle's UTF-8 bytes) has other hash functions, so the signatures differ and the
comparison is of the duplicate pairs found. Figures are documents per CPU second of
this process (the least of `--repeats` round-robin runs; CPU time, so other processes on
the machine do not count):

  sigs_per_sec_ours         the hand-written vectorised MinHash data/filters.py had before
                            it moved to datasketch (kept below as `HandWrittenMinHasher`,
                            for this comparison): shingles, blake2b per shingle, the
                            universal hashes vectorised in numpy over [shingles, 128]
  sigs_per_sec_project      data.filters.MinHasher now: datasketch's `legacy` scheme with
                            that version's blake2b hash and (a, b) draws, so the same
                            signatures (project_equals_ours checks every one)
  sigs_per_sec_datasketch   per document a copy of one template MinHash (as a Beam DoFn
                            would build it in setup()), update_batch(shingle bytes);
                            MinHash.bulk does the same (sigs_per_sec_datasketch_bulk)
  sigs_per_sec_datasketch_new  a new MinHash(num_perm=128) per document (draws its
                            permutations each time: the slow way)
  sigs_per_sec_datasketch_xxhash  the template form with hashfunc=xxhash.xxh32_intdigest
                            (when xxhash is installed), the faster hash datasketch's docs
                            suggest; its pairs: pairs_datasketch_xxhash
  (shingling alone: shingles_per_sec; it is inside all of them)
  dedup_per_sec_ours        filters.NearDuplicates.add_signature in document order:
                            band lookup, confirmation by signature agreement >= 0.8,
                            insert (11 bands x 11 rows, `filters.lsh_bands(0.8, 128)`)
  dedup_per_sec_datasketch  the same greedy loop on MinHashLSH(threshold=0.8,
                            num_perm=128) (its own optimum: 9 bands x 13 rows): query,
                            confirm with MinHash.jaccard >= 0.8, insert
  insert_per_sec_datasketch / query_per_sec_datasketch  MinHashLSH insert of every
                            document, then a query of every document
  band_keys_per_sec_ours    the Beam form of our LSH: each document's 11 band keys
                            (what the pipeline groups with GroupByKey)

Agreement: near-duplicate pairs = pairs sharing a band whose signatures agree on >= 0.8
of the permutations (ours: documents grouped by band key, as the Beam pipeline does;
datasketch: MinHashLSH query of every document, MinHash.jaccard). Each pair is checked
against the exact Jaccard of its shingle sets (`true_*`: exact >= 0.8). Also the documents
the greedy loops remove (`removed_*`).

Last line: JSON with the figures above and the agreement counts.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import time
from itertools import combinations
from typing import Any, Callable

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

try:
  from datasketch import MinHash, MinHashLSH
except ImportError as e:
  print(f"error: datasketch is not importable ({e}); pip install -e .[peers]",
        file=sys.stderr)
  sys.exit(2)
import numpy as np
try:
  import xxhash  # optional: the datasketch variant with a fast shingle hash
except ImportError:
  xxhash = None

from data import filters
from data.curate.inputs import held_out_config, read_source

FLAGS = flags.FLAGS
flags.DEFINE_string("config", os.path.join(REPO, "configs/data/shared.py"),
                    "Curation config file (a configs/data/*.py).")
flags.DEFINE_integer("repeats", 3, "Round-robin runs per figure; the least CPU time counts.")

THRESHOLD, NUM_PERM, NGRAM = 0.8, 128, 5


def documents(config_path: str) -> list[str]:
  spec = importlib.util.spec_from_file_location("curate_cfg", config_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  texts, bad = [], {}
  for source in cfg.sources:
    docs, _ = read_source(source, bad, held_out_config(cfg), cfg.get("tfds_data_dir", ""))
    texts += [filters.normalize(d.text) for d in docs]
  return [t for t in texts if t]


def timed(variants: dict[str, Callable[[], Any]], repeats: int
          ) -> tuple[dict[str, float], dict[str, Any]]:
  """Each variant `repeats` times, round robin (so a busy spell of the machine touches all
  alike); the least CPU seconds of this process per variant, and each one's last result.
  CPU time, not wall time: every variant is single-threaded, and CPU time does not count
  the time other processes hold the cores."""
  seconds, results = {k: float("inf") for k in variants}, {}
  for _ in range(repeats):
    for name, fn in variants.items():
      start = time.process_time()
      results[name] = fn()
      seconds[name] = min(seconds[name], time.process_time() - start)
  return seconds, results


class HandWrittenMinHasher(filters.MinHasher):
  """data/filters.py's MinHasher before it used datasketch (the figures that decided it):
  `num_perm` universal hashes a*x + b mod (2^61 - 1) of each shingle's blake2b-64 hash,
  vectorised over shingles with numpy."""

  _PRIME, _MASK32 = np.uint64((1 << 61) - 1), np.uint64(0xFFFFFFFF)

  def __init__(self, num_perm: int = 128, ngram: int = 5, seed: int = 0):
    super().__init__(num_perm, ngram, seed)
    rng = np.random.default_rng(seed)
    self.a = rng.integers(1, (1 << 61) - 1, num_perm, dtype=np.uint64)
    self.b = rng.integers(0, (1 << 61) - 1, num_perm, dtype=np.uint64)

  def signature(self, text: str) -> np.ndarray:
    shingles = self.shingles(text)
    if not shingles:
      return np.full(self.num_perm, np.iinfo(np.uint32).max, np.uint64)
    hv = np.fromiter((int.from_bytes(hashlib.blake2b(x.encode("utf-8"), digest_size=8)
                                     .digest(), "little") for x in sorted(shingles)),
                     np.uint64)
    hv = (hv & self._MASK32)[:, None]  # [S, 1]
    with np.errstate(over="ignore"):  # the hash family wraps in uint64 by design
      values = ((hv * self.a[None] + self.b[None]) % self._PRIME) & self._MASK32
    return values.min(axis=0)


def ours_pairs(sigs: list[np.ndarray], bands: int, rows: int) -> set[tuple[int, int]]:
  """Pairs sharing a band key (grouped, as Beam's GroupByKey) with >= THRESHOLD agreement."""
  groups: dict[tuple[int, bytes], list[int]] = {}
  for i, sig in enumerate(sigs):
    for b in range(bands):
      groups.setdefault((b, sig[b * rows:(b + 1) * rows].tobytes()), []).append(i)
  pairs = set()
  for members in groups.values():
    for i, j in combinations(members, 2):
      if (i, j) not in pairs and float(np.mean(sigs[i] == sigs[j])) >= THRESHOLD:
        pairs.add((i, j))
  return pairs


def datasketch_pairs(mhs: list[MinHash], lsh: MinHashLSH) -> set[tuple[int, int]]:
  pairs = set()
  for i, m in enumerate(mhs):
    for j in lsh.query(m):
      if j > i and m.jaccard(mhs[j]) >= THRESHOLD:
        pairs.add((i, j))
  return pairs


def greedy_datasketch(mhs: list[MinHash]) -> set[int]:
  """Document order; a document is removed when an earlier kept one confirms >= 0.8."""
  lsh, removed = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM), set()
  for i, m in enumerate(mhs):
    if any(m.jaccard(mhs[j]) >= THRESHOLD for j in lsh.query(m)):
      removed.add(i)
    else:
      lsh.insert(i, m)
  return removed


def greedy_ours(sigs: list[np.ndarray]) -> set[int]:
  nd = filters.NearDuplicates(THRESHOLD, NUM_PERM, NGRAM)
  return {i for i, sig in enumerate(sigs) if nd.add_signature(str(i), sig) is not None}


def main(argv):
  del argv
  if not os.path.isfile(FLAGS.config):
    print(f"error: --config: no such file {FLAGS.config}", file=sys.stderr)
    sys.exit(2)
  if FLAGS.repeats < 1:
    print(f"error: --repeats={FLAGS.repeats}: expected >= 1", file=sys.stderr)
    sys.exit(2)
  r = FLAGS.repeats
  texts = documents(FLAGS.config)
  n, mb = len(texts), sum(len(t.encode("utf-8")) for t in texts) / 1e6
  hasher = HandWrittenMinHasher(NUM_PERM, NGRAM)
  project = filters.MinHasher(NUM_PERM, NGRAM)  # datasketch, legacy scheme: the same values
  bands, rows = filters.lsh_bands(THRESHOLD, NUM_PERM)
  out: dict[str, Any] = {"documents": n, "mb": round(mb, 3), "num_perm": NUM_PERM,
                         "ngram": NGRAM, "threshold": THRESHOLD,
                         "load_avg_1m_start": round(os.getloadavg()[0], 2)}

  shingle_bytes = lambda x: [s.encode("utf-8") for s in hasher.shingles(x)]  # noqa: E731

  def ds_new():  # a fresh MinHash per document: its permutations are drawn every time
    mhs = []
    for x in texts:
      m = MinHash(num_perm=NUM_PERM)
      m.update_batch(shingle_bytes(x))
      mhs.append(m)
    return mhs

  def ds_copy(template: MinHash) -> list[MinHash]:  # a DoFn's form: template from setup()
    mhs = []
    for x in texts:
      m = template.copy()
      m.update_batch(shingle_bytes(x))
      mhs.append(m)
    return mhs

  variants = {
      "shingles": lambda: [hasher.shingles(x) for x in texts],
      "ours": lambda: [hasher.signature(x) for x in texts],
      "project": lambda: [project.signature(x) for x in texts],
      "datasketch_new": ds_new,
      "datasketch": lambda: ds_copy(MinHash(num_perm=NUM_PERM)),
      "datasketch_bulk": lambda: MinHash.bulk([shingle_bytes(x) for x in texts],
                                              num_perm=NUM_PERM)}
  if xxhash is not None:  # datasketch's docs suggest a faster hash than its SHA-1 default
    variants["datasketch_xxhash"] = lambda: ds_copy(
        MinHash(num_perm=NUM_PERM, hashfunc=xxhash.xxh32_intdigest))
  t, res = timed(variants, r)
  out["shingles_per_sec"] = round(n / t.pop("shingles"), 1)
  out.update({f"sigs_per_sec_{k}": round(n / v, 1) for k, v in t.items()})
  shingles, sigs, mhs = res["shingles"], res["ours"], res["datasketch"]
  out["project_equals_ours"] = all(np.array_equal(x, y) for x, y in zip(sigs, res["project"]))
  mhs_xx = res.get("datasketch_xxhash")
  assert all(np.array_equal(a.hashvalues, b.hashvalues)
             for a, b in zip(mhs, res["datasketch_bulk"]))

  def insert_all():
    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM)
    for i, m in enumerate(mhs):
      lsh.insert(i, m)
    return lsh
  t, res = timed({
      "dedup_ours": lambda: greedy_ours(sigs),
      "band_keys_ours": lambda: [sig[b * rows:(b + 1) * rows].tobytes() for sig in sigs
                                 for b in range(bands)],
      "dedup_datasketch": lambda: greedy_datasketch(mhs),
      "insert_datasketch": insert_all}, r)
  lsh = res["insert_datasketch"]
  t.update(timed({"query_datasketch": lambda: [lsh.query(m) for m in mhs]}, r)[0])
  out.update({f"{k.rsplit('_', 1)[0]}_per_sec_{k.rsplit('_', 1)[1]}": round(n / v, 1)
              for k, v in t.items()})
  removed_ours, removed_ds = res["dedup_ours"], res["dedup_datasketch"]
  out["bands_rows_ours"], out["bands_rows_datasketch"] = [bands, rows], [lsh.b, lsh.r]

  p_ours, p_ds = ours_pairs(sigs, bands, rows), datasketch_pairs(mhs, lsh)
  if mhs_xx is not None:
    lsh_xx = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM)
    for i, m in enumerate(mhs_xx):
      lsh_xx.insert(i, m)
    p_xx = datasketch_pairs(mhs_xx, lsh_xx)
    out.update({"pairs_datasketch_xxhash": len(p_xx),
                "pairs_datasketch_xxhash_and_ours": len(p_xx & p_ours)})
  exact = {p: len(shingles[p[0]] & shingles[p[1]]) / max(len(shingles[p[0]] |
                                                            shingles[p[1]]), 1)
           for p in p_ours | p_ds}
  true = {p for p, j in exact.items() if j >= THRESHOLD}
  out.update({"pairs_ours": len(p_ours), "pairs_datasketch": len(p_ds),
              "pairs_both": len(p_ours & p_ds), "pairs_only_ours": len(p_ours - p_ds),
              "pairs_only_datasketch": len(p_ds - p_ours),
              "true_pairs_ours": len(p_ours & true), "true_pairs_datasketch": len(p_ds & true),
              "true_pairs_union": len(true),
              "removed_ours": len(removed_ours), "removed_datasketch": len(removed_ds),
              "removed_both": len(removed_ours & removed_ds)})
  out["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
  for p in sorted(p_ours ^ p_ds)[:5]:  # what the two disagree on
    print(f"pair {p} only {'ours' if p in p_ours else 'datasketch'}: exact Jaccard "
          f"{exact[p]:.3f}; {texts[p[0]][:60]!r} / {texts[p[1]][:60]!r}")
  print(f"{n} documents ({mb:.2f} MB); signatures/s: ours {out['sigs_per_sec_ours']:.0f}, "
        f"datasketch {out['sigs_per_sec_datasketch']:.0f} (xxhash "
        f"{out.get('sigs_per_sec_datasketch_xxhash', 0):.0f}); greedy dedup docs/s: ours "
        f"{out['dedup_per_sec_ours']:.0f}, datasketch {out['dedup_per_sec_datasketch']:.0f}; "
        f"pairs ours {len(p_ours)}, datasketch {len(p_ds)}, both {len(p_ours & p_ds)}")
  print(json.dumps(out))


if __name__ == "__main__":
  app.run(main)
