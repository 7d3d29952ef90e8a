"""API keys, per-key request-rate and token quotas, and request size limits.

  keys = load_keys("keys.txt")                  # or load_keys(None) for LMLIFE_API_KEYS
  access = AccessControl(keys, ServerLimits(max_tokens_cap=512))
  client = access.authenticate(request.headers.get("authorization"))  # 401 if not a key
  access.admit(client)                          # 429 when its request rate is spent
  reservation = access.reserve(client, prompt_tokens + max_tokens)    # 429 over its quota
  ...
  access.settle(reservation, prompt_tokens + completion_tokens)       # the unused part back

Keys come from a file (`--api_keys_file`) or the environment (`LMLIFE_API_KEYS`,
comma-separated). The file is either one key per line (`#` comments and blank lines
skipped), every key getting the default limits, or JSON:

  {"keys": [{"key": "sk-alice", "name": "alice", "requests_per_minute": 60,
             "tokens_per_window": 100000}, ...],
   "defaults": {"requests_per_minute": 120, "tokens_per_window": 0, "window_seconds": 60}}

Keys are held in memory only as sha256 digests; a presented key is hashed and compared
with every digest by `hmac.compare_digest` (constant time, and no early exit that would tell
how many keys precede it). With no key configured the server is open (`AccessControl.open`;
the entry point logs it loudly) and all requests share one anonymous client's limits.

Limits (0 = unlimited):
- request rate: a token bucket per key holding `requests_per_minute` requests, refilled at
  requests_per_minute / 60 per second (a burst of a full minute's requests is allowed);
- token quota: prompt + completion tokens per window of `window_seconds` (fixed windows
  starting at a key's first request). A request reserves prompt + max_tokens before it
  runs, so concurrent requests cannot overrun the quota together, and gives back what it
  did not generate when it ends;
- `ServerLimits`: body bytes, the max_tokens cap (both answered with 400).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import math
import os
import threading
import time
from typing import Any, Callable

from serve.schemas import APIError

ENV_VAR = "LMLIFE_API_KEYS"
ANONYMOUS = "anonymous"


@dataclasses.dataclass(frozen=True)
class KeyLimits:
  """Per-key limits (0 = unlimited)."""
  requests_per_minute: float = 0.0
  tokens_per_window: int = 0
  window_seconds: float = 60.0

  def __post_init__(self):
    if self.requests_per_minute < 0 or self.tokens_per_window < 0:
      raise ValueError(f"limits must be >= 0 (0 = unlimited), got {self}")
    if self.window_seconds <= 0:
      raise ValueError(f"window_seconds must be > 0, got {self.window_seconds}")


@dataclasses.dataclass(frozen=True)
class ServerLimits:
  """Limits of every request, whoever sends it.

  Attributes:
    max_body_bytes: largest request body accepted.
    max_tokens_cap: largest max_tokens a request may ask for (and the default when it
      asks for none, if the context leaves that much room).
    default_key_limits: limits of keys that do not set their own (and of the open server).
  """
  max_body_bytes: int = 1 << 20
  max_tokens_cap: int = 1024
  default_key_limits: KeyLimits = KeyLimits()


@dataclasses.dataclass(frozen=True)
class Client:
  """An authenticated caller: a name for logs (never the key) and its limits."""
  name: str
  digest: str
  limits: KeyLimits


def digest(key: str) -> str:
  return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _limits_from(entry: dict[str, Any], defaults: KeyLimits, where: str) -> KeyLimits:
  known = {f.name for f in dataclasses.fields(KeyLimits)}
  extra = set(entry) - known - {"key", "name"}
  if extra:
    raise ValueError(f"{where}: unknown field(s) {sorted(extra)}; known: "
                     f"{sorted(known | {'key', 'name'})}")
  try:
    return dataclasses.replace(defaults, **{k: v for k, v in entry.items() if k in known})
  except (TypeError, ValueError) as e:
    raise ValueError(f"{where}: {e}") from e


def parse_keys(text: str, defaults: KeyLimits, source: str) -> list[Client]:
  """Clients from a key file's text (one key per line, or the JSON form; module doc).

  Raises:
    ValueError: malformed JSON, an entry without a key, an unknown field, a bad limit
      or a key given twice (the source is named, the key never).
  """
  clients: list[Client] = []
  if text.lstrip().startswith("{"):
    try:
      data = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"{source}: not valid JSON: {e}") from e
    defaults = _limits_from(data.get("defaults", {}), defaults, f"{source} defaults")
    for i, entry in enumerate(data.get("keys", [])):
      if not isinstance(entry, dict) or not isinstance(entry.get("key"), str) or \
          not entry["key"]:
        raise ValueError(f"{source}: keys[{i}] needs a non-empty string 'key'")
      clients.append(Client(str(entry.get("name") or f"key{i}"), digest(entry["key"]),
                            _limits_from(entry, defaults, f"{source} keys[{i}]")))
  else:
    for line in text.splitlines():
      key = line.strip()
      if key and not key.startswith("#"):
        clients.append(Client(f"key{len(clients)}", digest(key), defaults))
  digests = [c.digest for c in clients]
  if len(set(digests)) != len(digests):
    raise ValueError(f"{source}: a key is given twice")
  return clients


def load_keys(path: str | None, defaults: KeyLimits = KeyLimits(),
              environ: dict[str, str] | None = None) -> list[Client]:
  """Clients from `path` if given, else from $LMLIFE_API_KEYS (comma-separated); [] = none.

  Raises:
    OSError: an unreadable file. ValueError: see `parse_keys`.
  """
  if path:
    with open(path, encoding="utf-8") as f:
      return parse_keys(f.read(), defaults, path)
  value = (os.environ if environ is None else environ).get(ENV_VAR, "")
  return parse_keys("\n".join(value.split(",")), defaults, f"${ENV_VAR}")


class _Bucket:
  """A token bucket of `capacity` requests refilled at `rate` per second."""

  def __init__(self, capacity: float, rate: float, now: float):
    self.capacity, self.rate, self.level, self.at = capacity, rate, capacity, now

  def take(self, now: float) -> float:
    """Takes one request; returns 0, or the seconds until one is available."""
    self.level = min(self.capacity, self.level + (now - self.at) * self.rate)
    self.at = now
    if self.level >= 1.0:
      self.level -= 1.0
      return 0.0
    return (1.0 - self.level) / self.rate


@dataclasses.dataclass
class _Window:
  start: float
  used: int = 0


@dataclasses.dataclass(frozen=True)
class Reservation:
  """Tokens a running request holds against its key's quota (`AccessControl.settle`)."""
  client: Client
  tokens: int
  window_start: float


class AccessControl:
  """Authentication and per-key limits (module doc). Thread-safe.

  Args:
    clients: the configured keys ([] = an open server).
    limits: server-wide limits.
    clock: seconds, monotonic (tests pass a fake one).
  """

  def __init__(self, clients: list[Client], limits: ServerLimits = ServerLimits(),
               clock: Callable[[], float] = time.monotonic):
    self.clients, self.limits, self.clock = list(clients), limits, clock
    self._anonymous = Client(ANONYMOUS, "", limits.default_key_limits)
    self._buckets: dict[str, _Bucket] = {}
    self._windows: dict[str, _Window] = {}
    self._lock = threading.Lock()

  @property
  def open(self) -> bool:
    """True when no key is configured: every request is served."""
    return not self.clients

  def authenticate(self, authorization: str | None) -> Client:
    """The client of an `Authorization: Bearer <key>` header.

    Raises:
      APIError: 401 for a missing header or an unknown key (on a server with keys).
    """
    if self.open:
      return self._anonymous
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
      raise APIError(401, "Missing API key: send 'Authorization: Bearer <key>'",
                     code="invalid_api_key")
    presented = digest(key.strip())
    found = None
    for client in self.clients:  # every digest compared: the time does not depend on which
      if hmac.compare_digest(presented, client.digest):
        found = client
    if found is None:
      raise APIError(401, "Incorrect API key provided", code="invalid_api_key")
    return found

  def admit(self, client: Client) -> None:
    """Counts one request against the client's rate.

    Raises:
      APIError: 429 (with Retry-After) when its requests per minute are spent.
    """
    rpm = client.limits.requests_per_minute
    if not rpm:
      return
    with self._lock:
      now = self.clock()
      bucket = self._buckets.setdefault(client.digest, _Bucket(rpm, rpm / 60.0, now))
      wait = bucket.take(now)
    if wait:
      raise APIError(429, f"Rate limit reached for {client.name}: {rpm:g} requests per "
                     f"minute; retry in {wait:.1f} s", code="rate_limit_exceeded",
                     headers={"Retry-After": str(max(1, math.ceil(wait)))})

  def reserve(self, client: Client, tokens: int) -> Reservation:
    """Reserves `tokens` (prompt + max_tokens) of the client's quota for one request.

    Raises:
      APIError: 429 when the current window has less than `tokens` left.
    """
    quota, span = client.limits.tokens_per_window, client.limits.window_seconds
    with self._lock:
      now = self.clock()
      window = self._windows.get(client.digest)
      if window is None or now - window.start >= span:
        window = self._windows[client.digest] = _Window(now)
      if quota and window.used + tokens > quota:
        retry = max(1, math.ceil(window.start + span - now))
        raise APIError(429, f"Token quota reached for {client.name}: {window.used} of "
                       f"{quota} tokens used in this {span:g} s window and this request "
                       f"needs up to {tokens} (prompt + max_tokens); retry in {retry} s",
                       code="insufficient_quota", headers={"Retry-After": str(retry)})
      window.used += tokens
      return Reservation(client, tokens, window.start)

  def settle(self, reservation: Reservation, used: int) -> None:
    """Gives back the reserved tokens a finished request did not use (same window only)."""
    with self._lock:
      window = self._windows.get(reservation.client.digest)
      if window is not None and window.start == reservation.window_start:
        window.used -= max(0, reservation.tokens - used)

  def used_tokens(self, client: Client) -> int:
    """Tokens counted in the client's current window (for tests and logs)."""
    with self._lock:
      window = self._windows.get(client.digest)
      return window.used if window else 0
