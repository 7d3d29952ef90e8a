"""Checkpoint and resume through the real entry point, `python -m train.pretrain`.

All runs are the shakespeare_char config with a 2 x 64 model (see conftest.REF_FLAGS), one
process with 2 local CPU devices (mesh data=2). The uninterrupted `reference_run` is the
ground truth; the tests check that
  - a run killed with SIGKILL after a checkpoint, resumed, then stopped with SIGTERM and
    resumed again logs exactly the reference's per-step losses;
  - SIGTERM saves the current step and exits cleanly;
  - a corrupted newest step is skipped with a message and the previous one restored; a
    half-written tmp step directory is never restored;
  - the data=2 checkpoint restores onto fsdp=2 and onto one device with equal parameters;
  - a checkpoint of a different model is refused (resume and init_from), naming the field;
  - an unknown config field on the command line is an error naming it.
"""

import glob
import json
import os
import re
import shutil
import signal

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import (REF_FLAGS, REF_STEPS, finalized_steps, kill_if_running, pretrain_cmd,
                      read_log, run_cmd, start_cmd, train_losses, wait_for)
from model.config import ModelConfig
from train import checkpoint as ckpt_lib
from train.loop import PREEMPTED_EXIT_CODE
from train.losses import lm_loss
from train.trainer import Trainer


def _assert_same_losses(workdir, reference, steps=None, tol=1e-6):
  got, want = train_losses(workdir), train_losses(reference)
  steps = sorted(want) if steps is None else steps
  diffs = {s: (got.get(s), want[s]) for s in steps
           if s not in got or abs(got[s] - want[s]) > tol}
  assert not diffs, f"(resumed, reference) losses differ at steps {diffs}"


def _logged_step_count(log_path):
  return max([int(m) for m in re.findall(r"^step (\d+)/", read_log(log_path), re.M)] or [0])


def _signal_after_progress(cmd, log, step, sig):
  """Starts `cmd` (a resume), sends `sig` once it logged `step`; returns its exit code."""
  proc = start_cmd(cmd, log)
  try:
    wait_for(lambda: _logged_step_count(log) >= step, proc, 300, "progress after resuming",
             log)
    proc.send_signal(sig)
    return proc.wait(timeout=120)
  finally:
    kill_if_running(proc)


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory):
  """SIGKILL after the first finalized checkpoint, resume + SIGTERM, resume + Ctrl-C
  (SIGINT), resume to the end."""
  root = tmp_path_factory.mktemp("interrupted")
  workdir = str(root / "run")
  ckdir = os.path.join(workdir, "checkpoints")
  cmd = pretrain_cmd(workdir, *REF_FLAGS)
  info = {"workdir": workdir, "logs": [str(root / f"attempt{i}.log") for i in range(3)]}

  proc = start_cmd(cmd, info["logs"][0])
  try:
    wait_for(lambda: finalized_steps(ckdir), proc, 300, "a finalized checkpoint",
             info["logs"][0])
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  finally:
    kill_if_running(proc)
  info["killed_rc"] = proc.returncode
  info["steps_after_kill"] = finalized_steps(ckdir)

  info["sigterm_rc"] = _signal_after_progress(
      cmd, info["logs"][1], info["steps_after_kill"][-1] + 3, signal.SIGTERM)
  info["steps_after_sigterm"] = finalized_steps(ckdir)

  info["sigint_log"] = str(root / "attempt_sigint.log")  # Ctrl-C: the same as SIGTERM
  info["sigint_rc"] = _signal_after_progress(
      cmd, info["sigint_log"], info["steps_after_sigterm"][-1] + 2, signal.SIGINT)
  info["steps_after_sigint"] = finalized_steps(ckdir)

  out = run_cmd(cmd)
  with open(info["logs"][2], "w") as f:
    f.write(out.stdout)
  info["final_rc"] = out.returncode
  return info


def test_sigterm_saves_the_current_step_and_exits(interrupted_run):
  log = read_log(interrupted_run["logs"][1])
  assert interrupted_run["sigterm_rc"] == PREEMPTED_EXIT_CODE, log[-3000:]
  resumed_at = interrupted_run["steps_after_kill"][-1]
  assert f"Resumed from {interrupted_run['workdir']}/checkpoints/{resumed_at}" in log
  saved = [s for s in interrupted_run["steps_after_sigterm"] if s > resumed_at]
  assert saved, f"no checkpoint after SIGTERM: {interrupted_run['steps_after_sigterm']}\n{log}"
  assert f"SIGTERM: saved checkpoint at step {saved[-1]}; stopping." in log
  assert saved[-1] < REF_STEPS, "the run finished before SIGTERM arrived"
  assert f"step {saved[-1] + 1}/" not in log  # stopped right after that step


def test_ctrl_c_saves_the_current_step_and_exits_as_preempted(interrupted_run):
  # Failure 12: Ctrl-C printed a traceback and saved nothing; a preempted run exited 0.
  log = read_log(interrupted_run["sigint_log"])
  assert interrupted_run["sigint_rc"] == PREEMPTED_EXIT_CODE, log[-3000:]
  assert "Traceback" not in log, log[-3000:]
  saved = [s for s in interrupted_run["steps_after_sigint"]
           if s > interrupted_run["steps_after_sigterm"][-1]]
  assert saved and f"SIGINT: saved checkpoint at step {saved[-1]}; stopping." in log, log


def test_killed_and_resumed_run_logs_the_reference_losses(interrupted_run, reference_run):
  assert interrupted_run["killed_rc"] == -signal.SIGKILL
  assert interrupted_run["final_rc"] == 0, read_log(interrupted_run["logs"][2])[-3000:]
  assert finalized_steps(os.path.join(interrupted_run["workdir"], "checkpoints"))[-1] == \
      REF_STEPS
  # Every step's loss, logged by three processes, equals the uninterrupted run's.
  _assert_same_losses(interrupted_run["workdir"], reference_run,
                      steps=sorted(train_losses(reference_run)))
  assert sorted(train_losses(interrupted_run["workdir"])) == sorted(train_losses(reference_run))
  # Records the killed attempt wrote past its checkpoint were dropped on resume, not repeated.
  logged = [r["step"] for r in _records(interrupted_run["workdir"]) if "train/loss" in r]
  assert logged == sorted(set(logged)), "metrics.jsonl repeats steps after resuming"
  final = [r for r in _records(interrupted_run["workdir"]) if "eval/loss" in r]
  want = [r for r in _records(reference_run) if "eval/loss" in r]
  assert final[-1]["eval/loss"] == pytest.approx(want[-1]["eval/loss"], abs=1e-6)


def test_every_step_is_logged_with_log_every_1(reference_run):
  # log_every=1 promises a train/loss record per step, the first one included.
  assert sorted(train_losses(reference_run)) == list(range(1, REF_STEPS + 1))


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def _copy_run(src, dst):
  shutil.copytree(src, dst, ignore=shutil.ignore_patterns("tensorboard"))
  return str(dst)


def test_corrupted_newest_step_is_skipped_and_tmp_dirs_never_restored(reference_run, tmp_path):
  workdir = _copy_run(reference_run, tmp_path / "run")
  ckdir = os.path.join(workdir, "checkpoints")
  newest, previous = finalized_steps(ckdir)[-1], finalized_steps(ckdir)[-2]
  # A leftover of an interrupted save of a later step: readable content under a tmp name.
  shutil.copytree(os.path.join(ckdir, str(newest)),
                  os.path.join(ckdir, f"{newest + 10}.orbax-checkpoint-tmp-1712345678"))
  files = glob.glob(os.path.join(ckdir, str(newest), "params", "**", "d", "*"), recursive=True)
  assert files
  for f in files:
    with open(f, "wb") as fh:
      fh.write(b"\0garbage" * 64)
  out = run_cmd(pretrain_cmd(workdir, *REF_FLAGS))
  assert f"checkpoint step {newest} in {ckdir} is unreadable" in out.stdout, out.stdout[-3000:]
  assert f"Resumed from {ckdir}/{previous}\n" in out.stdout, out.stdout[-3000:]
  assert out.returncode == 0, out.stdout[-3000:]
  _assert_same_losses(workdir, reference_run, steps=list(range(previous + 1, newest + 1)))


def _trainer_on(workdir, mesh, devices, src, init_from="", flatten_update=None, **model_overrides):
  """A Trainer for the reference run's config and model, on another mesh."""
  with open(os.path.join(src, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  config.mesh.shape.update(dict(zip(("data", "fsdp", "tensor"), mesh)))
  config.init_from = init_from
  if flatten_update is not None:
    config.optim.flatten_update = flatten_update
  meta = ckpt_lib.read_metadata(src)
  model_cfg = ModelConfig.from_dict(meta["model_config"]).replace(**model_overrides)
  return Trainer(config, str(workdir), model_cfg, lm_loss, devices=devices)


def _host(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


@pytest.fixture(scope="module")
def restored_on_one_device(reference_run, tmp_path_factory):
  """The reference run (data=2 over 2 devices) resumed by a Trainer on one device, and its
  validation metrics recomputed from the restored parameters."""
  from data.lm_pipeline import build_lm_pipelines
  from data.documents import load_split_documents
  from data.tokenizer import Tokenizer
  workdir = _copy_run(reference_run, tmp_path_factory.mktemp("one") / "run")
  trainer = _trainer_on(workdir, (1, 1, 1), jax.devices()[:1], reference_run)
  state, data_state = trainer.restore_or_init()
  assert data_state is not None
  config = trainer.config
  tokenizer = Tokenizer.from_file(os.path.join(reference_run, "tokenizer.model"))
  _, val_set = build_lm_pipelines(config.data, tokenizer, global_batch_size=config.train.batch_size,
                                  documents=load_split_documents(config.data))
  metrics = trainer.evaluate(state.params, val_set(config.train.eval_batch_size))
  trainer.close()
  return _host(state), metrics


def test_data_parallel_checkpoint_resumes_on_one_device(reference_run, restored_on_one_device):
  meta = ckpt_lib.read_metadata(reference_run)
  assert meta["config"]["mesh"]["shape"]["data"] == -1  # saved by a data=2 run (2 devices)
  assert meta["process_count"] == 1 and meta["step"] == REF_STEPS
  state, metrics = restored_on_one_device
  assert int(state.step) == REF_STEPS
  # The restored parameters are the trained ones: on one device they give the final eval
  # loss the 2-device run logged.
  logged = [r for r in _records(reference_run) if "eval/loss" in r][-1]
  assert logged["step"] == REF_STEPS
  assert metrics["loss"] == pytest.approx(logged["eval/loss"], abs=1e-5)
  assert metrics["tokens"] == logged["eval/tokens"]


def test_data_parallel_checkpoint_restores_onto_fsdp(reference_run, restored_on_one_device,
                                                     tmp_path):
  # The run used flatten_update=True (one replicated optimizer vector), which only works on
  # replicated meshes; the fsdp run takes the parameters (init_from) with a per-array
  # optimizer instead.
  trainer = _trainer_on(tmp_path / "run", (1, 2, 1), jax.devices()[2:4], reference_run,
                        init_from=reference_run, flatten_update=False)
  state, _ = trainer.restore_or_init()
  trainer.close()
  wqkv = state.params["blocks"][0]["attn"]["wqkv"]  # the config stores Q/K/V fused
  assert wqkv.sharding.spec == P("fsdp", "tensor", None, None)  # tensor has size 1 here
  assert {s.data.shape for s in wqkv.addressable_shards} == {(32, 4, 3, 16)}
  assert {d.id for d in wqkv.sharding.device_set} == {2, 3}
  emb = state.params["embedding"]
  assert emb.sharding.spec == P("tensor", "fsdp")
  assert {s.data.shape for s in emb.addressable_shards} == {(emb.shape[0], 32)}
  jax.tree.map(np.testing.assert_array_equal, _host(state.params), restored_on_one_device[0].params)
  assert trainer.parent["step"] == REF_STEPS
  assert trainer.parent["path"].endswith(f"checkpoints/{REF_STEPS}")
  assert int(state.step) == 0 and not np.any(_host(state.opt_state[1][0].mu["embedding"]))


def test_resume_refuses_a_checkpoint_of_a_different_model_naming_the_field(reference_run,
                                                                          tmp_path):
  workdir = _copy_run(reference_run, tmp_path / "resume")
  trainer = _trainer_on(workdir, (1, 1, 1), jax.devices()[:1], reference_run, num_layers=3)
  with pytest.raises(ckpt_lib.CheckpointError, match=r"num_layers: checkpoint=2 config=3"):
    trainer.restore_or_init()
  trainer.close()


def test_resume_with_a_different_optimizer_layout_fails_without_destroying_checkpoints(
    reference_run, tmp_path):
  # The reference run used flatten_update=True (one flat Adam vector). Resuming it with
  # flatten_update=False is a config mistake, not a corrupted checkpoint: it must be refused
  # with a CheckpointError, and every step must still be there for the corrected command.
  workdir = _copy_run(reference_run, tmp_path / "run")
  ckdir = os.path.join(workdir, "checkpoints")
  before = finalized_steps(ckdir)
  trainer = _trainer_on(workdir, (1, 1, 1), jax.devices()[:1], reference_run,
                        flatten_update=False)
  try:
    with pytest.raises(ckpt_lib.CheckpointError):
      trainer.restore_or_init()
  finally:
    trainer.close()
  assert finalized_steps(ckdir) == before, sorted(os.listdir(ckdir))
  trainer = _trainer_on(workdir, (1, 1, 1), jax.devices()[:1], reference_run)  # corrected
  state, _ = trainer.restore_or_init()
  trainer.close()
  assert int(state.step) == before[-1]


def test_init_from_refuses_a_checkpoint_of_a_different_model_naming_the_field(reference_run,
                                                                             tmp_path):
  trainer = _trainer_on(tmp_path / "init", (1, 1, 1), jax.devices()[:1], reference_run,
                        init_from=reference_run, num_layers=3)
  with pytest.raises(ckpt_lib.CheckpointError, match=r"num_layers: checkpoint=2 config=3"):
    trainer.restore_or_init()
  trainer.close()


@pytest.mark.cli
def test_unknown_config_field_on_the_command_line_names_it(tmp_path):
  # Failure 3: 18 traceback frames for the README's own example.
  out = run_cmd(pretrain_cmd(str(tmp_path / "run"), "--config.optim.lrr=1"), timeout=120)
  assert out.returncode == 2
  assert out.stdout.strip().splitlines() == [
      "error: --config.optim.lrr: the config has no field 'lrr' (did you mean lr?)"], out.stdout
  assert not os.path.exists(tmp_path / "run")


def test_a_refused_resume_writes_nothing(reference_run, tmp_path):
  # Failure 6: a refused resume with another model shape overwrote the run's config.json.
  workdir = _copy_run(reference_run, tmp_path / "run")
  before = {n: open(os.path.join(workdir, n), "rb").read() for n in ("config.json",
                                                                      "metrics.jsonl")}
  listing = sorted(os.listdir(workdir))
  out = run_cmd(pretrain_cmd(workdir, *REF_FLAGS, "--config.model.num_layers=3"), timeout=120)
  assert out.returncode == 2, out.stdout[-3000:]
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: Checkpoint ") and \
      "num_layers: checkpoint=2 config=3" in lines[0], out.stdout[-3000:]
  assert sorted(os.listdir(workdir)) == listing
  for name, data in before.items():
    assert open(os.path.join(workdir, name), "rb").read() == data, name
