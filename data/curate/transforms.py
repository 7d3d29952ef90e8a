"""The curation's document transforms (Beam DoFns and PTransforms): reading, the filters,
exact and near deduplication. Documents travel as tuples `(key, provenance, text)` with
`key = (source index, file index, record index)`, the document order: where duplicates
meet, the smallest key is kept (first occurrence).

Counts and removed examples leave `FilterDocs` as tagged outputs, aggregated per bundle
(`finish_bundle`) so the statistics cost a few elements per bundle, not one per document.
"""

from __future__ import annotations

import collections
import itertools
from typing import Any, Iterable, Iterator, Mapping, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.transforms.window import GlobalWindows

from data import filters
from data.curate import decontaminate, inputs

Key = tuple[int, int, int]
Doc = tuple[Key, str, str]   # (key, provenance, text)


class ReadFile(beam.DoFn):
  """(source index, file index, path) -> its documents; the file's statistics (documents,
  UTF-8 bytes, held-out count, bad input) as the tagged output "files"."""

  def __init__(self, sources: Sequence[Mapping[str, Any]], held_out: Mapping[str, Any],
               tfds_data_dir: str):
    self.sources, self.held_out, self.tfds_data_dir = sources, held_out, tfds_data_dir

  def process(self, unit: tuple[int, int, str]) -> Iterator[Any]:
    s, f, path = unit
    bad: dict[str, dict[str, int]] = {}
    pieces, held = inputs.read_file(self.sources[s], path, bad, self.held_out,
                                    self.tfds_data_dir)
    size = 0
    for r, (text, provenance) in enumerate(pieces):
      size += len(text.encode("utf-8"))
      yield (s, f, r), provenance, text
    yield beam.pvalue.TaggedOutput("files", {
        "source": s, "file": f, "path": path, "docs": len(pieces), "bytes": size,
        "held_out": held, "bad_input": bad[path]})


class FilterDocs(beam.DoFn):
  """normalise -> quality -> safety -> PII scrub -> decontamination (the evaluation n-gram
  index as a side input). Main output: the surviving documents (normalised, scrubbed).
  Tagged "counts": ((source, "stage/what"), (docs, chars)); tagged "examples":
  ((stage, source), (key, example)), the bundle's first `examples` removed per pair."""

  def __init__(self, cfg: Mapping[str, Any], names: Sequence[str], examples: int):
    self.cfg, self.names, self.examples = cfg, names, examples
    sources = cfg["sources"]
    self.rules = [{**dict(cfg["quality"]["rules"]), **dict(s.get("quality") or {})}
                  for s in sources]

  def setup(self) -> None:
    self.blocklist = filters.Blocklist(list(self.cfg["safety"]["blocklist"]))
    self._deco, self._index = None, None

  def start_bundle(self) -> None:
    self.counts: dict[tuple[int, str], list[int]] = collections.defaultdict(lambda: [0, 0])
    self.removed: dict[tuple[str, int], list[tuple[Key, dict]]] = {}

  def _count(self, s: int, what: str, text: str) -> None:
    c = self.counts[(s, what)]
    c[0] += 1
    c[1] += len(text)

  def _decontaminator(self, index: np.ndarray | None) -> filters.Decontaminator | None:
    if index is None:
      return None
    if self._index is not index:  # the side input, wrapped once per worker
      self._deco = decontaminate.decontaminator(index, self.cfg["decontaminate"]["ngram"])
      self._index = index
    return self._deco

  def process(self, doc: Doc, index: np.ndarray | None = None) -> Iterator[Doc]:
    c, (key, provenance, raw) = self.cfg, doc
    s = key[0]
    deco = self._decontaminator(index)
    self._count(s, "input/kept", raw)
    text = filters.normalize(raw, c["normalize"]["strip_markup"]) \
        if c["normalize"]["enabled"] else raw
    removed = rule = None
    if not text:
      removed = "normalize"
    elif c["quality"]["enabled"] and (rule := filters.quality_failure(text, self.rules[s])):
      removed = "quality"
    elif c["safety"]["enabled"] and (rule := filters.safety_failure(text, self.blocklist)):
      removed = "safety"
    if removed is None and c["pii"]["enabled"]:
      text, found = filters.scrub_pii(text)
      if sum(found.values()):
        self._count(s, "pii/scrubbed", text)
    if removed is None and deco is not None and deco.contaminated(text):
      removed = "decontaminate"
    if removed is None:
      yield key, provenance, text
      return
    self._count(s, f"{removed}/removed", raw)
    why = ",".join(self.blocklist.matches(text)) if rule == "blocklist" else rule or removed
    ex = self.removed.setdefault((removed, s), [])
    ex.append((key, {"provenance": provenance, "rule": why, "text": raw[:300]}))
    if len(ex) > self.examples:
      ex.sort(key=lambda e: e[0])
      del ex[self.examples:]

  def finish_bundle(self) -> Iterator[Any]:
    for (s, what), (docs, chars) in self.counts.items():
      yield beam.pvalue.TaggedOutput(
          "counts", GlobalWindows.windowed_value(((self.names[s], what), (docs, chars))))
    for (stage, s), ex in self.removed.items():
      for e in ex:
        yield beam.pvalue.TaggedOutput(
            "examples", GlobalWindows.windowed_value(((stage, self.names[s]), e)))


def sum_pairs(pairs: Iterable[tuple[int, int]]) -> tuple[int, int]:
  docs = chars = 0
  for d, c in pairs:
    docs, chars = docs + d, chars + c
  return docs, chars


def _first_of_group(group: tuple[str, Iterable[Doc]]) -> Iterator[Any]:
  docs = sorted(group[1], key=lambda d: d[0])
  yield docs[0]
  for d in docs[1:]:
    yield beam.pvalue.TaggedOutput("removed", ("exact_dedup", d[0], docs[0][0]))


class ExactDedup(beam.PTransform):
  """Documents grouped by `filters.exact_key` (case-folded, whitespace-collapsed text
  hash); the smallest key of each group stays. Outputs "docs" and "removed"
  (("exact_dedup", key, kept key))."""

  def expand(self, docs):
    return (docs
            | "ByText" >> beam.Map(lambda d: (filters.exact_key(d[2]), d))
            | "Group" >> beam.GroupByKey()
            | "First" >> beam.FlatMap(_first_of_group).with_outputs("removed", main="docs"))


class _Sign(beam.DoFn):
  def __init__(self, num_perm: int, ngram: int, seed: int):
    self.args = (num_perm, ngram, seed)

  def setup(self) -> None:
    self.hasher = filters.MinHasher(*self.args)

  def process(self, doc: Doc) -> Iterator[tuple[Key, bytes]]:
    yield doc[0], self.hasher.signature(doc[2]).tobytes()


def _pairs(bucket: tuple[Any, Iterable[Key]]) -> Iterator[tuple[Key, Key]]:
  return itertools.combinations(sorted(bucket[1]), 2)  # (a, b) with a < b


def _with_first_signature(joined: tuple[Key, Mapping[str, list]]
                          ) -> Iterator[tuple[Key, tuple[Key, bytes]]]:
  a, j = joined
  for b in j["later"]:
    yield b, (a, j["sig"][0])


def resolve_near_duplicates(edges: Sequence[tuple[Key, Key]]) -> list[tuple[Key, Key]]:
  """Confirmed near-duplicate pairs (a, b), a < b -> [(removed, kept twin)]: in document
  order, a document goes iff an earlier document that stayed is its neighbour (exactly
  what streaming `filters.NearDuplicates` keeps; the twin named is the earliest such)."""
  earlier = collections.defaultdict(list)
  for a, b in edges:
    earlier[b].append(a)
  removed: dict[Key, Key] = {}
  for b in sorted(earlier):  # every neighbour a < b is decided before b
    kept = [a for a in sorted(earlier[b]) if a not in removed]
    if kept:
      removed[b] = kept[0]
  return sorted(removed.items())


class NearDedup(beam.PTransform):
  """MinHash-LSH near duplicates: a signature per document (`filters.MinHasher`, the same
  as streaming dedup), its LSH band keys grouped, every pair sharing a bucket confirmed by
  signature agreement >= threshold, the (small) edge list resolved in document order
  (`resolve_near_duplicates`). Outputs "docs" and "removed" (("near_dedup", key, twin))."""

  def __init__(self, threshold: float, num_perm: int, ngram: int, seed: int):
    super().__init__()
    self.threshold, self.args = threshold, (num_perm, ngram, seed)
    self.bands, self.rows = filters.lsh_bands(threshold, num_perm)

  def expand(self, docs):
    bands, rows, threshold = self.bands, self.rows, self.threshold

    def band_keys(ks: tuple[Key, bytes]) -> Iterator[tuple[tuple[int, bytes], Key]]:
      key, sig = ks
      for b in range(bands):  # uint64 entries: 8 bytes each
        yield (b, sig[b * rows * 8:(b + 1) * rows * 8]), key

    def confirm(joined: tuple[Key, Mapping[str, list]]) -> Iterator[tuple[Key, Key]]:
      b, j = joined
      sig_b = np.frombuffer(j["sig"][0], np.uint64)
      for a, sig_a in j["candidates"]:
        if float(np.mean(np.frombuffer(sig_a, np.uint64) == sig_b)) >= threshold:
          yield a, b

    sigs = docs | "Sign" >> beam.ParDo(_Sign(*self.args))
    pairs = (sigs
             | "Bands" >> beam.FlatMap(band_keys)
             | "Buckets" >> beam.GroupByKey()
             | "Pairs" >> beam.FlatMap(_pairs)
             | "Distinct" >> beam.Distinct())
    candidates = ({"sig": sigs, "later": pairs}
                  | "JoinFirst" >> beam.CoGroupByKey()
                  | "FirstSig" >> beam.FlatMap(_with_first_signature))
    removed = ({"sig": sigs, "candidates": candidates}
               | "JoinSecond" >> beam.CoGroupByKey()
               | "Confirm" >> beam.FlatMap(confirm)
               | "Edges" >> beam.combiners.ToList()
               | "Resolve" >> beam.FlatMap(resolve_near_duplicates))
    kept = docs | "Drop" >> beam.Filter(lambda d, gone: d[0] not in gone,
                                        gone=beam.pvalue.AsDict(removed))
    return {"docs": kept,
            "removed": removed | "Named" >> beam.Map(lambda kt: ("near_dedup", *kt))}
