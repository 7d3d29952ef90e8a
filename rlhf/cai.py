"""Constitutional AI (Bai et al. 2022) as a stage: the model's own critiques and revisions
become SFT data, and a judge's comparisons become preference pairs.

  python -m rlhf.cai --config=configs/cai/hh.py:phase=sl --workdir=runs/cai_sl \
      --config.init_from=runs/sft
  python -m rlhf.cai --config=configs/cai/hh.py:phase=feedback --workdir=runs/cai_fb \
      --config.init_from=runs/cai_sft --config.judge_from=runs/sft

Prompts: the training split of `config.data.sources` (the HH harmless-base red-team
prompts; the split of the reward-model and DPO runs, so their held-out prompts, which
eval.run's `redteam` and `winrate` answer, are never used), the first `num_prompts` that fit
`max_prompt_tokens`. `init_from` and `judge_from` are any language-model checkpoint with a
chat template, own or `hf:<dir>`.

phase=sl      the policy answers, critiques its answer against a principle drawn for the
              prompt (rlhf/cai_prompts.py), then revises it; each step one chat turn.
              `<workdir>/data.jsonl`: the revisions as HH transcripts ({"text"}), which
              train.sft reads unchanged (--config.data.sources=<workdir>/data.jsonl).
phase=feedback  the policy answers each prompt twice (two seeds); the judge (`judge_from`,
              default the policy) compares the two under a drawn principle's comparison
              question, as options (A)/(B) scored by log-likelihood, in both orders, and the
              averaged P(first better) orders the pair. `<workdir>/data.jsonl`: pairs in the
              prompt_chosen_rejected format with `soft_label`, which rlhf.reward and
              rlhf.dpo read unchanged. Pairs whose label is within `min_confidence` of 0.5
              (and identical or empty answers) are left out and counted.

Also written: `records.jsonl` (every step of every prompt), and last `summary.json`
(counts, minutes, the mean first-position probability of the judge), whose presence marks
the stage done (launch/pipeline.py).

Bad input (a malformed constitution file, a missing checkpoint, a config field that does
not exist) ends in one `error:` line naming the file or field, exit code 2, nothing written.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Any, Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from data.preferences import read_sources, split_pairs
from rlhf import cai_model
from rlhf import cai_prompts as cp
from train import checkpoint as ckpt_lib

PHASES = ("sl", "feedback")
OUTPUT = "data.jsonl"
SUMMARY = "summary.json"


# ------------------------------------------------------------------------------ prompts
def red_team_prompts(config: Any, model: cai_model.ChatModel) -> tuple[list[Any], int]:
  """(training-split prompts that fit, first `num_prompts`, as (key, messages)), and how
  many distinct training prompts were too long."""
  pairs, _ = read_sources(config.data.sources)
  train, _, _ = split_pairs(pairs, config.data.val_fraction, config.data.seed)
  seen, out, too_long = set(), [], 0
  for pair in train:
    if pair.key in seen:
      continue
    seen.add(pair.key)
    if len(model.template.prompt_ids(pair.prompt)) > config.max_prompt_tokens:
      too_long += 1
      continue
    out.append((pair.key, [dict(m) for m in pair.prompt]))
    if len(out) == config.num_prompts:
      break
  if not out:
    raise ValueError(f"config.data.sources={config.data.sources}: no training prompt fits "
                     f"max_prompt_tokens={config.max_prompt_tokens}")
  return out, too_long


def _answer(config: Any, model: cai_model.ChatModel, conversations: Sequence[Any],
            seed: int) -> list[str]:
  outs = cai_model.answer(model, conversations, config.max_new_tokens, config.temperature,
                          config.top_p, seed, config.batch_size)
  return [cp.clean_response(o["response"]) for o in outs]


# ------------------------------------------------------------------------------ phases
def supervised_phase(config: Any, policy: cai_model.ChatModel,
                     principles: Sequence[cp.Principle], prompts: Sequence[Any]
                     ) -> tuple[list[dict], list[dict], dict[str, int]]:
  """Answer, critique, revise. Returns (SFT records, full records, counts)."""
  keys = [k for k, _ in prompts]
  chosen = cp.sample_principles(principles, keys, config.seed, "sl")
  responses = _answer(config, policy, [m for _, m in prompts], config.seed)
  counts = {"prompts": len(prompts), "too_long": 0, "empty_revision": 0}
  crit_convs = [cp.critique_conversation(m, r, p)
                for (_, m), r, p in zip(prompts, responses, chosen)]
  # A turn whose prompt + max_new_tokens passes the context is skipped and counted.
  ok = [i for i, c in enumerate(crit_convs) if cai_model.fits(policy, c, config.max_new_tokens)]
  critiques = dict(zip(ok, _answer(config, policy, [crit_convs[i] for i in ok],
                                   config.seed + 1)))
  rev_convs = {i: cp.revision_conversation(prompts[i][1], responses[i], critiques[i],
                                           chosen[i]) for i in ok}
  ok = [i for i in ok if cai_model.fits(policy, rev_convs[i], config.max_new_tokens)]
  counts["too_long"] = len(prompts) - len(ok)
  revisions = dict(zip(ok, _answer(config, policy, [rev_convs[i] for i in ok],
                                   config.seed + 2))) if ok else {}
  sft, full = [], []
  for i in ok:
    key, messages = prompts[i]
    full.append({"key": key, "prompt": messages, "principle": chosen[i].name,
                 "response": responses[i], "critique": critiques[i],
                 "revision": revisions[i]})
    if not revisions[i]:
      counts["empty_revision"] += 1
      continue
    sft.append(cp.sft_record(messages, revisions[i], chosen[i]))
  counts["examples"] = len(sft)
  return sft, full, counts


def judge_pairs(judge: cai_model.ChatModel, items: Sequence[tuple[Any, str, str,
                                                                 cp.Principle]],
                batch_size: int) -> tuple[list[float], list[float]]:
  """(P(response 1 better) averaged over both orders, P("(A)") of each order) per item
  (prompt messages, response 1, response 2, principle)."""
  convs = []
  for messages, r1, r2, principle in items:
    convs += [cp.judge_conversation(messages, r1, r2, principle),
              cp.judge_conversation(messages, r2, r1, principle)]
  logps = cai_model.option_logps(judge, convs, cp.OPTIONS, batch_size)  # [2N, 2]
  labels = [cp.soft_label(logps[2 * i], logps[2 * i + 1]) for i in range(len(items))]
  first = [cp.first_order_probability(row) for row in logps]
  return labels, first


def feedback_phase(config: Any, policy: cai_model.ChatModel, judge: cai_model.ChatModel,
                   principles: Sequence[cp.Principle], prompts: Sequence[Any]
                   ) -> tuple[list[dict], list[dict], dict[str, Any]]:
  """Two answers per prompt, judged in both orders. Returns (pairs, full records, counts)."""
  keys = [k for k, _ in prompts]
  chosen = cp.sample_principles(principles, keys, config.seed, "feedback")
  messages = [m for _, m in prompts]
  first = _answer(config, policy, messages, config.seed)
  second = _answer(config, policy, messages, config.seed + 1)
  counts: dict[str, Any] = {"prompts": len(prompts), "identical_or_empty": 0, "too_long": 0,
                            "low_confidence": 0}
  items, index = [], []
  for i, (m, a, b, p) in enumerate(zip(messages, first, second, chosen)):
    if not a or not b or a == b:
      counts["identical_or_empty"] += 1
      continue
    if not all(cai_model.fits(judge, cp.judge_conversation(m, x, y, p), 8)
               for x, y in ((a, b), (b, a))):
      counts["too_long"] += 1
      continue
    items.append((m, a, b, p))
    index.append(i)
  if not items:
    raise ValueError(f"no prompt gave two distinct answers that fit the judge's context "
                     f"({counts})")
  labels, first_p = judge_pairs(judge, items, config.batch_size)
  pairs, full = [], []
  for (m, a, b, p), i, label in zip(items, index, labels):
    full.append({"key": keys[i], "prompt": m, "principle": p.name, "response_1": a,
                 "response_2": b, "p_1_better": label})
    if abs(label - 0.5) <= config.min_confidence:
      counts["low_confidence"] += 1
      continue
    pairs.append(cp.preference_record(m, a, b, label, p))
  counts["pairs"] = len(pairs)
  counts["judge_first_position_mean"] = sum(first_p) / len(first_p)
  counts["soft_label_mean_chosen"] = (sum(r["soft_label"] for r in pairs) / len(pairs)
                                      if pairs else float("nan"))
  return pairs, full, counts


# ------------------------------------------------------------------------------ driver
def _write_jsonl(path: str, records: Sequence[dict]) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  os.replace(tmp, path)


def run(config: Any, workdir: str) -> dict[str, Any]:
  """Checks the input, runs the configured phase, writes the files; returns the summary."""
  start = time.perf_counter()
  if config.phase not in PHASES:
    raise ValueError(f"config.phase={config.phase!r}: expected one of {PHASES}")
  if not config.init_from:
    raise ValueError("config.init_from: set the policy checkpoint (own or hf:<dir>)")
  principles = cp.load_constitution(config.constitution)
  policy = cai_model.load_chat_model(config.init_from, "config.init_from", config.template)
  judge = policy
  if config.phase == "feedback" and config.judge_from and config.judge_from != config.init_from:
    judge = cai_model.load_chat_model(config.judge_from, "config.judge_from", config.template)
  prompts, too_long = red_team_prompts(config, policy)
  print(f"cai {config.phase}: {len(prompts)} prompts ({too_long} longer than "
        f"{config.max_prompt_tokens} tokens left out), {len(principles)} principles",
        flush=True)
  if config.phase == "sl":
    records, full, counts = supervised_phase(config, policy, principles, prompts)
  else:
    records, full, counts = feedback_phase(config, policy, judge, principles, prompts)
  if not records:
    raise ValueError(f"phase {config.phase} produced no example ({counts})")
  os.makedirs(workdir, exist_ok=True)
  _write_jsonl(os.path.join(workdir, "records.jsonl"), full)
  _write_jsonl(os.path.join(workdir, OUTPUT), records)
  summary = {"phase": config.phase, "output": os.path.join(os.path.abspath(workdir), OUTPUT),
             "policy": config.init_from, "judge": config.judge_from or config.init_from,
             "prompts_too_long": too_long, **counts,
             "minutes": (time.perf_counter() - start) / 60}
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=1))
  tmp = os.path.join(workdir, SUMMARY + ".tmp")
  with open(tmp, "w") as f:
    json.dump(summary, f, indent=1)
  os.replace(tmp, os.path.join(workdir, SUMMARY))
  return summary


def done(workdir: str) -> bool:
  """Whether a CAI run finished in `workdir` (its summary.json is written last)."""
  return os.path.exists(os.path.join(workdir, SUMMARY))


def define_flags() -> None:
  """The command-line flags (defined only when this module is the program)."""
  config_flags.DEFINE_config_file("config", None, "configs/cai/<x>.py[:phase=...]",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Where data.jsonl, records.jsonl and summary.json go.")
  flags.DEFINE_bool("verbose", False, "Print the traceback of an error too.")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  FLAGS = flags.FLAGS
  logging.set_verbosity(logging.ERROR)  # Orbax logs every file it reads
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  try:
    summary = run(FLAGS.config, FLAGS.workdir)
  except (ValueError, KeyError, FileNotFoundError, ckpt_lib.CheckpointError) as e:
    if FLAGS.verbose:
      traceback.print_exception(e, file=sys.stderr)
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
    sys.exit(2)
  print(json.dumps(summary), flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
