"""From an engine request's token events to text pieces: incremental detokenization, stop
strings, log-probabilities per piece.

  async for item in generate(handle, tokenizer.decode, stops=["\\n\\n"], end_ids=(2, 5)):
    if isinstance(item, Piece): send(item.text, item.tokens)
    else: outcome = item          # the last item: Outcome (text, finish reason, usage)

Detokenization is incremental over a short window (as vLLM and Hugging Face's TextStreamer
do): the ids since the last emitted token's predecessor are decoded with and without the new
ones and the difference is the new text, so a word made of several tokens, a SentencePiece
leading space or a character of several byte tokens comes out as the whole-list decode gives
it, at a cost per token that does not grow with the answer. Held back until a later token
decides them: an incomplete UTF-8 tail (the decoder's trailing U+FFFD) and a tail that could
be the beginning of a stop string. A stop string
(OpenAI's `stop`, checked on the decoded text) ends the answer before it: the text is cut
where the stop string starts and the engine request is cancelled (its slot freed at the
next step). End-of-turn / eos ids end the answer in the engine and are not part of the text.

Each token is attributed to the piece in which its text starts, so streamed `logprobs`
line up with the streamed text; tokens whose text lies after a stop string are dropped.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
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
    # The decode window: ids[prefix:read] were decoded into `text` already and are decoded
    # again only as context for what follows (a leading space, a multi-byte character).
    self.prefix = self.read = 0

  def _window(self) -> tuple[str, str]:
    """(decode of the window's context, decode of the context and the ids after it)."""
    return self.decode(self.ids[self.prefix:self.read]), self.decode(self.ids[self.prefix:])

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
    context, window = self._window()
    if len(window) > len(context) and not window.endswith(INCOMPLETE):
      self.text += window[len(context):]
      self.prefix, self.read = self.read, len(self.ids)
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
    context, window = self._window()
    if not window.startswith(context):  # the decoder rewrote decoded text
      return ""
    self.text += window[len(context):]
    out, self.sent = self.text[self.sent:], len(self.text)
    return out

  @property
  def final_text(self) -> str:
    return self.text[:self.sent]

  def tokens_before(self, offset: int) -> int:
    """How many tokens start before character `offset` (they belong to emitted text)."""
    return bisect.bisect_left(self.starts, offset)  # starts never decrease


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


async def engine_events(handle: Any) -> AsyncIterator[list[TokenEvent | Finished]]:
  """The handle's event batches as an async iterator of lists: the engine's thread pushes
  each chunk into the event loop (`RequestHandle.listen`), one wake-up of the loop per
  chunk and no thread per request."""
  loop = asyncio.get_running_loop()
  queue: asyncio.Queue = asyncio.Queue()

  def put(batch: list) -> None:
    try:
      loop.call_soon_threadsafe(queue.put_nowait, batch)
    except RuntimeError:  # the loop is closed: the server is gone
      pass

  handle.listen(put)
  while True:
    batch = await queue.get()
    yield batch
    if isinstance(batch[-1], Finished):
      return


async def generate(handle: Any, decode: Callable[[Sequence[int]], str], *,
                   stops: Sequence[str] = (), end_ids: Sequence[int] = (),
                   prompt_tokens: int = 0, on_token: Callable[[int], None] | None = None
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
      async for batch in stream:
        # One piece per batch (the engine hands a request its tokens once per decode
        # chunk): a streamed chunk carries every token that is ready, not one each.
        tokens = [e for e in batch if isinstance(e, TokenEvent)]
        if tokens and on_token is not None:
          on_token(len(tokens))
        new = []
        for event in tokens:
          if int(event.token) in end or text.stop_at is not None:
            continue
          events.append(event)
          new.append(text.push(event.token))
        if text.stop_at is not None:
          handle.cancel()
        if any(new):
          upto = text.tokens_before(text.sent)
          yield Piece("".join(new), events[given:upto], text.starts[given:upto])
          given = upto
        if isinstance(batch[-1], Finished):
          finished = batch[-1]
          break
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
