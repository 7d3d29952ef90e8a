"""Shared test setup: 8 fake CPU devices, a tiny model fixture, run-config and subprocess helpers.

The environment variables below must be set before anything imports jax, which is why they
live at the top of conftest.py (pytest imports it before collecting any test module).
Subprocesses get an environment without XLA_FLAGS (`subprocess_env`) and set their device
count with --local_devices. A session-wide JAX compilation cache (a temporary directory,
removed at the end) is shared with the subprocesses, so the CLI runs of the same tiny
programs compile once.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
# One compilation cache for the session and its subprocesses: the CLI runs compile the same
# tiny programs again and again (~10 s each on a busy 2-core machine otherwise).
import tempfile  # noqa: E402
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="lmlife_jax_cache_")

import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any, Sequence  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = "pretrain/tinyshakespeare.txt"

# A small model for the CLI runs (the shakespeare_char config with a narrower, shallower model).
SMALL_MODEL_FLAGS = ("--config.model.num_layers=2", "--config.model.embed_dim=64",
                     "--config.model.mlp_dim=128")


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  if _OWN_CACHE:
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


# ---------------------------------------------------------------------------------- model
@pytest.fixture(scope="session")
def tiny_cfg():
  """ModelConfig.preset("tiny"): 2 layers, 64 wide, GQA 4/2, vocab 128, float32."""
  from model.config import ModelConfig
  return ModelConfig.preset("tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_cfg):
  """(model, pure params dict) of the tiny preset, built on the default device (seed 0)."""
  from flax import nnx
  from model.transformer import build_model
  model = build_model(tiny_cfg, seed=0)
  return model, nnx.to_pure_dict(nnx.state(model))


# ---------------------------------------------------------------------------------- configs
def tiny_run_config(data_path: str | None = None, **train_overrides: Any):
  """A run ConfigDict from `configs.common.base_config()` with tiny settings.

  Model: the `tiny` preset with vocab 0 (taken from the tokenizer). Data: `data_path`
  (absolute) or the real tiny Shakespeare, char tokenizer, seq_len 16. Mesh: data=-1.
  `train_overrides` update config.train (e.g. num_steps=4).
  """
  from configs import common
  config = common.base_config()
  config.model = common.model_config("tiny", vocab_size=0)
  config.data.path = data_path or SHAKESPEARE
  config.data.seq_len = 16
  config.data.tokenizer.model_type = "char"
  config.optim.warmup_steps = 2
  config.train.update(dict(batch_size=8, num_steps=4, log_every=1, eval_every=0,
                           eval_batch_size=8, checkpoint_every=0, async_checkpoint=False,
                           peak_flops=1e9))
  config.train.update(train_overrides)
  return config


def random_lm_batch(rng, batch: int, seq_len: int, vocab: int) -> dict:
  """A numpy LM batch (one document per row) with random tokens."""
  import numpy as np
  tokens = rng.integers(0, vocab, size=(batch, seq_len + 1)).astype(np.int32)
  return {
      "tokens": tokens[:, :-1],
      "targets": tokens[:, 1:],
      "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy(),
      "segment_ids": np.ones((batch, seq_len), np.int32),
      "loss_mask": np.ones((batch, seq_len), np.float32),
  }


# ---------------------------------------------------------------------------------- subprocesses
def subprocess_env(**extra: str) -> dict[str, str]:
  """Environment for `python -m ...` children: repo importable, no inherited fake devices."""
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # the child's device count comes from --local_devices
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env["TF_CPP_MIN_LOG_LEVEL"] = "2"
  env.update(extra)
  return env


def pretrain_cmd(workdir: str, *flags: str, config: str = "configs/pretrain/shakespeare_char.py",
                 local_devices: int | None = 2) -> list[str]:
  """`python -m train.pretrain` on a config file with extra flags.

  peak_flops is set so that runs skip measuring the CPU's matmul peak for MFU.
  `local_devices=None` leaves the device count to the environment (launch.local).
  """
  devices = [] if local_devices is None else [f"--local_devices={local_devices}"]
  return [sys.executable, "-m", "train.pretrain", f"--config={os.path.join(REPO_ROOT, config)}",
          f"--workdir={workdir}", *devices, "--config.train.peak_flops=1e9", *flags]


def run_cmd(cmd: Sequence[str], timeout: float = 300) -> subprocess.CompletedProcess:
  """Runs a command from the repo root, capturing stdout+stderr as text."""
  return subprocess.run(list(cmd), cwd=REPO_ROOT, env=subprocess_env(), timeout=timeout,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def start_cmd(cmd: Sequence[str], log_path: str) -> subprocess.Popen:
  """Starts a command in the background, output to `log_path`."""
  with open(log_path, "w") as log:  # the child keeps its own copy of the descriptor
    return subprocess.Popen(list(cmd), cwd=REPO_ROOT, env=subprocess_env(), stdout=log,
                            stderr=subprocess.STDOUT, text=True)


def kill_if_running(proc: subprocess.Popen) -> None:
  """SIGKILLs `proc` (one we started) if it is still running, and reaps it."""
  if proc.poll() is None:
    proc.kill()
    proc.wait()


def read_log(path: str) -> str:
  with open(path) as f:
    return f.read()


def finalized_steps(checkpoint_dir: str) -> list[int]:
  """Step directories Orbax has committed (renamed from their tmp name)."""
  if not os.path.isdir(checkpoint_dir):
    return []
  return sorted(int(n) for n in os.listdir(checkpoint_dir)
                if n.isdigit() and os.path.isdir(os.path.join(checkpoint_dir, n)))


def wait_for(predicate, proc: subprocess.Popen, timeout: float, what: str,
             log_path: str = "") -> None:
  """Polls `predicate` every 20 ms until true; fails if `proc` exits first or on timeout."""
  deadline = time.monotonic() + timeout
  while not predicate():
    if proc.poll() is not None:
      pytest.fail(f"process exited (rc={proc.returncode}) before {what}:\n"
                  f"{read_log(log_path)[-3000:] if log_path else ''}")
    if time.monotonic() > deadline:
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      pytest.fail(f"timed out waiting for {what}:\n{read_log(log_path)[-3000:]}")
    time.sleep(0.02)


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def train_losses(workdir: str) -> dict[int, float]:
  """step -> train/loss from metrics.jsonl (later records of a step win)."""
  return {r["step"]: r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r}


def eval_records(workdir: str) -> list[dict]:
  return [r for r in read_metrics(workdir) if "eval/loss" in r]


# The small CLI run shared by the checkpoint, resume, SIGTERM and multi-process tests:
# shakespeare_char with a 2 x 64 model, a 0.5% validation split (fast final eval), every step
# logged, a checkpoint every 10 steps.
REF_STEPS = 50
REF_FLAGS = (*SMALL_MODEL_FLAGS, f"--config.train.num_steps={REF_STEPS}",
             "--config.train.log_every=1", "--config.train.checkpoint_every=10",
             "--config.train.eval_every=0", "--config.train.eval_batch_size=16",
             "--config.data.val_fraction=0.005")


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
  """An uninterrupted CLI run (1 process, 2 local devices, mesh data=2): its workdir."""
  workdir = str(tmp_path_factory.mktemp("reference") / "run")
  out = run_cmd(pretrain_cmd(workdir, *REF_FLAGS))
  assert out.returncode == 0, out.stdout[-5000:]
  return workdir


# ---------------------------------------------------------------------------------- stage chain
@pytest.fixture(scope="session")
def base_run(tmp_path_factory):
  """A 40-step shakespeare_char pretraining run (char tokenizer without chat markers): the
  parent of the SFT and LoRA stage tests."""
  workdir = str(tmp_path_factory.mktemp("base") / "run")
  out = run_cmd(pretrain_cmd(workdir, *SMALL_MODEL_FLAGS, "--config.train.num_steps=40",
                             "--config.train.eval_every=0", "--config.data.val_fraction=0.005"))
  assert out.returncode == 0, out.stdout[-3000:]
  return workdir


SFT_FLAGS = ("--config.train.num_steps=30", "--config.train.eval_every=30",
             "--config.optim.lr=3e-3", "--config.optim.warmup_steps=5",
             "--config.sample_every=30")


def sft_cmd(workdir: str, init_from: str, *flags: str) -> list[str]:
  """`python -m train.sft` with the chat config's runlocal variant."""
  return [sys.executable, "-m", "train.sft", "--config=configs/sft/chat.py:runlocal=true",
          f"--workdir={workdir}", f"--config.init_from={init_from}", "--local_devices=2",
          "--config.train.peak_flops=1e9", *flags]


@pytest.fixture(scope="session")
def english_sft_run(tmp_path_factory):
  """The documented chain at smoke size: english_bpe base (BPE with the chat markers
  reserved), then SFT on the shared instruction data. Returns (sft workdir, SFT stdout);
  shared by the SFT and reward-model tests."""
  base = str(tmp_path_factory.mktemp("english") / "base")
  out = run_cmd(pretrain_cmd(base, config="configs/pretrain/english_bpe.py:runlocal=true"))
  assert out.returncode == 0, out.stdout[-3000:]
  workdir = str(tmp_path_factory.mktemp("english") / "sft")
  out = run_cmd(sft_cmd(workdir, base, *SFT_FLAGS))
  assert out.returncode == 0, out.stdout[-5000:]
  return workdir, out.stdout


def _subset_file(path, n=48):
  """The first n HH pairs with short transcripts (they fit 128 tokens whole)."""
  import gzip
  from data.readers import resolve_data_path
  with gzip.open(resolve_data_path("preference/hh_rlhf_harmless_base_test_shared.jsonl.gz"),
                 "rt") as f:
    records = [json.loads(line) for line in f]
  short = [r for r in records if max(len(r["chosen"]), len(r["rejected"])) < 300][:n]
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in short)
  return str(path)


def reward_cmd(workdir, init_from, *flags):
  return [sys.executable, "-m", "rlhf.reward", "--config=configs/reward/hh.py:runlocal=true",
          f"--workdir={workdir}", f"--config.init_from={init_from}", "--local_devices=2",
          "--config.train.peak_flops=1e9", *flags]


@pytest.fixture(scope="session")
def english_rm_run(english_sft_run, tmp_path_factory):
  """40 steps on 48 short HH pairs (25% of prompts held out), from the smoke SFT model."""
  sft, _ = english_sft_run
  tmp = tmp_path_factory.mktemp("rm")
  data = _subset_file(tmp / "pairs.jsonl")
  workdir = str(tmp / "run")
  out = run_cmd(reward_cmd(workdir, sft, f"--config.data.sources={data}",
                           "--config.data.val_fraction=0.25", "--config.data.seq_len=128",
                           "--config.model.max_seq_len=128", "--config.train.num_steps=40",
                           "--config.train.eval_every=20", "--config.train.log_every=10",
                           "--config.train.checkpoint_every=40", "--config.optim.lr=3e-3"))
  assert out.returncode == 0, out.stdout[-5000:]
  return workdir, data, out.stdout


# ---------------------------------------------------------------------------------- tiers
# Fixtures that run entry points as subprocesses: a test that uses one (directly or through
# another fixture) is in the `cli` tier (pytest.ini). Module-level ones too: interrupted_run
# (test_train_pretrain_cli.py).
CLI_FIXTURES = {"reference_run", "english_sft_run", "english_rm_run", "base_run",
                "interrupted_run"}


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m deselection
def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    if CLI_FIXTURES & set(getattr(item, "fixturenames", ())):
      item.add_marker(pytest.mark.cli)


# ---------------------------------------------------------------------------------- goldens
def pytest_addoption(parser):
  parser.addoption("--regen-golden", action="store_true", default=False,
                   help="Rewrite the golden files (tests/golden/) instead of comparing.")


@pytest.fixture
def regen_golden(request) -> bool:
  return bool(request.config.getoption("--regen-golden")) or \
      os.environ.get("LM_REGEN_GOLDEN") == "1"
