"""The server driven by the real `openai` client on localhost (serve/app.py over the real
engine, tiny checkpoints from tests/serve_fixtures.py).

Checked: chat and text completions equal the offline sampler's greedy outputs (one by one,
and 32 concurrent requests on 8 slots); streaming (role first, [DONE], usage) gives the same
text; logprobs equal the sampler's; stop strings cut the text (streamed or not); 401 / 429 /
400 / 404 / 500 with OpenAI's error body, the server serving on after each; the metrics of
/metrics; feedback recorded for a served completion. Safety refusals are in
tests/test_serve_safety.py, hot swap in tests/test_serve_swap.py.
"""

import concurrent.futures
import contextlib
import json
import logging
import time

import httpx
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from eval.sample import load_for_sampling, make_template
from model.sampling import SamplingConfig, respond
from serve.app import create_app
from serve.auth import KeyLimits, ServerLimits, parse_keys
from serve.deployment import Deployment, model_loader
from serve.engine import Finished
from serve.feedback import FeedbackStore
from serve_fixtures import running, write_checkpoint

TIMEOUT = 60.0  # seconds, every client call
KEY = "sk-test-key"
WORDS = ["hello", "there", "colors", "quick", "brown", "fox", "lazy", "dog", "light", "ROMEO",
         "blue", "green", "red", "how", "are", "you"]


def user(text):
  return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  return write_checkpoint(str(tmp_path_factory.mktemp("serve_api") / "lm"), seed=0)


@pytest.fixture(scope="module")
def deployment(checkpoint):
  # One prompt bucket (64) compiles fewer programs; the engine's buckets are its own tests'.
  deployment = Deployment(model_loader(slots=8, engine_options={"prompt_bucket": 64}),
                          checkpoint=checkpoint).start()
  yield deployment
  deployment.stop()


@pytest.fixture(scope="module")
def offline(checkpoint):
  """(sampler, params, chat template) of the same checkpoint, for reference outputs."""
  sampler, params, tokenizer, _ = load_for_sampling(checkpoint)
  return sampler, params, make_template("auto", tokenizer)


def greedy_chat(offline, messages, max_tokens):
  sampler, params, template = offline
  cfg = SamplingConfig(max_new_tokens=max_tokens, temperature=0.0)
  return respond(sampler, params, template, [messages], cfg, batch_size=1)[0]


def greedy_text(offline, prompt, max_tokens):
  """(text, token ids, logprobs) of the offline greedy continuation of a raw prompt."""
  sampler, params, template = offline
  tok = template.tokenizer
  cfg = SamplingConfig(max_new_tokens=max_tokens, temperature=0.0, eos_ids=(tok.eos_id,),
                       pad_id=tok.pad_id)
  out = sampler.generate(params, [tok.encode(prompt)], cfg)
  n = int(out.response_mask[0].sum())
  ids = [int(t) for t in out.response[0, :n] if t != tok.eos_id]
  return tok.decode(ids), ids, out.logprobs[0, :n]


@contextlib.contextmanager
def client_of(deployment, api_key=KEY, **app_kwargs):
  """(openai client, base url) of a fresh app on the shared deployment."""
  app_kwargs.setdefault("keys", [KEY])
  app = create_app(deployment, **app_kwargs)
  with running(app) as url:
    yield openai.OpenAI(base_url=url, api_key=api_key, max_retries=0, timeout=TIMEOUT), url


@pytest.fixture(scope="module")
def server(deployment):
  with client_of(deployment) as pair:
    yield pair


def test_chat_and_completion_equal_the_offline_greedy_outputs(server, offline):
  client, _ = server
  for text in ("hello", "Name three colors."):
    want = greedy_chat(offline, user(text), 24)
    r = client.chat.completions.create(model="any", messages=user(text), max_tokens=24,
                                       temperature=0)
    choice = r.choices[0]
    assert choice.message.content == want["response"]
    assert choice.finish_reason == ("stop" if want["ended"] else "length")
    assert r.usage.prompt_tokens == len(offline[2].prompt_ids(user(text)))
    assert r.usage.completion_tokens == want["tokens"]
    assert r.model == "lm" and r.id.startswith("chatcmpl-")
  text, ids, _ = greedy_text(offline, "ROMEO:", 20)
  r = client.completions.create(model="any", prompt="ROMEO:", max_tokens=20, temperature=0)
  assert r.choices[0].text == text and r.usage.completion_tokens >= len(ids)
  assert r.object == "text_completion"


def test_streaming_sends_the_same_text_role_first_then_done(server, offline):
  client, url = server
  whole = client.chat.completions.create(model="m", messages=user("hi, how are you?"),
                                         max_tokens=20, temperature=0)
  chunks = list(client.chat.completions.create(
      model="m", messages=user("hi, how are you?"), max_tokens=20, temperature=0,
      stream=True, stream_options={"include_usage": True}))
  assert chunks[0].choices[0].delta.role == "assistant"
  text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
  assert text == whole.choices[0].message.content
  finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
  assert finishes[-1] == whole.choices[0].finish_reason and not any(finishes[:-1])
  assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
  assert len({c.id for c in chunks}) == 1
  raw = httpx.post(f"{url}/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"prompt": "ROMEO:", "max_tokens": 8, "temperature": 0,
                         "stream": True}, timeout=TIMEOUT)
  events = [line for line in raw.text.split("\n\n") if line]
  assert raw.headers["content-type"].startswith("text/event-stream")
  assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
  streamed = "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1])
  assert streamed == greedy_text(offline, "ROMEO:", 8)[0]


def test_logprobs_equal_the_offline_samplers(server, offline):
  client, _ = server
  _, ids, logprobs = greedy_text(offline, "the lazy dog", 12)
  r = client.completions.create(model="m", prompt="the lazy dog", max_tokens=12,
                                temperature=0, logprobs=3)
  lp = r.choices[0].logprobs
  n = len(ids)
  np.testing.assert_allclose(lp.token_logprobs[:n], logprobs[:n], rtol=0, atol=2e-4)
  assert all(len(top) <= 3 for top in lp.top_logprobs)
  text = r.choices[0].text
  assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
  assert all(o <= len(text) for o in lp.text_offset)
  c = client.chat.completions.create(model="m", messages=user("hello"), max_tokens=10,
                                     temperature=0, logprobs=True, top_logprobs=4)
  content = c.choices[0].logprobs.content
  for entry in content:  # greedy: the chosen token is the most likely one
    tops = [t.logprob for t in entry.top_logprobs]
    assert len(tops) == 4 and tops == sorted(tops, reverse=True)
    assert entry.logprob == pytest.approx(tops[0], abs=1e-5)
    assert entry.bytes == list(entry.token.encode())
  ended = c.choices[0].finish_reason == "stop"  # the end-of-turn token is not content
  assert len(content) == c.usage.completion_tokens - ended


def test_stop_strings_cut_before_the_stop_streamed_or_not(server, offline):
  client, _ = server
  full, _, _ = greedy_text(offline, "quick brown", 24)
  stop = full[2:4]  # a string the answer contains (where it first occurs is the cut)
  want = full[:full.find(stop)]
  r = client.completions.create(model="m", prompt="quick brown", max_tokens=24,
                                temperature=0, stop=[stop, "never in the text"])
  assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
  chunks = list(client.completions.create(model="m", prompt="quick brown", max_tokens=24,
                                          temperature=0, stop=stop, stream=True))
  assert "".join(c.choices[0].text for c in chunks) == want
  assert chunks[-1].choices[0].finish_reason == "stop"


def test_32_concurrent_requests_all_equal_the_offline_sampler(server, offline):
  client, _ = server
  prompts = [f"{WORDS[i % 16]} {WORDS[(i * 7 + 3) % 16]}" for i in range(32)]

  def ask(prompt):
    return client.chat.completions.create(model="m", messages=user(prompt), max_tokens=16,
                                          temperature=0).choices[0].message.content
  with concurrent.futures.ThreadPoolExecutor(32) as pool:
    futures = [pool.submit(ask, p) for p in prompts]
    answers = [f.result(timeout=120) for f in futures]
  assert answers == [greedy_chat(offline, user(p), 16)["response"] for p in prompts]


def test_a_client_that_goes_away_cancels_its_request(server, deployment, monkeypatch,
                                                      caplog):
  _, url = server
  served = deployment.current
  # About 50 tokens/s, so the answer (up to 100 tokens) is far from done at the disconnect.
  monkeypatch.setattr(served.engine, "on_step", lambda tokens, seconds: time.sleep(0.3))
  handles, submit = [], served.engine.submit
  monkeypatch.setattr(served.engine, "submit",
                      lambda ids, params: handles.append(submit(ids, params)) or handles[-1])
  with caplog.at_level(logging.INFO, logger="serve"):
    with httpx.stream("POST", f"{url}/completions", timeout=TIMEOUT,
                      headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": "hello", "max_tokens": 100, "temperature": 0,
                            "stream": True}) as response:
      first = next(response.iter_lines())
    assert first.startswith("data: ")
    deadline = time.monotonic() + TIMEOUT
    while served.leases or served.engine.slots_in_use:  # the lease back, the slot free
      assert time.monotonic() < deadline
      time.sleep(0.05)
  (line,) = [r.getMessage() for r in caplog.records if "/v1/completions" in r.getMessage()]
  assert line.endswith("client_gone")
  _, finished = handles[0].result(timeout=TIMEOUT)
  assert finished.reason == "cancelled" and finished.completion_tokens < 100


def _error(response, status, code=None):
  assert response.status_code == status, response.text
  body = response.json()["error"]
  assert set(body) == {"message", "type", "param", "code"} and body["message"]
  if code:
    assert body["code"] == code
  return body


def test_bad_keys_are_401(server):
  client, url = server
  with pytest.raises(openai.AuthenticationError):
    client.with_options(api_key="sk-wrong").chat.completions.create(
        model="m", messages=user("hi"), max_tokens=2)
  _error(httpx.post(f"{url}/chat/completions", json={"messages": user("hi")}), 401,
         "invalid_api_key")
  _error(httpx.get(f"{url}/models"), 401)
  assert client.models.list().data[0].id == "lm"


def test_bad_bodies_and_too_long_prompts_are_400(deployment):
  with client_of(deployment, limits=ServerLimits(max_body_bytes=4000, max_tokens_cap=50)
                 ) as (client, url):
    auth = {"Authorization": f"Bearer {KEY}"}
    post = lambda body, path="chat/completions": httpx.post(f"{url}/{path}", headers=auth,
                                                            content=body, timeout=TIMEOUT)
    _error(post(b'{"messages": [{"role": "user"'), 400, "invalid_json")
    assert _error(post(b'{"messages": "hi"}'), 400)["param"] == "messages"
    assert _error(post(b'{"prompt": "a", "max_tokens": "ten"}', "completions"),
                  400)["param"] == "max_tokens"
    _error(post(json.dumps({"messages": user("x" * 5000)}).encode()), 400,
           "request_too_large")
    with pytest.raises(openai.BadRequestError) as e:  # the prompt alone overflows 128
      client.chat.completions.create(model="m", messages=user("hello " * 30), max_tokens=4)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):  # prompt + max_tokens overflow
      client.completions.create(model="m", prompt="hello " * 15, max_tokens=45)
    for kwargs in ({"max_tokens": 51}, {"n": 2}, {"extra_body": {"top_k": -1}}):
      with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="m", messages=user("hi"), **kwargs)
    _error(httpx.get(f"{url}/nothing/here"), 404)
    ok = client.chat.completions.create(model="m", messages=user("hi"), max_tokens=3)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_rate_and_quota_limits_are_429(deployment):
  keys = parse_keys(json.dumps({"keys": [
      {"key": "sk-slow", "requests_per_minute": 2},
      {"key": "sk-small", "tokens_per_window": 60, "window_seconds": 3600}]}), KeyLimits(), "t")
  with client_of(deployment, keys=keys) as (client, url):
    slow = client.with_options(api_key="sk-slow")
    for _ in range(2):
      slow.chat.completions.create(model="m", messages=user("hi"), max_tokens=2)
    with pytest.raises(openai.RateLimitError) as e:
      slow.chat.completions.create(model="m", messages=user("hi"), max_tokens=2)
    assert e.value.code == "rate_limit_exceeded"
    assert int(e.value.response.headers["retry-after"]) >= 1
    small = client.with_options(api_key="sk-small")
    first = small.completions.create(model="m", prompt="hello", max_tokens=30, temperature=0)
    used = first.usage.total_tokens  # 5 prompt + up to 30 generated: the rest came back
    with pytest.raises(openai.RateLimitError) as e:  # used + 5 + max_tokens = 61 > 60
      small.completions.create(model="m", prompt="hello", max_tokens=60 - used - 4)
    assert e.value.code == "insufficient_quota"
    small.completions.create(model="m", prompt="hello", max_tokens=60 - used - 5)  # = 60


class FailedRequest:
  """An engine handle whose request failed on the device."""
  id = "failed"

  def listen(self, callback):
    callback([Finished("error", 3, 0, "device lost")])

  def cancel(self):
    pass


def test_engine_failures_are_500_and_the_server_serves_on(server, deployment, monkeypatch):
  client, _ = server
  engine = deployment.current.engine
  monkeypatch.setattr(engine, "submit", lambda ids, params: FailedRequest())
  with pytest.raises(openai.InternalServerError) as e:
    client.chat.completions.create(model="m", messages=user("hi"), max_tokens=4)
  assert "device lost" in str(e.value) and e.value.code == "engine_error"
  with pytest.raises(openai.APIError, match="device lost"):  # streamed: an error event
    list(client.chat.completions.create(model="m", messages=user("hi"), max_tokens=4,
                                        stream=True))

  def bug(ids, params):
    raise ZeroDivisionError("a bug")
  monkeypatch.setattr(engine, "submit", bug)
  with pytest.raises(openai.InternalServerError, match="ZeroDivisionError"):
    client.completions.create(model="m", prompt="hi", max_tokens=4)
  monkeypatch.undo()
  ok = client.chat.completions.create(model="m", messages=user("hi"), max_tokens=4)
  assert ok.usage.completion_tokens >= 1


def test_metrics_count_requests_tokens_and_latencies(deployment):
  with client_of(deployment) as (client, url):
    usage = [client.chat.completions.create(model="m", messages=user(w), max_tokens=6,
                                            temperature=0).usage for w in ("hello", "fox")]
    with pytest.raises(openai.AuthenticationError):
      client.with_options(api_key="bad").chat.completions.create(model="m",
                                                                 messages=user("x"))
    families = {f.name: f for f in text_string_to_metric_families(
        httpx.get(url.replace("/v1", "/metrics"), timeout=TIMEOUT).text)}
  value = lambda name, **labels: next(
      s.value for s in families[name].samples
      if s.name.endswith(("_total", "_count")) or s.name == name
      if all(s.labels.get(k) == v for k, v in labels.items()))
  assert value("lmlife_requests", endpoint="/v1/chat/completions", status="200") == 2
  assert value("lmlife_requests", endpoint="/v1/chat/completions", status="401") == 1
  assert value("lmlife_generated_tokens") == sum(u.completion_tokens for u in usage)
  assert value("lmlife_prompt_tokens") == sum(u.prompt_tokens for u in usage)
  assert value("lmlife_time_to_first_token_seconds") == 2
  assert value("lmlife_time_per_output_token_seconds") == \
      sum(u.completion_tokens - 1 for u in usage)
  assert value("lmlife_slots") == 8 and value("lmlife_queue_depth") == 0
  assert "lmlife_tokens_per_second" in families and "lmlife_slots_in_use" in families


def test_feedback_is_stored_for_a_served_completion(deployment, tmp_path):
  store = FeedbackStore(str(tmp_path / "feedback.db"))
  with client_of(deployment, feedback=store) as (client, url):
    r = client.chat.completions.create(model="m", messages=user("hello"), max_tokens=8,
                                       temperature=0)
    auth = {"Authorization": f"Bearer {KEY}"}
    ok = httpx.post(f"{url}/feedback", headers=auth, timeout=TIMEOUT,
                    json={"completion_id": r.id, "rating": 1, "preferred": "Hi!"})
    assert ok.status_code == 200 and ok.json()["completion_id"] == r.id
    _error(httpx.post(f"{url}/feedback", headers=auth,
                      json={"completion_id": "nope", "rating": 0}), 404, "completion_not_found")
    _error(httpx.post(f"{url}/feedback", headers=auth, json={"rating": 1}), 400)
    _error(httpx.post(f"{url}/feedback", headers=auth, json={"completion_id": r.id}), 400)
  (row,) = store.feedback()
  assert row["completion_id"] == r.id and row["rating"] == 1 and row["preferred"] == "Hi!"
  (done,) = store.completions()
  assert done["output"] == r.choices[0].message.content and done["version"] == "lm"
  assert done["request"]["messages"] == user("hello") and done["kind"] == "chat"
