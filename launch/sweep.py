"""Ablations from config files: run every point of a sweep, then a results table and plot.

  python -m launch.sweep --config=configs/ablations/lr.py --workdir=runs/ablations/lr \
      [--set=train.num_steps=100] [--dry_run] [--tpu_name=NAME --zone=ZONE --bucket=gs://B]

An ablation config (configs/ablations/*.py) returns a ConfigDict with
  entry     the stage entry point every point runs (e.g. "train.pretrain")
  base      the run config file (with its `:arg` variant if any)
  fixed     overrides shared by every point, as nested sections ({"train": {"num_steps": 1000}})
  points    a list of points, each a plain dict of dotted overrides ({"optim.lr": 3e-3}); an
            optional "name" labels the point (default: its overrides)
  product   a list of (field, values) pairs; every combination of them is crossed with
            every point (seeds: ("seed", (0, 1, 2)))
  metric    the metric of the table's "best" column and of the summary (default eval/loss;
            lower is better)

Every point's full override set is applied to the base config before anything runs: a field
that does not exist stops the sweep, naming the point and the field. Points run in sequence,
each as its own process in `<workdir>/<index>_<label>/` (its log beside it, minutes in
`minutes.json`); points already finished are skipped, so re-running resumes. With
`--tpu_name` nothing runs: the launch.tpu_vm commands of every point are printed instead.

Results (from each point's metrics.jsonl and checkpoint metadata): `results.csv` and
`results.md` (per point: parameters, final train loss, final and best `metric`, tokens/s,
minutes; and, when the sweep has several seeds, mean ± std over seeds per setting) and
`curves.png` (train loss of every point overlaid, `metric` as markers; the y-range covers
both).
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import re
import shlex
import statistics
import sys
from typing import Any, Sequence

from absl import app, flags

from launch import overrides as ov
from launch import tpu_vm
from launch.report import last_value, read_metrics
from launch.stages import Chain, StageFailed, finished

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command-line flags (defined only when this module is the program)."""
  flags.DEFINE_string("config", None, "Ablation config file (configs/ablations/...py[:arg]).")
  flags.DEFINE_string("workdir", None, "Directory of every point's workdir and the results.")
  flags.DEFINE_multi_string("set", [], "field=value applied to every point (after `fixed`).")
  flags.DEFINE_bool("dry_run", False, "Check every point and print the commands; run nothing.")
  flags.DEFINE_string("tpu_name", "", "Print the launch.tpu_vm commands of every point for this "
                      "TPU VM instead of running locally.")
  flags.DEFINE_string("zone", "", "TPU zone (with --tpu_name).")
  flags.DEFINE_string("project", "", "GCP project (with --tpu_name; default: gcloud's).")
  flags.DEFINE_string("accelerator_type", "", "TPU type for the preflight (with --tpu_name).")
  flags.DEFINE_string("bucket", "", "gs:// prefix of the points' workdirs on the TPU (with "
                      "--tpu_name).")


class SweepError(ValueError):
  """Bad sweep input, found before any work."""


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  out: dict[str, Any] = {}
  for key, value in (tree.items() if hasattr(tree, "items") else []):
    path = f"{prefix}{key}"
    if hasattr(value, "items"):
      out.update(_flatten(value, path + "."))
    else:
      out[path] = value
  return out


def _label(overrides: dict[str, Any]) -> str:
  return ",".join(f"{k.split('.')[-1]}={v:g}" if isinstance(v, float) else
                  f"{k.split('.')[-1]}={ov.flag_value(v)}" for k, v in overrides.items())


def expand(config: Any, extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
  """The sweep's points: [{"name", "overrides" (every dotted override), "setting" (the
  overrides that vary, without the seed), "seed"}], each checked against the base config."""
  for key in ("entry", "base"):
    if not config.get(key):
      raise SweepError(f"The ablation config has no {key!r}")
  fixed = {**_flatten(config.get("fixed", {})), **(extra or {})}
  points = [dict(p) for p in config.get("points", [])] or [{}]
  product = [tuple(pair) for pair in config.get("product", [])]
  for pair in product:
    if len(pair) != 2 or not isinstance(pair[1], (list, tuple)) or not pair[1]:
      raise SweepError(f"product entry {pair!r}: expected (field, non-empty list of values)")
  combos = list(itertools.product(*[[(k, v) for v in values] for k, values in product]))
  base = ov.load_config(config.base)
  out = []
  for point in points:
    name = point.pop("name", None)
    for combo in combos:
      varying = {**point, **dict(combo)}
      overrides = {**fixed, **varying}
      index = len(out)
      where = f"sweep point {index} ({name or _label(varying) or 'base'})"
      ov.apply_overrides(base, overrides, where)
      setting = {k: v for k, v in varying.items() if k != "seed"}
      label = name or _label(setting) or "base"
      full = label + (f",seed={varying['seed']}" if "seed" in varying else "")
      out.append({"index": index, "name": full, "setting": label, "overrides": overrides,
                  "seed": varying.get("seed", base.get("seed", 0))})
  return out


def point_dir(workdir: str, point: dict[str, Any]) -> str:
  slug = re.sub(r"[^A-Za-z0-9_.=,-]+", "_", point["name"])[:80]
  return os.path.join(workdir, f"{point['index']:02d}_{slug}")


def command(config: Any, point: dict[str, Any], workdir: str) -> list[str]:
  return ["-m", config.entry, f"--config={config.base}", f"--workdir={workdir}",
          *ov.override_flags(point["overrides"])]


# --------------------------------------------------------------------------- results
def point_results(workdir: str, metric: str) -> dict[str, Any]:
  records = read_metrics(workdir)
  evals = [(r["step"], r[metric]) for r in records if isinstance(r.get(metric), (int, float))]
  best = min(evals, key=lambda x: x[1]) if evals else (None, None)
  out = {"steps": max((r["step"] for r in records), default=0),
         "final_train_loss": last_value(records, "train/loss"),
         f"final_{metric}": evals[-1][1] if evals else None,
         f"best_{metric}": best[1], "best_step": best[0],
         "tokens_per_sec": _steady_throughput(records)}
  try:
    from model.config import ModelConfig
    from train import checkpoint as ckpt_lib
    meta = ckpt_lib.read_metadata(workdir)
    out["params"] = ModelConfig.from_dict(meta["model_config"]).num_params()
  except Exception:  # noqa: BLE001 - an unfinished point has no checkpoint
    out["params"] = None
  return out


def _steady_throughput(records: list[dict[str, Any]]) -> float | None:
  """Median train/tokens_per_sec of the logged intervals after the first (compilation)."""
  values = [r["train/tokens_per_sec"] for r in records
            if isinstance(r.get("train/tokens_per_sec"), (int, float))]
  return statistics.median(values[1:] or values) if values else None


def _fmt(v: Any) -> str:
  if v is None:
    return "-"
  if isinstance(v, float):
    return f"{v:.4f}" if abs(v) < 100 else f"{v:,.0f}"
  if isinstance(v, int) and v >= 10000:
    return f"{v:,}"
  return str(v)


def write_results(config: Any, workdir: str, points: list[dict[str, Any]],
                  minutes: dict[str, float], failed: Sequence[str] = ()) -> dict[str, Any]:
  """results.csv, results.md and curves.png in `workdir`; returns the summary."""
  metric = config.get("metric", "eval/loss")
  rows = []
  for p in points:
    d = point_dir(workdir, p)
    rows.append({"point": p["name"] + (" (failed)" if p["name"] in failed else ""),
                 "setting": p["setting"], "seed": p["seed"], **point_results(d, metric),
                 "minutes": round(minutes.get(os.path.basename(d), float("nan")), 2)})
  keys = list(rows[0])
  with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
  shown = [k for k in keys if k != "setting"]
  lines = [f"Sweep `{config.base}` ({config.entry}), metric `{metric}` (lower is better).", "",
           "| " + " | ".join(shown) + " |", "|---|" + "---:|" * (len(shown) - 1)]
  for r in rows:
    lines.append("| " + " | ".join(f"{r[k]:.1f}" if k == "minutes" else _fmt(r[k])
                                   for k in shown) + " |")
  groups: dict[str, list[dict[str, Any]]] = {}
  for r in rows:
    groups.setdefault(r["setting"], []).append(r)
  summary = {"points": len(rows), "metric": metric}
  final_key = f"final_{metric}"
  if any(len(g) > 1 for g in groups.values()):
    lines += ["", f"Mean ± std over seeds of the final `{metric}`:", "",
              "| setting | seeds | mean | std |", "|---|---:|---:|---:|"]
  for setting, group in groups.items():
    values = [r[final_key] for r in group if r[final_key] is not None]
    mean = statistics.fmean(values) if values else None
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    summary[setting] = round(mean, 4) if mean is not None else None
    if any(len(g) > 1 for g in groups.values()):
      lines.append(f"| {setting} | {len(values)} | {_fmt(mean)} | {_fmt(std)} |")
  total = sum(minutes.get(os.path.basename(point_dir(workdir, p)), 0.0) for p in points)
  summary["minutes_total"] = round(total, 2)
  lines += ["", f"{len(rows)} runs, {total:.1f} minutes in all. Curves: `curves.png`.", ""]
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write("\n".join(lines))
  plot(workdir, points, metric)
  print("\n".join(lines), flush=True)
  return summary


def curve_ylim(train: Sequence[float], evals: Sequence[float]
               ) -> tuple[float, float] | None:
  """The y-limits of curves.png: every series' lowest point, up to above its top 20%.

  The bottom covers the lowest finite value of the train losses and of the eval metric
  (eval often ends below the train loss). The top is the highest 80th percentile of the
  two series plus half the range: the first steps' loss would squash the interesting end
  of the curves. None when nothing finite is plotted.
  """
  series = [sorted(v for v in values if math.isfinite(v)) for values in (train, evals)]
  series = [s for s in series if s]
  if not series:
    return None
  lo = min(s[0] for s in series)
  tail = max(s[int(len(s) * 0.8)] for s in series)
  return lo - 0.05 * (tail - lo + 1e-9), tail + 0.5 * (tail - lo + 1e-9)


def plot(workdir: str, points: list[dict[str, Any]], metric: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  settings = list(dict.fromkeys(p["setting"] for p in points))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  styles = ["-", "--", ":", "-."]
  seeds = list(dict.fromkeys(p["seed"] for p in points))
  fig, ax = plt.subplots(figsize=(7, 4.2))
  train_values: list[float] = []
  eval_values: list[float] = []
  for p in points:
    records = read_metrics(point_dir(workdir, p))
    color = colors[settings.index(p["setting"]) % len(colors)]
    style = styles[seeds.index(p["seed"]) % len(styles)]
    train = [(r["step"], r["train/loss"]) for r in records
             if isinstance(r.get("train/loss"), (int, float))]
    if train:
      ax.plot(*zip(*train), color=color, ls=style, lw=1.2, alpha=0.8, label=p["name"])
    evals = [(r["step"], r[metric]) for r in records if isinstance(r.get(metric), (int, float))]
    if evals:
      ax.plot(*zip(*evals), color=color, ls="none", marker="o", ms=4)
    train_values += [v for _, v in train]
    eval_values += [v for _, v in evals]
  ax.set_xlabel("step")
  ax.set_ylabel(f"train loss (lines), {metric} (dots)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  limits = curve_ylim(train_values, eval_values)
  if limits:
    ax.set_ylim(*limits)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "curves.png"), dpi=110)
  plt.close(fig)


# --------------------------------------------------------------------------- run
def run(config: Any, workdir: str, extra: dict[str, Any] | None = None,
        dry_run: bool = False, tpu: dict[str, str] | None = None) -> dict[str, Any]:
  workdir = os.path.abspath(workdir)
  points = expand(config, extra)
  if tpu:
    for p in points:
      remote = f"{tpu['bucket'].rstrip('/')}/{os.path.basename(point_dir(workdir, p))}"
      print(shlex.join(tpu_vm.sweep_point_command(tpu, command(config, p, remote))))
    return {}
  if dry_run:
    for p in points:
      d = point_dir(workdir, p)
      print(f"# point {p['index']}: {p['name']}{' (done)' if finished(d) else ''}")
      print(shlex.join([sys.executable, *command(config, p, d)]))
    return {}
  chain = Chain(workdir)
  failed = []
  for p in points:
    d = point_dir(workdir, p)
    try:
      chain.ensure(os.path.basename(d), command(config, p, d), exit_on_failure=False)
    except StageFailed as e:  # e.g. a learning rate that diverges: the others still run
      print(f"point {p['index']} failed: {e}", flush=True)
      failed.append(p["name"])
  summary = write_results(config, workdir, points, chain.minutes, failed)
  if failed:
    raise StageFailed(f"{len(failed)} point(s) failed: {failed} (their logs are in {workdir}; "
                      "the table marks them)")
  return summary


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS.config or not FLAGS.workdir:
    raise app.UsageError("--config and --workdir are required")
  tpu = None
  if FLAGS.tpu_name:
    if not FLAGS.zone or not FLAGS.accelerator_type or not FLAGS.bucket.startswith("gs://"):
      raise app.UsageError("--tpu_name needs --zone, --accelerator_type and --bucket=gs://...")
    tpu = {"name": FLAGS.tpu_name, "zone": FLAGS.zone, "project": FLAGS.project,
           "accelerator_type": FLAGS.accelerator_type, "bucket": FLAGS.bucket}
  try:
    config = ov.load_config(FLAGS.config)
    summary = run(config, FLAGS.workdir, ov.parse_assignments(FLAGS.set, "set"),
                  FLAGS.dry_run, tpu)
  except (SweepError, ValueError, FileNotFoundError, StageFailed) as e:
    sys.exit(f"error: {e}")
  if summary:
    print(json.dumps(summary))


if __name__ == "__main__":
  define_flags()
  app.run(main)
