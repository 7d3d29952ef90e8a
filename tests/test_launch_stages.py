"""launch/stages.py: a stage names its log when it starts and shows its progress lines while it
runs (a fake stage command stands in for a training run)."""

import os
import threading
import time

from launch.stages import Chain

# Progress, noise, then it waits for the test's go-ahead: so the test sees what was shown
# while the stage was still running.
FAKE_STAGE = """
import os, sys, time
print("Model: 5.3M parameters")
print("step 10/200 | loss 3.2100 | 4,100 tok/s | eta 35m", flush=True)
print("some noise the console does not need", flush=True)
deadline = time.time() + 20
while not os.path.exists({marker!r}) and time.time() < deadline:
  time.sleep(0.05)
print("eval step 200: {{'eval/loss': 2.9}}")
print("iter 3/24 | score 0.612 | kl 0.01")
print("  arc_easy: 6/12 requests | 3.0/s | eta 2s")
print("error: data.jsonl:3: field 'gold' is missing")
sys.exit(0 if os.path.exists({marker!r}) else 1)
"""


def _read_until(capsys, seen, needle, timeout=20.0):
  deadline = time.monotonic() + timeout
  while needle not in seen and time.monotonic() < deadline:
    time.sleep(0.05)
    seen += capsys.readouterr().out
  return seen


def test_a_stage_names_its_log_and_shows_progress_while_it_runs(tmp_path, capsys):
  marker = str(tmp_path / "go")
  chain = Chain(str(tmp_path / "run"), quiet_orbax=False)
  log = chain.log_path("pretrain")
  thread = threading.Thread(target=chain.ensure, daemon=True, kwargs=dict(
      name="pretrain", cmd=["-c", FAKE_STAGE.format(marker=marker)], done=lambda: False))
  thread.start()
  seen = _read_until(capsys, "", "[pretrain] step 10/200")
  # While the stage runs: its log is named and its first progress line is shown.
  assert f"pretrain: running, output in {log}" in seen
  assert "[pretrain] step 10/200 | loss 3.2100 | 4,100 tok/s | eta 35m" in seen, seen
  open(marker, "w").close()
  thread.join(timeout=30)
  assert not thread.is_alive()
  seen += capsys.readouterr().out
  for line in ("eval step 200: {'eval/loss': 2.9}", "iter 3/24 | score 0.612 | kl 0.01",
               "arc_easy: 6/12 requests | 3.0/s | eta 2s",
               "error: data.jsonl:3: field 'gold' is missing"):
    assert f"[pretrain] {line}" in seen, (line, seen)
  assert "[pretrain] some noise" not in seen and "[pretrain] Model:" not in seen
  assert "pretrain: done" in seen
  # The log has every line.
  with open(log) as f:
    text = f.read()
  assert "some noise the console does not need" in text and "Model: 5.3M" in text
  assert text.count("step 10/200") == 1 and os.path.exists(chain.path)
