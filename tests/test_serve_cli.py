"""`python -m serve` as a subprocess: one-line errors for bad input, and a real run on a
registry (keys from $LMLIFE_API_KEYS, a blocklist, feedback recorded in the registry, one log
line per request, a clean stop on SIGINT)."""

import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import openai
import pytest

from conftest import REPO_ROOT, run_cmd, subprocess_env
from serve.registry import Registry
from serve_fixtures import write_checkpoint

pytestmark = pytest.mark.cli
SERVE = [sys.executable, "-m", "serve"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  return write_checkpoint(str(tmp_path_factory.mktemp("serve_cli") / "lm"), seed=0)


def test_bad_input_is_one_error_line_and_exit_2(checkpoint, tmp_path):
  taken = socket.socket()
  taken.bind(("127.0.0.1", 0))
  taken.listen()
  cases = [
      ([], "exactly one of --checkpoint"),
      ([f"--checkpoint={checkpoint}", f"--registry={tmp_path}"], "exactly one of"),
      ([f"--checkpoint={tmp_path / 'none'}"], "does not exist"),
      ([f"--checkpoint={checkpoint}", f"--api_keys_file={tmp_path / 'k'}"], "no such file"),
      ([f"--registry={tmp_path}"], "no current version"),
      ([f"--checkpoint={checkpoint}", f"--port={taken.getsockname()[1]}"], "cannot listen"),
      ([f"--checkpoint={checkpoint}", "--slots=0"], "--slots=0"),
  ]
  try:
    for flags, cause in cases:
      out = run_cmd([*SERVE, *flags], timeout=120)
      lines = out.stdout.strip().splitlines()
      assert out.returncode == 2 and len(lines) == 1, (flags, out.stdout)
      assert lines[0].startswith("error: ") and cause in lines[0], (flags, lines)
  finally:
    taken.close()


def test_serves_a_registry_with_keys_blocklist_and_feedback(checkpoint, tmp_path):
  registry = Registry(str(tmp_path / "registry"))
  registry.register("v1", checkpoint)
  registry.promote("v1")
  (tmp_path / "block.txt").write_text("forbidden\n")
  log_path = tmp_path / "server.log"
  with open(log_path, "w") as log:
    proc = subprocess.Popen(
        [*SERVE, f"--registry={registry.root}", "--port=0", "--slots=4",
         f"--blocklist={tmp_path / 'block.txt'}"], cwd=REPO_ROOT, stdout=log,
        stderr=subprocess.STDOUT, env=subprocess_env(LMLIFE_API_KEYS="sk-a,sk-b"))
  try:
    deadline = time.monotonic() + 240
    while not re.search(r"on (http://\S+/v1)", log_path.read_text()):
      assert proc.poll() is None, log_path.read_text()
      assert time.monotonic() < deadline, log_path.read_text()
      time.sleep(0.2)
    url = re.search(r"on (http://\S+/v1)", log_path.read_text()).group(1)
    client = openai.OpenAI(base_url=url, api_key="sk-b", max_retries=0, timeout=60)
    ok = client.chat.completions.create(model="v1", messages=[{"role": "user",
                                                               "content": "hello"}],
                                        max_tokens=6, temperature=0)
    refused = client.completions.create(model="v1", prompt="a forbidden word", max_tokens=6)
    assert refused.choices[0].finish_reason == "content_filter"
    with pytest.raises(openai.AuthenticationError):
      client.with_options(api_key="sk-c").models.list()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  text = log_path.read_text()
  assert "Server stopped." in text and "safety: blocklist of 1 term(s)" in text
  request_lines = [line for line in text.splitlines() if "chatcmpl-" in line or "cmpl-" in line]
  assert len(request_lines) == 2 and ok.id in request_lines[0]
  assert "content_filter (refused: blocklist on input: term 'forbidden')" in request_lines[1]
  db = os.path.join(registry.root, "feedback.db")
  with sqlite3.connect(db) as con:
    rows = con.execute("SELECT id, version, output FROM completions ORDER BY created").fetchall()
  assert [r[0] for r in rows] == [ok.id, refused.id] and rows[0][1] == "v1"
  assert rows[0][2] == ok.choices[0].message.content
