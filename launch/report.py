"""The pipeline's final report: report.md, report.json, curves.png and eval.png.

Everything is read back from the stages' own outputs (metrics.jsonl of each workdir,
eval/<model>/results.json, eval/winrate.json, minutes.json), so the report can be rebuilt
at any time without rerunning anything: `launch.report.write(...)` is the last step of
`launch.pipeline` and re-running the pipeline on a finished workdir only rewrites it.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

# Metrics shown per stage in the stage table (the first of each group that the stage logs).
STAGE_METRICS = (("train loss", ("train/loss", "loss/policy")),
                 ("eval loss", ("eval/loss",)),
                 ("eval accuracy", ("eval/accuracy",)),
                 ("PPO score", ("ppo/score",)),
                 ("PPO KL", ("ppo/kl",)),
                 ("DPO reward accuracy", ("eval/reward_accuracy",)))
# (task, metric) rows of the evaluation table, in order; rows no model has are left out.
EVAL_ROWS = (("wikitext2", "word_perplexity"), ("wikitext2", "bits_per_byte"),
             ("hellaswag", "acc_norm"), ("arc_easy", "acc"), ("arc_challenge", "acc_norm"),
             ("piqa", "acc"), ("winogrande", "acc"), ("mmlu", "acc"), ("lambada", "acc"),
             ("gsm8k", "exact_match"), ("rm_accuracy", "accuracy"),
             ("redteam", "below_threshold"), ("redteam", "mean_score"))


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def last_value(records: list[dict[str, Any]], key: str) -> float | None:
  for r in reversed(records):
    if isinstance(r.get(key), (int, float)):
      return float(r[key])
  return None


def _fmt(v: Any) -> str:
  if v is None:
    return "-"
  if isinstance(v, float):
    if math.isnan(v):
      return "nan"
    return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
  return str(v)


def collect(config: Any, workdir: str, stages: list[dict[str, Any]],
            minutes: dict[str, float]) -> dict[str, Any]:
  """Every figure of the report as one dict (report.json)."""
  out: dict[str, Any] = {"stages": {}, "eval": {}, "winrate": None, "minutes": minutes}
  for s in stages:
    records = read_metrics(s["workdir"])
    figures = {"entry": s["entry"], "config": s["config"],
               "steps": max((r["step"] for r in records), default=0)}
    for label, keys in STAGE_METRICS:
      for key in keys:
        value = last_value(records, key)
        if value is not None:
          figures[label] = value
          break
    out["stages"][s["name"]] = figures
  eval_dir = os.path.join(workdir, "eval")
  if os.path.isdir(eval_dir):
    names = [m for m, _ in (*config.eval.models, *config.eval.get("reward_models", ()))]
    for model in names:
      path = os.path.join(eval_dir, model, "results.json")
      if os.path.exists(path):
        with open(path) as f:
          out["eval"][model] = json.load(f)["results"]
    path = os.path.join(eval_dir, "winrate.json")
    if os.path.exists(path):
      with open(path) as f:
        out["winrate"] = json.load(f)
  # rlhf.cai stages: the counts of the data they wrote (their summary.json).
  for s in stages:
    path = os.path.join(s["workdir"], "summary.json")
    if s["entry"] == "rlhf.cai" and os.path.exists(path):
      with open(path) as f:
        out.setdefault("cai", {})[s["name"]] = json.load(f)
  out["summary"] = {f"minutes_{k}": round(v, 2) for k, v in minutes.items()}
  out["summary"]["minutes_total"] = round(sum(minutes.values()), 2)
  return out


def markdown(data: dict[str, Any], config: Any) -> str:
  lines = ["# Pipeline report", ""]
  lines += ["## Stages", "", "| stage | entry | config | steps | " +
            " | ".join(label for label, _ in STAGE_METRICS) + " | minutes |",
            "|---|---|---|---:|" + "---:|" * len(STAGE_METRICS) + "---:|"]
  for name, f in data["stages"].items():
    lines.append(f"| {name} | {f['entry']} | {f['config']} | {f['steps']} | " +
                 " | ".join(_fmt(f.get(label)) for label, _ in STAGE_METRICS) +
                 f" | {data['minutes'].get(name, float('nan')):.1f} |")
  evals = {k: v for k, v in data["minutes"].items() if k.startswith("eval_")}
  total = sum(data["minutes"].values())
  lines += ["", f"Evaluation minutes: {', '.join(f'{k[5:]} {v:.1f}' for k, v in evals.items())}"
            f". Total wall time of the pipeline: {total:.1f} minutes.", ""]
  if data["eval"]:
    models = list(data["eval"])
    lines += ["## Evaluation", "", f"`limit` = {config.eval.limit or 'all'} items per task.",
              "", "| task | metric | " + " | ".join(models) + " |",
              "|---|---|" + "---:|" * len(models)]
    for task, metric in EVAL_ROWS:
      values = [data["eval"][m].get(task, {}).get(metric) for m in models]
      if any(v is not None for v in values):
        lines.append(f"| {task} | {metric} | " + " | ".join(_fmt(v) for v in values) + " |")
    lines.append("")
  w = data["winrate"]
  if w:
    judge = config.eval.judge
    lines += ["## Reward-model win rates", "",
              f"{w['num_prompts']} held-out HH prompts x {w['samples_per_prompt']} samples at "
              f"temperature {w['temperature']}, against `{w['baseline']}`, judged by the "
              f"`{judge}` stage (the reward model PPO trained against; "
              "benchmarks/rlhf_hh.py adds a second, independent judge).", "",
              "| policy | win rate | 95% interval | wins / ties / losses | score gain (std) | "
              "KL to baseline (nats) | distinct-2 | end-of-turn rate |",
              "|---|---:|---|---|---:|---:|---:|---:|"]
    for name in _policy_order(w, config):
      r = w["policies"][name]
      ci = r.get(f"winrate/{judge}/ci")
      lines.append(
          f"| {name} | {_fmt(r.get(f'winrate/{judge}'))} | "
          f"{'[' + ', '.join(f'{x:.3f}' for x in ci) + ']' if ci else '-'} | "
          f"{' / '.join(str(x) for x in r.get(f'winrate/{judge}/wins_ties_losses', []))} | "
          f"{_fmt(r.get(f'gain_std/{judge}'))} | {_fmt(r.get('kl'))} | "
          f"{_fmt(r.get('distinct2'))} | {_fmt(r.get('eos_fraction'))} |")
    lines.append("")
  if data.get("cai"):
    lines += ["## Constitutional AI data", "",
              "| stage | phase | prompts | examples / pairs | judge P(first option) | "
              "mean soft label of chosen |", "|---|---|---:|---:|---:|---:|"]
    for name, c in data["cai"].items():
      lines.append(f"| {name} | {c['phase']} | {c['prompts']} | "
                   f"{c.get('examples', c.get('pairs'))} | "
                   f"{_fmt(c.get('judge_first_position_mean'))} | "
                   f"{_fmt(c.get('soft_label_mean_chosen'))} |")
    lines.append("")
  lines += ["Plots: `curves.png` (training curves per stage), `eval.png` (task metrics and win "
            "rates per model).", ""]
  return "\n".join(lines)


def plot_curves(data_stages: list[dict[str, Any]], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  panels = []
  for s in data_stages:
    records = read_metrics(s["workdir"])
    if s["entry"] == "rlhf.ppo":
      keys = [("ppo/score", "score"), ("ppo/kl", "KL (nats)")]
    else:
      keys = [("train/loss", "train loss"), ("eval/loss", "eval loss")]
    panels.append((s["name"], records, keys))
  fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4 * max(len(panels), 1), 3.2),
                           squeeze=False)
  for ax, (name, records, keys) in zip(axes[0], panels):
    for key, label in keys:
      pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
      if pts:
        ax.plot(*zip(*pts), marker="o" if len(pts) < 20 else None, ms=3, label=label)
    ax.set_title(name)
    ax.set_xlabel("iteration" if any("ppo/score" in r for r in records) else "step")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _policy_order(w: dict[str, Any], config: Any) -> list[str]:
  order = list(config.eval.get("winrate_policies", ()))
  return sorted(w["policies"], key=lambda n: order.index(n) if n in order else len(order))


def plot_eval(data: dict[str, Any], config: Any, path: str) -> None:
  judge = config.eval.judge
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  models = [m for m, r in data["eval"].items() if "rm_accuracy" not in r]
  rows = [(t, m) for t, m in EVAL_ROWS if m in ("acc", "acc_norm")
          and any(t in data["eval"][x] for x in models)]
  w = data["winrate"]
  ncols = 1 + bool(w)
  fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 3.4), squeeze=False)
  ax = axes[0][0]
  width = 0.8 / max(len(models), 1)
  for i, model in enumerate(models):
    values = [data["eval"][model].get(t, {}).get(m, np.nan) for t, m in rows]
    ax.bar(np.arange(len(rows)) + i * width, values, width, label=model)
  ax.set_xticks(np.arange(len(rows)) + width * (len(models) - 1) / 2)
  ax.set_xticklabels([f"{t}\n{m}" for t, m in rows], fontsize=7)
  ax.set_title("multiple choice")
  ax.legend(fontsize=7)
  if w:
    ax = axes[0][1]
    names = _policy_order(w, config)
    rates = [w["policies"][n].get(f"winrate/{judge}", np.nan) for n in names]
    cis = [w["policies"][n].get(f"winrate/{judge}/ci") or [r, r] for n, r in zip(names, rates)]
    err = np.array([[r - lo for r, (lo, _) in zip(rates, cis)],
                    [hi - r for r, (_, hi) in zip(rates, cis)]])
    ax.bar(names, rates, yerr=err, capsize=4, color="tab:green")
    ax.axhline(0.5, color="gray", ls="--", lw=1)
    ax.set_ylim(0, 1)
    ax.set_title(f"win rate vs {w['baseline']} (judge: {judge})")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write(config: Any, workdir: str, stages: list[dict[str, Any]],
          minutes: dict[str, float]) -> dict[str, Any]:
  """Writes report.md, report.json, curves.png, eval.png into `workdir`; returns the data."""
  data = collect(config, workdir, stages, minutes)
  with open(os.path.join(workdir, "report.json"), "w") as f:
    json.dump(data, f, indent=1)
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write(markdown(data, config))
  plot_curves(stages, os.path.join(workdir, "curves.png"))
  if data["eval"]:
    plot_eval(data, config, os.path.join(workdir, "eval.png"))
  print(f"Report: {os.path.join(workdir, 'report.md')}", flush=True)
  return data
