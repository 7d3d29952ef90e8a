"""One command for the whole lifecycle: pretrain -> SFT -> reward model -> PPO and DPO -> eval.

  python -m launch.pipeline --config=configs/pipeline/cpu.py --workdir=runs/pipeline \
      [--stages=pretrain,sft] [--override=sft:train.num_steps=100] [--dry_run]

A pipeline config (configs/pipeline/*.py) lists training stages, each a stage entry point
(train.pretrain, train.sft, rlhf.reward, rlhf.ppo, rlhf.dpo, or rlhf.cai, which writes data
rather than a checkpoint) with a run config and dotted overrides, and names each stage's
parent: `init_from` (and PPO's `reward_from`, rlhf.cai's `judge_from`) is an earlier stage's
name, whose checkpoint initialises it, a checkpoint path or `hf:<dir>`; `data_from` names an
earlier rlhf.cai stage whose `data.jsonl` becomes the stage's `data.sources`. Then an
evaluation section: the tasks of eval.run for each named model (`eval.task_judge`, a
reward-model stage, judges `redteam` / `winrate` there), and reward-model win rates of the
policies against a baseline (eval.winrate, judged by a reward-model stage).

Before any work, every stage's config is loaded with its overrides (a field that does not
exist stops the pipeline naming the stage and the field) and every parent is checked: a
stage whose parent is neither an earlier stage of this run nor an existing checkpoint stops
it, naming the stage and the path. Stages already complete in `--workdir` (checkpoint at the
configured last step; an rlhf.cai stage: its summary.json; evaluation results present) are
skipped, so re-running the command resumes. Each stage runs as its own process
(`<workdir>/<stage>.log`, named when the stage starts; wall minutes in
`<workdir>/minutes.json`); while it runs, its progress lines (`step N/M | ...`, `eval step`,
`iter N/M`, `error:`) are shown prefixed by the stage name.

Last: `<workdir>/report.md` and `report.json` (stage minutes, final training metrics, the
evaluation table of every model, win rates with intervals) and the plots `curves.png`
(training curves of every stage) and `eval.png` (task metrics and win rates per model).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from typing import Any, Sequence

from absl import app, flags

from launch import overrides as ov
from launch import report as report_lib
from launch.stages import Chain, StageFailed, finished

ENTRIES = ("train.pretrain", "train.sft", "rlhf.reward", "rlhf.ppo", "rlhf.dpo", "rlhf.cai")
# Parent keys of a stage that name a checkpoint (an earlier stage or a path / hf:<dir>).
CHECKPOINT_KEYS = ("init_from", "reward_from", "judge_from")
STAGE_KEYS = ("name", "entry", "config", "overrides", *CHECKPOINT_KEYS, "data_from")

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command-line flags (defined only when this module is the program)."""
  flags.DEFINE_string("config", None, "Pipeline config file (configs/pipeline/...py[:arg]).")
  flags.DEFINE_string("workdir", None, "Directory of every stage's workdir and the report.")
  flags.DEFINE_list("stages", [], "Stages that may run, and `eval` (default: all); the run "
                    "stops before the first unfinished stage not listed.")
  flags.DEFINE_multi_string("override", [], "stage:field=value, e.g. sft:train.num_steps=100.")
  flags.DEFINE_bool("dry_run", False, "Check everything and print the commands; run nothing.")


class PipelineError(ValueError):
  """Bad pipeline input, found before any work."""


# --------------------------------------------------------------------------- plan
def _stage_list(config: Any) -> list[dict[str, Any]]:
  stages = [dict(s) for s in config.stages]
  names = [s.get("name", "") for s in stages]
  for i, s in enumerate(stages):
    where = f"pipeline stage {i} ({s.get('name', '?')})"
    missing = {"name", "entry", "config"} - set(s)
    if missing:
      raise PipelineError(f"{where}: missing {sorted(missing)}")
    unknown = set(s) - set(STAGE_KEYS)
    if unknown:
      raise PipelineError(f"{where}: unknown keys {sorted(unknown)}")
    if s["entry"] not in ENTRIES:
      raise PipelineError(f"{where}: entry {s['entry']!r} is not one of {ENTRIES}")
    if names.count(s["name"]) > 1:
      raise PipelineError(f"{where}: the name {s['name']!r} is used twice")
    s.setdefault("overrides", {})
  return stages


def plan(config: Any, workdir: str, extra: dict[str, dict[str, Any]] | None = None,
         selected: Sequence[str] = ()) -> list[dict[str, Any]]:
  """Resolves every stage: its workdir, parent paths and full override set, each checked.

  Returns the stages with `workdir`, `flags` (the command's arguments) and `done`.
  Raises PipelineError naming the stage and the cause, before anything runs.
  """
  stages = _stage_list(config)
  by_name = {s["name"]: s for s in stages}
  extra = extra or {}
  for name in extra:
    if name not in by_name:
      raise PipelineError(f"--override names stage {name!r}; stages: {list(by_name)}")
  for name in selected:
    if name not in by_name and name != "eval":
      raise PipelineError(f"--stages names {name!r}; stages: {list(by_name)}")
  seen: list[str] = []
  for s in stages:
    name = s["name"]
    s["workdir"] = os.path.join(workdir, name)
    s["done"] = stage_done(s)
    s["selected"] = not selected or name in selected
    overrides = {**s["overrides"], **extra.get(name, {})}
    if s.get("data_from"):
      overrides["data.sources"] = _data_parent(s, by_name, seen)
    for key in CHECKPOINT_KEYS:
      parent = s.get(key)
      if not parent:
        continue
      if parent in by_name:
        if parent not in seen:
          raise PipelineError(f"stage {name}: {key}={parent!r} is a later stage; a parent "
                              "must come before its child")
        p = by_name[parent]
        if p["entry"] == "rlhf.cai":
          raise PipelineError(f"stage {name}: {key}={parent!r} is an rlhf.cai stage, which "
                              "writes data, not a checkpoint (use data_from)")
        if not s["done"] and not p["done"] and not p["selected"]:
          raise PipelineError(
              f"stage {name}: parent checkpoint {key}={parent!r} is missing: stage {parent} "
              f"has not finished in {p['workdir']} and is not in --stages")
        path = stage_checkpoint(p)
        s.setdefault("parents", {})[key] = parent
      elif parent.startswith("hf:"):
        path = parent
        if not os.path.isfile(os.path.join(os.path.expanduser(parent[3:]), "config.json")):
          raise PipelineError(f"stage {name}: {key}={parent} has no config.json")
      else:
        path = os.path.abspath(os.path.expanduser(parent))
        if not _has_checkpoint(path):
          raise PipelineError(f"stage {name}: parent checkpoint {key}={parent} is missing "
                              f"(no readable checkpoint at {path})")
      overrides[key] = path
    cfg = ov.load_config(s["config"])
    ov.apply_overrides(cfg, overrides, f"stage {name} ({s['config']})")
    s["resolved_overrides"] = overrides
    seen.append(name)
  return stages


def _data_parent(s: dict[str, Any], by_name: dict[str, Any], seen: list[str]) -> str:
  """The data file an earlier rlhf.cai stage writes, for `data_from` (data.sources)."""
  parent = s["data_from"]
  p = by_name.get(parent)
  if p is None or p["entry"] != "rlhf.cai" or parent not in seen:
    raise PipelineError(f"stage {s['name']}: data_from={parent!r} is not an earlier "
                        "rlhf.cai stage")
  if not s["done"] and not p["done"] and not p["selected"]:
    raise PipelineError(f"stage {s['name']}: data_from={parent!r} has not finished in "
                        f"{p['workdir']} and is not in --stages")
  s.setdefault("parents", {})["data_from"] = parent
  return os.path.join(p["workdir"], "data.jsonl")


def stage_done(s: dict[str, Any]) -> bool:
  """A training stage: its checkpoint reached the last step; rlhf.cai: its summary.json."""
  if s["entry"] == "rlhf.cai":
    return os.path.exists(os.path.join(s["workdir"], "summary.json"))
  return finished(s["workdir"])


def stage_checkpoint(s: dict[str, Any]) -> str:
  """The checkpoint a stage leaves: PPO's policy in `<workdir>/policy`, else the workdir."""
  return os.path.join(s["workdir"], "policy") if s["entry"] == "rlhf.ppo" else s["workdir"]


def _has_checkpoint(path: str) -> bool:
  from train import checkpoint as ckpt_lib
  try:
    ckpt_lib.read_metadata(path)
    return True
  except Exception:  # noqa: BLE001 - any unreadable or missing checkpoint
    return False


def stage_command(s: dict[str, Any], stages_by_name: dict[str, Any]) -> list[str]:
  """`-m <entry> --config=... --workdir=... --config.<field>=...` of one stage."""
  del stages_by_name  # parents were resolved by plan()
  overrides = dict(s["resolved_overrides"])
  return ["-m", s["entry"], f"--config={s['config']}", f"--workdir={s['workdir']}",
          *ov.override_flags(overrides)]


# --------------------------------------------------------------------------- evaluation
def eval_plan(config: Any, stages: list[dict[str, Any]], workdir: str) -> list[dict[str, Any]]:
  """The evaluation commands: eval.run per language model (`data.benchmarks`) and per reward model
  (`eval.reward_tasks`), then eval.winrate once (if `eval.winrate_policies` is set)."""
  by_name = {s["name"]: s for s in stages}
  e = config.eval
  out = []
  models, reward_models = dict(e.models), dict(e.get("reward_models", ()))
  for group, entries, tasks in (("models", models, list(e.tasks)),
                                ("reward_models", reward_models, list(e.reward_tasks))):
    for model, stage in entries.items():
      if stage not in by_name:
        raise PipelineError(f"eval.{group}.{model}={stage!r} is not a stage: {list(by_name)}")
      is_rm = by_name[stage]["entry"] == "rlhf.reward"
      if is_rm != (group == "reward_models"):
        raise PipelineError(f"eval.{group}.{model}={stage!r}: a {by_name[stage]['entry']} "
                            f"stage belongs in eval.{'reward_models' if is_rm else 'models'}")
      out.append({"name": f"eval_{model}", "kind": "tasks", "group": group, "model": model,
                  "stage": stage,
                  "tasks": tasks, "output_dir": os.path.join(workdir, "eval", model)})
  judge = e.get("task_judge")
  if judge and (judge not in by_name or by_name[judge]["entry"] != "rlhf.reward"):
    raise PipelineError(f"eval.task_judge={judge!r} is not a reward-model stage")
  if e.get("winrate_policies"):
    for model in e.winrate_policies:
      if model not in models:
        raise PipelineError(f"eval.winrate_policies names {model!r}, not in eval.models")
    if e.baseline not in models:
      raise PipelineError(f"eval.baseline={e.baseline!r} is not in eval.models")
    if e.judge not in by_name or by_name[e.judge]["entry"] != "rlhf.reward":
      raise PipelineError(f"eval.judge={e.judge!r} is not a reward-model stage")
    out.append({"name": "eval_winrate", "kind": "winrate",
                "output": os.path.join(workdir, "eval", "winrate.json")})
  return out


def _tasks_done(output_dir: str, tasks: list[str], limit: int) -> bool:
  path = os.path.join(output_dir, "results.json")
  if not os.path.exists(path):
    return False
  with open(path) as f:
    report = json.load(f)
  return report.get("limit") == limit and set(tasks) <= set(report.get("results", {}))


def eval_command(item: dict[str, Any], config: Any, by_name: dict[str, Any]) -> list[str]:
  e = config.eval
  if item["kind"] == "tasks":
    stage = by_name[item["stage"]]
    cmd = ["-m", "eval.run", f"--checkpoint={stage_checkpoint(stage)}",
           f"--tasks={','.join(item['tasks'])}", f"--limit={e.limit}",
           f"--output_dir={item['output_dir']}", f"--batch_size={e.batch_size}"]
    if e.get("task_judge") and item["group"] == "models":
      # Judged tasks (redteam, winrate): a reward-model stage and the generation settings.
      cmd += [f"--judge={stage_checkpoint(by_name[e.task_judge])}",
              f"--samples_per_prompt={e.samples_per_prompt}",
              f"--max_prompt_tokens={e.max_prompt_tokens}",
              f"--max_new_tokens={e.max_new_tokens}", f"--temperature={e.temperature}"]
    return cmd
  models = dict(e.models)
  cmd = ["-m", "eval.winrate"]
  for model in e.winrate_policies:
    cmd.append(f"--policy={model}={stage_checkpoint(by_name[models[model]])}")
  cmd += [f"--baseline={e.baseline}",
          f"--reference={stage_checkpoint(by_name[models[e.baseline]])}",
          f"--judge={e.judge}={stage_checkpoint(by_name[e.judge])}",
          f"--samples_per_prompt={e.samples_per_prompt}", f"--max_prompts={e.max_prompts}",
          f"--max_prompt_tokens={e.max_prompt_tokens}", f"--max_new_tokens={e.max_new_tokens}",
          f"--temperature={e.temperature}", f"--batch_size={e.batch_size}",
          f"--output={item['output'].removesuffix('.json')}.jsonl"]
  return cmd


# --------------------------------------------------------------------------- run
def run(config: Any, workdir: str, selected: Sequence[str] = (),
        extra: dict[str, dict[str, Any]] | None = None, dry_run: bool = False) -> dict:
  """Plans (all checks first), runs what is not done, writes the report; returns it."""
  workdir = os.path.abspath(workdir)
  stages = plan(config, workdir, extra, selected)
  by_name = {s["name"]: s for s in stages}
  evals = eval_plan(config, stages, workdir)
  if dry_run:
    for s in stages:
      state = "done" if s["done"] else "would run" if s["selected"] else "not selected"
      print(f"# {s['name']}: {state}")
      print(shlex.join([sys.executable, *stage_command(s, by_name)]))
    for item in evals:
      print(f"# {item['name']}")
      print(shlex.join([sys.executable, *eval_command(item, config, by_name)]))
    return {}
  chain = Chain(workdir)
  with open(os.path.join(workdir, "pipeline_config.json"), "w") as f:
    f.write(json.dumps(config.to_dict(), indent=1, default=str))
  for s in stages:
    if not s["done"] and not s["selected"]:
      print(f"{s['name']}: not finished and not in --stages; stopping before it", flush=True)
      return {}
    chain.ensure(s["name"], stage_command(s, by_name),
                 done=lambda s=s: stage_done(s))
  if selected and "eval" not in selected:
    return {}
  limit = config.eval.limit
  for item in evals:
    cmd = eval_command(item, config, by_name)
    if item["kind"] == "tasks":
      done = lambda d=item["output_dir"], t=item["tasks"]: _tasks_done(d, t, limit)  # noqa: E731
      chain.ensure(item["name"], cmd, done=done)
    else:
      out = item["output"]
      if not os.path.exists(out):
        chain.ensure(item["name"], cmd, done=lambda: False)
        # eval.winrate prints its result as the log's last line.
        with open(chain.log_path(item["name"])) as f:
          last = [line for line in f if line.strip()][-1]
        tmp = out + ".tmp"
        with open(tmp, "w") as f:
          f.write(json.dumps(json.loads(last), indent=1))
        os.replace(tmp, out)
      else:
        print(f"{item['name']}: finished", flush=True)
  return report_lib.write(config, workdir, stages, chain.minutes)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS.config or not FLAGS.workdir:
    raise app.UsageError("--config and --workdir are required")
  try:
    config = ov.load_config(FLAGS.config)
    extra: dict[str, dict[str, Any]] = {}
    for item in FLAGS.override:
      stage, sep, assignment = item.partition(":")
      if not sep:
        raise PipelineError(f"--override={item!r}: expected stage:field=value")
      extra.setdefault(stage, {}).update(ov.parse_assignments([assignment], "override"))
    report = run(config, FLAGS.workdir, FLAGS.stages, extra, FLAGS.dry_run)
  except (PipelineError, ValueError, FileNotFoundError, StageFailed) as e:
    sys.exit(f"error: {e}")
  if report:
    print(json.dumps(report["summary"]))


if __name__ == "__main__":
  define_flags()
  app.run(main)
