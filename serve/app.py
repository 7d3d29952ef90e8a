"""The FastAPI application: OpenAI-compatible endpoints over a deployment.

  app = create_app(deployment, keys=load_keys("keys.txt"), limits=ServerLimits(),
                   safety=SafetyFilter.from_config(cfg), feedback=FeedbackStore("fb.db"))
  uvicorn.run(app, host="127.0.0.1", port=8000)      # `python -m serve` does this

Routes (the /v1 ones need `Authorization: Bearer <key>` when keys are configured):

  POST /v1/chat/completions   OpenAI chat completions (messages -> the model's template)
  POST /v1/completions        OpenAI text completions (a raw prompt)
  GET  /v1/models             the registry's versions (the served one marked current)
  POST /v1/feedback           {completion_id, rating?, preferred?, comment?} -> the store
  GET  /health                200 {"status": "ok", "model": ...} while a version is served
  GET  /metrics               Prometheus text format (serve/metrics.py)

Every error is OpenAI's body `{"error": {"message", "type", "param", "code"}}`: 400 for a
bad body (malformed JSON, wrong types: FastAPI's 422 is replaced), too long a prompt or
too many tokens; 401 for a missing or wrong key; 404 for an unknown route or completion id;
429 over a rate or quota; 500 when the engine fails on a request (the server stays up).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.api_openai import ServeContext, prepare
from serve.api_run import respond
from serve.auth import AccessControl, Client, ServerLimits, digest
from serve.deployment import Deployment
from serve.metrics import RequestTimer, ServerMetrics
from serve.safety import SafetyFilter
from serve.schemas import (APIError, ChatRequest, CompletionRequest, FeedbackRequest,
                           parse_body)

log = logging.getLogger("serve")
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/feedback",
             "/health", "/metrics")


def error_response(e: APIError) -> JSONResponse:
  return JSONResponse(e.body, status_code=e.status, headers=e.headers)


class CountRequests:
  """ASGI middleware: lmlife_requests_total{endpoint, status} of every HTTP request (the
  status as sent, so streamed answers count when their headers go out)."""

  def __init__(self, app: Any, metrics: ServerMetrics):
    self.app, self.metrics = app, metrics

  async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
      await self.app(scope, receive, send)
      return
    path = scope.get("path", "")
    endpoint = path if path in ENDPOINTS else (
        "/v1/models" if path.startswith("/v1/models/") else "other")
    status = [500]

    async def send_status(message: dict) -> None:
      if message["type"] == "http.response.start":
        status[0] = message["status"]
      await send(message)

    try:
      await self.app(scope, receive, send_status)
    finally:
      self.metrics.requests.labels(endpoint, str(status[0])).inc()


async def read_body(request: Request, limit: int) -> bytes:
  """The request body, refused (400) as soon as it passes `limit` bytes."""
  declared = request.headers.get("content-length")
  too_big = APIError(400, f"The request body is over this server's limit of {limit} bytes",
                     code="request_too_large")
  if declared and declared.isdigit() and int(declared) > limit:
    raise too_big
  parts, size = [], 0
  async for part in request.stream():
    size += len(part)
    if size > limit:
      raise too_big
    parts.append(part)
  return b"".join(parts)


def _clients(keys: Sequence[Client | str] | None, limits: ServerLimits) -> list[Client]:
  """Configured keys as Clients (a plain string gets the default limits)."""
  return [k if isinstance(k, Client) else Client(f"key{i}", digest(k), limits.default_key_limits)
          for i, k in enumerate(keys or [])]


async def _generation(ctx: ServeContext, request: Request, kind: str, model: type) -> Any:
  """A chat / text completion: the checks up to the version's lease, then the job."""
  arrival = time.perf_counter()
  endpoint = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
  client = ctx.access.authenticate(request.headers.get("authorization"))
  ctx.access.admit(client)
  body = parse_body(await read_body(request, ctx.access.limits.max_body_bytes), model)
  try:
    served = ctx.deployment.acquire()
  except RuntimeError as e:
    raise APIError(503, str(e)) from e
  released = []

  def release() -> None:  # exactly once, whoever ends the request
    if not released:
      released.append(True)
      ctx.deployment.release(served)

  try:
    job = prepare(ctx, kind, client, body, served, RequestTimer(ctx.metrics, endpoint, arrival))
  except BaseException:
    release()
    raise
  return await respond(ctx, job, release)


async def _guarded(ctx: ServeContext, request: Request, kind: str, model: type) -> Any:
  """`_generation` with every failure answered (and logged in one line)."""
  try:
    return await _generation(ctx, request, kind, model)
  except APIError as e:
    log.info("%d %s: %s", e.status, request.url.path, e.message)
    return error_response(e)
  except Exception as e:  # noqa: BLE001 - one failed request, the server stays up
    log.exception("request failed")
    return error_response(APIError(500, f"Internal error: {type(e).__name__}: {e}"))


def _add_error_handlers(app: FastAPI) -> None:
  """Every error as OpenAI's body; FastAPI's 422 becomes a 400."""

  @app.exception_handler(APIError)
  async def _api_error(request: Request, e: APIError) -> JSONResponse:
    return error_response(e)

  @app.exception_handler(RequestValidationError)
  async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
    return error_response(APIError(400, f"Invalid request: {e.errors()[:1]}"))

  @app.exception_handler(Exception)
  async def _internal(request: Request, e: Exception) -> JSONResponse:
    # Starlette logs the traceback after this answer; the server keeps serving.
    return error_response(APIError(500, f"Internal error: {type(e).__name__}: {e}"))

  @app.exception_handler(StarletteHTTPException)
  async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
    return error_response(APIError(e.status_code, str(e.detail), code="not_found"
                                   if e.status_code == 404 else None))


def _add_routes(app: FastAPI, ctx: ServeContext) -> None:
  """The endpoints of the module doc."""
  access, deployment = ctx.access, ctx.deployment

  @app.post("/v1/chat/completions")
  async def chat_completions(request: Request) -> Any:
    return await _guarded(ctx, request, "chat", ChatRequest)

  @app.post("/v1/completions")
  async def completions(request: Request) -> Any:
    return await _guarded(ctx, request, "text", CompletionRequest)

  @app.get("/v1/models")
  async def models(request: Request) -> Any:
    access.authenticate(request.headers.get("authorization"))
    return {"object": "list", "data": deployment.models()}

  @app.get("/v1/models/{name}")
  async def model(name: str, request: Request) -> Any:
    access.authenticate(request.headers.get("authorization"))
    for entry in deployment.models():
      if entry["id"] == name:
        return entry
    raise APIError(404, f"The model {name!r} does not exist", param="model",
                   code="model_not_found")

  @app.post("/v1/feedback")
  async def post_feedback(request: Request) -> Any:
    access.admit(access.authenticate(request.headers.get("authorization")))
    body = parse_body(await read_body(request, access.limits.max_body_bytes), FeedbackRequest)
    return _record_feedback(ctx, body)

  @app.get("/health")
  async def health() -> Any:
    served = deployment.current
    if served is None:
      raise APIError(503, "No model is being served")
    queue, busy, slots = deployment.stats()
    return {"status": "ok", "model": served.name, "swaps": deployment.swaps,
            "queue_depth": queue, "slots_in_use": busy, "slots": slots}

  @app.get("/metrics")
  async def scrape() -> Response:
    ctx.metrics.swaps.set(deployment.swaps)
    body, content_type = ctx.metrics.render()
    return Response(body, media_type=content_type)


def _record_feedback(ctx: ServeContext, body: FeedbackRequest) -> dict[str, Any]:
  """POST /v1/feedback into the store: 404 for an unknown completion (or no store)."""
  if ctx.feedback is None:
    raise APIError(404, "This server keeps no feedback store", code="feedback_disabled")
  try:
    row = ctx.feedback.record_feedback(body.completion_id, rating=body.rating,
                                       preferred=body.preferred, comment=body.comment)
  except KeyError as e:
    raise APIError(404, f"No completion with id {body.completion_id!r}",
                   param="completion_id", code="completion_not_found") from e
  except ValueError as e:  # nothing to record (no rating, preferred answer or comment)
    raise APIError(400, str(e), code="invalid_value") from e
  return {"id": row, "object": "feedback", "completion_id": body.completion_id}


def create_app(deployment: Deployment, *, keys: Sequence[Client | str] | None = None,
               limits: ServerLimits = ServerLimits(), safety: SafetyFilter | None = None,
               feedback: Any = None, metrics: ServerMetrics | None = None) -> FastAPI:
  """The server's ASGI app (module doc).

  Args:
    deployment: the started deployment (serve/deployment.py); the caller stops it.
    keys: API keys (`auth.load_keys`, or plain strings); None / [] = an open server.
    limits: body size, max_tokens cap and the default per-key limits.
    safety: input / output filters (None = off).
    feedback: a FeedbackStore recording every completion (None = nothing recorded and
      /v1/feedback answers 404).
    metrics: the collectors (default: new ones reading the deployment's engine).
  """
  metrics = metrics or ServerMetrics(deployment.stats)
  access = AccessControl(_clients(keys, limits), limits)
  if access.open:
    log.warning("NO API KEYS CONFIGURED: the server answers anyone who can reach it "
                "(give --api_keys_file or $LMLIFE_API_KEYS)")
  ctx = ServeContext(deployment, access, metrics, safety, feedback)
  app = FastAPI(title="lmlife", docs_url=None, redoc_url=None, openapi_url=None)
  app.state.ctx = ctx
  app.add_middleware(CountRequests, metrics=metrics)
  _add_error_handlers(app)
  _add_routes(app, ctx)
  return app
