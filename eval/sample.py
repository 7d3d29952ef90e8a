"""Sampling from a checkpoint: one-shot responses, a batch of prompts, or an interactive chat.

  python -m eval.sample --checkpoint=runs/sft --prompt="Name three colors."
  python -m eval.sample --checkpoint=runs/sft --chat    # exit, quit, Ctrl-C or Ctrl-D end it
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

Bad input (a missing checkpoint or one with an unreadable tokenizer, an unknown template, a
prompt longer than the context) ends in one `error:` line and exit code 2, checked before
anything is written; `--verbose` adds the traceback.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import sys
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from absl import app, flags, logging

from data.benchmarks import field, read_jsonl
from data.chat import ASSISTANT, SYSTEM, TEMPLATE_NAMES as CHAT_TEMPLATE_NAMES, USER, get_template
from data.readers import read_text
from data.tokenizer import Tokenizer
from eval.cli import exit_with_error
from eval.loading import load_checkpoint, parse_mesh
from model import sharding as msharding
from model.sampling import Sampler, SamplingConfig, respond
from model.transformer import Transformer
from train import checkpoint as ckpt_lib

RAW_TEMPLATE = "none"
TEMPLATE_NAMES = (*CHAT_TEMPLATE_NAMES, RAW_TEMPLATE)
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

  @property
  def end_ids(self) -> tuple[int, ...]:
    return (self.tokenizer.eos_id,)

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
  """The template `name` ("auto", "chat", "jinja" or "none") bound to `tokenizer`.

  Raises:
    ValueError: an unknown name (the known ones are listed), or a tokenizer without the
      chat markers (e.g. a base model's: use "none").
  """
  if name == RAW_TEMPLATE:
    return RawTemplate(tokenizer)
  if name not in CHAT_TEMPLATE_NAMES:
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


QUIT_COMMANDS = ("/quit", "/exit", "quit", "exit")


def _line_reader(interactive: bool) -> Callable[[], str]:
  """`input()`: on a terminal with a `you> ` prompt and, where Python has `readline`, line
  editing (arrow keys) and a history; on a pipe without the prompt. Raises EOFError at
  the end of the input."""
  if interactive:
    try:
      import readline  # noqa: F401 - optional module (not on every platform); importing it gives input() line editing and history
    except ImportError:  # e.g. Windows: plain input() still works
      pass
  prompt = "you> " if interactive else ""
  return lambda: input(prompt)


def run_chat(flags: Any, sampler: Sampler, params: Any, template: Any) -> None:
  """Interactive chat on stdin/stdout: /reset clears the history; exit, quit (or /exit,
  /quit), Ctrl-C or EOF end the session."""
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
  read_line = _line_reader(interactive)
  print("Chat: /reset clears the conversation; exit, quit, Ctrl-C or Ctrl-D end it.",
        file=sys.stderr)
  try:
    for turn in range(sys.maxsize):
      text = read_line().strip()
      if text.lower() in QUIT_COMMANDS:
        break
      if text == "/reset":
        history = []
        print("(conversation reset)", file=sys.stderr)
        continue
      if text:
        history = _chat_turn(flags, sampler, params, template, system, history, text, cfg,
                             turn)
  except (EOFError, KeyboardInterrupt):  # Ctrl-D / end of a pipe, Ctrl-C: a normal end
    if interactive:
      print(flush=True)  # the prompt line was left open


def _chat_turn(flags: Any, sampler: Sampler, params: Any, template: Any,
               system: list[Mapping[str, str]], history: list[Mapping[str, str]], text: str,
               cfg: SamplingConfig, turn: int) -> list[Mapping[str, str]]:
  """Answers `text` after `history` (oldest exchanges dropped to fit); the new history."""
  context, max_new = sampler.model_cfg.max_seq_len, cfg.max_new_tokens
  candidate = [*history, {"role": USER, "content": text}]
  kept, dropped = truncate_history(template, system, candidate, context - max_new)
  if not kept:
    print(f"error: that message does not fit the model context of {context} tokens "
          f"with max_new_tokens={max_new}; send a shorter one", file=sys.stderr)
    return history
  if dropped:
    print(f"(dropped the {dropped} oldest message(s): the conversation + max_new_tokens="
          f"{max_new} exceeded the model context of {context} tokens)", file=sys.stderr)
  out = respond(sampler, params, template, [[*system, *kept]], cfg, seed=flags.seed + turn,
                batch_size=1)[0]
  print(f"assistant> {out['response']}", flush=True)
  return [*kept, {"role": ASSISTANT, "content": out["response"]}]


def main(argv: Sequence[str]) -> None:
  FLAGS = flags.FLAGS
  if len(argv) > 1:
    exit_with_error(f"unexpected arguments {argv[1:]}")
  # Orbax logs every file operation at INFO and read-only restores at WARNING; the console
  # is for the samples. Unreadable checkpoint steps are still reported (printed).
  logging.set_verbosity(logging.ERROR)
  try:
    # Cheap checks first: a typo should not wait for the checkpoint to load.
    if FLAGS.template not in TEMPLATE_NAMES:
      raise ValueError(f"Unknown template {FLAGS.template!r}; known: {list(TEMPLATE_NAMES)}")
    if not (FLAGS.chat or FLAGS.prompt or FLAGS.prompts_file):
      raise ValueError("nothing to sample: give --prompt, --prompts_file or --chat")
    if FLAGS.chat and (FLAGS.prompt or FLAGS.prompts_file):
      raise ValueError("--chat reads prompts from stdin; drop --prompt / --prompts_file")
    if (FLAGS.system or FLAGS.chat) and FLAGS.template == RAW_TEMPLATE:
      raise ValueError("--system and --chat need a chat template, not --template=none")
    if FLAGS.local_devices:
      jax.config.update("jax_num_cpu_devices", FLAGS.local_devices)
    mesh_shape = parse_mesh(FLAGS.mesh)
    sampler, params, tokenizer, meta = load_for_sampling(FLAGS.checkpoint, mesh_shape)
    print(f"Loaded {meta['checkpoint_path']} (stage {meta.get('stage')}, "
          f"{sampler.model_cfg.num_params():,} parameters, mesh "
          f"{dict(sampler.mesh.shape)})", file=sys.stderr, flush=True)
    template = make_template(FLAGS.template, tokenizer)
    (run_chat if FLAGS.chat else run_prompts)(FLAGS, sampler, params, template)
  except (ckpt_lib.CheckpointError, ValueError, OSError) as e:
    exit_with_error(e, FLAGS.verbose)
  except KeyboardInterrupt:  # Ctrl-C while the checkpoint loads: no traceback
    sys.exit(130)


def define_flags() -> None:
  """The command-line flags (defined only when this module is the program)."""
  flags.DEFINE_string("checkpoint", None, "Workdir, checkpoints dir or step dir.",
                      required=True)
  flags.DEFINE_multi_string("prompt", [], "A prompt (repeat the flag for several).")
  flags.DEFINE_string("prompts_file", "", ".jsonl with a 'prompt' field, or text lines.")
  flags.DEFINE_bool("chat", False, "Interactive chat on stdin/stdout.")
  flags.DEFINE_string("template", "auto", f"Prompt template: {' | '.join(TEMPLATE_NAMES)}.")
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
  flags.DEFINE_bool("verbose", False, "Print the traceback of an error too.")


if __name__ == "__main__":
  define_flags()
  app.run(main)
