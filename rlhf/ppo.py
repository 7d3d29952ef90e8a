"""PPO entry point: the SFT policy optimised against a reward model with a KL penalty.

  python -m rlhf.ppo --config=configs/ppo/hh.py --workdir=runs/ppo \
      --config.init_from=runs/sft --config.reward_from=runs/rm

Four models, all on the same mesh: the policy (initialised from `init_from`, trained), the
frozen reference (the same checkpoint), the value model (a `RewardModel` initialised from
`reward_from`, trained with its own optimizer, `config.value_optim`) and the frozen reward
model (`reward_from`). PPO is an outer loop around two ordinary Trainers (`<workdir>/policy`
and `<workdir>/value`, each with the shared step, optimizer and checkpoint format):

  for each iteration:
    rollout   sample `rollout_batch_size` training prompts with the KV-cache sampler at
              temperature T (no top-k/top-p: the log-probs are the policy's own)
    scoring   one forward pass each: policy log-probs (old), reference log-probs, values,
              reward-model score at the end index; a response without `<|end|>` gets
              `score - missing_eos_penalty` (or the score `replace_score` instead); scores
              are normalised with the reward model's stored mean/std
    advantage per-token reward = -kl_coef * KL_t (+ score at the last token), GAE(γ, λ),
              advantages whitened over the batch
    update    `epochs` x `minibatches` of the policy step (clipped surrogate) and the value
              step (clipped value loss), each a `Trainer.dispatch`

The same T divides the logits in every pass (rollout, reference, training), so the first
minibatch's ratio is exactly 1 (logged as `policy/ratio_max_dev`). Metrics are logged per
iteration with the anchors' names (`objective/*`, `policy/*`, `val/*`, `eos_fraction`,
`response_length`, `time/*`); the KL coefficient of the adaptive controller and the
iteration are kept in the checkpoint metadata, so a resumed run continues the same run.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from rlhf import ppo_core
from rlhf.rollout import (advantages, distinct_n, plot_history, policy_loss_fn,
                          response_ids, response_logps, response_values, value_loss_fn)
from train.pretrain import write_config

RewardFn = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (tokens, response_mask) -> [B]


def _check(cfg: Any) -> None:
  """Validates the PPO fields and derives the Trainers' batch size and step count."""
  p = cfg.ppo
  if p.temperature <= 0:
    raise ValueError(f"ppo.temperature={p.temperature}: PPO samples from the policy; use > 0")
  if p.rollout_batch_size % p.minibatches:
    raise ValueError(f"ppo.rollout_batch_size={p.rollout_batch_size} is not divisible by "
                     f"ppo.minibatches={p.minibatches}")
  # One optimizer step per minibatch: the schedules run over every step of the run.
  with cfg.unlocked():
    cfg.train.batch_size = p.rollout_batch_size // p.minibatches
    cfg.train.num_steps = p.iterations * p.epochs * p.minibatches
    cfg.train.eval_batch_size = p.rollout_batch_size
    cfg.data.seq_len = p.max_prompt_tokens + p.max_new_tokens


class PPO:
  """The four models, the prompt set and the iteration loop of one PPO run.

  Args:
    config: the run config (configs/ppo/*.py).
    workdir: run directory; the policy and value Trainers write to its subdirectories.
    reward_fn: optional rule-based reward (tokens [B, L], response_mask [B, N]) -> [B]
      used instead of the reward model (tests, toy tasks); the value model is then
      initialised from `reward_from` if set, else from the policy's checkpoint.
  """

  def __init__(self, config: Any, workdir: str, reward_fn: RewardFn | None = None):
    from model.heads import RewardModel
    from model import layout
    from model.sampling import Sampler, SamplingConfig
    from rlhf.reward import reward_model_adapter
    from rlhf.rollout import build_prompt_set, end_scores
    from train.parent import setup_child
    from train.restore import InitAdapter
    from train.trainer import Trainer

    _check(config)
    self.config, self.workdir, self.reward_fn = config, workdir, reward_fn
    p = config.ppo
    parent = setup_child(config, "an SFT workdir or checkpoint directory (policy and reference)")
    if not config.reward_from and reward_fn is None:
      raise ValueError("PPO needs a reward: set --config.reward_from to a reward-model "
                       "checkpoint")
    value_config = copy.deepcopy(config)
    with value_config.unlocked():
      value_config.optim = config.value_optim
      value_config.init_from = config.reward_from or config.init_from
    rm_parent = setup_child(value_config, "a reward-model checkpoint")
    if config.reward_from and rm_parent.meta.get("model_class") != RewardModel.__name__:
      raise ValueError(f"reward_from={config.reward_from!r} is a {rm_parent.meta.get('stage')!r}"
                       " checkpoint without a scalar head; point it at a reward-model run")
    if rm_parent.child_tokenizer.fingerprint != parent.child_tokenizer.fingerprint:
      raise ValueError(f"The reward model's tokenizer ({config.reward_from}) differs from the "
                       f"policy's ({config.init_from}); train the reward model from the same "
                       "SFT checkpoint")
    if p.max_prompt_tokens + p.max_new_tokens > parent.child_cfg.max_seq_len:
      raise ValueError(f"ppo.max_prompt_tokens + ppo.max_new_tokens = "
                       f"{p.max_prompt_tokens + p.max_new_tokens} exceeds the model context "
                       f"({parent.child_cfg.max_seq_len})")
    self.template = parent.template
    self.prompts = build_prompt_set(config.data, parent.template, p.max_prompt_tokens)
    tok = parent.child_tokenizer
    self.policy = Trainer(
        config, os.path.join(workdir, "policy"), parent.child_cfg,
        functools.partial(policy_loss_fn, temperature=p.temperature, clip=p.clip),
        tokenizer_bytes=tok.to_bytes(), tokenizer_fingerprint=tok.fingerprint,
        init_adapter=InitAdapter(parent.execution_cfg, lambda x: layout.extend_vocab(
            x, parent.child_cfg.vocab_size, config.seed)))
    self.value = Trainer(
        value_config, os.path.join(workdir, "value"), rm_parent.child_cfg,
        functools.partial(value_loss_fn, clip=p.value_clip), model_factory=RewardModel,
        tokenizer_bytes=tok.to_bytes(), tokenizer_fingerprint=tok.fingerprint,
        init_adapter=reward_model_adapter(rm_parent, config.seed),
        devices=list(self.policy.mesh.devices.flat))
    self.reference, _ = self.policy.load_init_params()
    self.reward_params = self.value.load_init_params()[0] if config.reward_from else None
    norm = rm_parent.meta.get("reward_norm") if config.reward_from else None
    self.norm = (norm["mean"], norm["std"]) if (norm and p.normalize_reward) else (0.0, 1.0)
    self.sampler = Sampler(self.policy.graphdef, parent.child_cfg, self.policy.mesh,
                           self.policy.rules, self.policy.param_shardings)
    self.sampling = SamplingConfig(
        max_new_tokens=p.max_new_tokens, temperature=p.temperature, top_k=0, top_p=1.0,
        eos_ids=tuple(dict.fromkeys((parent.template.end_id, tok.eos_id))),
        pad_id=tok.pad_id, prompt_bucket=p.max_prompt_tokens)
    temperature = p.temperature
    # predict() compiles once per function object: these are built once per run.
    self._logp_entropy = lambda m, b: jnp.stack(response_logps(m, b, temperature), axis=1)
    self._logp = lambda m, b: response_logps(m, b, temperature)[0]
    self._end_scores = end_scores
    self.kl = ppo_core.KLController(p.kl_coef, p.kl_target or None, p.kl_horizon)

  # ------------------------------------------------------------------ one iteration
  def rollout(self, params: Any, prompts: list[np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """Samples responses; returns the host rollout batch (tokens, positions, masks, ...)."""
    out = self.sampler.generate(params, prompts, self.sampling, seed=seed)
    return {"tokens": out.tokens, "positions": out.positions, "segment_ids": out.segment_ids,
            "response_mask": out.response_mask.astype(np.float32),
            "ended": out.finished.astype(np.float32), "sampler_logp": out.logprobs}

  def score(self, policy_params: Any, value_params: Any, batch: dict[str, np.ndarray]
            ) -> dict[str, np.ndarray]:
    """Old and reference log-probs, entropy, values and (penalised, normalised) scores."""
    p = self.config.ppo
    rows = {k: batch[k] for k in ("tokens", "positions", "segment_ids", "response_mask")}
    both = self.policy.predict(self._logp_entropy, policy_params, [rows])  # [B, 2, N]
    ref_logp = self.policy.predict(self._logp, self.reference, [rows])
    values = self.value.predict(response_values, value_params, [rows])
    if self.reward_fn is not None:
      raw = np.asarray(self.reward_fn(batch["tokens"], batch["response_mask"]), np.float32)
    else:
      raw = self.value.predict(self._end_scores, self.reward_params, [rows])
    scores = (raw - self.norm[0]) / self.norm[1]
    missing = batch["ended"] == 0
    if p.replace_score:
      scores = np.where(missing, p.replace_score, scores)
    else:
      scores = scores - p.missing_eos_penalty * missing
    return {"old_logp": both[:, 0], "entropy": both[:, 1], "ref_logp": ref_logp,
            "old_values": values, "raw_scores": raw, "scores": scores.astype(np.float32)}

  def update(self, p_state: Any, v_state: Any, batch: dict[str, np.ndarray], seed: int):
    """epochs x minibatches of the policy and value steps; returns states and metrics."""
    p = self.config.ppo
    keys = ("tokens", "positions", "segment_ids", "response_mask", "old_logp", "advantages",
            "old_values", "returns")
    rng = np.random.default_rng(seed)
    size = p.rollout_batch_size // p.minibatches
    metrics = []
    for _ in range(p.epochs):
      order = rng.permutation(p.rollout_batch_size)
      for m in range(p.minibatches):
        rows = order[m * size:(m + 1) * size]
        mb = self.policy.stage([{k: batch[k][rows] for k in keys}])
        p_state, pm = self.policy.dispatch(p_state, mb, 1)
        v_state, vm = self.value.dispatch(v_state, mb, 1)
        metrics.append((pm, vm))
      if p.target_kl:  # early stop of this batch's epochs on the policy's drift
        if float(jax.device_get(metrics[-1][0]["train/policy/approxkl"])) > p.target_kl:
          break
    host = jax.device_get(metrics)
    first = host[0][0]
    out = {k.replace("train/", ""): float(np.mean([pm[k] for pm, _ in host]))
           for k in first if k.startswith("train/policy/")}
    out.update({k.replace("train/", ""): float(np.mean([vm[k] for _, vm in host]))
                for k in host[0][1] if k.startswith("train/val/")})
    out["policy/first_ratio_max_dev"] = float(first["train/policy/ratio_max_dev"])
    out["loss/policy"] = float(np.mean([pm["train/loss"] for pm, _ in host]))
    out["val/loss"] = float(np.mean([vm["train/loss"] for _, vm in host]))
    out["ppo/minibatch_steps"] = len(host)
    return p_state, v_state, out

  def iteration(self, i: int, p_state: Any, v_state: Any):
    """One rollout -> scoring -> advantages -> update; returns states, metrics, batch."""
    p = self.config.ppo
    # Iteration i's prompts are a pure function of (seed, i): a resumed run samples the same.
    prompts = self.prompts.train
    pick = np.random.default_rng([self.config.seed, i]).choice(
        len(prompts), p.rollout_batch_size, replace=len(prompts) < p.rollout_batch_size)
    chosen = [prompts[j] for j in pick]
    with self.policy.mesh_context():
      t0 = time.perf_counter()
      batch = self.rollout(p_state.params, chosen, seed=self.config.seed * 100_003 + i)
      t1 = time.perf_counter()
      batch.update(self.score(p_state.params, v_state.params, batch))
      t2 = time.perf_counter()
      mask = batch["response_mask"]
      _, kl, adv, returns = (np.asarray(x) for x in advantages(
          batch["scores"], batch["old_logp"], batch["ref_logp"], batch["old_values"], mask,
          self.kl.value, estimator=p.kl_estimator, gamma=p.gamma, lam=p.lam,
          whiten=p.whiten_advantages))
      batch.update(advantages=adv, returns=returns)
      p_state, v_state, update_metrics = self.update(p_state, v_state, batch, seed=i)
      t3 = time.perf_counter()
    kl_sum = (kl * mask).sum(1)
    non_score = -self.kl.value * kl_sum
    metrics = {
        "objective/scores": float(batch["raw_scores"].mean()),
        "objective/scores_normalized": float(batch["scores"].mean()),
        "objective/kl": float(kl_sum.mean()),
        "objective/kl_coef": self.kl.value,
        "objective/entropy": float((batch["entropy"] * mask).sum(1).mean()),
        "objective/non_score_reward": float(non_score.mean()),
        "objective/rlhf_reward": float((batch["scores"] + non_score).mean()),
        "eos_fraction": float(batch["ended"].mean()),
        "response_length": float(mask.sum(1).mean()),
        "objective/distinct2": distinct_n(  # collapse shows here first
            response_ids(batch["tokens"][:, -mask.shape[1]:], mask, batch["ended"]), 2),
        "returns/mean": float((returns * mask).sum() / mask.sum()),
        "policy/sampler_logp_max_dev": float(np.abs(
            (batch["sampler_logp"] - batch["old_logp"]) * mask).max()),
        "time/rollout": t1 - t0, "time/scoring": t2 - t1, "time/update": t3 - t2,
        **update_metrics,
    }
    metrics.update(self._throughput(metrics, mask))
    self.kl.update(metrics["objective/kl"], p.rollout_batch_size)
    return p_state, v_state, metrics, batch

  def _throughput(self, m: dict[str, float], mask: np.ndarray) -> dict[str, float]:
    """Tokens/s and MFU per phase (model FLOPs: forward for rollout and scoring)."""
    from train import flops as flops_lib
    p, cfg = self.config.ppo, self.policy.model_cfg
    seq = p.max_prompt_tokens + p.max_new_tokens
    rows, generated = p.rollout_batch_size, float(mask.sum())
    fwd = flops_lib.flops_per_token(cfg, seq, training=False)
    fwd_v = flops_lib.flops_per_token(self.value.model_cfg, seq, training=False,
                                      output_projection=False)
    train = (flops_lib.flops_per_token(cfg, seq) + flops_lib.flops_per_token(
        self.value.model_cfg, seq, output_projection=False)) * rows * seq
    scoring = (2 * fwd + 2 * fwd_v) * rows * seq
    update_steps = m["ppo/minibatch_steps"] / (p.epochs * p.minibatches)
    peak = self.policy.peak_flops or 1.0
    return {
        "time/rollout_tokens_per_sec": generated / m["time/rollout"],
        "time/scoring_tokens_per_sec": rows * seq / m["time/scoring"],
        "time/update_tokens_per_sec": rows * seq * p.epochs * update_steps / m["time/update"],
        "time/rollout_mfu": fwd * generated / m["time/rollout"] / peak,
        "time/scoring_mfu": scoring / m["time/scoring"] / peak,
        "time/update_mfu": train * p.epochs * update_steps / m["time/update"] / peak,
    }

  # ------------------------------------------------------------------ the run
  def _resume_iteration(self) -> int:
    """The iteration both restored checkpoints reached (0 for a fresh run)."""
    from train import checkpoint as ckpt_lib
    found = []
    for trainer in (self.policy, self.value):
      if trainer.checkpointer.latest_step() is None:
        found.append(None)
        continue
      meta = ckpt_lib.read_metadata(trainer.checkpointer.directory.as_posix())
      found.append(meta.get("ppo", {}))
    if found == [None, None]:
      return 0
    if None in found or found[0]["iteration"] != found[1]["iteration"]:
      raise RuntimeError(f"The policy and value checkpoints in {self.workdir} are from "
                         f"different iterations ({found}); delete the newer one to resume")
    self.kl.value = found[0]["kl_coef"]
    return int(found[0]["iteration"])

  def save(self, iteration: int, p_state: Any, v_state: Any) -> None:
    extra = {"ppo": {"iteration": iteration, "kl_coef": self.kl.value},
             "reference": self.config.init_from, "reward_model": self.config.reward_from}
    for trainer, state in ((self.policy, p_state), (self.value, v_state)):
      trainer.extra_metadata.update(extra)
      trainer.save(state)
      trainer.checkpointer.wait()  # both saved before going on: resume needs the pair

  def write_samples(self, iteration: int, batch: dict[str, np.ndarray], n: int = 4) -> None:
    size = self.config.ppo.max_new_tokens
    with open(os.path.join(self.workdir, "samples.jsonl"), "a") as f:
      for b in range(min(n, len(batch["tokens"]))):
        tokens = batch["tokens"][b]
        prompt = [int(t) for t in tokens[:-size] if t != self.sampling.pad_id]
        record = {"iteration": iteration,
                  "prompt": self.template.tokenizer.decode(prompt)[-300:],
                  "response": self.template.decode_response(tokens[-size:].tolist()),
                  "score": float(batch["raw_scores"][b]), "ended": bool(batch["ended"][b])}
        f.write(json.dumps(record) + "\n")

  def train(self) -> list[dict[str, float]]:
    """Runs (or resumes) the iterations; returns the per-iteration metrics of this call."""
    from train.metrics import MetricsWriter, format_duration
    p = self.config.ppo
    p_state, _ = self.policy.restore_or_init()
    v_state, _ = self.value.restore_or_init()
    start = self._resume_iteration()
    writer = MetricsWriter(self.workdir, enabled=jax.process_index() == 0)
    writer.truncate_after(start)
    self.policy.setup_throughput(p.rollout_batch_size * (p.max_prompt_tokens + p.max_new_tokens),
                                 p.max_prompt_tokens + p.max_new_tokens)
    self.policy.install_sigterm_handler()
    history, t_start = [], time.perf_counter()
    try:
      for i in range(start, p.iterations):
        p_state, v_state, m, batch = self.iteration(i, p_state, v_state)
        history.append({"iteration": i + 1, **m})
        writer.write(i + 1, m)
        if jax.process_index() == 0:
          eta = (time.perf_counter() - t_start) / (i + 1 - start) * (p.iterations - i - 1)
          print(f"iter {i + 1}/{p.iterations} | score {m['objective/scores']:.3f} | kl "
                f"{m['objective/kl']:.3f} | entropy {m['objective/entropy']:.2f} | eos "
                f"{m['eos_fraction']:.2f} | len {m['response_length']:.1f} | ratio dev "
                f"{m['policy/first_ratio_max_dev']:.1e} | clipfrac "
                f"{m['policy/clipfrac']:.3f} | rollout/score/update {m['time/rollout']:.1f}/"
                f"{m['time/scoring']:.1f}/{m['time/update']:.1f}s | eta "
                f"{format_duration(eta)}", flush=True)
          if p.sample_every and (i + 1) % p.sample_every == 0:
            self.write_samples(i + 1, batch)
        last = i + 1 == p.iterations
        if last or self.policy._sigterm or (  # pylint: disable=protected-access
            p.checkpoint_every and (i + 1) % p.checkpoint_every == 0):
          self.save(i + 1, p_state, v_state)
        if self.policy._sigterm:  # pylint: disable=protected-access
          print(f"SIGTERM: saved iteration {i + 1}; stopping.", flush=True)
          break
    finally:
      writer.close()
      self.policy.close()
      self.value.close()
    if jax.process_index() == 0 and history:
      plot_history(os.path.join(self.workdir, "metrics.jsonl"),
                   os.path.join(self.workdir, "ppo_curves.png"))
    return history


def run(config: Any, workdir: str) -> list[dict[str, float]]:
  """Trains with PPO per `config` in `workdir` (resuming if it holds a run)."""
  if jax.process_index() == 0:
    write_config(config, workdir)
  ppo = PPO(config, workdir)
  if jax.process_index() == 0:
    print(f"PPO: {len(ppo.prompts.train)} training / {len(ppo.prompts.val)} held-out prompts "
          f"({ppo.prompts.too_long} longer than ppo.max_prompt_tokens dropped); reward "
          f"normalisation mean {ppo.norm[0]:.3f} std {ppo.norm[1]:.3f}; mesh "
          f"{dict(ppo.policy.mesh.shape)}", flush=True)
  return ppo.train()


if __name__ == "__main__":
  from train import entry
  entry.launch(run)
