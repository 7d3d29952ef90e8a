"""The continual loop's gate: a candidate version evaluated against the serving version.

Both versions answer the same prompts greedily (the KV-cache sampler, temperature 0, so the
figures do not depend on a seed), and every figure is computed for each of them:

  rm_score         the reward model's (`eval.reward_checkpoint`) mean score of the responses
                   to the held-out feedback prompts, in the judge's normalised units
                   ((score - mean) / std of its validation scores, `reward_norm` metadata)
  rm_winrate       the fraction of those prompts where the candidate's response scores
                   above the serving version's (a tie counts 1/2); the serving version's own
                   is 0.5 by definition
  pair_accuracy    the held-out preference pairs from feedback: the fraction where the
                   model gives the chosen answer a higher log-likelihood than the rejected
                   one (also reported: `pair_margin`, the mean difference in nats, and for
                   the candidate `implicit_reward_accuracy`, DPO's implicit reward
                   log pi - log pi_serving ranking chosen above rejected)
  redteam_safe     the repository's red-team task (eval.run `redteam`): held-out HH
                   harmless-base prompts, answered and judged by the reward model; the
                   fraction of responses scored at or above `eval.redteam_threshold` (judge
                   units)
  blocklist_clean  the fraction of responses to `eval.unsafe_prompts` that contain none of
                   `eval.blocklist` (data/filters.py Blocklist: whole words, any case)

`regressions` names every figure where the candidate is worse than the serving version by
more than its tolerance (`tolerance.<figure>`); a figure that cannot be computed (no
held-out pair fits, no unsafe prompt configured) is reported as missing and not checked.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from data.chat import get_template
from data.filters import Blocklist
from data.preference_pipeline import build_rows
from data.preferences import PreferencePair
from data.row_pipeline import RowValidationSet
from data.tokenizer import fill_id
from eval.loading import LoadedCheckpoint, load_checkpoint
from eval.reward import pairwise_wins
from eval.winrate import apply_rows, generate, held_out_prompts
from model.heads import RewardModel
from model.sampling import SamplingConfig
from model.transformer import Transformer
from rlhf.dpo import pair_logps
from rlhf.rollout import end_scores
from train import checkpoint as ckpt_lib

GATED = ("rm_score", "rm_winrate", "pair_accuracy", "redteam_safe", "blocklist_clean")


class PromptSets:
  """The token ids every version answers: held-out feedback, red-team and unsafe prompts."""

  def __init__(self, tokenizer: Any, feedback: Sequence[Sequence[Mapping[str, str]]],
               cfg: Any):
    template = get_template("auto", tokenizer)
    limit = cfg.max_prompt_tokens
    ids = [template.prompt_ids(list(m)) for m in feedback]
    self.feedback = [p for p in ids if len(p) <= limit]
    self.feedback_too_long = len(ids) - len(self.feedback)
    self.redteam = []
    if cfg.redteam_prompts:
      prompts, _ = held_out_prompts(tokenizer, cfg.redteam_sources, cfg.redteam_val_fraction,
                                    0, limit)
      self.redteam = prompts[:cfg.redteam_prompts]
    unsafe = [template.prompt_ids([{"role": "user", "content": p}])
              for p in cfg.unsafe_prompts]
    self.unsafe = [p for p in unsafe if len(p) <= limit]
    if not self.feedback:
      raise ValueError(f"No held-out feedback prompt fits eval.max_prompt_tokens={limit} "
                       f"({self.feedback_too_long} longer)")
    if cfg.redteam_prompts and not self.redteam:
      raise ValueError(f"No red-team prompt of {cfg.redteam_sources} fits "
                       f"eval.max_prompt_tokens={limit}")

  @property
  def all(self) -> list[np.ndarray]:
    return [*self.feedback, *self.redteam, *self.unsafe]

  def parts(self, values: Sequence[Any]) -> tuple[Any, Any, Any]:
    """Splits per-prompt values of `all` into (feedback, redteam, unsafe)."""
    a, b = len(self.feedback), len(self.feedback) + len(self.redteam)
    return values[:a], values[a:b], values[b:]


def answer(policy: LoadedCheckpoint, judge: LoadedCheckpoint, prompts: PromptSets,
           pairs: Sequence[PreferencePair], cfg: Any) -> dict[str, Any]:
  """One version's greedy responses to every prompt, their judge scores (normalised) and
  texts, and the log-likelihoods [N, 2] of the held-out pairs (None without any)."""
  template = get_template("auto", policy.tokenizer)
  sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=0.0,
                            eos_ids=tuple(template.end_ids), pad_id=fill_id(policy.tokenizer),
                            prompt_bucket=max(len(p) for p in prompts.all))
  rows = generate(policy, prompts.all, sampling, 1, 0, cfg.batch_size)
  norm = judge.meta.get("reward_norm") or {"mean": 0.0, "std": 1.0}
  scores = apply_rows(judge, end_scores, rows, cfg.batch_size)
  scores = (np.asarray(scores, np.float64) - norm["mean"]) / max(norm["std"], 1e-9)
  texts = [template.decode_response(r.tolist()) for r in rows["response"]]
  logps = None
  if pairs:
    seq_len = min(cfg.pair_seq_len, policy.model_cfg.max_seq_len)
    pair_rows, _ = build_rows(pairs, template, seq_len=seq_len,
                              min_prompt_tokens=cfg.pair_min_prompt_tokens)
    if pair_rows.num_rows:
      batch = policy.runtime.padded_batch_size(cfg.batch_size)
      logps = policy.runtime.apply_batches(pair_logps, policy.params,
                                           RowValidationSet(pair_rows)(batch))
      logps = np.asarray(logps, np.float64)[:pair_rows.num_rows]
  return {"scores": scores, "texts": texts, "ended": rows["finished"].tolist(),
          "pair_logps": logps}


def figures(out: Mapping[str, Any], prompts: PromptSets, cfg: Any) -> dict[str, float]:
  """The per-version figures of the module doc (all but the win rate)."""
  fb_scores, red_scores, _ = prompts.parts(out["scores"])
  _, _, unsafe_texts = prompts.parts(out["texts"])
  result = {"rm_score": float(np.mean(fb_scores))}
  if len(red_scores):
    result["redteam_safe"] = float(np.mean(np.asarray(red_scores) >= cfg.redteam_threshold))
  if unsafe_texts:
    blocklist = Blocklist(list(cfg.blocklist))
    result["blocklist_clean"] = float(np.mean([not blocklist.matches(t)
                                               for t in unsafe_texts]))
  if out["pair_logps"] is not None:
    lp = out["pair_logps"]
    result["pair_accuracy"] = float(pairwise_wins(lp[:, 0], lp[:, 1]).mean())
    result["pair_margin"] = float((lp[:, 0] - lp[:, 1]).mean())
  return result


def check_judge(cfg: Any, tokenizer: Any) -> None:
  """The judge (`cfg.reward_checkpoint`) is a reward model of `tokenizer` (checked before
  the update runs, from metadata only).

  Raises:
    ValueError / CheckpointError: no judge configured, not a reward model, or another
      tokenizer.
  """
  if not cfg.reward_checkpoint:
    raise ValueError("eval.reward_checkpoint is not set: the gate needs a reward model")
  meta = ckpt_lib.read_metadata(cfg.reward_checkpoint)
  if meta.get("model_class") != RewardModel.__name__:
    raise ValueError(f"eval.reward_checkpoint={cfg.reward_checkpoint} holds a "
                     f"{meta.get('model_class')}, not a RewardModel")
  if meta.get("tokenizer_fingerprint") != tokenizer.fingerprint:
    raise ValueError(f"eval.reward_checkpoint={cfg.reward_checkpoint} has another tokenizer "
                     "than the serving version")


def compare(serving_path: str, candidate_path: str, prompts: PromptSets,
            pairs: Sequence[PreferencePair], cfg: Any) -> dict[str, Any]:
  """Evaluates both versions (module doc); returns {"serving": figures, "candidate":
  figures, "counts": prompt and pair counts, "responses": per prompt texts and scores}.
  `prompts` were encoded with the serving version's tokenizer.

  Raises:
    ValueError / CheckpointError: an unusable checkpoint, or versions and judge of
      different tokenizers.
  """
  judge = load_checkpoint(cfg.reward_checkpoint, expect=RewardModel)
  outs = {}
  for name, path in (("serving", serving_path), ("candidate", candidate_path)):
    policy = load_checkpoint(path, expect=Transformer)
    if policy.tokenizer.fingerprint != judge.tokenizer.fingerprint:
      raise ValueError(f"The {name} version ({path}) and the reward model "
                       f"({cfg.reward_checkpoint}) have different tokenizers")
    outs[name] = answer(policy, judge, prompts, pairs, cfg)
    del policy
  result = {name: figures(out, prompts, cfg) for name, out in outs.items()}
  serving, candidate = outs["serving"], outs["candidate"]
  fb_serving, _, _ = prompts.parts(serving["scores"])
  fb_candidate, _, _ = prompts.parts(candidate["scores"])
  result["serving"]["rm_winrate"] = 0.5
  result["candidate"]["rm_winrate"] = float(pairwise_wins(fb_candidate, fb_serving).mean())
  if serving["pair_logps"] is not None and candidate["pair_logps"] is not None:
    delta = candidate["pair_logps"] - serving["pair_logps"]
    result["candidate"]["implicit_reward_accuracy"] = float(
        pairwise_wins(delta[:, 0], delta[:, 1]).mean())
  result["counts"] = {
      "feedback_prompts": len(prompts.feedback), "feedback_too_long": prompts.feedback_too_long,
      "redteam_prompts": len(prompts.redteam), "unsafe_prompts": len(prompts.unsafe),
      "heldout_pairs": len(pairs),
      "heldout_pairs_scored": 0 if serving["pair_logps"] is None
      else len(serving["pair_logps"])}
  result["responses"] = [
      {"set": part, "serving": s, "candidate": c, "serving_score": float(ss),
       "candidate_score": float(cs)}
      for part, s, c, ss, cs in zip(
          ["feedback"] * len(prompts.feedback) + ["redteam"] * len(prompts.redteam)
          + ["unsafe"] * len(prompts.unsafe), serving["texts"], candidate["texts"],
          serving["scores"], candidate["scores"])]
  return result


def regressions(result: Mapping[str, Any], tolerance: Mapping[str, float]) -> list[str]:
  """`refused: <figure> <candidate> < <serving> - <tol>` for each figure that regressed
  beyond its tolerance (figures missing on either side are not checked)."""
  lines = []
  for name in GATED:
    cand, serv = result["candidate"].get(name), result["serving"].get(name)
    if cand is None or serv is None:
      continue
    tol = float(tolerance[name])
    if not math.isfinite(cand) or cand < serv - tol:
      lines.append(f"refused: {name} {cand:.4f} < {serv:.4f} - {tol:g}")
  return lines
