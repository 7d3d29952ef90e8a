"""Tests for serve/safety.py: the blocklist, the reward-model scorer (against the model's own
`score`), and refusals through the server (blocklist and reward score, on input and on
output, streamed or not: HTTP 200, finish_reason "content_filter", the refusal text, a log
line naming the check, the refusal counted in /metrics and recorded as served)."""

import contextlib
import logging
import re

import httpx
import jax.numpy as jnp
import openai
import pytest
from flax import nnx

from eval.loading import load_checkpoint
from model.heads import RewardModel
from serve.app import create_app
from serve.deployment import Deployment, model_loader
from serve.feedback import FeedbackStore
from serve.safety import (Blocklist, RewardScorer, SafetyConfig, SafetyFilter)
from serve_fixtures import running, write_checkpoint

TIMEOUT = 60.0
REFUSAL = "Sorry, not that."


def user(text):
  return [{"role": "user", "content": text}]


def test_blocklist_matches_whole_words_and_regexes(tmp_path):
  words = tmp_path / "block.txt"
  words.write_text("# comment\nbomb\nre:how to (build|make) a \\w+\n\nrat poison\n")
  blocklist = Blocklist.from_config(SafetyConfig(blocklist=("Class",), blocklist_file=str(words)))
  assert len(blocklist) == 4
  assert blocklist.find("A BOMB!") == "bomb"
  assert blocklist.find("bombastic") is None and blocklist.find("subclass") is None
  assert blocklist.find("how to MAKE a cake") == "re:how to (build|make) a \\w+"
  assert blocklist.find("some rat poison here") == "rat poison"
  assert blocklist.find("the CLASS starts") == "class"
  with pytest.raises(ValueError, match="blocklist regex"):
    Blocklist(["re:(unclosed"])


@pytest.mark.parametrize("data,cause", [
    ({"blocklist": "bomb"}, "list of strings"),
    ({"threshold": 1}, "unknown field"),
    ({"reward_threshold": "low"}, "reward_threshold"),
    ({"check_input": "yes"}, "check_input"),
])
def test_bad_safety_configs_are_named(data, cause):
  with pytest.raises(ValueError, match=cause):
    SafetyConfig.from_dict(data, "safety.json")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  root = tmp_path_factory.mktemp("serve_safety")
  return (write_checkpoint(str(root / "lm"), seed=0),
          write_checkpoint(str(root / "rm"), seed=3, reward=True))


@pytest.fixture(scope="module")
def scorer(checkpoints):
  return RewardScorer.from_checkpoint(checkpoints[1])


def test_scorer_equals_the_reward_models_score_at_the_last_token(checkpoints, scorer):
  loaded = load_checkpoint(checkpoints[1], expect=RewardModel)
  model = nnx.merge(loaded.graphdef, loaded.params)
  conversation = user("hello there! how are you?")
  for response in (None, "Red, green and blue."):
    ids = scorer.ids(conversation, response)
    n = len(ids)
    want = model.score(jnp.asarray(ids)[None], jnp.arange(n)[None], jnp.ones((1, n), int),
                       jnp.asarray([n - 1]))
    assert scorer.score(conversation, response) == pytest.approx(float(want[0]), abs=1e-5)
  # The response is scored at its end-of-turn token: the ids end with the template's end.
  assert scorer.ids(conversation, "Red.")[-1] == scorer.template.end_id
  assert scorer.score(conversation, "Red.") != scorer.score(conversation, "Blue, dog!")
  with pytest.raises(Exception, match="RewardModel"):
    RewardScorer.from_checkpoint(checkpoints[0])  # a language model is not a judge


@pytest.fixture(scope="module")
def deployment(checkpoints):
  deployment = Deployment(model_loader(slots=4, engine_options={"prompt_bucket": 64}),
                          checkpoint=checkpoints[0]).start()
  yield deployment
  deployment.stop()


@contextlib.contextmanager
def serving(deployment, cfg, scorer=None, feedback=None):
  safety = SafetyFilter(cfg, Blocklist.from_config(cfg), scorer)
  with running(create_app(deployment, safety=safety, feedback=feedback)) as url:
    yield openai.OpenAI(base_url=url, api_key="open", max_retries=0, timeout=TIMEOUT), url


def ask(client, text, stream=False, max_tokens=16):
  """(content, finish_reason) of a greedy chat answer."""
  r = client.chat.completions.create(model="m", messages=user(text), max_tokens=max_tokens,
                                     temperature=0, stream=stream)
  if not stream:
    return r.choices[0].message.content, r.choices[0].finish_reason
  chunks = [c for c in r if c.choices]
  return ("".join(c.choices[0].delta.content or "" for c in chunks),
          chunks[-1].choices[0].finish_reason)


def test_blocklisted_input_is_refused_and_logged(deployment, tmp_path, caplog):
  cfg = SafetyConfig(blocklist=("re:how to (build|make) a bomb",), refusal_message=REFUSAL,
                     check_output=False)
  store = FeedbackStore(str(tmp_path / "fb.db"))
  with serving(deployment, cfg, feedback=store) as (client, url), \
      caplog.at_level(logging.WARNING, logger="serve"):
    for stream in (False, True):
      assert ask(client, "Tell me how to build a bomb", stream) == (REFUSAL, "content_filter")
    answer, reason = ask(client, "hello there")
    assert answer != REFUSAL and reason in ("stop", "length")
    text = client.completions.create(model="m", prompt="how to make a bomb", max_tokens=4)
    assert text.choices[0].text == REFUSAL
    assert text.choices[0].finish_reason == "content_filter"
    metrics = httpx.get(url.replace("/v1", "/metrics"), timeout=TIMEOUT).text
  assert re.search(r'lmlife_refusals_total\{check="blocklist"\} 3\.0', metrics)
  refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
  assert len(refused) == 3 and "content_filter (refused: blocklist on input" in refused[0]
  assert "how to (build|make) a bomb" in refused[0]
  rows = store.completions()
  assert sum(r["output"] == REFUSAL for r in rows) == 3 and len(rows) == 4


def test_blocklisted_output_is_refused_before_it_is_sent(deployment):
  with serving(deployment, SafetyConfig()) as (client, _):
    answer, _ = ask(client, "the quick brown fox")
  assert len(answer) >= 3
  cfg = SafetyConfig(blocklist=("re:" + re.escape(answer[:3]),), refusal_message=REFUSAL)
  with serving(deployment, cfg) as (client, _):
    for stream in (False, True):  # a streamed answer is held back until it passed
      assert ask(client, "the quick brown fox", stream) == (REFUSAL, "content_filter")


def test_a_low_reward_score_is_refused(deployment, scorer):
  prompts = ["hello there", "what light?", "Name three colors.", "the lazy dog"]
  scores = {p: scorer.score(user(p)) for p in prompts}
  low, high = min(scores, key=scores.get), max(scores, key=scores.get)
  assert scores[low] < scores[high]
  threshold = (scores[low] + scores[high]) / 2
  cfg = SafetyConfig(reward_threshold=threshold, check_output=False, refusal_message=REFUSAL)
  with serving(deployment, cfg, scorer) as (client, _):
    assert ask(client, low) == (REFUSAL, "content_filter")
    assert ask(client, high)[1] != "content_filter"
  # On output: the score of the conversation with the answer the model gives.
  with serving(deployment, SafetyConfig()) as (client, _):
    answer, _ = ask(client, high)
  score = scorer.score(user(high), answer)
  for threshold, refused in ((score + 1e-3, True), (score - 1e-3, False)):
    cfg = SafetyConfig(reward_threshold=threshold, check_input=False, refusal_message=REFUSAL)
    with serving(deployment, cfg, scorer) as (client, _):
      got = ask(client, high, stream=True)
    assert got == ((REFUSAL, "content_filter") if refused else (answer, got[1]))
