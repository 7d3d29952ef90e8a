"""The continual loop: user feedback on the served version -> the next version, if it is better.

  python -m launch.continual --registry=runs/registry --feedback=runs/serve/feedback.db \
      --workdir=runs/continual [--config=configs/continual/default.py] [--name=v3] \
      [--config.eval.reward_checkpoint=runs/rm] [--config.updates=sft,dpo]

One pass, in this order (every input is checked before the first stage starts):
1. The serving version is the registry's current one (serve/registry.py). The feedback is
   every row of the feedback store (serve/feedback.py) recorded since that version was
   registered; for a version this loop made, every row after the last one it was trained
   on (its metrics' `feedback.last_id`), so rows that came in while it was being trained
   are not lost.
2. Feedback -> training data (serve/feedback.py conversions): preference pairs
   (`<workdir>/<name>/data/pairs.jsonl`, prompt/chosen/rejected) and SFT examples
   (`sft.jsonl`, HH transcripts). Prompts are split into train / held-out by a hash of the
   prompt (`feedback.val_fraction`, `feedback.seed`) with the stages' own functions
   (data.preferences.split_pairs, data.sft_sources.split_examples), and the stages get the
   same fraction and seed, so each holds out exactly the loop's held-out part as its
   validation set and never trains on it.
3. The update: each stage of `config.updates` ("sft", "dpo" or both, in order) runs as its
   own process through its entry point (train.sft, rlhf.dpo), with LoRA (`config.lora`),
   from the serving version's checkpoint (the next stage from the previous one's), in
   `<workdir>/<name>/<stage>`. The exact commands are printed; logs are `<stage>.log`. A
   stage already finished there is not run again, so re-running the command resumes.
4. The gate (launch/continual_eval.py): the candidate and the serving version answer the
   held-out feedback prompts, red-team prompts and unsafe prompts; a reward model judges;
   held-out pairs are scored. `<workdir>/<name>/gate.json` keeps every figure and response.
5. No figure worse than the serving version's by more than `tolerance.<figure>`: the
   candidate is registered (parent: the serving version; metrics: the gate's figures and
   the feedback used) and promoted (unless `config.promote` is False); the server picks it
   up at its next poll of `Registry.generation()`. Otherwise nothing is registered and one
   line per regressed figure is printed: `refused: <figure> <candidate> < <serving> - <tol>`.

Exit codes: 0 registered (and promoted); 1 refused by the gate, or a stage failed (its
log is named); 2 bad input (one `error:` line: no current version, no feedback database,
too little feedback for a held-out split, an unknown config field, a missing judge).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Sequence

from absl import app, flags
from ml_collections import config_flags

from data.chat import render
from data.preferences import read_records, split_pairs
from data.sft_sources import parse_transcript, split_examples
from data.tokenizer import load_tokenizer
from launch import continual_eval
from launch import overrides as ov
from launch.stages import Chain, StageFailed
from serve.feedback import FeedbackStore, to_preference_pairs, to_sft_examples, write_jsonl
from serve.registry import Registry, write_json
from train import checkpoint as ckpt_lib
from train import entry

ENTRIES = {"sft": "train.sft", "dpo": "rlhf.dpo"}
FLAGS = flags.FLAGS


class Refused(Exception):
  """The gate refused the candidate (the message holds the `refused:` lines)."""


def define_flags() -> None:
  config_flags.DEFINE_config_file("config", "configs/continual/default.py",
                                  "Continual loop config (configs/continual/...py[:arg]).",
                                  lock_config=True)
  flags.DEFINE_string("registry", None, "The registry directory (serve/registry.py).")
  flags.DEFINE_string("feedback", None, "The feedback database (serve/feedback.py).")
  flags.DEFINE_string("workdir", None, "Where each candidate's data, runs and gate go.")
  flags.DEFINE_string("name", "", "Name of the candidate version (default: v<N>, the first "
                      "free one).")
  entry.define_common_flags()


# ------------------------------------------------------------------------------ data
def collect(registry: Registry, feedback_path: str, cfg: Any) -> dict[str, Any]:
  """The serving version, its feedback rows and their conversion and split (module doc 1-2).

  Raises:
    ValueError: no current version, no feedback database, or too little feedback for a
      stage of `cfg.updates` to have both a training and a held-out part.
  """
  serving = registry.current()
  if serving is None:
    raise ValueError(f"registry {registry.root} has no current version: register and "
                     "promote the served model first (python -m serve.registry)")
  if not os.path.exists(feedback_path):
    raise ValueError(f"no feedback database at {feedback_path}")
  last_id = serving.get("metrics", {}).get("feedback", {}).get("last_id")
  store = FeedbackStore(feedback_path)
  rows = (store.feedback(since_id=last_id) if last_id is not None
          else store.feedback(since_time=serving["created"]))
  f = cfg.feedback
  pairs = to_preference_pairs(rows, f.low_rating)
  examples = to_sft_examples(rows, f.high_rating)
  pair_objects = (read_records("feedback pairs", enumerate(pairs.records),
                               "prompt_chosen_rejected").pairs if pairs.records else [])
  train_pairs, val_pairs, _ = split_pairs(pair_objects, f.val_fraction, f.seed)
  conversations = [parse_transcript(r["text"]) for r in examples.records]
  train_convs, val_convs = split_examples(conversations, f.val_fraction, f.seed)
  sizes = {"dpo": (len(train_pairs), len(val_pairs), "preference pairs"),
           "sft": (len(train_convs), len(val_convs), "SFT examples")}
  for stage in cfg.updates:
    if stage not in ENTRIES:
      raise ValueError(f"config.updates names {stage!r}; expected stages of {list(ENTRIES)}")
    train, val, what = sizes[stage]
    if not train or not val:
      raise ValueError(
          f"too little feedback for {stage}: {train} training and {val} held-out {what} from "
          f"{len(rows)} feedback rows since {serving['name']} (each part needs one; collect "
          "more feedback or change feedback.val_fraction)")
  # Held-out prompts: those of held-out items that no stage of this update trains on.
  trained = {render(p.prompt) for p in train_pairs if "dpo" in cfg.updates}
  trained |= {render(c[:-1]) for c in train_convs if "sft" in cfg.updates}
  heldout = {render(p.prompt): list(p.prompt) for p in val_pairs}
  heldout.update({render(c[:-1]): c[:-1] for c in val_convs})
  prompts = [m for k, m in heldout.items() if k not in trained][:cfg.eval.max_prompts]
  if not prompts:
    raise ValueError("no held-out feedback prompt to evaluate on (every held-out prompt is "
                     "also trained on)")
  return {"serving": serving, "rows": rows, "pairs": pairs, "examples": examples,
          "val_pairs": val_pairs, "heldout_prompts": prompts,
          "split": {k: {"train": v[0], "heldout": v[1]} for k, v in sizes.items()}}


def candidate_name(registry: Registry, name: str) -> str:
  """`name`, or the first v<N> not taken (N from the number of versions)."""
  taken = {v["name"] for v in registry.versions()}
  if name:
    if name in taken:
      raise ValueError(f"--name={name}: version {name!r} already exists in {registry.root}")
    return name
  n = len(taken)
  while f"v{n}" in taken:
    n += 1
  return f"v{n}"


# ------------------------------------------------------------------------------ update
def plan_stages(cfg: Any, serving_checkpoint: str, folder: str, data: dict[str, str]
                ) -> list[tuple[str, list[str], str]]:
  """(name, command, workdir) of each update stage, every override checked first."""
  out, parent = [], serving_checkpoint
  for stage in cfg.updates:
    spec = cfg[stage].config
    overrides = ov.parse_assignments(list(cfg[stage].overrides), f"{stage}.overrides")
    overrides.update({
        "init_from": parent, "data.sources": data[stage],
        "data.val_fraction": cfg.feedback.val_fraction, "data.seed": cfg.feedback.seed,
        **{f"lora.{k}": v for k, v in cfg.lora.items()}})
    ov.apply_overrides(ov.load_config(spec), overrides, f"{stage} ({spec})")
    workdir = os.path.join(folder, stage)
    cmd = ["-m", ENTRIES[stage], f"--config={spec}", f"--workdir={workdir}",
           *ov.override_flags(overrides)]
    out.append((stage, cmd, workdir))
    parent = workdir
  return out


def write_data(folder: str, found: dict[str, Any]) -> dict[str, str]:
  """pairs.jsonl, sft.jsonl and heldout.json under `<folder>/data`; returns the sources of
  each stage."""
  data_dir = os.path.join(folder, "data")
  os.makedirs(data_dir, exist_ok=True)
  paths = {"dpo": os.path.join(data_dir, "pairs.jsonl"),
           "sft": os.path.join(data_dir, "sft.jsonl")}
  write_jsonl(paths["dpo"], found["pairs"].records)
  write_jsonl(paths["sft"], found["examples"].records)
  write_json(os.path.join(data_dir, "heldout.json"),
             {"prompts": found["heldout_prompts"], "split": found["split"]})
  return paths


# ------------------------------------------------------------------------------ the loop
def run(registry: Registry, feedback_path: str, workdir: str, cfg: Any, name: str = ""
        ) -> dict[str, Any]:
  """One pass of the loop (module doc); returns the registered version.

  Raises:
    ValueError / CheckpointError: bad input (before any stage runs).
    StageFailed: a stage's process failed.
    Refused: the gate refused the candidate (nothing registered).
  """
  found = collect(registry, feedback_path, cfg)
  serving, rows = found["serving"], found["rows"]
  name = candidate_name(registry, name)
  folder = os.path.join(os.path.abspath(workdir), name)
  print(f"serving {serving['name']} ({serving['checkpoint']}); {len(rows)} feedback rows "
        f"since it was registered -> {len(found['pairs'].records)} preference pairs "
        f"(skipped {found['pairs'].skipped}), {len(found['examples'].records)} SFT examples "
        f"(skipped {found['examples'].skipped}); split {found['split']}; candidate {name}",
        flush=True)
  # The gate's prompts and judge are checked before anything is trained.
  tokenizer = load_tokenizer(ckpt_lib.read_tokenizer(serving["checkpoint"]))
  continual_eval.check_judge(cfg.eval, tokenizer)
  prompts = continual_eval.PromptSets(tokenizer, found["heldout_prompts"], cfg.eval)
  os.makedirs(folder, exist_ok=True)
  stages = plan_stages(cfg, serving["checkpoint"], folder, write_data(folder, found))
  chain = Chain(folder)
  for stage, cmd, _ in stages:
    chain.ensure(stage, cmd, exit_on_failure=False)
  candidate = ckpt_lib.read_metadata(stages[-1][2])["checkpoint_path"]
  print(f"gate: {candidate} against {serving['name']}", flush=True)
  result = continual_eval.compare(serving["checkpoint"], candidate, prompts,
                                  found["val_pairs"], cfg.eval)
  refused = continual_eval.regressions(result, cfg.tolerance)
  write_json(os.path.join(folder, "gate.json"), {**result, "refused": refused,
                                                  "tolerance": cfg.tolerance.to_dict()})
  for figure in continual_eval.GATED:
    print(f"  {figure:16s} serving {result['serving'].get(figure, float('nan')):8.4f}  "
          f"candidate {result['candidate'].get(figure, float('nan')):8.4f}  "
          f"tolerance {cfg.tolerance[figure]:g}", flush=True)
  if refused:
    raise Refused("\n".join(refused))
  metrics = {"gate": {k: result[k] for k in ("serving", "candidate", "counts")},
             "feedback": {"rows": len(rows), "first_id": rows[0]["id"],
                          "last_id": rows[-1]["id"], "pairs": len(found["pairs"].records),
                          "sft_examples": len(found["examples"].records),
                          "split": found["split"]},
             "updates": list(cfg.updates), "workdir": folder}
  version = registry.register(name, candidate, parent=serving["name"], metrics=metrics,
                              note=f"continual: {'+'.join(cfg.updates)} on {len(rows)} "
                                   f"feedback rows")
  print(f"registered {name}: {version['checkpoint']}", flush=True)
  if cfg.promote:
    registry.promote(name)
    print(f"promoted {name} (generation {registry.generation()})", flush=True)
  return version


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    entry.fail(f"unexpected arguments {argv[1:]}")
  for flag in ("registry", "feedback", "workdir"):
    if not FLAGS[flag].value:
      entry.fail(f"--{flag} is required")

  def body() -> None:
    try:
      run(Registry(FLAGS.registry), FLAGS.feedback, FLAGS.workdir, entry.loaded_config(),
          FLAGS.name)
    except StageFailed as e:
      print(f"error: {e}", file=sys.stderr, flush=True)
      sys.exit(1)
    except Refused as e:
      print(str(e), flush=True)
      sys.exit(1)

  entry.run_main(body)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=entry.parse_flags)
