"""The command line every training entry point shares (train/entry.py), run as the user would.

Failure 3: bad input printed 10-57 traceback frames; now one `error:` line, exit code 2 and
nothing written. Failure 13: Orbax, absl and TensorFlow lines filled the console, and
`--help` never listed --config or --workdir.
"""

from __future__ import annotations

import os
import re
import sys

import pytest

from conftest import SMALL_MODEL_FLAGS, pretrain_cmd, run_cmd

pytestmark = pytest.mark.cli

STAGES = ("train.pretrain", "train.sft", "rlhf.reward", "rlhf.dpo", "rlhf.ppo")
CONFIGS = {"train.pretrain": "configs/pretrain/shakespeare_char.py",
           "train.sft": "configs/sft/chat.py", "rlhf.reward": "configs/reward/hh.py",
           "rlhf.dpo": "configs/dpo/hh.py", "rlhf.ppo": "configs/ppo/hh.py"}
# Lines a training run prints: its own progress and reports, nothing from the libraries.
OWN_LINE = re.compile(r"^(step \d+/\d+ \||First call |eval step \d+: |Model: |attention: |Resumed from |"
                      r"Initialised params from )")


@pytest.mark.parametrize("module", STAGES)
def test_help_is_short_and_lists_the_run_flags(module):
  out = run_cmd([sys.executable, "-m", module, "--help"], timeout=120)
  text = out.stdout
  for flag in ("--config:", "--workdir:", "--[no]verbose:", "--coordinator_address:"):
    assert flag in text, text[-3000:]
  assert len(text.splitlines()) < 80, text  # not absl's hundreds of library flags
  assert "Traceback (most recent call last)" not in text


@pytest.mark.parametrize("module", STAGES)
def test_bad_input_is_one_error_line_and_writes_nothing(module, tmp_path):
  workdir = tmp_path / "run"
  for flags, needle in ((("--config.optim.lrr=1",), "--config.optim.lrr: the config has no "
                                                    "field 'lrr' (did you mean lr?)"),
                        (("--config.init_from=/nonexistent",), "/nonexistent")):
    if module == "train.pretrain" and "init_from" in flags[0]:
      flags, needle = ("--config.data.path=/nonexistent.txt",), "/nonexistent.txt"
    out = run_cmd([sys.executable, "-m", module, f"--config={CONFIGS[module]}",
                   f"--workdir={workdir}", "--local_devices=2", *flags], timeout=180)
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 2, out.stdout[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
    assert not workdir.exists()


def test_a_training_run_prints_only_its_own_lines(tmp_path):
  out = run_cmd(pretrain_cmd(str(tmp_path / "run"), *SMALL_MODEL_FLAGS,
                             "--config.train.num_steps=4", "--config.train.log_every=2",
                             "--config.data.val_fraction=0.005",
                             "--config.train.eval_batch_size=16"), timeout=300)
  assert out.returncode == 0, out.stdout[-3000:]
  noise = [line for line in out.stdout.splitlines() if not OWN_LINE.match(line)]
  assert not noise, noise
  assert os.path.exists(tmp_path / "run" / "config.json")


def test_hf_export_prints_one_line(english_sft_run, tmp_path):
  # Failure 13 also counted 73 library lines of 83 in `train.hf_convert export`.
  out = run_cmd([sys.executable, "-m", "train.hf_convert", "export",
                 f"--checkpoint={english_sft_run[0]}", f"--out={tmp_path / 'hf'}"], timeout=300)
  assert out.returncode == 0, out.stdout[-3000:]
  assert out.stdout.strip().splitlines() == [
      f"Wrote {tmp_path / 'hf'}: LlamaForCausalLM 2 layers x 64, vocab 1024"], out.stdout
