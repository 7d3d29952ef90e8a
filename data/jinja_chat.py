"""Chat templates of imported models: the tokenizer's own Jinja `chat_template`.

`JinjaChatTemplate` renders the template the way `transformers`' `apply_chat_template` does
(`transformers/utils/chat_template_utils.py`: a jinja2 `ImmutableSandboxedEnvironment` with
trim_blocks and lstrip_blocks, the `loopcontrols` extension, `raise_exception`, the
non-escaping `tojson`, `strftime_now`, a `{% generation %}` block that just renders its body,
and the special-token strings `bos_token` / `eos_token` / `pad_token` / `unk_token` as
variables), then encodes the rendered text in one go with the tokenizer (special-token
strings map to their ids, no BOS added: what `apply_chat_template(tokenize=True)` does). It
has the interface of `data.chat.ChatTemplate`.

Decisions:
- Loss mask from prefix renders, mapped to tokens by character offsets. For every assistant
  message i, `render(messages[:i], add_generation_prompt=True)` is the text before its
  content and `render(messages[:i + 1])` ends with its turn; the masked characters run from
  the end of the first to the end of the last occurrence of the end-of-turn token in the
  second (so the content and the end-of-turn token, not a trailing newline). A token is a
  loss token when its character span overlaps a masked span. This needs each prefix render
  to be a prefix of the next (true of Llama-3, ChatML/Qwen2.5, Mistral, Llama-2 templates);
  a template that rewrites earlier turns (e.g. one that drops past reasoning) is refused
  with a ValueError rather than trained with a wrong mask.
- End-of-turn ids, derived rather than listed per family: the first special token the
  template emits after an assistant message's content (`<|eot_id|>`, `<|im_end|>`,
  `</s>`), then the tokenizer's EOS, then any of the usual end-of-text tokens the vocabulary
  has (`END_OF_TEXT_TOKENS`, so Llama-3-Instruct, whose EOS is `<|eot_id|>`, still stops
  at `<|end_of_text|>`). Generation stops at any of them.
"""

from __future__ import annotations

import datetime
import json
from typing import Any, Mapping, Sequence

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
import numpy as np

Message = Mapping[str, Any]
# End-of-text tokens of the common families; stop ids when the vocabulary has them.
END_OF_TEXT_TOKENS = ("<|end_of_text|>", "<|endoftext|>", "<|eot_id|>", "<|im_end|>",
                      "<end_of_turn>", "<eos>", "</s>")
SOURCE = "tokenizer_config.json field 'chat_template'"
_PROBE = [{"role": "user", "content": "Hello?"},
          {"role": "assistant", "content": "PROBE-RESPONSE"}]


class _Generation(Extension):
  """`{% generation %}...{% endgeneration %}` (transformers' assistant tracker) as a no-op."""
  tags = {"generation"}

  def parse(self, parser: Any) -> nodes.Node:
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

  def _render(self, caller: Any) -> str:
    return caller()


def _raise_exception(message: str) -> None:
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
  # transformers' override: jinja's own tojson escapes HTML characters.
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def compile_template(source: str) -> jinja2.Template:
  """The sandboxed jinja2 template (transformers' environment).

  Raises:
    ValueError: A syntax error (one line, naming the config field and the line).
  """
  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[_Generation, loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  try:
    return env.from_string(source)
  except jinja2.TemplateSyntaxError as e:
    raise ValueError(f"{SOURCE}: not a valid Jinja template (line {e.lineno}: {e.message})"
                     ) from e


def _check(messages: Sequence[Message]) -> list[dict[str, Any]]:
  """Plain-dict copies of the messages; each needs a string role and content."""
  out = []
  for index, message in enumerate(messages):
    if (not isinstance(message, Mapping) or not isinstance(message.get("role"), str)
        or not isinstance(message.get("content"), str)):
      raise ValueError(f"Message {index} must be a mapping with string 'role' and 'content', "
                       f"got {message!r:.200}")
    out.append(dict(message))
  return out


class JinjaChatTemplate:
  """Encodes conversations with the tokenizer's own chat template."""

  name = "jinja"

  def __init__(self, tokenizer: Any, source: str | None = None):
    """Binds `source` (default: `tokenizer.chat_template`) to `tokenizer`.

    Raises:
      ValueError: No template, a syntax error, a template that fails to render a
        two-turn conversation, or one with no special token closing an assistant turn.
    """
    source = tokenizer.chat_template if source is None else source
    if not source:
      raise ValueError(f"{SOURCE}: the tokenizer has no chat template; use the project "
                       "template (data.chat, name 'chat' or 'auto')")
    self.tokenizer = tokenizer
    self._source = source
    self._template = compile_template(source)
    ids = {"bos_token": tokenizer.bos_id, "eos_token": tokenizer.eos_id,
           "pad_token": tokenizer.pad_id, "unk_token": tokenizer.unk_id}
    # Like transformers' special_tokens_map: only the tokens the family has.
    self._variables = {k: tokenizer.id_to_piece(i) for k, i in ids.items() if i >= 0}
    self._specials = dict(tokenizer.special_tokens)
    self._end_text = self._find_end_of_turn()
    ends = [self._specials[self._end_text], tokenizer.eos_id,
            *(self._specials[t] for t in END_OF_TEXT_TOKENS if t in self._specials)]
    self._end_ids = tuple(dict.fromkeys(int(i) for i in ends if i >= 0))

  def _find_end_of_turn(self) -> str:
    """The first special token after an assistant message's content."""
    text = self.render(_PROBE)
    after = text[text.rfind(_PROBE[-1]["content"]) + len(_PROBE[-1]["content"]):]
    found = [(after.find(s), -len(s), s) for s in self._specials if s and s in after]
    if not found:
      raise ValueError(f"{SOURCE}: no special token follows an assistant message's content "
                       f"(rendered {after!r:.60}), so its end of turn is unknown")
    return min(found)[2]

  @property
  def jinja(self) -> str:
    """The Jinja source (what an export writes as `chat_template`)."""
    return self._source

  @property
  def end_id(self) -> int:
    """The end-of-turn id the template writes after an assistant message."""
    return self._end_ids[0]

  @property
  def end_ids(self) -> tuple[int, ...]:
    """Every id generation stops at (module doc)."""
    return self._end_ids

  def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
    """The template's text for `messages` (what `apply_chat_template(tokenize=False)` gives).

    Raises:
      ValueError: The template failed to render (one line: the field and the cause).
    """
    try:
      return self._template.render(messages=_check(messages), tools=None, documents=None,
                                   add_generation_prompt=add_generation_prompt,
                                   **self._variables)
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError) as e:
      cause = " ".join(str(e).split()) or type(e).__name__
      raise ValueError(f"{SOURCE} failed to render: {cause}") from e

  def _loss_spans(self, messages: Sequence[Message], text: str) -> list[tuple[int, int]]:
    """Character spans of each assistant content + end-of-turn token in `text`."""
    spans = []
    for i, message in enumerate(messages):
      if message["role"] != "assistant":
        continue
      before = self.render(messages[:i], add_generation_prompt=True)
      turn = self.render(messages[:i + 1])
      if not turn.startswith(before) or not text.startswith(turn):
        raise ValueError(f"{SOURCE}: rendering is not incremental at message {i} (a "
                         "prefix render is not a prefix of the conversation), so the "
                         "response-only loss mask cannot be derived")
      end = turn.rfind(self._end_text, len(before))
      if end < 0:
        raise ValueError(f"{SOURCE}: assistant message {i} is not closed by "
                         f"{self._end_text!r}")
      spans.append((len(before), end + len(self._end_text)))
    return spans

  def encode(self, messages: Sequence[Message]) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [N], loss_mask float32 [N]); the mask is 1 on assistant content tokens
    and their end-of-turn token (module doc).

    Raises:
      ValueError: A malformed message, or the template fails to render.
    """
    text = self.render(messages)
    spans = self._loss_spans(messages, text)
    ids, offsets = self.tokenizer.encode_with_offsets(text)
    mask = np.zeros(len(ids), np.float32)
    for t, (start, end) in enumerate(offsets):
      end = max(end, start + 1)  # a zero-width token counts at its position
      mask[t] = any(start < b and a < end for a, b in spans)
    return np.asarray(ids, np.int32), mask

  def encode_batch(self, conversations: Sequence[Sequence[Message]]
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
    """`encode` for many conversations."""
    return [self.encode(messages) for messages in conversations]

  def prompt_ids(self, messages: Sequence[Message]) -> np.ndarray:
    """Ids for generation: `render(messages, add_generation_prompt=True)` encoded."""
    ids, _ = self.tokenizer.encode_with_offsets(self.render(messages, True))
    return np.asarray(ids, np.int32)

  def encode_response(self, messages: Sequence[Message], response: str
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(prompt ids, response ids) of `messages` answered by `response`, from one rendering:
    the response ids are the conversation's tokens after the prompt, through the end of
    turn (preference rows; see `data.chat.ChatTemplate.encode_response`).

    Raises:
      ValueError: The prompt's encoding is not a prefix of the conversation's.
    """
    prompt = self.prompt_ids(messages)
    ids, mask = self.encode([*messages, {"role": "assistant", "content": response}])
    if len(ids) < len(prompt) or not np.array_equal(ids[:len(prompt)], prompt):
      raise ValueError(f"{SOURCE}: the generation prompt does not encode as a prefix of the "
                       "answered conversation")
    last = int(np.flatnonzero(mask)[-1]) + 1 if mask.any() else len(ids)
    return prompt, ids[len(prompt):last]

  def decode_response(self, ids: Sequence[int]) -> str:
    """Decodes generated ids up to (not including) the first end id."""
    kept = []
    for token in ids:
      if int(token) in self._end_ids:
        break
      kept.append(int(token))
    return self.tokenizer.decode(kept)
