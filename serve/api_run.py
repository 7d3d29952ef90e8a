"""Running a prepared job (serve/api_openai.py): the safety checks, the engine request, the
whole or streamed answer, and the bookkeeping every answer ends with (quota settled, the
completion recorded in the feedback store, metrics, one log line).

  return await respond(ctx, job, release)   # release(): gives the version's lease back

The lease on the version (serve/deployment.py) is given back when the last byte is sent:
a streamed answer is produced by its own task (holding the lease) that feeds the response
body, so a client that disconnects before the first byte cannot leave the lease held, and
one that disconnects mid-answer cancels the engine request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, AsyncIterator, Callable

from fastapi.responses import JSONResponse, StreamingResponse

from serve.api_generation import Outcome, Piece, generate
from serve.api_openai import Job, ServeContext, chunk, full_body, sse, usage
from serve.safety import Verdict
from serve.schemas import APIError

log = logging.getLogger("serve")
_TASKS: set[asyncio.Task] = set()  # running stream producers (asyncio keeps weak references)


async def _check(ctx: ServeContext, job: Job, response: str | None = None
                 ) -> Verdict | None:
  """The input (response None) or output safety check, off the event loop."""
  if ctx.safety is None:
    return None
  if response is None:
    return await asyncio.to_thread(ctx.safety.check_input, job.conversation)
  return await asyncio.to_thread(ctx.safety.check_output, job.conversation, response)


def _refusal(ctx: ServeContext, job: Job, completion_tokens: int = 0) -> Outcome:
  return Outcome(ctx.safety.refusal, "content_filter", len(job.prompt_ids), completion_tokens,
                 [])


def _record(ctx: ServeContext, job: Job, out: Outcome | None, verdict: Verdict | None,
            sent: str) -> None:
  """The bookkeeping of a finished (or abandoned) job."""
  prompt = out.prompt_tokens if out else len(job.prompt_ids)
  completion = out.completion_tokens if out else 0
  ctx.access.settle(job.reservation, prompt + completion)
  ctx.metrics.prompt_tokens.inc(prompt)
  job.timer.done()
  reason = out.finish_reason if out else "client_gone"
  if verdict is not None:
    ctx.metrics.refusals.labels(verdict.check).inc()
  if ctx.feedback is not None and out is not None and reason != "error":
    request = {("messages" if job.kind == "chat" else "prompt"):
               job.conversation if job.kind == "chat" else job.conversation[0]["content"],
               "max_tokens": job.params.max_tokens, "temperature": job.params.temperature,
               "top_p": job.params.top_p, "top_k": job.params.top_k, "seed": job.params.seed,
               "stop": job.stops, "finish_reason": reason}
    if verdict is not None:
      request["refused"] = str(verdict)
    try:
      ctx.feedback.record_completion(job.id, job.served.name, job.kind, request, sent)
    except Exception as e:  # noqa: BLE001 - a full disk must not fail the answer
      log.error("feedback store: %s not recorded: %s: %s", job.id, type(e).__name__, e)
  # One line per request; a refusal says which check refused and why.
  log.log(logging.WARNING if verdict else logging.INFO, "%s %s %s key=%s %d+%d tokens %.2fs %s%s",
          job.id, job.endpoint, job.served.name, job.client.name, prompt, completion,
          time.perf_counter() - job.timer.start, reason,
          f" (refused: {verdict})" if verdict else "")


def start(ctx: ServeContext, job: Job) -> Any:
  """Submits the job to its version's engine; the handle.

  Raises:
    APIError: 400 when the engine refuses the request (too long), 503 when the version is
      shutting down.
  """
  try:
    return job.served.engine.submit(job.prompt_ids, job.params)
  except ValueError as e:
    raise APIError(400, str(e), code="context_length_exceeded") from e
  except RuntimeError as e:
    raise APIError(503, f"The model is not accepting requests: {e}") from e


async def run(ctx: ServeContext, job: Job, handle: Any) -> AsyncIterator[Piece | Outcome]:
  """Pieces of the answer, then its Outcome (a refusal has finish_reason content_filter);
  the bookkeeping happens however the iteration ends."""
  out: Outcome | None = None
  verdict: Verdict | None = None
  sent: list[str] = []
  try:
    hold = ctx.safety is not None and ctx.safety.checks_output
    held: list[Piece] = []
    pieces = generate(handle, job.served.tokenizer.decode, stops=job.stops,
                      end_ids=job.params.stop_ids, prompt_tokens=len(job.prompt_ids),
                      on_token=job.timer.token)
    async with contextlib.aclosing(pieces):  # closed now if we are (cancels the request)
      async for item in pieces:
        if isinstance(item, Outcome):
          out = item
        elif hold:
          held.append(item)
        else:
          sent.append(item.text)
          yield item
    if hold and out.finish_reason != "error":
      verdict = await _check(ctx, job, out.text)
      if verdict is not None:
        out = _refusal(ctx, job, out.completion_tokens)
        held = [Piece(out.text, [], [])]
      for item in held:
        sent.append(item.text)
        yield item
    yield out
  finally:
    _record(ctx, job, out, verdict, "".join(sent))


async def refused(ctx: ServeContext, job: Job, verdict: Verdict
                  ) -> AsyncIterator[Piece | Outcome]:
  """The answer of a request the input check refused."""
  out = _refusal(ctx, job)
  try:
    yield Piece(out.text, [], [])
    yield out
  finally:
    _record(ctx, job, out, verdict, out.text)


async def respond(ctx: ServeContext, job: Job, release: Callable[[], None]) -> Any:
  """Runs the job; its JSON response or event stream. `release` is called exactly once,
  when the answer is complete (or abandoned)."""
  owned = True
  try:
    try:
      verdict = await _check(ctx, job)
      items = refused(ctx, job, verdict) if verdict else run(ctx, job, start(ctx, job))
    except BaseException:
      ctx.access.settle(job.reservation, 0)  # nothing ran: the reserved tokens go back
      raise
    if job.body.stream:
      owned = False
      return _stream(ctx, job, items, release)
    out = None
    try:
      async for item in items:  # to the end: the bookkeeping runs when `items` finishes
        out = item if isinstance(item, Outcome) else out
    finally:
      await items.aclose()
    if out is None or out.finish_reason == "error":
      raise APIError(500, f"The engine failed on this request: "
                     f"{out.error if out else 'no outcome'}", code="engine_error")
    return JSONResponse(full_body(job, out))
  finally:
    if owned:
      release()


def _stream(ctx: ServeContext, job: Job, items: AsyncIterator[Piece | Outcome],
            release: Callable[[], None]) -> StreamingResponse:
  """Server-sent events of `items`, produced by a task that owns the lease."""
  queue: asyncio.Queue = asyncio.Queue()

  async def produce() -> None:
    try:
      if job.kind == "chat":
        queue.put_nowait(sse(chunk(job, None, role=True)))
      async for item in items:
        if isinstance(item, Piece):
          queue.put_nowait(sse(chunk(job, item)))
        elif item.finish_reason == "error":
          queue.put_nowait(sse(APIError(500, f"The engine failed on this request: "
                                        f"{item.error}", code="engine_error").body))
        else:
          queue.put_nowait(sse(chunk(job, None, item.finish_reason)))
          if job.body.include_usage():
            head = {k: v for k, v in chunk(job, None).items() if k != "choices"}
            queue.put_nowait(sse({**head, "choices": [],
                                  "usage": usage(item.prompt_tokens, item.completion_tokens)}))
      queue.put_nowait(sse("[DONE]"))
    except Exception as e:  # noqa: BLE001 - reported in the stream; the server stays up
      log.exception("stream %s failed", job.id)
      queue.put_nowait(sse(APIError(500, f"{type(e).__name__}: {e}").body))
      queue.put_nowait(sse("[DONE]"))
    finally:
      await items.aclose()
      release()
      queue.put_nowait(None)

  task = asyncio.create_task(produce(), name=job.id)
  _TASKS.add(task)
  task.add_done_callback(_TASKS.discard)

  async def body() -> AsyncIterator[str]:
    try:
      while (event := await queue.get()) is not None:
        yield event
    finally:
      if not task.done():  # the client went away: stop generating
        task.cancel()

  return StreamingResponse(body(), media_type="text/event-stream",
                           headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
