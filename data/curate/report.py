"""The curation report: documents in and out of every stage per source, bad input, token
shares and examples of removed documents (`report.json`, `report.md`, `report.png`)."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from data.curate import files

FILTER_STAGES = ("normalize", "quality", "safety", "decontaminate")


def build_report(names: Sequence[str], file_stats: Sequence[Mapping[str, Any]],
                 counts: Iterable[tuple[tuple[str, str], tuple[int, int]]],
                 examples: Iterable[tuple[tuple[str, str], tuple[Any, dict]]],
                 removed: Iterable[tuple[str, Any, Any]], output: Mapping[str, int],
                 tokens: Mapping[str, Any] | None, config: Mapping[str, Any],
                 examples_per_filter: int, doc_id: Callable[[Any], str]) -> dict[str, Any]:
  """The report from the pipeline's statistics (see `data.curate.pipeline`).

  Args:
    names: The source names, in config order.
    file_stats: Per input file: source (index), file, path, docs, bytes, held_out,
      bad_input.
    counts: ((source, "stage/what"), (documents, characters)), summed here.
    examples: ((stage, source), (key, example)) of removed documents; the
      `examples_per_filter` smallest keys per stage and source are kept.
    removed: (stage, key, kept twin's key) for "exact_dedup" / "near_dedup".
    output: Documents kept per source.
    tokens: The tokenized output's info.json, or None.
    config: The run's config (dict).
    examples_per_filter: Examples kept per stage and source.
    doc_id: key -> document id.
  """
  summed: dict[tuple[str, str], list[int]] = {}
  for key, (docs, chars) in counts:
    c = summed.setdefault(key, [0, 0])
    c[0] += docs
    c[1] += chars
  chosen: dict[tuple[str, str], list[tuple[Any, dict]]] = {}
  for key, ex in examples:
    chosen.setdefault(key, []).append(ex)
  dups: dict[tuple[str, str], int] = {}
  for stage, key, twin in sorted(removed, key=lambda r: r[1]):
    name = names[key[0]]
    dups[(stage, name)] = dups.get((stage, name), 0) + 1
    chosen.setdefault((stage, name), []).append((key, {"duplicate_of": doc_id(twin)}))
  table, bad, empty = {}, {}, []
  files = sorted(file_stats, key=lambda f: (f["source"], f["file"]))
  for s, name in enumerate(names):
    mine = [f for f in files if f["source"] == s]
    bad.update({f["path"]: f["bad_input"] for f in mine})
    if not sum(f["docs"] for f in mine):
      empty.append(name)
    row = {"files": len(mine), "held_out": sum(f["held_out"] for f in mine),
           "input": summed.get((name, "input/kept"), [0, 0])[0]}
    for stage in FILTER_STAGES:
      row[stage] = summed.get((name, f"{stage}/removed"), [0, 0])[0]
    row["pii_scrubbed"] = summed.get((name, "pii/scrubbed"), [0, 0])[0]
    row["exact_dedup"] = dups.get(("exact_dedup", name), 0)
    row["near_dedup"] = dups.get(("near_dedup", name), 0)
    row["output"] = int(output.get(name, 0))
    row["input_chars"] = summed.get((name, "input/kept"), [0, 0])[1]
    row["input_bytes"] = sum(f["bytes"] for f in mine)
    table[name] = row
  report_examples: dict[str, dict[str, list[dict]]] = {}
  for stage in (*FILTER_STAGES, "exact_dedup", "near_dedup"):
    for name in names:
      ex = sorted(chosen.get((stage, name), []), key=lambda e: e[0])[:examples_per_filter]
      if ex:
        report_examples.setdefault(stage, {})[name] = [
            {"doc_id": doc_id(key), **e} for key, e in ex]
  return {"per_source": table, "bad_input": bad, "empty_sources": empty,
          "examples": report_examples, "tokens": tokens, "config": config}


def write_views(report: Mapping[str, Any], workdir: str) -> None:
  """report.md and report.png of a report (report.json is written by the pipeline)."""
  files.write_bytes(files.join(workdir, "report.md"),
                    report_markdown(report).encode("utf-8"))
  with tempfile.TemporaryDirectory() as tmp:
    plot_report(report, os.path.join(tmp, "report.png"))
    with open(os.path.join(tmp, "report.png"), "rb") as f:
      files.write_bytes(files.join(workdir, "report.png"), f.read())


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
  if report.get("empty_sources"):
    lines.append("Sources that gave no document: " + ", ".join(report["empty_sources"]))
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

