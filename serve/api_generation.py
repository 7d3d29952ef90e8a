"""From an engine request's token events to text pieces: incremental detokenization, stop
strings, log-probabilities per piece.

  async for item in generate(handle, tokenizer.decode, stops=["\\n\\n"], end_ids=(2, 5)):
    if isinstance(item, Piece): send(item.text, item.tokens)
    else: outcome = item          # the last item: Outcome (text, finish reason, usage)

Detokenization decodes the whole list of generated ids after every token and emits the new
suffix, so a word made of several tokens, or a character of several byte tokens, comes out
right. Held back until a later token decides them: an incomplete UTF-8 tail (the decoder's
trailing U+FFFD) and a tail that could be the beginning of a stop string. A stop string
(OpenAI's `stop`, checked on the decoded text) ends the answer before it: the text is cut
where the stop string starts and the engine request is cancelled (its slot freed at the
next step). End-of-turn / eos ids end the answer in the engine and are not part of the text.

Each token is attributed to the piece in which its text starts, so streamed `logprobs`
line up with the streamed text; tokens whose text lies after a stop string are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from typing import Any, AsyncIterator, Callable, Sequence

from serve.engine import Finished, TokenEvent

INCOMPLETE = "\ufffd"  # what the decoders give for an unfinished UTF-8 sequence


class TextAssembler:
  """Generated ids -> text that is safe to emit (module doc).

  Args:
    decode: ids -> text (the tokenizer's decode).
    stops: stop strings (non-empty).
  """

  def __init__(self, decode: Callable[[Sequence[int]], str], stops: Sequence[str] = ()):
    self.decode, self.stops = decode, [s for s in stops if s]
    self.longest_stop = max((len(s) for s in self.stops), default=0)
    self.ids: list[int] = []
    self.starts: list[int] = []  # offset in `text` where each token's text begins
    self.text = ""               # decoded text without an incomplete UTF-8 tail
    self.sent = 0                # characters of `text` emitted
    self.stop_at: int | None = None

  def _holdback(self) -> int:
    """Length of the longest tail of `text` that begins some stop string."""
    for k in range(min(self.longest_stop - 1, len(self.text)), 0, -1):
      tail = self.text[-k:]
      if any(s.startswith(tail) for s in self.stops):
        return k
    return 0

  def push(self, token: int) -> str:
    """Adds one generated token; returns the text it makes safe to emit ('' if none)."""
    if self.stop_at is not None:
      return ""
    self.starts.append(len(self.text))
    self.ids.append(int(token))
    self.text = self.decode(self.ids).rstrip(INCOMPLETE)
    if self.stops:
      begin = max(0, self.sent - self.longest_stop)
      hits = [i for i in (self.text.find(s, begin) for s in self.stops) if i >= 0]
      if hits:
        self.stop_at = min(hits)
        return self._emit(self.stop_at)
    return self._emit(len(self.text) - self._holdback())

  def _emit(self, upto: int) -> str:
    if upto <= self.sent:
      return ""
    out = self.text[self.sent:upto]
    self.sent = upto
    return out

  def finish(self) -> str:
    """The rest of the text once generation ended (a held-back tail that did not become a
    stop string, or an unfinished character as the decoder renders it)."""
    if self.stop_at is not None:
      return ""
    full = self.decode(self.ids)
    if not full.startswith(self.text[:self.sent]):  # the decoder rewrote emitted text
      return ""
    out, self.sent = full[self.sent:], len(full)
    self.text = full
    return out

  @property
  def final_text(self) -> str:
    return self.text[:self.sent]

  def tokens_before(self, offset: int) -> int:
    """How many tokens start before character `offset` (they belong to emitted text)."""
    n = 0
    while n < len(self.starts) and self.starts[n] < offset:
      n += 1
    return n


@dataclasses.dataclass
class Piece:
  """Text to send now, the tokens whose text starts in it (for logprobs) and where in the
  whole answer each of those tokens starts (characters)."""
  text: str
  tokens: list[TokenEvent]
  offsets: list[int]


@dataclasses.dataclass
class Outcome:
  """How a generation ended.

  finish_reason: "stop" (end of turn, eos or a stop string), "length", or "error".
  """
  text: str
  finish_reason: str
  prompt_tokens: int
  completion_tokens: int
  tokens: list[TokenEvent]
  offsets: list[int] = dataclasses.field(default_factory=list)
  error: str | None = None


async def engine_events(handle: Any) -> AsyncIterator[TokenEvent | Finished]:
  """The handle's blocking event iterator as an async one (a thread pumps it into the
  event loop, so many requests wait on the engine without holding executor threads)."""
  loop = asyncio.get_running_loop()
  queue: asyncio.Queue = asyncio.Queue()

  def put(event: Any) -> None:
    try:
      loop.call_soon_threadsafe(queue.put_nowait, event)
    except RuntimeError:  # the loop is closed: the server is gone
      pass

  def pump() -> None:
    try:
      for event in handle.events():
        put(event)
    except Exception as e:  # noqa: BLE001 - reported as the request's error
      put(Finished("error", 0, 0, f"{type(e).__name__}: {e}"))

  threading.Thread(target=pump, name=f"events-{handle.id}", daemon=True).start()
  while True:
    event = await queue.get()
    yield event
    if isinstance(event, Finished):
      return


async def generate(handle: Any, decode: Callable[[Sequence[int]], str], *,
                   stops: Sequence[str] = (), end_ids: Sequence[int] = (),
                   prompt_tokens: int = 0, on_token: Callable[[], None] | None = None
                   ) -> AsyncIterator[Piece | Outcome]:
  """Pieces of text as the engine produces them, then the Outcome (module doc).

  The engine request is cancelled if the caller stops iterating early (a client that went
  away) or a stop string is found.
  """
  text = TextAssembler(decode, stops)
  end = set(int(i) for i in end_ids)
  events: list[TokenEvent] = []  # generated tokens that are part of the answer
  given = 0                      # events already attached to a piece
  finished: Finished | None = None
  try:
    async with contextlib.aclosing(engine_events(handle)) as stream:
      async for event in stream:
        if isinstance(event, Finished):
          finished = event
          break
        if on_token is not None:
          on_token()
        if int(event.token) in end or text.stop_at is not None:
          continue
        events.append(event)
        new = text.push(event.token)
        if text.stop_at is not None:
          handle.cancel()
        if new:
          upto = text.tokens_before(text.sent)
          yield Piece(new, events[given:upto], text.starts[given:upto])
          given = upto
  finally:
    if finished is None:
      handle.cancel()
  rest = text.finish()
  kept = text.tokens_before(text.sent) if text.stop_at is not None else len(events)
  if rest or kept > given:
    yield Piece(rest, events[given:kept], text.starts[given:kept])
  reason = finished.reason
  if text.stop_at is not None or reason == "cancelled":
    reason = "stop"
  yield Outcome(text.final_text, reason, finished.prompt_tokens or prompt_tokens,
                finished.completion_tokens, events[:kept], text.starts[:kept], finished.error)
