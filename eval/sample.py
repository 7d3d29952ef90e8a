"""Sampling from a checkpoint: one-shot responses, a batch of prompts, or an interactive chat.

  python -m eval.sample --checkpoint=runs/sft --prompt="Name three colors."
  python -m eval.sample --checkpoint=runs/sft --chat
  python -m eval.sample --checkpoint=runs/pretrain --prompt="ROMEO:" --template=none
  python -m eval.sample --checkpoint=runs/sft --prompts_file=prompts.jsonl \
      --temperature=0 --output=samples.jsonl --mesh=data=1,fsdp=2,tensor=1

Library use (what the SFT acceptance check calls):

  sampler, params, tokenizer, meta = load_for_sampling("runs/sft")
  template = make_template("chat", tokenizer)
  outs = respond(sampler, params, template, [[{"role": "user", "content": "Hi"}]],
                 SamplingConfig(max_new_tokens=64, temperature=0.0))
  # [{"response": "...", "ended": True, "tokens": 12}]

Templates: "chat" (data/chat.py: the prompt ends with `<|assistant|>`, generation stops at
`<|end|>` or `</s>`) and "none" (the raw prompt text is continued until `</s>`, for base
models). The tokenizer always comes from the checkpoint, so ids match the weights.

Weights are restored straight onto the sampling mesh: one device by default, or `--mesh`
(e.g. "data=1,fsdp=2,tensor=1"; -1 fills the remaining devices) to shard a model that does
not fit one device. The batch dimension is split over the mesh's batch axes.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import sys
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from data.benchmarks import field, read_jsonl
from data.chat import ASSISTANT, SYSTEM, TEMPLATES, USER, get_template
from data.readers import read_text
from data.tokenizer import Tokenizer
from eval.loading import load_checkpoint, parse_mesh
from model import sharding as msharding
from model.sampling import Sampler, SamplingConfig
from model.transformer import Transformer
from train import checkpoint as ckpt_lib

RAW_TEMPLATE = "none"
TEMPLATE_NAMES = (*sorted(TEMPLATES), RAW_TEMPLATE)
Conversation = Sequence[Mapping[str, str]]


class RawTemplate:
  """The "none" template: message contents are concatenated as plain text, no markers.

  It has the `ChatTemplate` interface `respond` uses (`prompt_ids`, `end_id`,
  `decode_response`), so a base model is sampled by the same code; its end of turn is
  `</s>`, the end-of-document token pretraining appends.
  """

  name = RAW_TEMPLATE

  def __init__(self, tokenizer: Tokenizer):
    self.tokenizer = tokenizer

  @property
  def end_id(self) -> int:
    return self.tokenizer.eos_id

  def prompt_ids(self, messages: Conversation) -> np.ndarray:
    return np.asarray(self.tokenizer.encode("".join(m["content"] for m in messages)),
                      np.int32)

  def decode_response(self, ids: Sequence[int]) -> str:
    kept = []
    for token in ids:
      if int(token) == self.end_id:
        break
      kept.append(int(token))
    return self.tokenizer.decode(kept)


def make_template(name: str, tokenizer: Tokenizer) -> Any:
  """The template `name` ("chat" or "none") bound to `tokenizer`.

  Raises:
    ValueError: an unknown name (the known ones are listed), or a tokenizer without the
      chat markers (e.g. a base model's: use "none").
  """
  if name == RAW_TEMPLATE:
    return RawTemplate(tokenizer)
  if name not in TEMPLATES:
    raise ValueError(f"Unknown template {name!r}; known: {list(TEMPLATE_NAMES)}")
  try:
    return get_template(name, tokenizer)
  except ValueError as e:  # a base model's tokenizer: point at the raw template
    raise ValueError(f"{e} For a base (pretrained) checkpoint use --template=none.") from e


def load_for_sampling(checkpoint: str, mesh_shape: Mapping[str, int] | None = None
                      ) -> tuple[Sampler, Any, Tokenizer, dict[str, Any]]:
  """Restores a language-model checkpoint and builds a Sampler for it (`eval.loading`).

  Args:
    checkpoint: a workdir, its `checkpoints/` directory, or one step directory.
    mesh_shape: e.g. {"data": 1, "fsdp": 2, "tensor": 1}; None = one device.

  Returns:
    (sampler, params on the mesh, tokenizer, checkpoint metadata incl. checkpoint_path).

  Raises:
    CheckpointError: the checkpoint is missing, unreadable, not a language model, or has
      no model config or tokenizer; the message names the path.
    ValueError: a mesh that does not fit the devices.
  """
  loaded = load_checkpoint(checkpoint, mesh_shape, expect=Transformer)
  sampler = Sampler(loaded.graphdef, loaded.model_cfg, mesh=loaded.mesh, rules=loaded.rules,
                    param_shardings=loaded.param_shardings)
  return sampler, loaded.params, loaded.tokenizer, loaded.meta


def respond(sampler: Sampler, params: Any, template: Any,
            conversations: Sequence[Conversation], sampling_cfg: SamplingConfig,
            seed: int = 0, batch_size: int = 32) -> list[dict[str, Any]]:
  """Samples one assistant turn for each conversation, `batch_size` prompts per call.

  Generation stops at the template's end of turn or `</s>` (`sampling_cfg.eos_ids` and
  `pad_id` are set here from the template). Batches are padded to `batch_size` rows (a
  multiple of the mesh's batch-parallel size) so every call reuses one compiled program
  per prompt-length bucket (fewer prompts than `batch_size` make one smaller batch);
  batch i draws with fold_in(key(seed), i).

  Args:
    sampler, params: from `load_for_sampling`.
    template: `make_template(...)` bound to the checkpoint's tokenizer.
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
  cfg = dataclasses.replace(sampling_cfg, pad_id=tokenizer.pad_id,
                            eos_ids=tuple(dict.fromkeys((template.end_id, tokenizer.eos_id))))
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
                      "ended": bool(n and ids[-1] == template.end_id), "tokens": n})
  return results


def truncate_history(template: Any, system: Sequence[Mapping[str, str]],
                     history: Sequence[Mapping[str, str]], max_prompt_tokens: int
                     ) -> tuple[list[Mapping[str, str]], int]:
  """Drops the oldest user/assistant pairs until the prompt fits `max_prompt_tokens`.

  The system messages are always kept. Returns (kept history, number of messages
  dropped); the kept history is empty when even the newest message alone does not fit.
  """
  history = list(history)
  dropped = 0
  while history and len(template.prompt_ids([*system, *history])) > max_prompt_tokens:
    # Drop a whole exchange so the conversation still opens with a user turn.
    n = 2 if len(history) > 2 and history[1]["role"] == ASSISTANT else 1
    history, dropped = history[n:], dropped + n
  return history, dropped


# ------------------------------------------------------------------------------ command line
def read_prompts(path: str) -> list[str]:
  """`.jsonl`: the "prompt" field of each record; any other file: one prompt per line."""
  if path.endswith(".jsonl"):
    return [field(r, "prompt", str, f"{path}:{n}") for n, r in read_jsonl(path)]
  # newline=None: lines end as in a file opened in text mode; read_text names a bad byte.
  return [line.rstrip("\n") for line in io.StringIO(read_text(path), newline=None)
          if line.strip()]


def _fit_max_new_tokens(requested: int, longest_prompt: int, context: int,
                        what: str) -> int:
  """Shortens max_new_tokens to the room the context leaves (said on stderr)."""
  room = context - longest_prompt
  if room < 1:
    raise ValueError(f"{what} has {longest_prompt} tokens; the model context is {context} "
                     "tokens, leaving no room for a response")
  if requested > room:
    print(f"note: max_new_tokens {requested} -> {room} (model context {context} tokens, "
          f"longest prompt {longest_prompt})", file=sys.stderr)
  return min(requested, room)


def run_prompts(flags: Any, sampler: Sampler, params: Any, template: Any) -> None:
  """Answers --prompt / --prompts_file; prints each and writes --output if given."""
  texts = list(flags.prompt or []) + (read_prompts(flags.prompts_file)
                                      if flags.prompts_file else [])
  system = [{"role": SYSTEM, "content": flags.system}] if flags.system else []
  conversations = [[*system, {"role": USER, "content": t}] for t in texts]
  lengths = [len(template.prompt_ids(c)) for c in conversations]
  longest = int(np.argmax(lengths))
  max_new = _fit_max_new_tokens(flags.max_new_tokens, lengths[longest],
                                sampler.model_cfg.max_seq_len,
                                f"Prompt {longest} ({texts[longest][:40]!r})")
  cfg = SamplingConfig(max_new_tokens=max_new, temperature=flags.temperature,
                       top_k=flags.top_k, top_p=flags.top_p)
  outs = respond(sampler, params, template, conversations, cfg, seed=flags.seed,
                 batch_size=flags.batch_size)
  records = [{"prompt": t, **o} for t, o in zip(texts, outs)]
  for i, r in enumerate(records):
    status = ("ended" if r["ended"] else "length limit" if r["tokens"] == max_new else
              "stopped at </s>")
    print(f"=== prompt {i + 1}/{len(records)} ===\n{r['prompt']}\n"
          f"--- response ({r['tokens']} tokens, {status}) ---\n{r['response']}", flush=True)
  if flags.output:
    os.makedirs(os.path.dirname(os.path.abspath(flags.output)), exist_ok=True)
    with open(flags.output, "w") as f:
      for r in records:
        f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"Wrote {len(records)} samples to {flags.output}", file=sys.stderr)


def run_chat(flags: Any, sampler: Sampler, params: Any, template: Any) -> None:
  """Interactive chat on stdin/stdout: /reset clears the history, /quit or EOF exits."""
  context = sampler.model_cfg.max_seq_len
  # Keep at least half the context for the conversation itself.
  max_new = min(flags.max_new_tokens, context // 2)
  if max_new < flags.max_new_tokens:
    print(f"note: max_new_tokens {flags.max_new_tokens} -> {max_new} (half the model "
          f"context of {context} tokens)", file=sys.stderr)
  cfg = SamplingConfig(max_new_tokens=max_new, temperature=flags.temperature,
                       top_k=flags.top_k, top_p=flags.top_p)
  system = [{"role": SYSTEM, "content": flags.system}] if flags.system else []
  history: list[Mapping[str, str]] = []
  interactive = sys.stdin.isatty()
  print("Chat: /reset clears the conversation, /quit exits.", file=sys.stderr)
  for turn in range(sys.maxsize):
    if interactive:
      print("you> ", end="", flush=True)
    line = sys.stdin.readline()
    if not line or line.strip() == "/quit":
      break
    text = line.rstrip("\n")
    if text.strip() == "/reset":
      history = []
      print("(conversation reset)", file=sys.stderr)
      continue
    if not text.strip():
      continue
    candidate = [*history, {"role": USER, "content": text}]
    kept, dropped = truncate_history(template, system, candidate, context - max_new)
    if not kept:
      print(f"error: that message does not fit the model context of {context} tokens "
            f"with max_new_tokens={max_new}; send a shorter one", file=sys.stderr)
      continue
    if dropped:
      print(f"(dropped the {dropped} oldest message(s): the conversation + max_new_tokens="
            f"{max_new} exceeded the model context of {context} tokens)", file=sys.stderr)
    out = respond(sampler, params, template, [[*system, *kept]], cfg, seed=flags.seed + turn,
                  batch_size=1)[0]
    print(f"assistant> {out['response']}", flush=True)
    history = [*kept, {"role": ASSISTANT, "content": out["response"]}]


def main(argv: Sequence[str]) -> None:
  from absl import flags as absl_flags
  from absl import logging
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  flags = absl_flags.FLAGS
  # Orbax logs every file operation at INFO and read-only restores at WARNING; the console
  # is for the samples. Unreadable checkpoint steps are still reported (printed).
  logging.set_verbosity(logging.ERROR)
  try:
    # Cheap checks first: a typo should not wait for the checkpoint to load.
    if flags.template not in TEMPLATE_NAMES:
      raise ValueError(f"Unknown template {flags.template!r}; known: {list(TEMPLATE_NAMES)}")
    if not (flags.chat or flags.prompt or flags.prompts_file):
      raise ValueError("nothing to sample: give --prompt, --prompts_file or --chat")
    if flags.chat and (flags.prompt or flags.prompts_file):
      raise ValueError("--chat reads prompts from stdin; drop --prompt / --prompts_file")
    if (flags.system or flags.chat) and flags.template == RAW_TEMPLATE:
      raise ValueError("--system and --chat need a chat template, not --template=none")
    if flags.local_devices:
      jax.config.update("jax_num_cpu_devices", flags.local_devices)
    mesh_shape = parse_mesh(flags.mesh)
    sampler, params, tokenizer, meta = load_for_sampling(flags.checkpoint, mesh_shape)
    print(f"Loaded {meta['checkpoint_path']} (stage {meta.get('stage')}, "
          f"{sampler.model_cfg.num_params():,} parameters, mesh "
          f"{dict(sampler.mesh.shape)})", file=sys.stderr, flush=True)
    template = make_template(flags.template, tokenizer)
    (run_chat if flags.chat else run_prompts)(flags, sampler, params, template)
  except (ckpt_lib.CheckpointError, ValueError, OSError) as e:
    sys.exit("error: " + " ".join(str(e).split()))  # one line, no traceback


def define_flags() -> None:
  """The command-line flags (defined only when this module is the program)."""
  from absl import flags
  flags.DEFINE_string("checkpoint", None, "Workdir, checkpoints dir or step dir.",
                      required=True)
  flags.DEFINE_multi_string("prompt", [], "A prompt (repeat the flag for several).")
  flags.DEFINE_string("prompts_file", "", ".jsonl with a 'prompt' field, or text lines.")
  flags.DEFINE_bool("chat", False, "Interactive chat on stdin/stdout.")
  flags.DEFINE_string("template", "chat", f"Prompt template: {' | '.join(TEMPLATE_NAMES)}.")
  flags.DEFINE_string("system", "", "Optional system message (chat template).")
  flags.DEFINE_integer("max_new_tokens", 128, "Response length limit in tokens.")
  flags.DEFINE_float("temperature", 0.7, "Sampling temperature (0 = greedy).")
  flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off).")
  flags.DEFINE_float("top_p", 0.9, "Nucleus sampling mass (1 = off).")
  flags.DEFINE_integer("seed", 0, "PRNG seed.")
  flags.DEFINE_integer("batch_size", 32, "Prompts per generate call.")
  flags.DEFINE_string("mesh", "", "Mesh to shard weights over, e.g. "
                      "'data=1,fsdp=2,tensor=1' (default: one device).")
  flags.DEFINE_integer("local_devices", 0, "CPU devices to expose (CPU runs; 0 = default).")
  flags.DEFINE_string("output", "", "Write {prompt, response, ended, tokens} jsonl here.")


if __name__ == "__main__":
  from absl import app
  define_flags()
  app.run(main)
