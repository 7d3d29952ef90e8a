"""Batched generation with a KV cache: prefill, then a `lax.while_loop` of decode steps.

  sampler = Sampler(graphdef, mesh=..., rules=..., param_shardings=...)
  out = sampler.generate(params, prompts, SamplingConfig(max_new_tokens=64), seed=0)

Layout. Prompts of different lengths are LEFT-padded to a bucket length P (a multiple of
`prompt_bucket`, so one compiled program serves many batches), then N = max_new_tokens
decode slots follow: every sequence writes its i-th new token to cache slot P + i, so one
`dynamic_update_slice` serves the whole batch. Positions count real tokens only (a prompt
of length L has positions 0..L-1 and its i-th new token position L + i), and padding has
segment id 0, so the model computes exactly what it computes on the unpadded sequence.

`SampleOutput.tokens / positions / segment_ids` ([B, P + N]) are that layout, ready for a
full forward pass: `token_logprobs(model, out, temperature)` recomputes the response
log-probabilities the way the trainer does, and they equal the sampler's (PPO's first
importance ratio is 1).

Sampling: temperature 0 = greedy (argmax); otherwise logits / temperature, then optional
top-k and top-p (nucleus) filtering, then a categorical draw. `logprobs` are
log softmax(logits / temperature) of the drawn token WITHOUT the top-k/top-p filtering
(at temperature 0: of logits / 1): the policy's own distribution at that temperature,
which is what PPO's trainer recomputes. A sequence stops after its first EOS (EOS is part
of the response and of the mask); later slots hold `pad_id` with mask 0.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from model import sharding as msharding
from model.transformer import init_cache


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to sample.

  Attributes:
    max_new_tokens: Response length limit N (decode steps).
    temperature: 0 = greedy; otherwise logits are divided by it.
    top_k: Keep the k most likely tokens (0 = off).
    top_p: Keep the smallest set of tokens whose probability reaches p (1.0 = off).
    eos_ids: Tokens that end a sequence (included in the response).
    pad_id: Filler after a sequence ended, and left padding of prompts.
    prompt_bucket: Prompt lengths are padded up to a multiple of this (compile once per
      bucket).
    use_cache: Decode with the KV cache (False: recompute the whole sequence every step;
      the same tokens, for benchmarks and tests).
  """
  max_new_tokens: int = 64
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  eos_ids: tuple[int, ...] = ()
  pad_id: int = 0
  prompt_bucket: int = 32
  use_cache: bool = True

  def __post_init__(self):
    if self.max_new_tokens <= 0:
      raise ValueError(f"SamplingConfig.max_new_tokens={self.max_new_tokens} must be > 0")
    if self.temperature < 0:
      raise ValueError(f"SamplingConfig.temperature={self.temperature} must be >= 0")
    if self.top_k < 0:
      raise ValueError(f"SamplingConfig.top_k={self.top_k} must be >= 0 (0 = off)")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"SamplingConfig.top_p={self.top_p} must be in (0, 1]")
    if self.prompt_bucket <= 0:
      raise ValueError(f"SamplingConfig.prompt_bucket={self.prompt_bucket} must be > 0")


class SampleOutput(NamedTuple):
  """Generated sequences (numpy arrays; B = batch, P = padded prompt length, N = new).

  tokens, positions, segment_ids: [B, P + N], the left-padded prompt then the response.
  response: [B, N] sampled tokens (pad_id after EOS); response_mask: [B, N] 1 on generated
  tokens up to and including EOS; logprobs: [B, N] (0 where the mask is 0);
  prompt_lengths: [B]; finished: [B] True where an EOS was generated.
  """
  tokens: np.ndarray
  positions: np.ndarray
  segment_ids: np.ndarray
  response: np.ndarray
  response_mask: np.ndarray
  logprobs: np.ndarray
  prompt_lengths: np.ndarray
  finished: np.ndarray

  @property
  def prompt_len(self) -> int:
    """P, the padded prompt length."""
    return self.tokens.shape[1] - self.response.shape[1]


def filter_logits(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
  """Sets logits outside the top-k / top-p (nucleus) set to -inf. logits: [B, V] float32."""
  if top_k:
    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]  # [B, 1]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)  # most likely first
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token if the mass strictly before it is < p (the first token is always kept).
    keep_sorted = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(
        keep_sorted)
    logits = jnp.where(keep, logits, -jnp.inf)
  return logits


def sample_token(logits: jax.Array, rng: jax.Array, cfg: SamplingConfig
                 ) -> tuple[jax.Array, jax.Array]:
  """Draws one token per row from float32 logits [B, V]; returns (tokens, logprobs) [B]."""
  if cfg.temperature == 0.0:
    tokens = jnp.argmax(logits, axis=-1)
    scaled = logits
  else:
    scaled = logits / cfg.temperature
    tokens = jax.random.categorical(rng, filter_logits(scaled, cfg.top_k, cfg.top_p), axis=-1)
  logprobs = jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), tokens[:, None],
                                 axis=-1)[:, 0]
  return tokens.astype(jnp.int32), logprobs


def _generate(model: nnx.Module, prompt_tokens: jax.Array, prompt_lengths: jax.Array,
              rng: jax.Array, cfg: SamplingConfig) -> dict[str, jax.Array]:
  """The traced generation program (see the module docstring for the layout)."""
  b, p = prompt_tokens.shape
  n = cfg.max_new_tokens
  slots = jnp.arange(p)
  real = slots[None, :] >= (p - prompt_lengths)[:, None]  # [B, P] left padding
  positions = jnp.where(real, slots[None, :] - (p - prompt_lengths)[:, None], 0)
  segment_ids = real.astype(jnp.int32)
  kv_segment_ids = jnp.concatenate([segment_ids, jnp.zeros((b, n), jnp.int32)], axis=1)
  cache = init_cache(model.cfg, b, p + n)
  h, cache = model.hidden(prompt_tokens, positions, segment_ids, cache=cache, cache_index=0,
                          kv_segment_ids=kv_segment_ids)
  logits = model.logits(h[:, -1:])[:, 0]  # the last prompt token is real (left padding)
  eos = jnp.asarray(cfg.eos_ids or (-1,), jnp.int32)

  def cond(carry):
    i, done = carry[0], carry[-1]
    return (i < n) & ~jnp.all(done)

  def body(carry):
    i, cache, kv_seg, logits, rng, out_tokens, out_logp, out_mask, done = carry
    rng, step_rng = jax.random.split(rng)
    token, logp = sample_token(logits, step_rng, cfg)
    token = jnp.where(done, cfg.pad_id, token)
    out_tokens = out_tokens.at[:, i].set(token)
    out_logp = out_logp.at[:, i].set(jnp.where(done, 0.0, logp))
    out_mask = out_mask.at[:, i].set(~done)
    done = done | jnp.isin(token, eos)
    kv_seg = kv_seg.at[:, p + i].set(1)
    h, cache = model.hidden(token[:, None], (prompt_lengths + i)[:, None],
                            jnp.ones((b, 1), jnp.int32), cache=cache, cache_index=p + i,
                            kv_segment_ids=kv_seg)
    logits = model.logits(h)[:, 0]
    return i + 1, cache, kv_seg, logits, rng, out_tokens, out_logp, out_mask, done

  init = (jnp.int32(0), cache, kv_segment_ids, logits, rng,
          jnp.full((b, n), cfg.pad_id, jnp.int32), jnp.zeros((b, n), jnp.float32),
          jnp.zeros((b, n), bool), jnp.zeros((b,), bool))
  _, _, _, _, _, out_tokens, out_logp, out_mask, done = jax.lax.while_loop(cond, body, init)
  resp_positions = prompt_lengths[:, None] + jnp.arange(n)[None, :]
  return {
      "tokens": jnp.concatenate([prompt_tokens, out_tokens], axis=1),
      "positions": jnp.concatenate([positions, resp_positions], axis=1).astype(jnp.int32),
      "segment_ids": jnp.concatenate([segment_ids, jnp.ones((b, n), jnp.int32)], axis=1),
      "response": out_tokens, "response_mask": out_mask.astype(jnp.int32),
      "logprobs": out_logp, "finished": done,
  }


def _generate_uncached(model: nnx.Module, prompt_tokens: jax.Array,
                       prompt_lengths: jax.Array, rng: jax.Array, cfg: SamplingConfig
                       ) -> dict[str, jax.Array]:
  """The same program without a cache: one full forward over [B, P + N] per new token."""
  b, p = prompt_tokens.shape
  n = cfg.max_new_tokens
  slots = jnp.arange(p)
  real = slots[None, :] >= (p - prompt_lengths)[:, None]
  positions = jnp.concatenate(
      [jnp.where(real, slots[None, :] - (p - prompt_lengths)[:, None], 0),
       prompt_lengths[:, None] + jnp.arange(n)[None, :]], axis=1).astype(jnp.int32)
  # Later slots never influence earlier logits (causal), so they may be 1 from the start.
  segment_ids = jnp.concatenate([real.astype(jnp.int32), jnp.ones((b, n), jnp.int32)], 1)
  eos = jnp.asarray(cfg.eos_ids or (-1,), jnp.int32)

  def cond(carry):
    return (carry[0] < n) & ~jnp.all(carry[-1])

  def body(carry):
    i, tokens, rng, out_logp, out_mask, done = carry
    rng, step_rng = jax.random.split(rng)
    h = model.hidden(tokens, positions, segment_ids)  # [B, P + N, E]: the full recompute
    h = jax.lax.dynamic_slice_in_dim(h, p - 1 + i, 1, axis=1)  # only the next token's logits
    logits = model.logits(h)[:, 0]
    token, logp = sample_token(logits, step_rng, cfg)
    token = jnp.where(done, cfg.pad_id, token)
    tokens = tokens.at[:, p + i].set(token)
    out_logp = out_logp.at[:, i].set(jnp.where(done, 0.0, logp))
    out_mask = out_mask.at[:, i].set(~done)
    return i + 1, tokens, rng, out_logp, out_mask, done | jnp.isin(token, eos)

  tokens = jnp.concatenate([prompt_tokens, jnp.full((b, n), cfg.pad_id, jnp.int32)], axis=1)
  init = (jnp.int32(0), tokens, rng, jnp.zeros((b, n), jnp.float32), jnp.zeros((b, n), bool),
          jnp.zeros((b,), bool))
  _, tokens, _, out_logp, out_mask, done = jax.lax.while_loop(cond, body, init)
  return {"tokens": tokens, "positions": positions, "segment_ids": segment_ids,
          "response": tokens[:, p:], "response_mask": out_mask.astype(jnp.int32),
          "logprobs": out_logp, "finished": done}


def pad_prompts(prompts: Sequence[Sequence[int]], cfg: SamplingConfig, max_seq_len: int
                ) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token lists to [B, P] (P a multiple of cfg.prompt_bucket); returns lengths.

  Raises:
    ValueError: an empty prompt, or one whose length + max_new_tokens exceeds the context.
  """
  lengths = np.array([len(x) for x in prompts], np.int32)
  if not len(prompts):
    raise ValueError("No prompts to sample from")
  for i, length in enumerate(lengths):
    if length == 0:
      raise ValueError(f"Prompt {i} is empty; a prompt needs at least one token")
    if length + cfg.max_new_tokens > max_seq_len:
      raise ValueError(f"Prompt {i} has {length} tokens; with max_new_tokens="
                       f"{cfg.max_new_tokens} that exceeds the model context of "
                       f"{max_seq_len} tokens (shorten the prompt or max_new_tokens)")
  p = -(-int(lengths.max()) // cfg.prompt_bucket) * cfg.prompt_bucket
  out = np.full((len(prompts), p), cfg.pad_id, np.int32)
  for i, x in enumerate(prompts):
    out[i, p - len(x):] = x
  return out, lengths


class Sampler:
  """Jitted, sharded generation for one model structure (`graphdef`).

  Args:
    graphdef: `nnx.split(model)[0]` (params are passed to `generate`).
    model_cfg: The model's ModelConfig (its context length bounds prompt + response).
    mesh: Device mesh (default: one device, no sharding).
    rules: Logical axis rules (as the Trainer's); batch rows shard over the batch axes.
    param_shardings: Shardings of `params` (e.g. the Trainer's `param_shardings`).
  """

  def __init__(self, graphdef: Any, model_cfg: Any, mesh: jax.sharding.Mesh | None = None,
               rules: Sequence[tuple[str, Any]] | None = None, param_shardings: Any = None):
    self.graphdef, self.model_cfg = graphdef, model_cfg
    self.mesh = mesh
    self.rules = tuple(rules) if rules is not None else msharding.DEFAULT_RULES
    self.param_shardings = param_shardings
    self._compiled: dict[SamplingConfig, Any] = {}

  def _fn(self, cfg: SamplingConfig):
    if cfg not in self._compiled:
      def run(params, prompt_tokens, prompt_lengths, key_data):
        generate = _generate if cfg.use_cache else _generate_uncached
        return generate(nnx.merge(self.graphdef, params), prompt_tokens, prompt_lengths,
                        jax.random.wrap_key_data(key_data), cfg)
      if self.mesh is None:
        self._compiled[cfg] = jax.jit(run)
      else:
        batch = NamedSharding(self.mesh, P(dict(self.rules).get("batch")))
        replicated = NamedSharding(self.mesh, P())
        # Several processes: outputs replicated, so every process reads every row (the
        # rows were given whole to every process).
        out = replicated if jax.process_count() > 1 else batch
        self._compiled[cfg] = jax.jit(
            run, in_shardings=(self.param_shardings, batch, batch, replicated),
            out_shardings=out)
    return self._compiled[cfg]

  def generate(self, params: Any, prompts: Sequence[Sequence[int]] | np.ndarray,
               cfg: SamplingConfig, seed: int | jax.Array = 0,
               prompt_lengths: np.ndarray | None = None) -> SampleOutput:
    """Samples a response for every prompt.

    Args:
      params: Model parameters (pure dict, as the Trainer holds them).
      prompts: Token lists, or an already left-padded [B, P] array with `prompt_lengths`;
        with several processes every process passes all rows.
      cfg: How to sample.
      seed: An int or a JAX PRNG key.
      prompt_lengths: [B] real lengths when `prompts` is a padded array.
    """
    if prompt_lengths is None:
      tokens, lengths = pad_prompts(prompts, cfg, self.model_cfg.max_seq_len)
    else:
      tokens, lengths = np.asarray(prompts, np.int32), np.asarray(prompt_lengths, np.int32)
    rng = jax.random.key(seed) if isinstance(seed, int) else seed
    key_data = np.asarray(jax.device_get(jax.random.key_data(rng)))
    fn = self._fn(cfg)
    if self.mesh is None:
      out = fn(params, tokens, lengths, key_data)
    else:
      with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
        out = fn(params, *self._global((tokens, lengths, key_data)))
    out = jax.device_get(out)
    return SampleOutput(prompt_lengths=lengths, **{k: np.asarray(v) for k, v in out.items()})

  def _global(self, arrays: Sequence[np.ndarray]) -> list[Any]:
    """Host arrays every process holds whole -> global arrays (rows over the batch axes,
    the key replicated); with one process numpy goes to jit as it is."""
    if jax.process_count() == 1:
      return list(arrays)
    batch = NamedSharding(self.mesh, P(dict(self.rules).get("batch")))
    replicated = NamedSharding(self.mesh, P())
    shardings = [batch] * (len(arrays) - 1) + [replicated]
    return [jax.make_array_from_callback(a.shape, sh, lambda i, a=a: a[i])
            for a, sh in zip(arrays, shardings)]


def token_logprobs(model: nnx.Module, out: SampleOutput | dict, temperature: float = 1.0
                   ) -> jax.Array:
  """Response log-probabilities [B, N] recomputed by one full forward pass (the trainer's way).

  Uses the sampler's layout (tokens / positions / segment_ids) and log softmax(logits / T);
  temperature 0 means T = 1 (greedy sampling reports log-probs of the raw logits).
  """
  get = (lambda k: out[k]) if isinstance(out, dict) else (lambda k: getattr(out, k))
  tokens, response = jnp.asarray(get("tokens")), jnp.asarray(get("response"))
  n = response.shape[1]
  logits = model(tokens, jnp.asarray(get("positions")), jnp.asarray(get("segment_ids")))
  logits = logits[:, -n - 1:-1] / (temperature or 1.0)  # position t predicts token t + 1
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), response[..., None],
                             axis=-1)[..., 0]
  return logp * jnp.asarray(get("response_mask"))


def respond(sampler: Sampler, params: Any, template: Any,
            conversations: Sequence[Any], sampling_cfg: SamplingConfig,
            seed: int = 0, batch_size: int = 32) -> list[dict[str, Any]]:
  """Samples one assistant turn for each conversation, `batch_size` prompts per call.

  Generation stops at the template's end of turn or `</s>` (`sampling_cfg.eos_ids` and
  `pad_id` are set here from the template). Batches are padded to `batch_size` rows (a
  multiple of the mesh's batch-parallel size) so every call reuses one compiled program
  per prompt-length bucket (fewer prompts than `batch_size` make one smaller batch);
  batch i draws with fold_in(key(seed), i).

  Args:
    sampler, params: the model's sampler and parameters.
    template: a chat template (data/chat.py: `prompt_ids`, `end_ids`, `decode_response`,
      `tokenizer`) bound to the model's tokenizer.
    conversations: message lists ({"role", "content"}), each ending before the reply.
    sampling_cfg: length limit, temperature, top-k / top-p, prompt bucket.
    seed: PRNG seed (unused at temperature 0).
    batch_size: prompts per generate call.

  Returns:
    Per conversation: {"response": decoded text up to the end token, "ended": True iff
    the end-of-turn token was generated within max_new_tokens, "tokens": generated tokens
    including the stop token}.

  Raises:
    ValueError: a conversation whose prompt + max_new_tokens exceeds the model context
      (its index is named), or an empty one.
  """
  tokenizer = template.tokenizer
  # The id written after a row stops: pad, else eos, else 0 (Llama-3 has no pad token;
  # the positions are masked either way). Generation stops at every end-of-turn id.
  fill = next(i for i in (tokenizer.pad_id, tokenizer.eos_id, 0) if i >= 0)
  cfg = dataclasses.replace(sampling_cfg, pad_id=fill, eos_ids=tuple(
      dict.fromkeys(i for i in (*template.end_ids, tokenizer.eos_id) if i >= 0)))
  context = sampler.model_cfg.max_seq_len
  prompts = [template.prompt_ids(c).tolist() for c in conversations]
  if not prompts:
    return []
  for i, ids in enumerate(prompts):
    if not ids:
      raise ValueError(f"Prompt {i} is empty")
    if len(ids) + cfg.max_new_tokens > context:
      raise ValueError(f"Prompt {i} has {len(ids)} tokens; with max_new_tokens="
                       f"{cfg.max_new_tokens} that exceeds the model context of {context} "
                       "tokens")
  dp = msharding.batch_parallel_size(sampler.mesh, sampler.rules) if sampler.mesh else 1
  batch_size = min(max(1, batch_size), len(prompts))  # no filler rows for a few prompts
  batch_size = -(-batch_size // dp) * dp  # rows must split evenly over the mesh
  results = []
  for b, start in enumerate(range(0, len(prompts), batch_size)):
    batch = prompts[start:start + batch_size]
    padded = batch + [batch[0]] * (batch_size - len(batch))  # filler rows, dropped below
    out = sampler.generate(params, padded, cfg,
                           seed=jax.random.fold_in(jax.random.key(seed), b))
    for row in range(len(batch)):
      n = int(out.response_mask[row].sum())
      ids = out.response[row, :n]
      results.append({"response": template.decode_response(ids),
                      "ended": bool(n and ids[-1] == template.end_ids[0]), "tokens": n})
  return results
