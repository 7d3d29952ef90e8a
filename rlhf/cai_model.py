"""The models of Constitutional AI: a language model (own checkpoint or `hf:<dir>`) loaded for
inference, its chat-template generation, and the judge's option log-likelihoods.

rlhf/ sits below eval/ (.importlinter), so this is a small loader of its own over the same
pieces eval.loading uses: the checkpoint metadata, `train.state` shardings and
`train.checkpoint.load_params`, or `train.hf_import` for a Hugging Face directory (read
straight into the model, as `init_from=hf:` does). The model lives on one device; the
runtime (train/runtime.py) compiles one program per padded width.
"""

from __future__ import annotations

import math
import os
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from data.chat import get_template
from data.tokenizer import fill_id, load_tokenizer
from model import sharding as msharding
from model.config import ModelConfig
from model.sampling import Sampler, SamplingConfig, respond
from model.transformer import Transformer
from train import checkpoint as ckpt_lib
from train.hf_import import hf_dir_of, load_hf_params, load_hf_parent
from train.runtime import Runtime
from train.state import abstract_model, mesh_shardings, with_shardings


class ChatModel(NamedTuple):
  """A language model ready to answer chats and score continuations."""
  path: str
  cfg: ModelConfig
  graphdef: Any
  params: Any
  shardings: Any
  tokenizer: Any
  template: Any
  mesh: jax.sharding.Mesh
  rules: tuple

  @property
  def runtime(self) -> Runtime:
    return Runtime(self.mesh, self.rules, self.graphdef, self.shardings)

  @property
  def context(self) -> int:
    return self.cfg.max_seq_len


def load_chat_model(path: str, field: str, template: str = "auto") -> ChatModel:
  """Loads a language-model checkpoint (or `hf:<dir>`) onto one device.

  Raises:
    CheckpointError / ValueError: naming `field` (the config field that gave the path) and
      the path: missing, unreadable, not a language model, or a tokenizer without a chat
      template (a base model: run SFT first).
  """
  mesh = msharding.make_mesh({}, jax.devices()[:1])
  rules = msharding.normalize_rules(None)
  hf_dir = hf_dir_of(path)
  try:
    if hf_dir is not None:
      if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise ckpt_lib.CheckpointError(f"no Hugging Face model at {hf_dir} (no config.json)")
      cfg, tokenizer, _ = load_hf_parent(hf_dir)
    else:
      if not os.path.exists(path):
        raise ckpt_lib.CheckpointError(f"checkpoint {path!r} does not exist")
      meta = ckpt_lib.read_metadata(path)
      cfg = ModelConfig.from_dict(meta["model_config"])
      if meta.get("model_class", "Transformer") != "Transformer":
        raise ckpt_lib.CheckpointError(f"checkpoint {path!r} holds a {meta['model_class']}, "
                                       "not a language model")
    graphdef, abstract, logical = abstract_model(Transformer, cfg)
    shardings = mesh_shardings(logical, mesh, rules)
    target = with_shardings(abstract, shardings)
    if hf_dir is not None:
      params = load_hf_params(hf_dir, cfg, target)
    else:
      params, _, blob = ckpt_lib.load_params(meta["checkpoint_path"], target)
      tokenizer = load_tokenizer(blob)
    chat = get_template(template, tokenizer)
  except (ckpt_lib.CheckpointError, ValueError, KeyError, OSError) as e:
    raise ValueError(f"{field}={path}: {' '.join(str(e).split())}") from e
  return ChatModel(path, cfg, graphdef, params, shardings, tokenizer, chat, mesh, rules)


def fits(model: ChatModel, conversation: Sequence[Any], max_new_tokens: int) -> bool:
  """Whether the conversation's prompt plus `max_new_tokens` fits the model's context."""
  return len(model.template.prompt_ids(conversation)) + max_new_tokens <= model.context


def answer(model: ChatModel, conversations: Sequence[Any], max_new_tokens: int,
           temperature: float, top_p: float, seed: int, batch_size: int
           ) -> list[dict[str, Any]]:
  """One assistant turn per conversation (model.sampling.respond on the KV-cache sampler)."""
  sampler = Sampler(model.graphdef, model.cfg, mesh=model.mesh, rules=model.rules,
                    param_shardings=model.shardings)
  cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
  return respond(sampler, model.params, model.template, conversations, cfg, seed=seed,
                 batch_size=batch_size)


def _continuation_logps(model: Any, batch: dict[str, jax.Array]) -> jax.Array:
  """Sum of log p(target) over the masked continuation slots of right-padded rows [B]."""
  tokens, starts, targets, mask = (batch[k] for k in ("tokens", "starts", "targets", "mask"))
  h = model.hidden(tokens)  # [B, T, E]
  index = starts[:, None] + jnp.arange(targets.shape[1])[None]  # [B, K]
  h = jnp.take_along_axis(h, index[..., None], axis=1)  # [B, K, E]
  logp = jax.nn.log_softmax(model.logits(h).astype(jnp.float32), axis=-1)  # [B, K, V]
  picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return jnp.sum(picked * mask, axis=1)


def option_logps(model: ChatModel, conversations: Sequence[Any],
                 options: Sequence[str], batch_size: int) -> np.ndarray:
  """log p(option | conversation) for every conversation and option: [N, len(options)].

  Each option is scored as the content of the assistant's reply (the ids the template
  gives a reply's content), after the conversation's generation prompt.
  """
  option_ids = [model.tokenizer.encode(o) for o in options]
  k = max(len(o) for o in option_ids)
  rows = [(model.template.prompt_ids(c).tolist(), o) for c in conversations
          for o in option_ids]
  longest = max(len(p) + len(o) for p, o in rows)
  if longest > model.context:
    raise ValueError(f"a judge prompt has {longest} tokens; the judge's context is "
                     f"{model.context}")
  width = min(model.context, 1 << math.ceil(math.log2(longest)))
  n = len(rows)
  tokens = np.full((n, width), fill_id(model.tokenizer), np.int32)
  starts = np.zeros(n, np.int32)
  targets = np.zeros((n, k), np.int32)
  mask = np.zeros((n, k), np.float32)
  for r, (prompt, option) in enumerate(rows):
    seq = prompt + option
    tokens[r, :len(seq)] = seq
    starts[r] = len(prompt) - 1  # hidden state that predicts the option's first token
    targets[r, :len(option)] = option
    mask[r, :len(option)] = 1.0
  # The K slots from `starts` must stay inside the row (a short option at the end).
  starts = np.minimum(starts, width - k)
  shift = (np.asarray([len(p) - 1 for p, _ in rows]) - starts)
  for r in np.nonzero(shift)[0]:  # re-align targets for rows whose window was moved back
    prompt, option = rows[r]
    targets[r] = 0
    mask[r] = 0.0
    targets[r, shift[r]:shift[r] + len(option)] = option
    mask[r, shift[r]:shift[r] + len(option)] = 1.0
  out = model.runtime.apply(_continuation_logps, model.params,
                            {"tokens": tokens, "starts": starts, "targets": targets,
                             "mask": mask}, batch_size)
  return np.asarray(out, np.float64).reshape(len(conversations), len(options))
