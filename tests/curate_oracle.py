"""A sequential reference for the curation's keep/drop decisions (tests only).

Independent of the Beam pipeline (`data.curate.pipeline`): every source read with
`inputs.read_source` in config order, each document through the `data.filters`
primitives in turn (normalise, quality, safety, PII scrub, decontamination), then exact
dedup (a set of `exact_key`s) and streaming near dedup (`filters.NearDuplicates`), in
document order. The first occurrence wins everywhere.
"""

from __future__ import annotations

from typing import Any

from data import filters
from data.curate.decontaminate import eval_texts
from data.curate.inputs import held_out_config, read_source


def kept_documents(cfg: Any) -> dict[tuple[str, str], str]:
  """{(source, provenance): curated text} of the documents a curation of `cfg` keeps."""
  blocklist = filters.Blocklist(list(cfg.safety.blocklist))
  deco = None
  if cfg.decontaminate.enabled:
    n = cfg.decontaminate.ngram
    deco = filters.Decontaminator(eval_texts(list(cfg.decontaminate.eval_tasks), n), n)
  near = None
  if cfg.near_dedup.enabled:
    near = filters.NearDuplicates(cfg.near_dedup.threshold, cfg.near_dedup.num_perm,
                                  cfg.near_dedup.ngram, cfg.seed)
  seen: set[str] = set()
  kept: dict[tuple[str, str], str] = {}
  for source in cfg.sources:
    source = dict(source)
    rules = {**dict(cfg.quality.rules), **dict(source.get("quality") or {})}
    docs, _ = read_source(source, {}, held_out_config(cfg), cfg.get("tfds_data_dir", ""))
    for doc in docs:
      text = filters.normalize(doc.text, cfg.normalize.strip_markup) \
          if cfg.normalize.enabled else doc.text
      if not text:
        continue
      if cfg.quality.enabled and filters.quality_failure(text, rules):
        continue
      if cfg.safety.enabled and filters.safety_failure(text, blocklist):
        continue
      if cfg.pii.enabled:
        text, _ = filters.scrub_pii(text)
      if deco is not None and deco.contaminated(text):
        continue
      if cfg.exact_dedup.enabled:
        key = filters.exact_key(text)
        if key in seen:
          continue
        seen.add(key)
      if near is not None and near.add(doc.doc_id, text) is not None:
        continue
      kept[(doc.source, doc.provenance)] = text
  return kept
