"""Prometheus metrics of the server, exposed at /metrics in the text format.

Each app has its own `CollectorRegistry` (several servers in one process, as in the tests,
do not collide). Names and meaning:

  lmlife_requests_total{endpoint, status}     requests answered, by route and HTTP status
  lmlife_refusals_total{check}                requests refused by a safety check
  lmlife_time_to_first_token_seconds          request arrival -> first generated token
  lmlife_time_per_output_token_seconds        time between consecutive tokens of a request
  lmlife_request_duration_seconds{endpoint}   request arrival -> last token / answer
  lmlife_prompt_tokens_total, lmlife_generated_tokens_total
  lmlife_tokens_per_second                    the engine's decode throughput (last step)
  lmlife_queue_depth, lmlife_slots_in_use, lmlife_slots   of the serving engine, read at scrape
  lmlife_version_generation                   swaps done since the server started
"""

from __future__ import annotations

import time
from typing import Callable

import prometheus_client as prom

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServerMetrics:
  """The server's collectors in their own registry.

  Args:
    engine_stats: returns (queue depth, slots in use, slots) of the engine now serving;
      read when /metrics is scraped (`Deployment.stats`).
  """

  def __init__(self, engine_stats: Callable[[], tuple[int, int, int]] | None = None):
    self.registry = prom.CollectorRegistry(auto_describe=True)
    r = self.registry
    self.requests = prom.Counter("lmlife_requests", "Requests answered, by endpoint and "
                                 "HTTP status.", ["endpoint", "status"], registry=r)
    self.refusals = prom.Counter("lmlife_refusals", "Requests refused by a safety check.",
                                 ["check"], registry=r)
    self.ttft = prom.Histogram("lmlife_time_to_first_token_seconds", "Request arrival to "
                               "the first generated token.", buckets=LATENCY_BUCKETS,
                               registry=r)
    self.per_token = prom.Histogram("lmlife_time_per_output_token_seconds", "Time between "
                                    "consecutive generated tokens of a request.",
                                    buckets=TOKEN_BUCKETS, registry=r)
    self.duration = prom.Histogram("lmlife_request_duration_seconds", "Request arrival to "
                                   "its last token.", ["endpoint"], buckets=LATENCY_BUCKETS,
                                   registry=r)
    self.prompt_tokens = prom.Counter("lmlife_prompt_tokens", "Prompt tokens of served "
                                      "requests.", registry=r)
    self.generated_tokens = prom.Counter("lmlife_generated_tokens", "Tokens generated.",
                                         registry=r)
    self.tokens_per_second = prom.Gauge("lmlife_tokens_per_second", "Tokens generated per "
                                        "second by the engine's last decode step.",
                                        registry=r)
    self.swaps = prom.Gauge("lmlife_version_generation", "Version swaps since start.",
                            registry=r)
    # Read at scrape time; may be set after construction (the deployment comes later).
    self.engine_stats = engine_stats or (lambda: (0, 0, 0))
    for i, (name, doc) in enumerate((("lmlife_queue_depth", "Requests waiting for a slot."),
                                     ("lmlife_slots_in_use", "Engine slots decoding."),
                                     ("lmlife_slots", "Engine slots."))):
      prom.Gauge(name, doc, registry=r).set_function(lambda i=i: self.engine_stats()[i])

  def on_step(self, step_tokens: int, seconds: float) -> None:
    """The engine's per-step callback: its decode throughput."""
    if seconds > 0:
      self.tokens_per_second.set(step_tokens / seconds)

  def render(self) -> tuple[bytes, str]:
    """(body, content type) of a scrape."""
    return prom.generate_latest(self.registry), prom.CONTENT_TYPE_LATEST


class RequestTimer:
  """Times one generation request: TTFT, inter-token gaps and its duration."""

  def __init__(self, metrics: ServerMetrics, endpoint: str, start: float | None = None):
    self.metrics, self.endpoint = metrics, endpoint
    self.start = time.perf_counter() if start is None else start
    self.last: float | None = None

  def token(self, count: int = 1) -> None:
    """`count` tokens arrived now (the engine delivers a chunk at a time).

    The first token's wait is the time to first token; every later token is one
    per-token observation, and tokens that arrive together share their wait evenly (the
    first chunk's others share the wait since the request started), so the histogram's
    count is completion tokens - 1, as the per-token latency's definition wants.
    """
    now = time.perf_counter()
    since, gaps = (self.start, count - 1) if self.last is None else (self.last, count)
    if self.last is None:
      self.metrics.ttft.observe(now - self.start)
    for _ in range(gaps):
      self.metrics.per_token.observe((now - since) / count)
    self.last = now
    self.metrics.generated_tokens.inc(count)

  def done(self) -> None:
    self.metrics.duration.labels(self.endpoint).observe(time.perf_counter() - self.start)
