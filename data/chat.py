"""The chat template: conversations -> token ids with a loss mask, and back.

A conversation is a list of messages `{"role": "system" | "user" | "assistant",
"content": str}`. Each message is rendered as

  <role marker> content <|end|>

with the markers `<|system|>`, `<|user|>`, `<|assistant|>` and `<|end|>`, and no
newline or space in between: the markers are single tokenizer pieces, so nothing
is needed to separate them from the text. A generation prompt is the rendered
prompt messages followed by `<|assistant|>`; the model then writes the content
and ends its turn with `<|end|>`.

  render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}])
  == "<|user|>Hi<|end|><|assistant|>Yo<|end|>"

Decisions:
- Each message's content is encoded on its own (`tokenizer.encode(content)`) and
  the marker ids are put between the pieces, so a marker boundary is exact: no
  piece ever spans a marker and content, and the loss mask is known per token
  without any offset bookkeeping. For markers that are USER_DEFINED pieces
  (`train_tokenizer(user_defined_symbols=...)` or `Tokenizer.with_pieces`) this
  gives the same ids as encoding `render(messages)` in one go, because
  SentencePiece splits text at user-defined pieces before anything else.
- The loss mask is 1 on an assistant message's content tokens and on its
  `<|end|>` (the model must learn to stop), 0 on every marker and on system and
  user tokens (the `<|assistant|>` marker is 0: it is given in the prompt).
- Content is not escaped: a literal "<|end|>" inside a message encodes to the
  marker id, as it would in any SentencePiece-based template.
- `PROJECT_JINJA` is the same template in Jinja: an export writes it as the
  `chat_template`, so `apply_chat_template` renders what `ChatTemplate` encodes.

Template names (`get_template`): "chat" = these markers; "jinja" = the tokenizer's own
`chat_template` (`data.jinja_chat`, imported models); "auto" = the tokenizer's own template
when it has one, else the markers (the default: self-trained models keep the markers).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from data.jinja_chat import JinjaChatTemplate
from data.tokenizer import Tokenizer

SYSTEM, USER, ASSISTANT = "system", "user", "assistant"
ROLE_TOKENS: Mapping[str, str] = {
    SYSTEM: "<|system|>",
    USER: "<|user|>",
    ASSISTANT: "<|assistant|>",
}
END_OF_TURN = "<|end|>"
# Every piece the template needs; pass to train_tokenizer(user_defined_symbols=...)
# or Tokenizer.with_pieces.
CHAT_MARKERS: tuple[str, ...] = (*ROLE_TOKENS.values(), END_OF_TURN)

Message = Mapping[str, str]
AUTO = "auto"
# The project template as Jinja (what an export writes as `chat_template`).
PROJECT_JINJA = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role ' + message['role'] + '; expected system, user or "
    "assistant') }}{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


def _check_message(message: Message, index: int) -> tuple[str, str]:
  """Returns (role, content) of a well-formed message, else raises ValueError."""
  if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
    raise ValueError(f"Message {index} must be a mapping with 'role' and 'content', "
                     f"got {message!r:.200}")
  role, content = message["role"], message["content"]
  if role not in ROLE_TOKENS:
    raise ValueError(f"Message {index} has unknown role {role!r}; "
                     f"expected one of {sorted(ROLE_TOKENS)}")
  if not isinstance(content, str):
    raise ValueError(f"Message {index} ({role}) content is {type(content).__name__}, "
                     "expected a string")
  return role, content


def render(messages: Sequence[Message]) -> str:
  """The conversation as template text (for display; `ChatTemplate` encodes)."""
  parts = []
  for index, message in enumerate(messages):
    role, content = _check_message(message, index)
    parts.append(f"{ROLE_TOKENS[role]}{content}{END_OF_TURN}")
  return "".join(parts)


class ChatTemplate:
  """Encodes conversations for training and generation with one tokenizer."""

  name = "chat"

  def __init__(self, tokenizer: Tokenizer):
    """Binds the template to a tokenizer holding every marker as one piece.

    Raises:
      ValueError: Some markers are not single pieces of `tokenizer`; the message
        names them and how to add them.
    """
    ids, missing = {}, []
    for marker in CHAT_MARKERS:
      encoded = tokenizer.encode(marker)
      if len(encoded) == 1 and tokenizer.id_to_piece(encoded[0]) == marker:
        ids[marker] = encoded[0]
      else:
        missing.append(marker)
    if missing:
      raise ValueError(
          f"The tokenizer ({tokenizer!r}) lacks the chat marker(s) {missing} as "
          "single pieces. Add them with `tokenizer.with_pieces(data.chat.CHAT_MARKERS)` "
          "(appends them at the end of the vocabulary, existing ids unchanged) or "
          "train it with train_tokenizer(..., user_defined_symbols=CHAT_MARKERS).")
    self.tokenizer = tokenizer
    self._role_ids = {role: ids[marker] for role, marker in ROLE_TOKENS.items()}
    self._end_id = ids[END_OF_TURN]

  @property
  def end_id(self) -> int:
    """Id of `<|end|>`, the end of every turn (a generation stop token)."""
    return self._end_id

  @property
  def end_ids(self) -> tuple[int, ...]:
    """Every generation stop id: `<|end|>`, then `</s>` (a pretrained model may emit it)."""
    eos = self.tokenizer.eos_id
    return (self._end_id,) + ((eos,) if eos >= 0 and eos != self._end_id else ())

  @property
  def jinja(self) -> str:
    """The template in Jinja (`PROJECT_JINJA`), for exports."""
    return PROJECT_JINJA

  def role_id(self, role: str) -> int:
    """Id of a role's marker."""
    if role not in self._role_ids:
      raise ValueError(f"Unknown role {role!r}; expected one of {sorted(ROLE_TOKENS)}")
    return self._role_ids[role]

  def _assemble(self, roles: Sequence[str], contents: Sequence[Sequence[int]]
                ) -> tuple[np.ndarray, np.ndarray]:
    """Marker + content ids + end per message, with the loss mask."""
    ids, mask = [], []
    for role, content in zip(roles, contents):
      weight = 1.0 if role == ASSISTANT else 0.0
      ids.append(self._role_ids[role])
      mask.append(0.0)
      ids.extend(content)
      mask.extend([weight] * len(content))
      ids.append(self._end_id)
      mask.append(weight)
    return np.asarray(ids, np.int32), np.asarray(mask, np.float32)

  def encode(self, messages: Sequence[Message]) -> tuple[np.ndarray, np.ndarray]:
    """Encodes a conversation for training.

    Args:
      messages: The conversation, `{"role", "content"}` mappings.

    Returns:
      (ids int32 [N], loss_mask float32 [N]): loss_mask is 1 exactly on the
      assistant content tokens and each assistant turn's `<|end|>`.

    Raises:
      ValueError: A malformed message or an unknown role (named).
    """
    checked = [_check_message(m, i) for i, m in enumerate(messages)]
    return self._assemble([r for r, _ in checked],
                          [self.tokenizer.encode(c) for _, c in checked])

  def encode_batch(self, conversations: Sequence[Sequence[Message]]
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
    """`encode` for many conversations, with one threaded tokenizer call."""
    checked = [[_check_message(m, i) for i, m in enumerate(messages)]
               for messages in conversations]
    flat = self.tokenizer.encode_batch([c for conv in checked for _, c in conv])
    out, at = [], 0
    for conv in checked:
      out.append(self._assemble([r for r, _ in conv], flat[at:at + len(conv)]))
      at += len(conv)
    return out

  def prompt_ids(self, messages: Sequence[Message]) -> np.ndarray:
    """Ids for generation: the rendered `messages` then `<|assistant|>` (int32)."""
    ids, _ = self.encode(messages)
    return np.concatenate([ids, [self._role_ids[ASSISTANT]]]).astype(np.int32)

  def encode_response(self, messages: Sequence[Message], response: str
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(prompt ids, response ids): `prompt_ids(messages)` and the response's content ids
    then `<|end|>` (exactly what `encode` gives the answered conversation's last turn)."""
    content = np.asarray(self.tokenizer.encode(response), np.int32)
    return self.prompt_ids(messages), np.concatenate([content, [self._end_id]]).astype(np.int32)

  def decode_response(self, ids: Sequence[int]) -> str:
    """Decodes generated ids up to (not including) the first `<|end|>`.

    Generation also stops at `</s>`, which a model pretrained with `add_eos`
    may still emit; everything from the first stop token on is dropped.
    """
    stops = set(self.end_ids)
    kept = []
    for token in ids:
      if int(token) in stops:
        break
      kept.append(int(token))
    return self.tokenizer.decode(kept)


# Either kind of template (same interface): the type pipelines take.
AnyTemplate = ChatTemplate | JinjaChatTemplate
TEMPLATES = {ChatTemplate.name: ChatTemplate, JinjaChatTemplate.name: JinjaChatTemplate}
TEMPLATE_NAMES = (AUTO, *sorted(TEMPLATES))


def resolve_template_name(name: str, tokenizer: Any) -> str:
  """"auto" -> "jinja" when `tokenizer` has its own chat template, else "chat"; other
  names unchanged.

  Raises:
    ValueError: Unknown name (the known ones are listed).
  """
  if name not in TEMPLATE_NAMES:
    raise ValueError(f"Unknown chat template {name!r}; known: {list(TEMPLATE_NAMES)}")
  if name == AUTO:
    return JinjaChatTemplate.name if tokenizer.chat_template else ChatTemplate.name
  return name


def uses_project_markers(name: str, tokenizer: Any) -> bool:
  """Whether template `name` on `tokenizer` is the project's (its markers must be added,
  `tokenizer.with_pieces(CHAT_MARKERS)`)."""
  return resolve_template_name(name, tokenizer) == ChatTemplate.name


def get_template(name: str, tokenizer: Any) -> AnyTemplate:
  """The template called `name` ("auto", "chat" or "jinja") bound to `tokenizer`.

  Raises:
    ValueError: Unknown name (the known ones are listed), the tokenizer lacks the
      project's markers ("chat"), or its own template is missing or broken ("jinja").
  """
  return TEMPLATES[resolve_template_name(name, tokenizer)](tokenizer)
