"""Tests for serve/auth.py: key files (lines, JSON with limits, environment), keys held only
as digests, the request-rate token bucket and the token quota (on a fake clock)."""

import json

import pytest

from serve.auth import (AccessControl, KeyLimits, ServerLimits, digest, load_keys,
                        parse_keys)
from serve.schemas import APIError


class Clock:
  def __init__(self):
    self.now = 1000.0

  def __call__(self):
    return self.now


def test_key_file_forms(tmp_path):
  lines = tmp_path / "keys.txt"
  lines.write_text("# team keys\nsk-a\n\n  sk-b  \n")
  clients = load_keys(str(lines), KeyLimits(requests_per_minute=5))
  assert [c.digest for c in clients] == [digest("sk-a"), digest("sk-b")]
  assert all(c.limits.requests_per_minute == 5 for c in clients)
  js = tmp_path / "keys.json"
  js.write_text(json.dumps({"defaults": {"tokens_per_window": 100},
                            "keys": [{"key": "sk-c", "name": "carol", "requests_per_minute": 2},
                                     {"key": "sk-d"}]}))
  carol, other = load_keys(str(js))
  assert carol.name == "carol" and carol.limits == KeyLimits(2, 100, 60.0)
  assert other.limits == KeyLimits(0, 100, 60.0)
  env = load_keys(None, environ={"LMLIFE_API_KEYS": "sk-e, sk-f"})
  assert [c.digest for c in env] == [digest("sk-e"), digest("sk-f")]
  assert load_keys(None, environ={}) == []


@pytest.mark.parametrize("text,cause", [
    ('{"keys": [{"name": "x"}]}', "non-empty string 'key'"),
    ('{"keys": [{"key": "a", "rpm": 3}]}', "unknown field"),
    ('{"keys": [{"key": "a", "requests_per_minute": -1}]}', ">= 0"),
    ("sk-a\nsk-a\n", "given twice"),
    ('{"keys": [', "not valid JSON"),
])
def test_bad_key_files_are_named_errors(text, cause):
  with pytest.raises(ValueError, match=cause) as e:
    parse_keys(text, KeyLimits(), "keys.json")
  assert "keys.json" in str(e.value) and "sk-a" not in str(e.value)


def test_keys_are_held_as_digests_and_checked():
  access = AccessControl(parse_keys("sk-secret-1\nsk-secret-2", KeyLimits(), "t"))
  held = repr(vars(access)) + repr(access.clients)
  assert "sk-secret" not in held and digest("sk-secret-1") in held
  assert access.authenticate("Bearer sk-secret-2").name == "key1"
  for header in (None, "", "Bearer", "Basic sk-secret-1", "Bearer sk-secret-3"):
    with pytest.raises(APIError) as e:
      access.authenticate(header)
    assert e.value.status == 401 and e.value.type == "authentication_error"


def test_an_open_server_serves_everyone_under_the_default_limits():
  access = AccessControl([], ServerLimits(default_key_limits=KeyLimits(requests_per_minute=1)))
  assert access.open
  client = access.authenticate(None)
  access.admit(client)
  with pytest.raises(APIError):
    access.admit(access.authenticate("Bearer anything"))


def test_request_rate_is_a_token_bucket():
  clock = Clock()
  (client,) = parse_keys("k", KeyLimits(requests_per_minute=3), "t")
  access = AccessControl([client], clock=clock)
  for _ in range(3):  # a burst of a minute's requests
    access.admit(client)
  with pytest.raises(APIError) as e:
    access.admit(client)
  assert e.value.status == 429 and e.value.code == "rate_limit_exceeded"
  assert e.value.headers["Retry-After"] == "20"  # one request per 20 s
  clock.now += 20
  access.admit(client)
  with pytest.raises(APIError):
    access.admit(client)


def test_token_quota_reserves_then_settles_per_window():
  clock = Clock()
  (client,) = parse_keys("k", KeyLimits(tokens_per_window=100, window_seconds=60), "t")
  access = AccessControl([client], clock=clock)
  first = access.reserve(client, 60)
  with pytest.raises(APIError) as e:  # 60 held + 50 > 100, even before the first ends
    access.reserve(client, 50)
  assert e.value.status == 429 and e.value.code == "insufficient_quota"
  access.settle(first, 30)  # it used 30 of its 60
  assert access.used_tokens(client) == 30
  second = access.reserve(client, 70)
  access.settle(second, 70)
  with pytest.raises(APIError):
    access.reserve(client, 1)
  clock.now += 60  # a new window
  access.reserve(client, 100)
  access.settle(second, 0)  # a reservation of an older window changes nothing
  assert access.used_tokens(client) == 100
