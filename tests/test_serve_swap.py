"""Hot swap and rollback through the registry (serve/deployment.py), with the real engine.

A registry holds two tiny models (different seeds, so different greedy answers), v1 current.
8-10 greedy chat requests (prompts whose v1 answers run to max_tokens) stream from v1,
slowed to about 100 tokens/s; once each has its first piece, v1's engine is paused (its
per-step callback waits on a gate) so they are all mid-answer, and v2 is promoted. The
server loads and warms up v2 and switches new requests to it while v1's requests are still
running: new requests get v2's answers. Then v1 resumes: every stream completes with its
full v1 answer (the same text as v1 gave before the swap), and v1's engine is stopped,
draining, only after its last request. A rollback then serves v1 again, and its greedy
answers equal the earlier ones exactly.

Without a model (fake registry and engines): a version that fails to load leaves the old
one serving and is not retried until the registry changes again.
"""

import concurrent.futures
import threading
import time

import openai
import pytest

from serve.app import create_app
from serve.deployment import Deployment, ServedModel, model_loader
from serve.registry import Registry
from serve_fixtures import running, write_checkpoint

TIMEOUT = 120.0
CANDIDATES = [f"{a} {b}" for a in ("hello", "quick", "lazy", "ROMEO:", "Name", "blue")
              for b in ("fox", "dog", "light", "there")]
MAX_TOKENS = 40


def user(text):
  return [{"role": "user", "content": text}]


def wait_until(predicate, what, timeout=TIMEOUT):
  deadline = time.monotonic() + timeout
  while not predicate():
    if time.monotonic() > deadline:
      pytest.fail(f"timed out waiting for {what}")
    time.sleep(0.02)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
  root = tmp_path_factory.mktemp("serve_swap")
  registry = Registry(str(root / "registry"))
  for name, seed in (("v1", 0), ("v2", 1)):
    registry.register(name, write_checkpoint(str(root / name), seed=seed))
  registry.promote("v1")
  return registry


def greedy(client, prompts):
  """[(version, answer, finish reason)] of greedy chat answers (requests in parallel)."""
  def ask(prompt):
    r = client.chat.completions.create(model="m", messages=user(prompt),
                                       max_tokens=MAX_TOKENS, temperature=0)
    return r.model, r.choices[0].message.content, r.choices[0].finish_reason
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    return list(pool.map(ask, prompts, timeout=TIMEOUT))


class Stream:
  """A streamed greedy answer read in a thread; `text` grows as pieces arrive."""

  def __init__(self, client, prompt):
    self.client, self.prompt = client, prompt
    self.text, self.model, self.finish = "", None, None
    self.started = threading.Event()

  def read(self):
    chunks = self.client.chat.completions.create(model="m", messages=user(self.prompt),
                                                 max_tokens=MAX_TOKENS, temperature=0,
                                                 stream=True)
    for chunk in chunks:
      self.model = chunk.model
      if chunk.choices and chunk.choices[0].delta.content:
        self.text += chunk.choices[0].delta.content
        self.started.set()
      if chunk.choices and chunk.choices[0].finish_reason:
        self.finish = chunk.choices[0].finish_reason
    self.started.set()  # an empty answer
    return self


def test_swap_under_streaming_load_loses_nothing_and_rollback_restores(registry):
  gate = threading.Event()
  gate.set()
  loads = []

  def slow_or_paused(tokens, seconds):
    time.sleep(0.02)  # about 100 tokens/s: the streams all start well before any ends
    gate.wait()

  def load(name, checkpoint):
    # Only the first engine (v1) is slowed and can be paused: its scheduler runs this after
    # every step.
    on_step = slow_or_paused if not loads else None
    loads.append(name)
    return model_loader(slots=16, engine_options={"steps_per_sync": 2, "prompt_bucket": 64},
                        on_step=on_step)(name, checkpoint)

  deployment = Deployment(load, registry=registry, poll_seconds=0.1).start()
  stops = []  # (version, its leases, ...) when the deployment stopped a version's engine

  def on_swap(old, new):
    real_stop = old.engine.stop

    def stop(drain=True):
      stops.append((old.name, old.leases, drain))
      real_stop(drain=drain)
    old.engine.stop = stop
  deployment.on_swap = on_swap
  try:
    with running(create_app(deployment)) as url:
      client = openai.OpenAI(base_url=url, api_key="open", max_retries=0, timeout=TIMEOUT)
      # The streams ask the prompts whose answers run to max_tokens (a random model ends
      # some answers after a few tokens, before the swap could find them running).
      first = greedy(client, CANDIDATES)
      prompts = [p for p, (_, _, finish) in zip(CANDIDATES, first) if finish == "length"][:10]
      assert len(prompts) >= 8 and {m for m, _, _ in first} == {"v1"}
      before = greedy(client, prompts)

      with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        streams = [Stream(client, p) for p in prompts]
        futures = [pool.submit(s.read) for s in streams]
        try:
          for s in streams:
            assert s.started.wait(TIMEOUT)
          gate.clear()  # v1 stops between two steps: its requests are mid-answer
          registry.promote("v2")
          wait_until(lambda: deployment.current.name == "v2", "the swap to v2")
          at_swap = [s.text for s in streams]
          during = greedy(client, prompts)  # v1 is still paused
          assert {m for m, _, _ in during} == {"v2"}
          assert [a for _, a, _ in during] != [a for _, a, _ in before]  # another model
          assert not stops  # v1 still has its requests
        finally:
          gate.set()  # (also on a failure: the streams must end for the pool to close)
        done = [f.result(timeout=TIMEOUT) for f in futures]

      for s, (_, answer, finish) in zip(done, before):
        assert (s.model, s.text, s.finish) == ("v1", answer, finish)
      assert all(len(t) < len(s.text) for t, s in zip(at_swap, done)), \
          "every stream was mid-answer at the swap"
      wait_until(lambda: stops, "v1's engine to be stopped")
      assert stops == [("v1", 0, True)]  # after its last request, draining

      registry.rollback()
      wait_until(lambda: deployment.current.name == "v1", "the rollback to v1")
      assert greedy(client, CANDIDATES) == first
      assert loads == ["v1", "v2", "v1"]
  finally:
    gate.set()
    deployment.stop()


class FakeRegistry:
  """snapshot() / versions() of a registry whose current version the test sets."""

  def __init__(self):
    self.generation, self.current = 1, {"name": "v1", "checkpoint": "/ckpt/v1"}

  def set(self, name):
    self.generation += 1
    self.current = {"name": name, "checkpoint": f"/ckpt/{name}"}

  def snapshot(self):
    return self.generation, dict(self.current)

  def versions(self):
    return [{"name": n, "checkpoint": f"/ckpt/{n}", "created": 1.5} for n in ("v1", "v2")]


class FakeEngine:
  queue_depth, slots_in_use, slots = 0, 0, 4

  def __init__(self):
    self.stopped = threading.Event()

  def stop(self, drain=True):
    assert drain
    self.stopped.set()


def test_a_version_that_fails_to_load_leaves_the_old_one_serving():
  def load(name, checkpoint):
    if name == "broken":
      raise ValueError("unreadable checkpoint")
    return ServedModel(name, checkpoint, FakeEngine(), None, None, None, 16)

  registry = FakeRegistry()
  deployment = Deployment(load, registry=registry, poll_seconds=3600).start()
  v1 = deployment.current
  registry.set("broken")
  with pytest.raises(ValueError, match="unreadable"):
    deployment.poll_once()
  assert deployment.current is v1 and not deployment.poll_once()  # not retried
  lease = deployment.acquire()  # a request still running on v1
  registry.set("v2")
  assert deployment.poll_once() and deployment.current.name == "v2"
  assert [(m["id"], m["current"], m["created"]) for m in deployment.models()] == \
      [("v1", False, 1), ("v2", True, 1)]
  assert not v1.engine.stopped.wait(0.2)  # drained only after its last request
  deployment.release(lease)
  assert v1.engine.stopped.wait(10)
  deployment.stop()
  assert deployment.current is None and deployment.stats() == (0, 0, 0)
