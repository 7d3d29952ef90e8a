"""The feedback store: every served completion and the users' ratings of it, in SQLite.

  store = FeedbackStore("runs/serve/feedback.db")
  store.record_completion("chatcmpl-1", "v3", "chat", {"messages": [...], ...}, "Paris.")
  store.record_feedback("chatcmpl-1", rating=0.0, preferred="The capital is Paris.")
  rows = store.feedback(since_id=0)          # each joined with its completion
  pairs = to_preference_pairs(rows)          # -> rlhf.dpo data (prompt/chosen/rejected)
  examples = to_sft_examples(rows)           # -> train.sft data (HH transcripts)

The server (serve/app.py) writes a completion row for every response it serves and a
feedback row for every POST /v1/feedback; the continual loop (launch/continual.py) reads
them back and turns them into training data. Stdlib `sqlite3` in WAL mode, so the loop (or
`sqlite3 feedback.db`) reads while the server writes; one connection per store guarded by a
lock, so any thread of the server may call any method.

Schema (PRAGMA user_version = 1; a deployment that keeps feedback elsewhere reproduces these
two tables, or implements the four methods, and the loop works unchanged):

  completions                one row per served completion
    id        TEXT PRIMARY KEY  the completion id returned to the client ("chatcmpl-...")
    version   TEXT NOT NULL     the registry version (or checkpoint) that produced it
    kind      TEXT NOT NULL     "chat" (/v1/chat/completions) or "text" (/v1/completions)
    request   TEXT NOT NULL     the request as JSON: "messages" (chat) or "prompt" (text),
                                plus the sampling parameters the server used
    output    TEXT NOT NULL     the text served (after stop strings and safety filters)
    created   REAL NOT NULL     unix time, seconds

  feedback                   one row per rating / correction a user sent
    id            INTEGER PRIMARY KEY AUTOINCREMENT   increasing: `feedback(since_id=...)`
    completion_id TEXT NOT NULL REFERENCES completions(id)
    rating        REAL          the user's score of the output, higher = better (NULL: none)
    preferred     TEXT          the answer the user would have preferred (NULL: none)
    comment       TEXT          free text (NULL: none); never used for training
    created       REAL NOT NULL unix time, seconds

Ratings are plain numbers, higher is better; the conversions take the thresholds (defaults
for thumbs: 1 = good, 0 or below = bad). Rules of the conversions (each skipped row is
counted by reason, see `Converted.skipped`):
- Only chat completions are training data: the stages train on the chat template, and a
  text completion's prompt is not a conversation (skipped as "text_completion").
- Preference pairs: (1) a completion rated at most `low_rating` (or not rated) with a
  `preferred` answer -> chosen = preferred, rejected = the served output; (2) two
  completions of the same prompt (same messages) with different ratings -> chosen = the
  higher rated. A completion's rating is that of its latest rated feedback row.
- SFT examples: completions whose latest rating is at least `high_rating`, and every
  `preferred` answer,
  each as the prompt's conversation plus the answer. They are written as HH transcripts
  ("\\n\\nHuman: ...\\n\\nAssistant: ...", the format data/sft_sources.py reads for
  multi-turn chats); a conversation with a system message (no place in a transcript),
  turns that do not alternate user / assistant, or text that contains a turn header (it
  would not parse back) is skipped and counted.
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import os
import sqlite3
import threading
import time
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

from data.chat import ASSISTANT, SYSTEM, USER, render
from data.sft_sources import TURN_RE

SCHEMA_VERSION = 1
KINDS = ("chat", "text")
SCHEMA = """
CREATE TABLE IF NOT EXISTS completions (
  id TEXT PRIMARY KEY,
  version TEXT NOT NULL,
  kind TEXT NOT NULL CHECK (kind IN ('chat', 'text')),
  request TEXT NOT NULL,
  output TEXT NOT NULL,
  created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS completions_version ON completions (version);
CREATE TABLE IF NOT EXISTS feedback (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  completion_id TEXT NOT NULL REFERENCES completions (id),
  rating REAL,
  preferred TEXT,
  comment TEXT,
  created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS feedback_completion ON feedback (completion_id);
"""
_COMPLETION_COLUMNS = ("id", "version", "kind", "request", "output", "created")


class FeedbackStore:
  """Served completions and their feedback in one SQLite file (schema: module doc).

  Args:
    path: the database file (created with its folder if missing).
  """

  def __init__(self, path: str):
    self.path = os.path.abspath(os.path.expanduser(path))
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    self._lock = threading.Lock()
    # One connection shared by the server's threads, serialised by the lock; other
    # processes open their own (WAL lets readers work while a writer commits).
    self._db = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False)
    self._db.row_factory = sqlite3.Row
    with self._lock:
      version = self._db.execute("PRAGMA user_version").fetchone()[0]
      if version not in (0, SCHEMA_VERSION):
        raise ValueError(f"{self.path}: feedback schema version {version}; this code reads "
                         f"version {SCHEMA_VERSION}")
      self._db.execute("PRAGMA journal_mode=WAL")
      self._db.execute("PRAGMA foreign_keys=ON")
      self._db.executescript(SCHEMA)
      self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
      self._db.commit()

  def close(self) -> None:
    with self._lock:
      self._db.close()

  def __enter__(self) -> "FeedbackStore":
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()

  def record_completion(self, completion_id: str, version: str, kind: str, request: dict,
                        output: str, created: float | None = None) -> None:
    """Stores one served completion.

    Raises:
      ValueError: an unknown kind, a request that is not JSON-serialisable, or an id that
        is already stored.
    """
    if kind not in KINDS:
      raise ValueError(f"kind={kind!r}: expected one of {KINDS}")
    try:
      text = json.dumps(request)
    except (TypeError, ValueError) as e:
      raise ValueError(f"completion {completion_id}: request is not JSON ({e})") from e
    try:
      with self._lock, self._db:
        self._db.execute("INSERT INTO completions VALUES (?, ?, ?, ?, ?, ?)",
                         (completion_id, version, kind, text, output,
                          time.time() if created is None else float(created)))
    except sqlite3.IntegrityError as e:
      raise ValueError(f"completion id {completion_id!r} is already recorded") from e

  def record_feedback(self, completion_id: str, *, rating: float | None = None,
                      preferred: str | None = None, comment: str | None = None) -> int:
    """Stores a user's feedback on a completion; returns the feedback row id.

    Raises:
      KeyError: no completion has this id.
      ValueError: nothing given (no rating, preferred answer or comment), or a rating that
        is not a finite number.
    """
    if rating is None and not preferred and not comment:
      raise ValueError("feedback needs a rating, a preferred answer or a comment")
    if rating is not None:
      if isinstance(rating, bool) or not isinstance(rating, (int, float)) \
          or not math.isfinite(rating):
        raise ValueError(f"rating={rating!r}: expected a finite number")
      rating = float(rating)
    with self._lock, self._db:
      if self._db.execute("SELECT 1 FROM completions WHERE id = ?",
                          (completion_id,)).fetchone() is None:
        raise KeyError(completion_id)
      cursor = self._db.execute(
          "INSERT INTO feedback (completion_id, rating, preferred, comment, created) "
          "VALUES (?, ?, ?, ?, ?)", (completion_id, rating, preferred or None,
                                     comment or None, time.time()))
      return int(cursor.lastrowid)

  def completions(self, version: str | None = None) -> list[dict]:
    """Every stored completion (of `version` if given), oldest first; `request` decoded."""
    query = "SELECT * FROM completions"
    args: tuple = ()
    if version is not None:
      query, args = query + " WHERE version = ?", (version,)
    with self._lock:
      rows = self._db.execute(query + " ORDER BY created, rowid", args).fetchall()
    return [_completion(r) for r in rows]

  def feedback(self, since_id: int = 0, since_time: float | None = None) -> list[dict]:
    """Feedback rows with id > `since_id` (and created >= `since_time`), oldest first.

    Each row: id, completion_id, rating, preferred, comment, created, and its completion's
    version, kind, request (decoded), output and completion_created.
    """
    query = ("SELECT f.id, f.completion_id, f.rating, f.preferred, f.comment, f.created, "
             "c.version, c.kind, c.request, c.output, c.created AS completion_created "
             "FROM feedback f JOIN completions c ON c.id = f.completion_id WHERE f.id > ?")
    args: list[Any] = [since_id]
    if since_time is not None:
      query += " AND f.created >= ?"
      args.append(since_time)
    with self._lock:
      rows = self._db.execute(query + " ORDER BY f.id", args).fetchall()
    return [{**dict(r), "request": json.loads(r["request"])} for r in rows]


def _completion(row: sqlite3.Row) -> dict:
  out = {k: row[k] for k in _COMPLETION_COLUMNS}
  out["request"] = json.loads(out["request"])
  return out


# ------------------------------------------------------------------------- conversions
class Converted(NamedTuple):
  """Training records made from feedback rows, and the rows skipped per reason."""
  records: list[dict]
  skipped: dict[str, int]


def prompt_messages(row: Mapping[str, Any]) -> list[dict[str, str]] | None:
  """The conversation a chat completion answered (ends with a user turn), else None."""
  if row.get("kind") != "chat":
    return None
  messages = row.get("request", {}).get("messages")
  if not isinstance(messages, list) or not messages:
    return None
  out = []
  for m in messages:
    if not (isinstance(m, Mapping) and m.get("role") in (SYSTEM, USER, ASSISTANT)
            and isinstance(m.get("content"), str)):
      return None  # e.g. tool calls or content parts: not a plain-text conversation
    out.append({"role": m["role"], "content": m["content"]})
  return out if out[-1]["role"] == USER else None


def _chat_rows(rows: Iterable[Mapping[str, Any]], skipped: collections.Counter
               ) -> list[tuple[Mapping[str, Any], list[dict[str, str]]]]:
  out = []
  for row in rows:
    messages = prompt_messages(row)
    if messages is None:
      skipped["text_completion" if row.get("kind") == "text" else "bad_request"] += 1
    else:
      out.append((row, messages))
  return out


def _latest_rated(chat: Sequence[tuple[Mapping[str, Any], list[dict[str, str]]]]
                  ) -> list[tuple[Mapping[str, Any], list[dict[str, str]]]]:
  """The latest rated feedback row of each completion (a user may revise a rating)."""
  latest = {}
  for row, messages in chat:
    if row.get("rating") is not None:
      latest[row["completion_id"]] = (row, messages)
  return list(latest.values())


def to_preference_pairs(rows: Sequence[Mapping[str, Any]], low_rating: float = 0.0
                        ) -> Converted:
  """Feedback rows (`FeedbackStore.feedback`) -> preference records (module doc rules).

  Each record is {"prompt": messages, "chosen", "rejected", "completion_ids"}: the
  `prompt_chosen_rejected` format of data/preferences.py.
  """
  skipped: collections.Counter = collections.Counter()
  records, seen = [], set()

  def add(messages: list[dict[str, str]], chosen: str, rejected: str, ids: list[str]):
    key = (render(messages), chosen, rejected)
    if not chosen.strip() or not rejected.strip() or chosen == rejected:
      skipped["empty_or_identical"] += 1
    elif key in seen:
      skipped["duplicate"] += 1
    else:
      seen.add(key)
      records.append({"prompt": messages, "chosen": chosen, "rejected": rejected,
                      "completion_ids": ids})

  chat = _chat_rows(rows, skipped)
  for row, messages in chat:
    rating = row.get("rating")
    if row.get("preferred") and (rating is None or rating <= low_rating):
      add(messages, row["preferred"], row["output"], [row["completion_id"]])
  by_prompt = collections.defaultdict(list)
  for row, messages in _latest_rated(chat):
    by_prompt[render(messages)].append((row, messages))
  for group in by_prompt.values():
    for (a, messages), (b, _) in itertools.combinations(group, 2):
      if a["rating"] != b["rating"]:
        hi, lo = (a, b) if a["rating"] > b["rating"] else (b, a)
        add(messages, hi["output"], lo["output"], [hi["completion_id"], lo["completion_id"]])
  return Converted(records, dict(skipped))


def transcript(messages: Sequence[Mapping[str, str]]) -> str | None:
  """User/assistant messages as an HH transcript; None if it would not parse back the same."""
  parts = []
  for i, m in enumerate(messages):
    # HH transcripts alternate Human / Assistant from a Human turn and have no system turn.
    if (m["role"] != (USER if i % 2 == 0 else ASSISTANT) or TURN_RE.search(m["content"])
        or not m["content"].strip()):
      return None
    parts.append(f"\n\n{'Human' if m['role'] == USER else 'Assistant'}: {m['content'].strip()}")
  return "".join(parts)


def to_sft_examples(rows: Sequence[Mapping[str, Any]], high_rating: float = 1.0
                    ) -> Converted:
  """Feedback rows -> SFT records {"text": transcript, "completion_ids"} (module doc rules)."""
  skipped: collections.Counter = collections.Counter()
  records, seen = [], set()
  chat = _chat_rows(rows, skipped)
  answers = [(row, messages, row["output"]) for row, messages in _latest_rated(chat)
             if row["rating"] >= high_rating]
  answers += [(row, messages, row["preferred"]) for row, messages in chat
              if row.get("preferred")]
  for row, messages, answer in answers:
    text = transcript([*messages, {"role": ASSISTANT, "content": answer}])
    if text is None:
      skipped["not_a_transcript"] += 1
    elif text in seen:
      skipped["duplicate"] += 1
    else:
      seen.add(text)
      records.append({"text": text, "completion_ids": [row["completion_id"]]})
  return Converted(records, dict(skipped))


def write_jsonl(path: str, records: Iterable[Mapping[str, Any]]) -> int:
  """Writes records one JSON object per line (atomically: a tmp file renamed); returns
  how many."""
  tmp = f"{path}.tmp"
  n = 0
  with open(tmp, "w", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record) + "\n")
      n += 1
  os.replace(tmp, path)
  return n
