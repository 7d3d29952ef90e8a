"""Request bodies of the OpenAI-compatible API and its error shape.

  body = parse_body(await request.body(), ChatRequest)   # raises APIError (400) if malformed

Requests follow OpenAI's schema (https://platform.openai.com/docs/api-reference): the fields
this server implements are declared with their types and ranges; `top_k` is an extra field
(the openai client sends it with `extra_body={"top_k": 40}`). Fields of OpenAI's schema that
the server does not implement (tools, response_format other than text, logit_bias, penalties,
n > 1, best_of > 1, echo, suffix) are refused with a 400 that names them rather than
silently ignored; unknown fields are ignored, as OpenAI's own server does for new clients.

Every error leaves as OpenAI's body `{"error": {"message", "type", "param", "code"}}`
(`APIError.body`), whatever raised it: a malformed JSON body or a wrong type is a 400
(never FastAPI's 422), a missing key a 401, a spent quota a 429, an engine failure a 500.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field


class APIError(Exception):
  """An error answered with OpenAI's error body.

  Attributes:
    status: HTTP status (400, 401, 404, 429, 500, 503).
    message: what went wrong, for the user.
    type: OpenAI's error type ("invalid_request_error", "authentication_error", ...).
    param: the request field at fault, if one is.
    code: a short machine-readable code.
    headers: extra response headers (e.g. Retry-After on a 429).
  """

  TYPES = {400: "invalid_request_error", 401: "authentication_error",
           404: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
           503: "server_error"}

  def __init__(self, status: int, message: str, *, param: str | None = None,
               code: str | None = None, type: str | None = None,
               headers: dict[str, str] | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.code = status, message, param, code
    self.type = type or self.TYPES.get(status, "server_error")
    self.headers = headers or {}

  @property
  def body(self) -> dict[str, Any]:
    return {"error": {"message": self.message, "type": self.type, "param": self.param,
                      "code": self.code}}


class _Request(BaseModel):
  """Fields common to both generation endpoints (OpenAI's names and ranges)."""
  model_config = ConfigDict(extra="ignore", strict=False)

  @pydantic.model_validator(mode="before")
  @classmethod
  def _null_is_default(cls, data: Any) -> Any:
    """`"temperature": null` (as many clients send) means the default, as at OpenAI."""
    return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

  model: str | None = None
  max_tokens: int | None = Field(None, ge=1)
  temperature: float = Field(1.0, ge=0.0, le=2.0)
  top_p: float = Field(1.0, gt=0.0, le=1.0)
  top_k: int = Field(0, ge=0)
  n: int = Field(1, ge=1)
  stop: str | list[str] | None = None
  seed: int | None = None
  stream: bool = False
  stream_options: dict[str, Any] | None = None
  user: str | None = None
  # OpenAI fields this server refuses unless left at their neutral value.
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0
  logit_bias: dict[str, float] | None = None

  def unsupported(self) -> list[str]:
    """Names of the set OpenAI fields this server does not implement."""
    out = []
    if self.n != 1:
      out.append("n (one choice per request)")
    if self.presence_penalty or self.frequency_penalty:
      out.append("presence_penalty / frequency_penalty")
    if self.logit_bias:
      out.append("logit_bias")
    return out

  def stop_strings(self) -> list[str]:
    """`stop` as a list (OpenAI allows up to 4; empty strings are dropped)."""
    stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
    if len(stops) > 4:
      raise APIError(400, f"stop has {len(stops)} strings; at most 4 are allowed",
                     param="stop")
    return [s for s in stops if s]

  def include_usage(self) -> bool:
    return bool(self.stream_options and self.stream_options.get("include_usage"))


class TextPart(BaseModel):
  """One part of a message's content list (only text parts are served)."""
  model_config = ConfigDict(extra="ignore")
  type: Literal["text"]
  text: str


class Message(BaseModel):
  """A chat message; "developer" (OpenAI's newer name) is served as "system"."""
  model_config = ConfigDict(extra="ignore")
  role: Literal["system", "developer", "user", "assistant"]
  content: str | list[TextPart]

  def plain(self) -> dict[str, str]:
    """{"role", "content"} as the chat templates take it."""
    content = (self.content if isinstance(self.content, str)
               else "".join(p.text for p in self.content))
    return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatRequest(_Request):
  """POST /v1/chat/completions."""
  messages: list[Message] = Field(min_length=1)
  max_completion_tokens: int | None = Field(None, ge=1)
  logprobs: bool = False
  top_logprobs: int | None = Field(None, ge=0, le=20)
  tools: list[Any] | None = None
  tool_choice: Any = None
  functions: list[Any] | None = None
  response_format: dict[str, Any] | None = None

  def unsupported(self) -> list[str]:
    out = super().unsupported()
    if self.tools or self.functions or self.tool_choice not in (None, "none"):
      out.append("tools / functions")
    if self.response_format and self.response_format.get("type") != "text":
      out.append("response_format (only text)")
    return out

  def token_limit(self) -> int | None:
    """max_completion_tokens (OpenAI's newer name) else max_tokens."""
    return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Request):
  """POST /v1/completions: one prompt (a string, a one-string list, or token ids)."""
  prompt: str | list[str] | list[int]
  logprobs: int | None = Field(None, ge=0, le=20)
  echo: bool = False
  suffix: str | None = None
  best_of: int | None = None

  def unsupported(self) -> list[str]:
    out = super().unsupported()
    if isinstance(self.prompt, list) and len(self.prompt) != 1 and \
        not all(isinstance(x, int) for x in self.prompt):
      out.append("several prompts (one prompt per request)")
    if self.echo:
      out.append("echo")
    if self.suffix:
      out.append("suffix")
    if self.best_of not in (None, 1):
      out.append("best_of")
    return out

  def token_limit(self) -> int | None:
    return self.max_tokens


class FeedbackRequest(BaseModel):
  """POST /v1/feedback: a user's judgement of one served completion."""
  model_config = ConfigDict(extra="forbid")
  completion_id: str = Field(min_length=1)
  rating: float | None = None
  preferred: str | None = None
  comment: str | None = None


def _field_name(loc: tuple[Any, ...]) -> str:
  """pydantic's error location -> "messages[0].content" (union branch names dropped)."""
  out = ""
  for part in loc:
    if isinstance(part, int):
      out += f"[{part}]"
    elif part in ("str", "list[str]", "list[int]", "list[TextPart]", "function-after") or \
        str(part).startswith(("literal[", "union[")):
      continue
    else:
      out += ("." if out else "") + str(part)
  return out


def parse_body(raw: bytes, model: type[BaseModel]) -> Any:
  """The request `model` from a raw JSON body.

  Raises:
    APIError: 400 for a body that is not JSON, not an object, or has a missing field or
      a field of the wrong type or range (the first such field is named in `param`).
  """
  try:
    data = json.loads(raw or b"")
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise APIError(400, f"The request body is not valid JSON: {e}", code="invalid_json")
  if not isinstance(data, dict):
    raise APIError(400, f"The request body must be a JSON object, not "
                   f"{type(data).__name__}", code="invalid_json")
  try:
    return model.model_validate(data)
  except pydantic.ValidationError as e:
    first = e.errors()[0]
    param = _field_name(first["loc"])
    raise APIError(400, f"Invalid request: {param or 'body'}: {first['msg']}", param=param,
                   code="invalid_value")
