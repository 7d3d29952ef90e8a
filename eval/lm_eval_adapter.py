"""An lm-evaluation-harness model ("lmlife") that runs this project's checkpoints.

  python -m eval.lm_eval --model lmlife --model_args checkpoint=runs/chain/base \
      --batch_size 32 --tasks lmlife_lambada_openai_cloze --include_path runs/lm_eval_tasks

  lm = LmlifeLM(checkpoint="runs/chain/base", batch_size=32)     # or LmlifeLM(loaded=...)
  lm_eval.simple_evaluate(model=lm, tasks=[...], task_manager=...)

The three request kinds go through the project's own sharded scorer and sampler, so a
number from lm-eval is the number eval.run computes:
- `loglikelihood` and `loglikelihood_rolling`: eval.loglik.LoglikScorer, which already
  encodes (context, continuation) pairs like lm-eval's `_encode_pair` and scores rolling
  windows like its `get_rolling_token_windows` (see that module for the details);
- `generate_until`: eval.sample.respond on model.sampling.Sampler (KV cache, batched,
  sharded). As lm-eval's HF model does: the context is encoded without BOS (an empty one
  becomes `</s>`) and left-truncated to max_seq_len - max_gen_toks tokens; generation
  stops at `</s>` or after max_gen_toks tokens (max_gen_toks is capped at max_seq_len - 1);
  the decoded text is cut before the first occurrence of any `until` string. The jitted
  decode loop cannot stop on a string, so a row runs on until `</s>` or the limit and the
  cut is made afterwards (the same text, more decode steps). `do_sample=False` or
  `temperature=0` is greedy; otherwise temperature / top_k / top_p sampling from `seed`.

model_args: checkpoint (a workdir, its checkpoints/ dir or a step dir), mesh (weights
sharded over e.g. `fsdp:2`; write `/` between axes, `data:2/fsdp:4`, since lm-eval splits
model_args on commas), max_gen_toks (default 256, as lm-eval's HF model), prompt_bucket (prompt lengths
are padded to a multiple of it: one compiled program per bucket), seed. lm-eval's
`device` and `max_batch_size` are accepted and ignored (JAX places the model on the mesh).
The batch size (sequences per forward pass / generate call) is lm-eval's own
`--batch_size` (its CLI always passes one, default 1: give e.g. `--batch_size 32`;
"auto" = 32), as for lm-eval's HF model.

No chat templates (`--apply_chat_template`): lm-eval's base class refuses them.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import lm_eval.models  # noqa: F401 - lm-eval's own models first (see below)
import numpy as np
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from eval.loading import LoadedCheckpoint, load_checkpoint, parse_mesh
from eval.lm_tasks import Progress
from eval.loglik import LoglikScorer
from eval.sample import RawTemplate, respond
from model.sampling import Sampler, SamplingConfig
from model.transformer import Transformer

# lm-eval fills its model registry with its built-in models only when the registry is
# empty (`get_model`); registering "lmlife" into an empty one would hide "hf" & co. in this
# process, hence the `import lm_eval.models` above.
DEFAULT_BATCH_SIZE = 32
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's HFLM default
_log = logging.getLogger(__name__)


class TokenPrompts(RawTemplate):
  """The raw template of eval.sample with prompts given as token ids (already encoded and
  truncated), so `respond` batches and samples them; responses end at `</s>`."""

  def prompt_ids(self, ids: Sequence[int]) -> np.ndarray:
    return np.asarray(ids, np.int32)


def cut_at_stop_strings(text: str, until: Sequence[str]) -> str:
  """`text` up to the first occurrence of any non-empty stop string (lm-eval's cut)."""
  for term in until:
    if term:
      text = text.split(term)[0]
  return text


def normalize_mesh(spec: str) -> str:
  """A model_args mesh ("data:2/fsdp:4") in eval.loading's form ("data=2,fsdp=4")."""
  return spec.replace(":", "=").replace("/", ",")


@register_model("lmlife")
class LmlifeLM(LM):
  """lm-eval's model interface over one lmlife language-model checkpoint.

  Args:
    checkpoint: checkpoint to load (`eval.loading.load_checkpoint`); or pass `loaded`.
    batch_size: sequences per forward pass / generate call (int, or "auto" = 32).
    mesh: e.g. "fsdp:2" or "data:2/fsdp:4" (default: one device).
    max_gen_toks: generation limit when a task does not set one.
    prompt_bucket: generation prompts are padded to a multiple of this.
    seed: PRNG seed of sampled (not greedy) generation.
    loaded: an already restored checkpoint (eval.run passes its own).
    device, max_batch_size: lm-eval's generic arguments, ignored.

  Raises:
    ValueError: an unknown argument (the known ones are named), neither checkpoint nor
      loaded, a bad mesh; CheckpointError: a missing or unusable checkpoint.
  """

  def __init__(self, checkpoint: str | None = None, batch_size: int | str | None = None,
               mesh: str = "", max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
               prompt_bucket: int = 64, seed: int = 0,
               loaded: LoadedCheckpoint | None = None, device: Any = None,
               max_batch_size: Any = None, **unknown: Any):
    super().__init__()
    del device, max_batch_size
    # lm-eval bootstraps stderrs (perplexity's) in a forked process pool unless this is set;
    # forking a process that runs JAX's threads can deadlock.
    os.environ.setdefault("DISABLE_MULTIPROC", "1")
    if unknown:
      raise ValueError(f"lmlife model_args: unknown {sorted(unknown)}; known: checkpoint, "
                       "batch_size, mesh, max_gen_toks, prompt_bucket, seed")
    if loaded is None:
      if not checkpoint:
        raise ValueError("lmlife model_args: checkpoint=<dir> is required")
      loaded = load_checkpoint(str(checkpoint), parse_mesh(normalize_mesh(str(mesh))),
                               expect=Transformer)
    if loaded.model_class is not Transformer:
      raise ValueError(f"lmlife needs a language model; {loaded.meta['checkpoint_path']} "
                       f"holds a {loaded.model_class.__name__}")
    if batch_size in (None, "auto") or str(batch_size).startswith("auto"):
      batch_size = DEFAULT_BATCH_SIZE
    self.loaded, self.tokenizer = loaded, loaded.tokenizer
    self.batch_size = int(batch_size)
    self.max_gen_toks, self.prompt_bucket = int(max_gen_toks), int(prompt_bucket)
    self.seed = int(seed)
    self.max_length = loaded.model_cfg.max_seq_len
    self.scorer = LoglikScorer(loaded, self.batch_size)
    self._sampler: Sampler | None = None

  @property
  def sampler(self) -> Sampler:
    """The checkpoint's sampler, built on the first generation request."""
    if self._sampler is None:
      lo = self.loaded
      self._sampler = Sampler(lo.graphdef, lo.model_cfg, mesh=lo.mesh, rules=lo.rules,
                              param_shardings=lo.param_shardings)
    return self._sampler

  def get_model_info(self) -> dict[str, Any]:
    """Recorded in lm-eval's results["config"]."""
    meta = self.loaded.meta
    return {"checkpoint": meta["checkpoint_path"], "stage": meta.get("stage"),
            "step": meta.get("step"), "num_params": self.loaded.model_cfg.num_params()}

  # ------------------------------------------------------------------ log-likelihoods
  def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False
                    ) -> list[tuple[float, bool]]:
    """(log p(continuation | context), is greedy) per (context, continuation) request."""
    pairs = [tuple(r.args) for r in requests]
    self.scorer.progress = None if disable_tqdm else Progress("loglikelihood")
    out = self.scorer.loglikelihood(pairs)
    for pair, result in zip(pairs, out):
      self.cache_hook.add_partial("loglikelihood", pair, result)
    return out

  def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False
                            ) -> list[float]:
    """Total log-likelihood of each whole text (disjoint rolling windows)."""
    texts = [r.args[0] for r in requests]
    self.scorer.progress = None if disable_tqdm else Progress("loglikelihood_rolling")
    out = [logp for logp, _ in self.scorer.rolling_loglikelihood(texts)]
    for text, logp in zip(texts, out):
      self.cache_hook.add_partial("loglikelihood_rolling", (text,), logp)
    return out

  # ------------------------------------------------------------------ generation
  def _sampling(self, kwargs: dict[str, Any]) -> tuple[SamplingConfig, list[str]]:
    """(sampling config, stop strings) of one request's generation kwargs."""
    kwargs = dict(kwargs or {})
    until = kwargs.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    max_gen = min(int(kwargs.pop("max_gen_toks", self.max_gen_toks)), self.max_length - 1)
    do_sample = bool(kwargs.pop("do_sample", False))
    temperature = float(kwargs.pop("temperature", 1.0 if do_sample else 0.0) or 0.0)
    top_k, top_p = int(kwargs.pop("top_k", 0) or 0), float(kwargs.pop("top_p", 1.0) or 1.0)
    if unused := {k: v for k, v in kwargs.items() if k not in ("max_new_tokens",)}:
      _log.warning("lmlife: generation kwargs %s are not supported and ignored", unused)
    if not do_sample:
      temperature = 0.0
    cfg = SamplingConfig(max_new_tokens=max(1, max_gen), temperature=temperature,
                         top_k=top_k, top_p=top_p if temperature else 1.0,
                         prompt_bucket=self.prompt_bucket)
    return cfg, until

  def prompt_ids(self, context: str, max_gen: int) -> list[int]:
    """The context's tokens (no BOS; `</s>` if empty), keeping the last ones that leave
    room for `max_gen` new tokens (lm-eval's left truncation)."""
    ids = self.tokenizer.encode(context) or [self.tokenizer.eos_id]
    return ids[-(self.max_length - max_gen):]

  def generate_until(self, requests: list[Instance], disable_tqdm: bool = False
                     ) -> list[str]:
    """Generated continuations, cut before the first `until` string."""
    groups: dict[SamplingConfig, list[int]] = {}
    settings = []
    for i, request in enumerate(requests):
      cfg, until = self._sampling(request.args[1])
      settings.append((cfg, until))
      groups.setdefault(cfg, []).append(i)
    out: list[str] = [""] * len(requests)
    template = TokenPrompts(self.tokenizer)
    progress = None if disable_tqdm else Progress("generate_until")
    done = 0
    for cfg, indices in groups.items():
      prompts = {i: self.prompt_ids(requests[i].args[0], cfg.max_new_tokens) for i in indices}
      order = sorted(indices, key=lambda i: -len(prompts[i]))  # similar lengths per batch
      for start in range(0, len(order), self.batch_size):
        chunk = order[start:start + self.batch_size]
        responses = respond(self.sampler, self.loaded.params, template,
                            [prompts[i] for i in chunk], cfg,
                            seed=self.seed + done, batch_size=self.batch_size)
        for i, response in zip(chunk, responses):
          out[i] = cut_at_stop_strings(response["response"], settings[i][1])
          self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        done += len(chunk)
        if progress:
          progress(done, len(requests))
    return out
