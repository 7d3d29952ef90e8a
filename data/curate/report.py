"""The curation report: documents in and out of every stage per source, bad input, token
shares and examples of removed documents (`report.json`, `report.md`, `report.png`)."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

from data.curate import files

FILTER_STAGES = ("normalize", "quality", "safety", "decontaminate")


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


def write_report(curator: Any) -> dict[str, Any]:
  """The report phase of a `phases.Curator` (dedup must be done); returns the report."""
  dedup = curator.deduplicate()
  split = curator.split_stats()
  counts, bad, examples = StageCounts(), {}, {}
  for stats in split.values():
    bad.update(stats["bad_input"])
  for shard in range(curator.cfg.num_shards):
    stats = files.read_json(curator.shard_path("stage1", shard, "stats.json"))
    counts.merge(stats["counts"])
    for stage, by_source in stats["examples"].items():
      for source, ex in by_source.items():
        mine = examples.setdefault(stage, {}).setdefault(source, [])
        mine.extend(ex[:max(curator.cfg.examples_per_filter - len(mine), 0)])
  per_source = {s["name"]: {} for s in curator.sources}
  for stage in ("exact_dedup", "near_dedup"):
    for doc_id, twin in dedup["removed"][stage]:
      source = doc_id.split("/")[0]
      per_source[source][stage] = per_source[source].get(stage, 0) + 1
      ex = examples.setdefault(stage, {}).setdefault(source, [])
      if len(ex) < curator.cfg.examples_per_filter:
        ex.append({"doc_id": doc_id, "duplicate_of": twin})
  kept_by_source: dict[str, int] = {}
  for doc_id in dedup["kept"]:
    source = doc_id.split("/")[0]
    kept_by_source[source] = kept_by_source.get(source, 0) + 1
  table = {}
  for source in per_source:
    data = counts.data.get(source, {})
    row = {"held_out": split[source]["held_out"],
           "input": data.get("input/kept", _counter())["docs"]}
    for stage in FILTER_STAGES:
      row[stage] = data.get(f"{stage}/removed", _counter())["docs"]
    row["pii_scrubbed"] = data.get("pii/scrubbed", _counter())["docs"]
    row["exact_dedup"] = per_source[source].get("exact_dedup", 0)
    row["near_dedup"] = per_source[source].get("near_dedup", 0)
    row["output"] = kept_by_source.get(source, 0)
    row["input_chars"] = data.get("input/kept", _counter())["chars"]
    table[source] = row
  info_path = curator.path("tokenized", "info.json")
  tokens = files.read_json(info_path) if os.path.exists(info_path) else None
  report = {"per_source": table, "bad_input": bad, "examples": examples,
            "tokens": tokens, "config": curator.cfg.to_dict()}
  files.atomic_write(curator.path("report.json"), json.dumps(report, indent=1))
  files.atomic_write(curator.path("report.md"), report_markdown(report))
  plot_report(report, curator.path("report.png"))
  return report



COLUMNS = ["held_out", "input", *FILTER_STAGES, "pii_scrubbed", "exact_dedup",
           "near_dedup", "output"]


def report_markdown(report: Mapping[str, Any]) -> str:
  lines = ["Documents per source through each stage (held_out: removed by the held-out rules "
           "before the input count; pii_scrubbed documents are kept).", "",
           "| source | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
  rows = report["per_source"]
  lines += [f"| {s} | " + " | ".join(str(r[k]) for k in COLUMNS) + " |" for s, r in rows.items()]
  lines += ["| total | " + " | ".join(str(sum(r[k] for r in rows.values())) for k in COLUMNS)
            + " |", ""]
  bad = {p: c for p, c in report["bad_input"].items() if any(c.values())}
  lines.append("Bad input: " + ("none" if not bad else "; ".join(
      f"{p}: " + ", ".join(f"{k} {v}" for k, v in c.items() if v) for p, c in bad.items())))
  if report.get("tokens"):
    t = report["tokens"]
    lines += ["", f"Tokens: train {t['train_tokens']:,} ({t['train_documents']:,} documents), "
              f"validation {t['val_tokens']:,} ({t['val_documents']:,} documents).", "",
              "| source | natural tokens | natural share | target share | tokens | "
              "realised share | epochs |", "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {s} | {r['natural_tokens']:,} | {r['natural_share']:.3f} | "
              f"{r['target_share']:.3f} | {r['tokens']:,} | {r['share']:.3f} | "
              f"{r['epochs']:.2f} |" for s, r in t["per_source"].items()]
  lines += ["", "Examples of removed documents:"]
  for stage, by_source in report["examples"].items():
    for e in (e for ex in by_source.values() for e in ex):
      what = e.get("text", f"duplicate of {e.get('duplicate_of')}")
      lines.append(f"- {stage} ({e.get('rule', stage)}) {e['doc_id']}: "
                   + json.dumps(what[:160], ensure_ascii=False))
  return "\n".join(lines) + "\n"



def plot_report(report: Mapping[str, Any], path: str) -> None:
  """Left: documents each stage removed, per source (log scale: a filter that removes 3 of
  7,000 stays visible); labels say how many of the input were kept. Right, when the run
  tokenized: natural, target and realised token share per source."""
  # Imported here: matplotlib is heavy and only the report phase plots.
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows, tokens = report["per_source"], report.get("tokens")
  names = list(rows)
  stages = ["held_out", *FILTER_STAGES, "exact_dedup", "near_dedup"]
  fig, axes = plt.subplots(1, 2 if tokens else 1, figsize=(13 if tokens else 8,
                                                           1.5 + 0.6 * len(names)),
                           squeeze=False)
  ax, y = axes[0][0], np.arange(len(names))
  height = 0.8 / len(stages)
  for k, stage in enumerate(stages):
    values = [rows[n][stage] for n in names]
    ax.barh(y + k * height, values, height, label=stage, color=f"C{k}")
  ax.set_xscale("symlog", linthresh=1)
  ax.set_yticks(y + 0.4 - height / 2,
                [f"{n}\nkept {rows[n]['output']:,}/{rows[n]['input']:,}" for n in names])
  ax.set_xlabel("documents removed (symlog)")
  ax.set_title("Curation: documents removed by each stage")
  ax.legend(fontsize=7, loc="upper right")
  if tokens:
    ax = axes[0][1]
    t = tokens["per_source"]
    for k, (key, label) in enumerate([("natural_share", "natural"),
                                      ("target_share", "target"), ("share", "realised")]):
      ax.barh(y + k * 0.27, [t[n][key] for n in names], 0.27, label=label)
    ax.set_yticks(y + 0.27, names)
    ax.set_xlabel("share of training tokens")
    ax.set_title("Mixture")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)

