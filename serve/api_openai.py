"""The generation endpoints' preparation and bodies: request -> prompt ids and limits ->
a Job; a finished job -> OpenAI's response body or stream chunks.

  job = prepare(ctx, "chat", client, body, served, timer)   # 400 / 429 before anything runs
  return await api_run.respond(ctx, job, release)          # JSON, or a StreamingResponse

Order of the checks (serve/app.py does the first ones): key (401), request rate (429),
body size and schema (400), unsupported fields (400), the prompt through the model's own
template and the token limits (400: prompt tokens > context - max_tokens, max_tokens over the
cap), the key's token quota (429), the input safety check (a refusal). Then the request
runs on the version it leased (serve/deployment.py) until its last byte is sent.

Streaming sends `data: {chunk}` events then `data: [DONE]`; a chat stream's first chunk
carries the role. When the deployment checks outputs (serve/safety.py), a streamed answer
is held back until the whole answer passed the check (the score needs the whole answer):
the role chunk goes out at once, the content after the check.

Every answer (refusals too) is recorded in the feedback store, keyed by its id
("chatcmpl-..." / "cmpl-..."), with its request and the text served.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
import uuid
from typing import Any

from data.tokenizer import Tokenizer
from serve.api_generation import Outcome, Piece
from serve.auth import AccessControl, Client, Reservation
from serve.deployment import Deployment, ServedModel
from serve.engine import GenerationParams
from serve.metrics import RequestTimer, ServerMetrics
from serve.safety import SafetyFilter
from serve.schemas import APIError, ChatRequest, CompletionRequest

log = logging.getLogger("serve")
BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@dataclasses.dataclass
class ServeContext:
  """Everything a request needs from the server."""
  deployment: Deployment
  access: AccessControl
  metrics: ServerMetrics
  safety: SafetyFilter | None = None
  feedback: Any = None   # serve/feedback.py FeedbackStore (or None: nothing recorded)


@dataclasses.dataclass
class Job:
  """One accepted generation request."""
  kind: str                      # "chat" | "text"
  id: str
  served: ServedModel
  client: Client
  body: ChatRequest | CompletionRequest
  conversation: list[dict[str, str]]
  prompt_ids: list[int]
  params: GenerationParams
  stops: list[str]
  reservation: Reservation
  timer: RequestTimer
  created: int = dataclasses.field(default_factory=lambda: int(time.time()))

  @property
  def endpoint(self) -> str:
    return "/v1/chat/completions" if self.kind == "chat" else "/v1/completions"


# ------------------------------------------------------------------------------ preparation
def _prompt(kind: str, body: Any, served: ServedModel) -> tuple[list[dict], list[int]]:
  """(conversation, prompt ids) through the model's own template."""
  if kind == "chat":
    if served.chat_template is None:
      raise APIError(400, f"Model {served.name} has no chat template (a base model): use "
                     "/v1/completions", param="messages", code="no_chat_template")
    conversation = [m.plain() for m in body.messages]
    try:
      ids = served.chat_template.prompt_ids(conversation)
    except ValueError as e:
      raise APIError(400, str(e), param="messages") from e
    return conversation, [int(i) for i in ids]
  prompt = body.prompt[0] if isinstance(body.prompt, list) and body.prompt and \
      isinstance(body.prompt[0], str) else body.prompt
  if isinstance(prompt, list):  # token ids
    vocab = served.tokenizer.vocab_size
    if not prompt or any(not 0 <= i < vocab for i in prompt):
      raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
    ids, text = list(prompt), served.tokenizer.decode(prompt)
  else:
    ids, text = served.text_template.prompt_ids([{"content": prompt}]).tolist(), prompt
  if not ids:
    raise APIError(400, "The prompt is empty", param="prompt")
  return [{"role": "user", "content": text}], ids


def _max_tokens(body: Any, prompt_len: int, context: int, cap: int) -> int:
  """The request's max_tokens, checked against the cap and the room the context leaves."""
  asked = body.token_limit()
  param = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) \
      else "max_tokens"
  if asked is not None and asked > cap:
    raise APIError(400, f"{param}={asked} is over this server's cap of {cap}", param=param)
  room = context - prompt_len
  if room < 1 or (asked is not None and asked > room):
    raise APIError(400, f"This model's context is {context} tokens; the prompt has "
                   f"{prompt_len} tokens and {param} is {asked if asked else 'at least 1'}: "
                   "shorten the prompt or ask for fewer tokens", param="messages" if
                   isinstance(body, ChatRequest) else "prompt", code="context_length_exceeded")
  return asked if asked is not None else min(cap, room)


def prepare(ctx: ServeContext, kind: str, client: Client, body: Any, served: ServedModel,
            timer: RequestTimer) -> Job:
  """Checks a parsed request against the model and the limits (module doc); reserves its
  tokens. Raises APIError (400, 429)."""
  unsupported = body.unsupported()
  if unsupported:
    raise APIError(400, f"Not supported by this server: {', '.join(unsupported)}",
                   code="unsupported_parameter")
  stops = body.stop_strings()
  conversation, ids = _prompt(kind, body, served)
  max_tokens = _max_tokens(body, len(ids), served.context, ctx.access.limits.max_tokens_cap)
  if kind == "chat":
    want, top = body.logprobs or bool(body.top_logprobs), body.top_logprobs or 0
  else:
    want, top = body.logprobs is not None, body.logprobs or 0
  try:  # the engine's own checks (e.g. a negative seed)
    params = GenerationParams(max_tokens=max_tokens, temperature=body.temperature,
                              top_p=body.top_p, top_k=body.top_k, seed=body.seed,
                              stop_ids=served.stop_ids(kind == "chat"), logprobs=want,
                              top_logprobs=top)
  except ValueError as e:
    raise APIError(400, str(e), code="invalid_value") from e
  reservation = ctx.access.reserve(client, len(ids) + max_tokens)
  prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
  return Job(kind, prefix + uuid.uuid4().hex, served, client, body, conversation, ids, params,
             stops, reservation, timer)


# ------------------------------------------------------------------------------ bodies
def token_text(tokenizer: Any, token: int) -> tuple[str, list[int]]:
  """A token's text and bytes for logprobs (SentencePiece: its piece, '▁' as a space and
  byte pieces as their byte; other tokenizers: the token decoded alone)."""
  if isinstance(tokenizer, Tokenizer):
    piece = tokenizer.id_to_piece(token)
    byte = BYTE_PIECE.match(piece)
    if byte:
      value = int(byte.group(1), 16)
      return bytes([value]).decode("utf-8", "replace"), [value]
    text = piece.replace("\u2581", " ")
  else:
    text = tokenizer.decode([token])
  return text, list(text.encode("utf-8"))


def chat_logprobs(job: Job, piece: Piece | Outcome) -> dict | None:
  """Chat's `logprobs` of the piece's tokens ({"content": [{token, logprob, bytes,
  top_logprobs}]}), or None when the request did not ask."""
  if not job.params.logprobs:
    return None
  tok = job.served.tokenizer

  def entry(token: int, logprob: float) -> dict:
    text, raw = token_text(tok, token)
    return {"token": text, "logprob": logprob, "bytes": raw}
  return {"content": [{**entry(e.token, e.logprob),
                       "top_logprobs": [entry(t, lp) for t, lp in (e.top_logprobs or [])]}
                      for e in piece.tokens]}


def text_logprobs(job: Job, piece: Piece | Outcome) -> dict | None:
  """Completions' legacy `logprobs` (tokens, token_logprobs, top_logprobs as {token:
  logprob}, text_offset in characters of the answer), or None when not asked."""
  if not job.params.logprobs:
    return None
  tok = job.served.tokenizer
  return {"tokens": [token_text(tok, e.token)[0] for e in piece.tokens],
          "token_logprobs": [e.logprob for e in piece.tokens],
          "top_logprobs": [{token_text(tok, t)[0]: lp for t, lp in (e.top_logprobs or [])}
                           for e in piece.tokens],
          "text_offset": list(piece.offsets)}


def usage(prompt: int, completion: int) -> dict[str, int]:
  return {"prompt_tokens": prompt, "completion_tokens": completion,
          "total_tokens": prompt + completion}


def _head(job: Job, obj: str) -> dict[str, Any]:
  return {"id": job.id, "object": obj, "created": job.created, "model": job.served.name,
          "system_fingerprint": job.served.name}


def full_body(job: Job, out: Outcome) -> dict[str, Any]:
  """The non-streamed response of a finished job."""
  if job.kind == "chat":
    choice = {"index": 0, "message": {"role": "assistant", "content": out.text},
              "logprobs": chat_logprobs(job, out), "finish_reason": out.finish_reason}
    head = _head(job, "chat.completion")
  else:
    choice = {"index": 0, "text": out.text, "logprobs": text_logprobs(job, out),
              "finish_reason": out.finish_reason}
    head = _head(job, "text_completion")
  return {**head, "choices": [choice], "usage": usage(out.prompt_tokens, out.completion_tokens)}


def chunk(job: Job, piece: Piece | None, finish: str | None = None, *, role: bool = False
          ) -> dict[str, Any]:
  """One streamed chunk: a piece of text, the role (chat's first chunk) or the finish."""
  if job.kind == "chat":
    delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
    if piece is not None:
      delta["content"] = piece.text
    choice = {"index": 0, "delta": delta, "finish_reason": finish,
              "logprobs": chat_logprobs(job, piece) if piece else None}
    return {**_head(job, "chat.completion.chunk"), "choices": [choice]}
  choice = {"index": 0, "text": piece.text if piece else "", "finish_reason": finish,
            "logprobs": text_logprobs(job, piece) if piece else None}
  return {**_head(job, "text_completion"), "choices": [choice]}


def sse(data: Any) -> str:
  return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
