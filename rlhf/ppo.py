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
minibatch's ratio is exactly 1 (logged as `ppo/first_ratio_max_dev`). Metrics are logged per
iteration under `ppo/` (TRL's objective/* and policy/* names: `ppo/score`, `ppo/kl`,
`ppo/entropy`, `ppo/clipfrac`, ...), `value/` (the value function: `value/loss`,
`value/clipfrac`, `value/explained_variance`) and `time/`; the KL coefficient of the adaptive
controller and the iteration are kept in the checkpoint metadata, so a resumed run continues
the same run. The outer loop runs on the Trainer loop's services (train/loop.py): SIGTERM /
Ctrl-C save the iteration and stop, a non-finite step stops before anything is saved, and
the metrics writer and progress line are the shared ones.
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

from data.tokenizer import fill_id
from model import lora
from model.config import ModelConfig
from model.heads import RewardModel
from model.sampling import Sampler, SamplingConfig
from model.transformer import Transformer
from rlhf import ppo_core
from rlhf.reward import reward_model_adapter
from rlhf.rollout import (advantages, build_prompt_set, distinct_n, end_scores,
                          phase_throughput, plot_history, policy_loss_fn, response_ids,
                          response_logps, response_values, value_loss_fn)
from train import checkpoint as ckpt_lib
from train import entry
from train.loop import Preemption, check_finite
from train.metrics import MetricsWriter, Progress
from train.parent import setup_child
from train.stage import Program, Run, Stage
from train.trainer import Trainer

RewardFn = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (tokens, response_mask) -> [B]
ROLLOUT_KEYS = ("tokens", "positions", "segment_ids", "response_mask")
UPDATE_KEYS = (*ROLLOUT_KEYS, "old_logp", "advantages", "old_values", "returns")


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


def value_config(config: Any) -> Any:
  """The value Trainer's config: the run's, with `value_optim` and the reward model as its
  parent."""
  out = copy.deepcopy(config)
  with out.unlocked():
    out.optim = config.value_optim
    out.init_from = config.reward_from or config.init_from
  return out


def ppo_batch(b: int, t: int, n: int) -> dict[str, jax.ShapeDtypeStruct]:
  """A PPO minibatch: rollout rows [B, T] and per-response-token arrays [B, N]."""
  spec = jax.ShapeDtypeStruct
  return {**{k: spec((b, t), np.int32) for k in ("tokens", "positions", "segment_ids")},
          **{k: spec((b, n), np.float32) for k in ("response_mask", "old_logp", "advantages",
                                                    "old_values", "returns")}}


def programs(config: Any, model_cfg: ModelConfig) -> list[Program]:
  """Two trainers on the same minibatches: the policy and the value model."""
  del model_cfg
  p = config.ppo
  b = p.rollout_batch_size // p.minibatches
  batch = ppo_batch(b, p.max_prompt_tokens + p.max_new_tokens, p.max_new_tokens)
  return [Program("policy", config, Transformer,
                  functools.partial(policy_loss_fn, temperature=p.temperature, clip=p.clip),
                  batch),
          Program("value", value_config(config), RewardModel,
                  functools.partial(value_loss_fn, clip=p.value_clip), batch)]


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
    _check(config)
    self.config, self.workdir, self.reward_fn = config, workdir, reward_fn
    p = config.ppo
    parent = setup_child(config, "an SFT workdir or checkpoint directory (policy and reference)")
    if not config.reward_from and reward_fn is None:
      raise ValueError("PPO needs a reward: set --config.reward_from to a reward-model "
                       "checkpoint")
    rm_parent = setup_child(value_config(config), "a reward-model checkpoint")
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
    policy, value = programs(config, parent.child_cfg)
    self.policy = Trainer(
        config, os.path.join(workdir, "policy"), parent.child_cfg, policy.loss_fn,
        tokenizer_bytes=tok.to_bytes(), tokenizer_fingerprint=tok.fingerprint,
        init_adapter=parent.lm_adapter(config.seed))
    self.value = Trainer(
        value.config, os.path.join(workdir, "value"), rm_parent.child_cfg, value.loss_fn,
        model_factory=RewardModel, tokenizer_bytes=tok.to_bytes(),
        tokenizer_fingerprint=tok.fingerprint,
        init_adapter=reward_model_adapter(rm_parent, config.seed),
        devices=list(self.policy.mesh.devices.flat))
    # With LoRA the reference is the policy's own frozen base with the adapters zeroed
    # (model/lora.py zero_adapters): no second copy of the weights.
    self.reference = (None if parent.child_cfg.lora_rank else
                      self.policy.load_init_params()[0])
    self.reward_params = self.value.load_init_params()[0] if config.reward_from else None
    norm = rm_parent.meta.get("reward_norm") if config.reward_from else None
    self.norm = (norm["mean"], norm["std"]) if (norm and p.normalize_reward) else (0.0, 1.0)
    self.sampler = Sampler(self.policy.graphdef, parent.child_cfg, self.policy.mesh,
                           self.policy.rules, self.policy.param_shardings)
    self.sampling = SamplingConfig(
        max_new_tokens=p.max_new_tokens, temperature=p.temperature, top_k=0, top_p=1.0,
        eos_ids=tuple(parent.template.end_ids), pad_id=fill_id(tok),
        prompt_bucket=p.max_prompt_tokens)
    temperature = p.temperature
    # The runtime compiles once per function object: these are built once per run.
    self._logp_entropy = lambda m, b: jnp.stack(response_logps(m, b, temperature), axis=1)
    self._logp = lambda m, b: response_logps(m, b, temperature)[0]
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
    rows = {k: batch[k] for k in ROLLOUT_KEYS}
    size = p.rollout_batch_size
    both = self.policy.predict(self._logp_entropy, policy_params, rows, size)  # [B, 2, N]
    reference = (self.reference if self.reference is not None else
                 lora.zero_adapters(policy_params))
    ref_logp = self.policy.predict(self._logp, reference, rows, size)
    values = self.value.predict(response_values, value_params, rows, size)
    if self.reward_fn is not None:
      raw = np.asarray(self.reward_fn(batch["tokens"], batch["response_mask"]), np.float32)
    else:
      raw = self.value.predict(end_scores, self.reward_params, rows, size)
    scores = (raw - self.norm[0]) / self.norm[1]
    missing = batch["ended"] == 0
    if p.replace_score:
      scores = np.where(missing, p.replace_score, scores)
    else:
      scores = scores - p.missing_eos_penalty * missing
    return {"old_logp": both[:, 0], "entropy": both[:, 1], "ref_logp": ref_logp,
            "old_values": values, "raw_scores": raw, "scores": scores.astype(np.float32)}

  def update(self, p_state: Any, v_state: Any, batch: dict[str, np.ndarray], seed: int):
    """epochs x minibatches of the policy and value steps; returns states and metrics
    (`ppo/*` from the policy steps, `value/*` from the value steps)."""
    p = self.config.ppo
    rng = np.random.default_rng(seed)
    size = p.rollout_batch_size // p.minibatches
    first_step = int(jax.device_get(p_state.step)) + 1
    metrics = []
    for _ in range(p.epochs):
      order = rng.permutation(p.rollout_batch_size)
      for m in range(p.minibatches):
        rows = order[m * size:(m + 1) * size]
        # Every process holds the whole rollout: stage the minibatch as global rows.
        mb = self.policy.runtime.replicated_rows({k: batch[k][rows] for k in UPDATE_KEYS})
        p_state, pm = self.policy.step(p_state, mb)
        v_state, vm = self.value.step(v_state, mb)
        metrics.append((pm, vm))
      if p.target_kl:  # early stop of this batch's epochs on the policy's drift
        if float(jax.device_get(metrics[-1][0]["train/approxkl"])) > p.target_kl:
          break
    host = jax.device_get(metrics)
    for trainer, side in ((self.policy, 0), (self.value, 1)):
      values = {k: np.array([h[side][k] for h in host], np.float64) for k in host[0][side]}
      check_finite(first_step, values, trainer.latest())
    mean = lambda side, k: float(np.mean([h[side][k] for h in host]))  # noqa: E731
    out = {f"ppo/{k[6:]}": mean(0, k) for k in host[0][0]
           if k not in ("train/loss", "train/finite", "train/lr", "train/grad_norm")}
    out.update({f"value/{k[6:]}": mean(1, k) for k in host[0][1]
                if k not in ("train/loss", "train/finite", "train/lr", "train/grad_norm")})
    out["ppo/first_ratio_max_dev"] = float(host[0][0]["train/ratio_max_dev"])
    out["ppo/policy_loss"] = mean(0, "train/loss")
    out["value/loss"] = mean(1, "train/loss")
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
        "ppo/score": float(batch["raw_scores"].mean()),
        "ppo/score_normalized": float(batch["scores"].mean()),
        "ppo/kl": float(kl_sum.mean()),
        "ppo/kl_coef": self.kl.value,
        "ppo/entropy": float((batch["entropy"] * mask).sum(1).mean()),
        "ppo/non_score_reward": float(non_score.mean()),
        "ppo/rlhf_reward": float((batch["scores"] + non_score).mean()),
        "ppo/eos_fraction": float(batch["ended"].mean()),
        "ppo/response_length": float(mask.sum(1).mean()),
        "ppo/distinct2": distinct_n(  # collapse shows here first
            response_ids(batch["tokens"][:, -mask.shape[1]:], mask, batch["ended"]), 2),
        "ppo/returns_mean": float((returns * mask).sum() / mask.sum()),
        "ppo/sampler_logp_max_dev": float(np.abs(
            (batch["sampler_logp"] - batch["old_logp"]) * mask).max()),
        "time/rollout_s": t1 - t0, "time/scoring_s": t2 - t1, "time/update_s": t3 - t2,
        **update_metrics,
    }
    metrics.update(phase_throughput(metrics, mask, p, self.policy.model_cfg,
                                    self.value.model_cfg, self.policy.throughput.peak_flops))
    self.kl.update(metrics["ppo/kl"], p.rollout_batch_size)
    return p_state, v_state, metrics, batch

  # ------------------------------------------------------------------ the run
  def _resume_iteration(self) -> int:
    """The iteration both restored checkpoints reached (0 for a fresh run)."""
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
      raise ckpt_lib.CheckpointError(
          f"The policy and value checkpoints in {self.workdir} are from different iterations "
          f"({found}); delete the newer one to resume")
    self.kl.value = found[0]["kl_coef"]
    return int(found[0]["iteration"])

  def save(self, iteration: int, p_state: Any, v_state: Any) -> None:
    extra = {"ppo": {"iteration": iteration, "kl_coef": self.kl.value},
             "reference": self.config.init_from, "reward_model": self.config.reward_from}
    for trainer, state in ((self.policy, p_state), (self.value, v_state)):
      trainer.extra_metadata.update(extra)
      trainer.save(state)
      trainer.wait()  # both saved before going on: resume needs the pair

  def write_samples(self, iteration: int, batch: dict[str, np.ndarray], n: int = 4) -> None:
    size = self.config.ppo.max_new_tokens
    with open(os.path.join(self.workdir, "samples.jsonl"), "a") as f:
      for b in range(min(n, len(batch["tokens"]))):
        tokens = batch["tokens"][b]
        # Display only: drops the left padding (and any real token equal to the fill id).
        prompt = [int(t) for t in tokens[:-size] if t != self.sampling.pad_id]
        record = {"iteration": iteration,
                  "prompt": self.template.tokenizer.decode(prompt)[-300:],
                  "response": self.template.decode_response(tokens[-size:].tolist()),
                  "score": float(batch["raw_scores"][b]), "ended": bool(batch["ended"][b])}
        f.write(json.dumps(record) + "\n")

  def train(self) -> list[dict[str, float]]:
    """Runs (or resumes) the iterations; returns the per-iteration metrics of this call
    (`self.preempted` names the signal if one stopped it)."""
    p = self.config.ppo
    p_state, _ = self.policy.restore_or_init()
    v_state, _ = self.value.restore_or_init()
    start = self._resume_iteration()
    writer = MetricsWriter(self.workdir, enabled=jax.process_index() == 0)
    writer.truncate_after(start)
    seq = p.max_prompt_tokens + p.max_new_tokens
    self.policy.setup_throughput(p.rollout_batch_size * seq, seq)
    progress = Progress(p.iterations, start, unit="iter")
    stop = Preemption().install()
    history = []
    try:
      for i in range(start, p.iterations):
        p_state, v_state, m, batch = self.iteration(i, p_state, v_state)
        history.append({"iteration": i + 1, **m})
        writer.write(i + 1, m)
        if jax.process_index() == 0:
          print(progress.line(i + 1, {}, [
              f"score {m['ppo/score']:.3f}", f"kl {m['ppo/kl']:.3f}",
              f"entropy {m['ppo/entropy']:.2f}", f"eos {m['ppo/eos_fraction']:.2f}",
              f"len {m['ppo/response_length']:.1f}",
              f"ratio dev {m['ppo/first_ratio_max_dev']:.1e}",
              f"clipfrac {m['ppo/clipfrac']:.3f}",
              f"rollout/score/update {m['time/rollout_s']:.1f}/{m['time/scoring_s']:.1f}/"
              f"{m['time/update_s']:.1f}s"]), flush=True)
          if p.sample_every and (i + 1) % p.sample_every == 0:
            self.write_samples(i + 1, batch)
        last = i + 1 == p.iterations
        if last or stop.requested or (p.checkpoint_every and (i + 1) % p.checkpoint_every == 0):
          self.save(i + 1, p_state, v_state)
        if stop.requested:
          print(f"{stop.requested}: saved iteration {i + 1}; stopping.", flush=True)
          break
    finally:
      stop.uninstall()
      writer.close()
      self.policy.close()
      self.value.close()
    self.preempted = stop.requested
    if jax.process_index() == 0 and history:
      plot_history(os.path.join(self.workdir, "metrics.jsonl"),
                   os.path.join(self.workdir, "ppo_curves.png"))
    return history


def build(config: Any, workdir: str) -> Run:
  """The four models and the prompt set; the run is PPO's own outer loop."""
  ppo = PPO(config, workdir)

  def loop() -> dict[str, Any]:
    history = ppo.train()
    return {"history": history, "preempted": 1.0 if ppo.preempted else 0.0}

  return Run(
      trainers=[ppo.policy, ppo.value], loop=loop,
      info=[f"PPO: {len(ppo.prompts.train)} training / {len(ppo.prompts.val)} held-out prompts "
            f"({ppo.prompts.too_long} longer than ppo.max_prompt_tokens dropped); reward "
            f"normalisation mean {ppo.norm[0]:.3f} std {ppo.norm[1]:.3f}; mesh "
            f"{dict(ppo.policy.mesh.shape)}"])


STAGE = Stage("ppo", programs=programs, build=build)

if __name__ == "__main__":
  entry.launch(STAGE)
