"""Bias and truthfulness across the pipeline's models: does alignment move them?

  python -m eval.safety_report --output_dir=runs/chain/safety \
      --checkpoints=base=runs/chain/base,sft=runs/chain/sft,ppo=runs/chain/ppo,dpo=runs/chain/dpo \
      [--judge=runs/chain/rm] [--limit=0] [--batch_size=32] [--max_new_tokens=64]

For each model it runs `python -m eval.run` (the command is printed) with the safety tasks
(crows_pairs, bbq, truthfulqa_mc, truthfulqa_gen; with --judge also the existing `redteam`
task) into `<output_dir>/<name>/`, skipping tasks whose results are already there for the same
checkpoint and --limit (so a rerun only adds what is missing; --rerun runs them again).
Then it writes, in `<output_dir>`:
  safety_report.md    the headline figures side by side (a column per model), then a table
                      per model with every figure (per bias type / category too);
  safety_report.json  the same figures, {model: {task: {metric: value}}};
  safety_report.png   one panel per headline metric, a bar per model.
Bad input (a malformed --checkpoints, an eval.run that fails) ends in one `error:` line and
exit code 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Sequence

from absl import app, flags

from eval.cli import exit_with_error
from eval.run import format_metric
from eval.safety_tasks import SAFETY_TASKS

# (task, metric, how to read it) in the report's order.
HEADLINE = (
    ("crows_pairs", "pct_stereotype", "share preferring the stereotype; 0.5 = none"),
    ("crows_pairs", "likelihood_diff", "mean |log-likelihood gap| of a pair"),
    ("bbq", "accuracy_amb", "accuracy, ambiguous contexts (answer: unknown)"),
    ("bbq", "accuracy_disamb", "accuracy, disambiguated contexts"),
    ("bbq", "amb_bias_score", "s_AMB, 0 = unbiased, 1 = always the stereotype"),
    ("bbq", "disamb_bias_score", "s_DIS, 0 = unbiased"),
    ("truthfulqa_mc", "mc1", "best answer the likeliest"),
    ("truthfulqa_mc", "mc2", "probability mass on true answers"),
    ("truthfulqa_gen", "rouge1_acc", "greedy answer closer to a true reference"),
    ("redteam", "below_threshold", "red-team responses the judge scores harmful"),
)


def parse_models(spec: str) -> dict[str, str]:
  """"base=runs/a,sft=runs/b" -> {"base": "runs/a", "sft": "runs/b"} (order kept)."""
  models: dict[str, str] = {}
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, sep, path = part.partition("=")
    if not sep or not name.strip() or not path.strip():
      raise ValueError(f"--checkpoints entry {part!r} is not name=path")
    if name.strip() in models:
      raise ValueError(f"--checkpoints names {name.strip()!r} twice")
    models[name.strip()] = path.strip()
  if not models:
    raise ValueError("--checkpoints is empty; expected name=path[,name=path...]")
  return models


def read_results(eval_dir: str) -> dict[str, Any]:
  """results.json of an eval.run output folder ({} when there is none)."""
  path = os.path.join(eval_dir, "results.json")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def missing_tasks(report: dict[str, Any], tasks: Sequence[str], limit: int) -> list[str]:
  """Tasks not yet in `report` (every task when it was made with another --limit)."""
  if report.get("limit") != limit:
    return list(tasks)
  return [t for t in tasks if t not in report.get("results", {})]


def eval_command(checkpoint: str, out_dir: str, tasks: Sequence[str], flags_: Any
                 ) -> list[str]:
  cmd = [sys.executable, "-m", "eval.run", f"--checkpoint={checkpoint}",
         f"--tasks={','.join(tasks)}", f"--output_dir={out_dir}", f"--limit={flags_.limit}",
         f"--batch_size={flags_.batch_size}", f"--max_new_tokens={flags_.max_new_tokens}"]
  if "redteam" in tasks:
    cmd += [f"--judge={flags_.judge}", f"--max_prompt_tokens={flags_.max_prompt_tokens}"]
  if flags_.local_devices:
    cmd.append(f"--local_devices={flags_.local_devices}")
  return cmd


def figures(reports: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
  """{model: {task: {metric: value}}} of the float figures (stderr and timings left out)."""
  out: dict[str, dict[str, dict[str, Any]]] = {}
  for model, report in reports.items():
    out[model] = {task: {k: v for k, v in r.items() if isinstance(v, (int, float))
                         and not isinstance(v, bool) and k != "seconds"}
                  for task, r in report.get("results", {}).items()}
  return out


def _cell(value: Any) -> str:
  return "–" if value is None else format_metric(float(value))


def markdown_report(table: dict[str, dict[str, dict[str, Any]]]) -> str:
  """Headline figures side by side, then every figure of each model."""
  models = list(table)
  lines = ["# Bias and truthfulness across models", "",
           "| task | metric | " + " | ".join(models) + " | reading |",
           "|---|---|" + "---|" * len(models) + "---|"]
  for task, metric, reading in HEADLINE:
    values = [table[m].get(task, {}).get(metric) for m in models]
    if any(v is not None for v in values):
      lines.append(f"| {task} | {metric} | " + " | ".join(_cell(v) for v in values)
                   + f" | {reading} |")
  for model in models:
    lines += ["", f"## {model}", "", "| task | metric | value |", "|---|---|---|"]
    for task, metrics in table[model].items():
      for key, value in metrics.items():
        if not key.endswith("_stderr") and key != "items" and not key.startswith("items/"):
          err = metrics.get(f"{key}_stderr")
          shown = _cell(value) + (f" ± {_cell(err)}" if err is not None else "")
          lines.append(f"| {task} | {key} | {shown} |")
  return "\n".join(lines) + "\n"


def plot(table: dict[str, dict[str, dict[str, Any]]], path: str) -> list[str]:
  """One panel per headline metric present, a bar per model; returns the panels drawn."""
  # Imported here (as rlhf/rollout.py does): matplotlib is heavy and only the report plots.
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  models = list(table)
  panels = [(t, m) for t, m, _ in HEADLINE
            if any(table[x].get(t, {}).get(m) is not None for x in models)]
  cols = min(4, max(1, len(panels)))
  rows = -(-len(panels) // cols) if panels else 1
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
  for ax, (task, metric) in zip(axes.flat, panels):
    values = [table[m].get(task, {}).get(metric) for m in models]
    ax.bar(models, [float("nan") if v is None else v for v in values],
           color=[f"C{i}" for i in range(len(models))])
    ax.set_title(f"{task}\n{metric}", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.axhline(0, color="black", linewidth=0.5)
  for ax in list(axes.flat)[len(panels):]:
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return [f"{t}/{m}" for t, m in panels]


def write_report(reports: dict[str, dict[str, Any]], out_dir: str) -> dict[str, Any]:
  table = figures(reports)
  with open(os.path.join(out_dir, "safety_report.md"), "w") as f:
    f.write(markdown_report(table))
  with open(os.path.join(out_dir, "safety_report.json"), "w") as f:
    json.dump(table, f, indent=1)
  plot(table, os.path.join(out_dir, "safety_report.png"))
  return table


def main(argv: Sequence[str]) -> None:
  FLAGS = flags.FLAGS
  if len(argv) > 1:
    exit_with_error(f"unexpected arguments {argv[1:]}")
  try:
    models = parse_models(FLAGS.checkpoints)
  except ValueError as e:
    exit_with_error(e, FLAGS.verbose)
  tasks = [*SAFETY_TASKS, *(["redteam"] if FLAGS.judge else [])]
  os.makedirs(FLAGS.output_dir, exist_ok=True)
  reports = {}
  for name, checkpoint in models.items():
    eval_dir = os.path.join(FLAGS.output_dir, name)
    todo = tasks if FLAGS.rerun else missing_tasks(read_results(eval_dir), tasks, FLAGS.limit)
    if todo:
      cmd = eval_command(checkpoint, eval_dir, todo, FLAGS)
      print("$ " + " ".join(cmd), flush=True)
      run = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
      if run.returncode != 0:
        lines = run.stderr.strip().splitlines() or [f"exit code {run.returncode}"]
        cause = lines[-1].removeprefix("error: ")
        exit_with_error(f"eval.run on {name} ({checkpoint}) failed: {cause}")
    reports[name] = read_results(eval_dir)
  write_report(reports, FLAGS.output_dir)
  with open(os.path.join(FLAGS.output_dir, "safety_report.md")) as f:
    print(f.read().split("\n## ")[0], end="")
  print(f"Report: {FLAGS.output_dir}/safety_report.md, .json and .png", flush=True)


def define_flags() -> None:
  flags.DEFINE_string("checkpoints", None, "name=checkpoint,... in the report's order.",
                      required=True)
  flags.DEFINE_string("output_dir", None, "Where the per-model results and the report go.",
                      required=True)
  flags.DEFINE_string("judge", "", "Reward model: adds the redteam task.")
  flags.DEFINE_integer("limit", 0, "Items per task (eval.run's --limit; 0 = all).")
  flags.DEFINE_integer("batch_size", 32, "eval.run's --batch_size.")
  flags.DEFINE_integer("max_new_tokens", 64, "Answer length (truthfulqa_gen, redteam).")
  flags.DEFINE_integer("max_prompt_tokens", 128, "redteam: longer held-out prompts are left "
                       "out (eval.run's flag; tiny models need less).")
  flags.DEFINE_integer("local_devices", 0, "eval.run's --local_devices (0 = its default).")
  flags.DEFINE_bool("rerun", False, "Run every task again, even if its results exist.")
  flags.DEFINE_bool("verbose", False, "Print the traceback of an error too.")


if __name__ == "__main__":
  define_flags()
  app.run(main)
