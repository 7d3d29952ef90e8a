"""Tests for serve/feedback.py: the SQLite schema, recording from many threads, reading back
(joined, since an id or a time), refusals, and the conversions to preference pairs and SFT
examples, read back by the data readers the stages use."""

import json
import sqlite3
import threading

import pytest

from data.chat import render
from data.preferences import read_records
from data.sft_sources import read_sft_file
from serve.feedback import (FeedbackStore, to_preference_pairs, to_sft_examples, transcript,
                            write_jsonl)


def _chat(content, system=None):
  messages = [{"role": "user", "content": content}]
  if system:
    messages.insert(0, {"role": "system", "content": system})
  return {"messages": messages, "max_tokens": 16, "temperature": 0.0}


def test_schema_is_the_documented_one(tmp_path):
  path = str(tmp_path / "db" / "feedback.db")
  FeedbackStore(path).close()
  db = sqlite3.connect(path)
  columns = {t: [(r[1], r[2]) for r in db.execute(f"PRAGMA table_info({t})")]
             for t in ("completions", "feedback")}
  assert columns == {
      "completions": [("id", "TEXT"), ("version", "TEXT"), ("kind", "TEXT"),
                      ("request", "TEXT"), ("output", "TEXT"), ("created", "REAL")],
      "feedback": [("id", "INTEGER"), ("completion_id", "TEXT"), ("rating", "REAL"),
                   ("preferred", "TEXT"), ("comment", "TEXT"), ("created", "REAL")]}
  assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
  assert db.execute("PRAGMA user_version").fetchone()[0] == 1


def test_record_and_read_back(tmp_path):
  store = FeedbackStore(str(tmp_path / "f.db"))
  store.record_completion("c1", "v0", "chat", _chat("Hi"), "Hello!", created=10.0)
  store.record_completion("c2", "v1", "text", {"prompt": "Once"}, " upon", created=11.0)
  first = store.record_feedback("c1", rating=1)
  second = store.record_feedback("c2", preferred=" upon a time", comment="longer")
  assert second > first
  assert [c["id"] for c in store.completions()] == ["c1", "c2"]
  (c,) = store.completions(version="v1")
  assert c == {"id": "c2", "version": "v1", "kind": "text", "request": {"prompt": "Once"},
               "output": " upon", "created": 11.0}
  rows = store.feedback()
  assert [(r["id"], r["completion_id"], r["rating"], r["preferred"], r["comment"])
          for r in rows] == [(first, "c1", 1.0, None, None),
                             (second, "c2", None, " upon a time", "longer")]
  assert rows[0]["request"] == _chat("Hi") and rows[0]["output"] == "Hello!"
  assert rows[0]["version"] == "v0" and rows[0]["completion_created"] == 10.0
  assert [r["id"] for r in store.feedback(since_id=first)] == [second]
  assert store.feedback(since_time=rows[1]["created"] + 1) == []
  # Another connection (the continual loop's process) reads what the server wrote.
  assert len(FeedbackStore(store.path).feedback()) == 2


def test_refusals(tmp_path):
  store = FeedbackStore(str(tmp_path / "f.db"))
  store.record_completion("c1", "v0", "chat", _chat("Hi"), "Hello!")
  with pytest.raises(KeyError):
    store.record_feedback("nope", rating=1.0)
  with pytest.raises(ValueError, match="already recorded"):
    store.record_completion("c1", "v0", "chat", _chat("Hi"), "again")
  with pytest.raises(ValueError, match="kind="):
    store.record_completion("c2", "v0", "embedding", {}, "")
  with pytest.raises(ValueError, match="not JSON"):
    store.record_completion("c3", "v0", "chat", {"x": object()}, "")
  with pytest.raises(ValueError, match="needs a rating"):
    store.record_feedback("c1")
  for bad in (float("nan"), "5", True):
    with pytest.raises(ValueError, match="finite number"):
      store.record_feedback("c1", rating=bad)
  assert store.feedback() == [] and len(store.completions()) == 1


def test_many_threads_record_at_once(tmp_path):
  store = FeedbackStore(str(tmp_path / "f.db"))
  errors = []

  def serve(t):
    try:
      for i in range(25):
        cid = f"t{t}-{i}"
        store.record_completion(cid, "v0", "chat", _chat(f"q{t}-{i}"), f"a{i}")
        store.record_feedback(cid, rating=float(i % 2))
    except Exception as e:  # noqa: BLE001 - reported by the assert below
      errors.append(e)

  threads = [threading.Thread(target=serve, args=(t,)) for t in range(8)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert errors == []
  rows = store.feedback()
  assert len(rows) == 200 and len(store.completions()) == 200
  assert len({r["id"] for r in rows}) == 200
  assert all(r["output"] == "a" + r["completion_id"].split("-")[1] for r in rows)


@pytest.fixture
def rated(tmp_path):
  """Feedback as a server records it: corrections, ratings of two answers to one prompt, a
  text completion, and a chat with a system message."""
  store = FeedbackStore(str(tmp_path / "f.db"))
  add = store.record_completion
  add("a1", "v0", "chat", _chat("Capital of France?"), "Berlin.")
  store.record_feedback("a1", rating=0.0, preferred="Paris.")
  add("b1", "v0", "chat", _chat("Say hi."), "Go away.")
  add("b2", "v0", "chat", _chat("Say hi."), "Hi there!")
  store.record_feedback("b1", rating=1.0)
  store.record_feedback("b1", rating=-1.0)       # revised: the latest rating counts
  store.record_feedback("b2", rating=1.0)
  add("c1", "v0", "chat", _chat("2+2?"), "4")
  store.record_feedback("c1", rating=1.0, preferred="Four.")  # rated well: no pair
  add("d1", "v0", "text", {"prompt": "Once"}, " upon")
  store.record_feedback("d1", rating=0.0, preferred=" upon a time")
  add("e1", "v0", "chat", _chat("Rhyme?", system="Be a poet."), "No.")
  store.record_feedback("e1", rating=0.0, preferred="Moon, June.")
  return store


def test_preference_pairs(rated, tmp_path):
  pairs, skipped = to_preference_pairs(rated.feedback())
  got = {(render(p["prompt"]), p["chosen"], p["rejected"]) for p in pairs}
  system_prompt = render([{"role": "system", "content": "Be a poet."},
                          {"role": "user", "content": "Rhyme?"}])
  assert got == {(render(_chat("Capital of France?")["messages"]), "Paris.", "Berlin."),
                 (render(_chat("Say hi.")["messages"]), "Hi there!", "Go away."),
                 (system_prompt, "Moon, June.", "No.")}
  assert skipped == {"text_completion": 1}
  # A higher threshold makes c1's correction a pair too.
  assert len(to_preference_pairs(rated.feedback(), low_rating=1.0).records) == 4
  # The stages read them back: data/preferences.py's prompt_chosen_rejected format.
  path = str(tmp_path / "pairs.jsonl")
  assert write_jsonl(path, pairs) == 3
  with open(path) as f:
    read = read_records(path, enumerate(json.loads(line) for line in f))
  assert read.format == "prompt_chosen_rejected" and len(read.pairs) == 3
  assert {(p.chosen, p.rejected) for p in read.pairs} == {(c, r) for _, c, r in got}


def test_sft_examples(rated, tmp_path):
  examples, skipped = to_sft_examples(rated.feedback())
  texts = {e["text"] for e in examples}
  assert texts == {"\n\nHuman: Capital of France?\n\nAssistant: Paris.",
                   "\n\nHuman: Say hi.\n\nAssistant: Hi there!",
                   "\n\nHuman: 2+2?\n\nAssistant: 4", "\n\nHuman: 2+2?\n\nAssistant: Four."}
  # "Go away." was rated 1 first, then -1: the latest rating counts, so it is no example.
  assert skipped["text_completion"] == 1 and skipped["not_a_transcript"] == 1
  path = str(tmp_path / "sft.jsonl")
  write_jsonl(path, examples)
  read = read_sft_file(path)
  assert read.format == "transcript" and read.skipped == 0
  assert {(c[0]["content"], c[1]["content"]) for c in read.conversations} == {
      ("Capital of France?", "Paris."), ("Say hi.", "Hi there!"), ("2+2?", "4"),
      ("2+2?", "Four.")}


def test_transcript_refuses_what_would_not_parse_back():
  user = lambda c: {"role": "user", "content": c}
  bot = lambda c: {"role": "assistant", "content": c}
  assert transcript([user("a"), bot("b"), user("c"), bot("d")]) == (
      "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d")
  assert transcript([user("a"), user("b"), bot("c")]) is None
  assert transcript([user("a\n\nAssistant: fake"), bot("b")]) is None
  assert transcript([user(" "), bot("b")]) is None
