"""Policy comparison on held-out prompts: responses of several policies, judged by reward models.

  python -m eval.winrate --policy=sft=runs/sft --policy=ppo=runs/ppo/policy \
      --policy=dpo=runs/dpo --baseline=sft --reference=runs/sft \
      --judge=train=runs/rm_a --judge=second=runs/rm_b --output=runs/compare.jsonl

The prompts are the held-out prompts of the preference sources (the validation split of
`rlhf.rollout.build_prompt_set`, the split every reward-model, DPO and PPO run of these
sources holds out), at most `--max_prompt_tokens`. Every policy answers each prompt
`--samples_per_prompt` times with the KV-cache sampler at `--temperature` (no top-k/top-p),
sample j of every policy drawn with the same seed (common random numbers: a policy compared
with itself ties everywhere). For each policy the last line reports:

  score/<judge>       mean raw score of its responses under the judge (read at the response's
                      last token, its `<|end|>` when it has one)
  gain_std/<judge>    (mean score - baseline mean score) / std of the baseline's scores
  winrate/<judge>     fraction of (prompt, sample j) where its score beats the baseline's
                      sample j (a tie counts 1/2), with wins/ties/losses counts and a
                      bootstrap 95% interval over prompts (samples of a prompt resampled
                      together)
  kl                  mean over responses of sum_t log pi(y_t) - log pi_ref(y_t), both at
                      the sampling temperature: the k1 estimate of KL(pi || pi_ref) per
                      response, nats (`--reference`; the SFT policy in RLHF)
  distinct2           distinct bigrams / bigrams over all its responses (end token excluded),
                      and distinct2_ratio to the baseline's
  eos_fraction, response_length

Every policy and judge must share one tokenizer (checked by fingerprint). `--output` writes
one JSON line per (policy, prompt, sample) with the text and scores.
"""

from __future__ import annotations

import functools
import json
import sys
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx

from data.chat import get_template
from data.config import default_preference_data_config
from data.tokenizer import fill_id
from eval.loading import LoadedCheckpoint, load_checkpoint
from eval.reward import bootstrap_ci, pairwise_wins
from model.heads import RewardModel
from model.sampling import Sampler, SamplingConfig
from model.transformer import Transformer
from rlhf.rollout import (build_prompt_set, distinct_n, end_scores, response_ids,
                          response_logps)
from train import checkpoint as ckpt_lib

ROW_KEYS = ("tokens", "positions", "segment_ids", "response_mask")


def parse_named(values: Sequence[str], flag: str) -> dict[str, str]:
  """["name=path", ...] -> {name: path}; a malformed or repeated name is an error."""
  out = {}
  for value in values:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
      raise ValueError(f"--{flag}={value!r}: expected name=checkpoint")
    if name in out:
      raise ValueError(f"--{flag}: the name {name!r} is given twice")
    out[name] = path
  return out


def apply_rows(loaded: LoadedCheckpoint, fn: Callable[..., jax.Array],
               rows: Mapping[str, np.ndarray], batch_size: int, **static: Any) -> np.ndarray:
  """fn(model, batch, **static) over `rows` on the checkpoint's runtime (train/runtime.py:
  one compiled program per function, static arguments and model structure, shared by every
  policy, judge and reference of a comparison)."""
  return loaded.runtime.apply(_bound(fn, tuple(sorted(static.items()))),
                              loaded.params, {k: rows[k] for k in ROW_KEYS}, batch_size)


@functools.lru_cache(maxsize=None)
def _bound(fn: Callable[..., jax.Array], static: tuple[tuple[str, Any], ...]
           ) -> Callable[..., jax.Array]:
  """One function object per (fn, static arguments), so the runtime's cache keys on it."""
  return functools.partial(fn, **dict(static))


def generate(loaded: LoadedCheckpoint, prompts: Sequence[np.ndarray], cfg: SamplingConfig,
             samples_per_prompt: int, seed: int, batch_size: int) -> dict[str, np.ndarray]:
  """Rows [prompts x samples, ...] in the sampler's layout; sample j of prompt i is row
  i * samples_per_prompt + j, and batch b draws with fold_in(key(seed), b)."""
  sampler = Sampler(loaded.graphdef, loaded.model_cfg, mesh=loaded.mesh, rules=loaded.rules,
                    param_shardings=loaded.param_shardings)
  order = [p for p in prompts for _ in range(samples_per_prompt)]
  parts = []
  for b, start in enumerate(range(0, len(order), batch_size)):
    chunk = order[start:start + batch_size]
    n = len(chunk)
    chunk = chunk + [chunk[0]] * (batch_size - n)  # one compiled shape
    out = sampler.generate(loaded.params, chunk, cfg,
                           seed=jax.random.fold_in(jax.random.key(seed), b))
    parts.append({"tokens": out.tokens[:n], "positions": out.positions[:n],
                  "segment_ids": out.segment_ids[:n], "response": out.response[:n],
                  "response_mask": out.response_mask[:n].astype(np.float32),
                  "finished": out.finished[:n]})
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def response_kl(policy: LoadedCheckpoint, reference: LoadedCheckpoint,
                rows: Mapping[str, np.ndarray], temperature: float, batch_size: int
                ) -> np.ndarray:
  """sum_t log pi(y_t) - log pi_ref(y_t) per response [R] (k1 KL estimate, nats)."""
  return (apply_rows(policy, _response_logp, rows, batch_size, temperature=temperature)
          - apply_rows(reference, _response_logp, rows, batch_size, temperature=temperature))


def _response_logp(model: nnx.Module, batch: Mapping[str, jax.Array], temperature: float
                   ) -> jax.Array:
  """log pi(response) [B] at `temperature`."""
  return jnp.sum(response_logps(model, batch, temperature)[0] * batch["response_mask"], 1)


def compare(policies: Mapping[str, str], judges: Mapping[str, str], *, baseline: str,
            reference: str | None, prompts: Sequence[np.ndarray], samples_per_prompt: int,
            max_new_tokens: int, temperature: float, seed: int = 0, batch_size: int = 32,
            num_resamples: int = 10_000, output: str | None = None,
            with_scores: bool = False) -> dict[str, Any]:
  """Generates, scores and compares (module doc); returns {"policies": {name: figures}}
  (with `with_scores`, also each response's score as figures["scores/<judge>"])."""
  if baseline not in policies:
    raise ValueError(f"--baseline={baseline!r} is not one of the policies {list(policies)}")
  if not prompts:
    raise ValueError("No held-out prompt to compare on (all longer than max_prompt_tokens?)")
  if temperature <= 0:
    raise ValueError(f"--temperature={temperature}: the comparison samples; use > 0")
  loaded_judges = {name: load_checkpoint(path, expect=RewardModel)
                   for name, path in judges.items()}
  ref = load_checkpoint(reference, expect=Transformer) if reference else None
  fingerprint = None
  for name, item in [*loaded_judges.items(), ("reference", ref)]:
    if item is not None:
      fingerprint = fingerprint or item.tokenizer.fingerprint
      if item.tokenizer.fingerprint != fingerprint:
        raise ValueError(f"{name} ({item.meta['checkpoint_path']}) has another tokenizer than "
                         "the other checkpoints; compare models of one tokenizer")
  results, rows_of = {}, {}
  num_prompts = len(prompts)
  for name, path in policies.items():
    policy = load_checkpoint(path, expect=Transformer)
    if fingerprint and policy.tokenizer.fingerprint != fingerprint:
      raise ValueError(f"Policy {name} ({path}) has another tokenizer than the judges / "
                       "reference; compare models of one tokenizer")
    fingerprint = fingerprint or policy.tokenizer.fingerprint
    template = get_template("auto", policy.tokenizer)
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=0,
                         top_p=1.0, eos_ids=tuple(template.end_ids),
                         pad_id=fill_id(policy.tokenizer),
                         prompt_bucket=max(len(p) for p in prompts))
    rows = generate(policy, prompts, cfg, samples_per_prompt, seed, batch_size)
    rows["scores"] = {j: apply_rows(judge, end_scores, rows, batch_size)
                      for j, judge in loaded_judges.items()}
    if ref is not None:
      rows["kl"] = response_kl(policy, ref, rows, temperature, batch_size)
    rows["texts"] = [template.decode_response(r.tolist()) for r in rows["response"]]
    rows_of[name] = rows
    results[name] = {
        "checkpoint": policy.meta["checkpoint_path"],
        "distinct2": distinct_n(response_ids(rows["response"], rows["response_mask"],
                                             rows["finished"]), 2),
        "eos_fraction": float(rows["finished"].mean()),
        "response_length": float(rows["response_mask"].sum(1).mean()),
        **({"kl": float(rows["kl"].mean())} if ref is not None else {}),
        **{f"score/{j}": float(s.mean()) for j, s in rows["scores"].items()},
        **({f"scores/{j}": s.tolist() for j, s in rows["scores"].items()}
           if with_scores else {}),
    }
    del policy
  base = rows_of[baseline]
  for name, rows in rows_of.items():
    r = results[name]
    r["distinct2_ratio"] = r["distinct2"] / max(results[baseline]["distinct2"], 1e-9)
    for j in loaded_judges:
      ours, theirs = rows["scores"][j], base["scores"][j]
      r[f"gain_std/{j}"] = float((ours.mean() - theirs.mean()) / max(theirs.std(), 1e-9))
      wins = pairwise_wins(ours, theirs)
      per_prompt = wins.reshape(num_prompts, samples_per_prompt).mean(1)
      lo, hi = bootstrap_ci(per_prompt, num_resamples, seed=seed)
      r[f"winrate/{j}"] = float(wins.mean())
      r[f"winrate/{j}/ci"] = [lo, hi]
      r[f"winrate/{j}/wins_ties_losses"] = [int((wins == 1).sum()), int((wins == 0.5).sum()),
                                            int((wins == 0).sum())]
  if output:
    with open(output, "w") as f:
      for name, rows in rows_of.items():
        for i, text in enumerate(rows["texts"]):
          f.write(json.dumps({
              "policy": name, "prompt_index": i // samples_per_prompt,
              "sample": i % samples_per_prompt, "response": text,
              "ended": bool(rows["finished"][i]),
              **{f"score/{j}": float(s[i]) for j, s in rows["scores"].items()},
              **({"kl": float(rows["kl"][i])} if "kl" in rows else {})}) + "\n")
  return {"num_prompts": num_prompts, "samples_per_prompt": samples_per_prompt,
          "baseline": baseline, "temperature": temperature, "policies": results}


def held_out_prompts(tokenizer: Any, sources: str, val_fraction: float, seed: int,
                     max_prompt_tokens: int) -> tuple[list[np.ndarray], int]:
  """The validation prompts (chat template) of `sources`, and how many were too long."""
  data = default_preference_data_config()
  data.update(sources=sources, val_fraction=val_fraction, seed=seed)
  try:
    prompt_set = build_prompt_set(data, get_template("auto", tokenizer), max_prompt_tokens)
  except ValueError as e:
    raise ValueError(f"No held-out prompt fits --max_prompt_tokens={max_prompt_tokens} "
                     f"({e})") from e
  return prompt_set.val, prompt_set.too_long


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  FLAGS = flags.FLAGS
  logging.set_verbosity(logging.ERROR)  # Orbax logs every file operation
  try:
    policies = parse_named(FLAGS.policy, "policy")
    judges = parse_named(FLAGS.judge, "judge")
    if not policies or not judges:
      raise ValueError("give at least one --policy=name=checkpoint and one --judge")
    baseline = FLAGS.baseline or next(iter(policies))
    if baseline not in policies:
      raise ValueError(f"--baseline={baseline!r} is not one of the policies {list(policies)}")
    tokenizer = load_checkpoint(policies[baseline], expect=Transformer).tokenizer
    prompts, too_long = held_out_prompts(
        tokenizer, FLAGS.sources or default_preference_data_config().sources,
        FLAGS.val_fraction, FLAGS.split_seed, FLAGS.max_prompt_tokens)
    if FLAGS.max_prompts:
      prompts = prompts[:FLAGS.max_prompts]
    result = compare(policies, judges, baseline=baseline,
                     reference=FLAGS.reference or None, prompts=prompts,
                     samples_per_prompt=FLAGS.samples_per_prompt,
                     max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                     seed=FLAGS.seed, batch_size=FLAGS.batch_size, output=FLAGS.output or None)
  except (ckpt_lib.CheckpointError, ValueError, OSError) as e:
    sys.exit("error: " + " ".join(str(e).split()))
  result["prompts_too_long"] = too_long
  print(f"{result['num_prompts']} held-out prompts x {result['samples_per_prompt']} samples "
        f"({too_long} prompts longer than {FLAGS.max_prompt_tokens} tokens left out), "
        f"baseline {result['baseline']}")
  for name, r in result["policies"].items():
    judged = "  ".join(
        f"{j}: score {r[f'score/{j}']:.3f} gain {r[f'gain_std/{j}']:+.2f} std win "
        f"{r[f'winrate/{j}']:.3f} {r[f'winrate/{j}/wins_ties_losses']}" for j in judges)
    print(f"  {name:8s} {judged}  kl {r.get('kl', float('nan')):.2f}  distinct-2 "
          f"{r['distinct2']:.3f} ({r['distinct2_ratio']:.2f}x)  eos {r['eos_fraction']:.2f}  "
          f"len {r['response_length']:.1f}")
  print(json.dumps(result, sort_keys=True))


def define_flags() -> None:
  """The command-line flags (defined only when this module is the program)."""
  flags.DEFINE_multi_string("policy", [], "name=checkpoint of a language model to compare.")
  flags.DEFINE_multi_string("judge", [], "name=checkpoint of a reward model that judges.")
  flags.DEFINE_string("baseline", "", "The policy the others are compared with (default: "
                      "the first).")
  flags.DEFINE_string("reference", "", "Language model the KL is measured to (optional).")
  flags.DEFINE_string("sources", "", "Preference sources; default: the HH pairs of "
                      "data.config.default_preference_data_config.")
  flags.DEFINE_float("val_fraction", 0.1, "Held-out fraction of prompts (the runs' split).")
  flags.DEFINE_integer("split_seed", 0, "Seed of the prompt split (the runs' data.seed).")
  flags.DEFINE_integer("max_prompt_tokens", 128, "Longer prompts are left out.")
  flags.DEFINE_integer("max_new_tokens", 64, "Response length limit.")
  flags.DEFINE_integer("max_prompts", 0, "Only the first N held-out prompts (0 = all): for "
                       "quick runs.")
  flags.DEFINE_float("temperature", 0.7, "Sampling temperature (also of the KL).")
  flags.DEFINE_integer("samples_per_prompt", 4, "Responses per prompt and policy.")
  flags.DEFINE_integer("seed", 0, "Sampling seed (the same for every policy).")
  flags.DEFINE_integer("batch_size", 32, "Rows per sampling / scoring call.")
  flags.DEFINE_string("output", "", "JSONL of every response with its scores.")


if __name__ == "__main__":
  define_flags()
  app.run(main)
