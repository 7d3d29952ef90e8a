"""launch/tpu_vm.py: the exact gcloud commands of a pod run (dry run) and the preflight."""

import io
import os
import subprocess

import pytest

from conftest import REPO_ROOT
from launch import tpu_vm

TPU = {"name": "lm-pod", "zone": "us-east5-a", "project": "my-proj",
       "accelerator_type": "v5p-64"}
ENTRY = ["-m", "train.pretrain", "--config=configs/pretrain/llama_1b.py",
         "--workdir=gs://my-bucket/runs/llama_1b", "--config.optim.lr=0.0001"]
SSH = ["gcloud compute tpus tpu-vm ssh lm-pod --zone=us-east5-a --project=my-proj"]


def _dry(action, entry=(), **kw):
  out = io.StringIO()
  tpu_vm.execute(action, dict(TPU), list(entry), dry_run=True, out=out, **kw)
  return out.getvalue().splitlines()


@pytest.fixture
def credentials(tmp_path, monkeypatch):
  key = tmp_path / "key.json"
  key.write_text("{}")
  monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))


def test_host_layouts():
  assert tpu_vm.host_layout("v5p-64") == (8, 4)      # 32 chips, 4 per host
  assert tpu_vm.host_layout("v4-8") == (1, 4)
  assert tpu_vm.host_layout("v4-32") == (4, 4)
  assert tpu_vm.host_layout("v5litepod-8") == (1, 8)
  assert tpu_vm.host_layout("v5litepod-16") == (4, 4)
  assert tpu_vm.host_layout("v6e-256") == (64, 4)
  assert tpu_vm.host_layout("v3-32") == (4, 8)
  with pytest.raises(tpu_vm.PreflightError, match="Unknown accelerator type 'v9-8'"):
    tpu_vm.host_layout("v9-8")


def test_dry_run_of_a_pod_run_prints_exactly_these_commands(credentials):
  lines = _dry("run", ENTRY, run_name_="llama")
  assert lines == [
      # Preflight on every worker: host, code revision, workdir probe.
      SSH[0] + " --worker=all '--command=cd ~/lmlife && echo \"$(hostname) $(cat REVISION "
      "2>/dev/null || echo none) $(~/lmlife-venv/bin/python -m train.storage "
      "gs://my-bucket/runs/llama_1b 2>&1 | tail -n 1)\"'",
      # The entry point on every worker, detached, with jax.distributed auto-detection.
      SSH[0] + " --worker=all '--command=mkdir -p ~/lmlife-logs && cd ~/lmlife && nohup "
      "~/lmlife-venv/bin/python -m train.pretrain --config=configs/pretrain/llama_1b.py "
      "--workdir=gs://my-bucket/runs/llama_1b --config.optim.lr=0.0001 --distributed_auto > "
      "~/lmlife-logs/llama.log 2>&1 < /dev/null &'",
      SSH[0] + " --worker=0 '--command=tail -n +1 -f ~/lmlife-logs/llama.log'",
  ]


def test_dry_run_of_create_setup_stop_delete():
  assert _dry("create") == [
      "gcloud compute tpus tpu-vm create lm-pod --zone=us-east5-a --project=my-proj "
      "--accelerator-type=v5p-64 --version=v2-alpha-tpuv5"]
  assert _dry("create", spot=True)[0].endswith(" --spot")
  rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                       text=True, check=True).stdout.strip()
  archive = f"/tmp/lmlife-{rev[:12]}.tar.gz"
  assert _dry("setup") == [
      f"git archive --format=tar.gz --output={archive} {rev}",
      f"gcloud compute tpus tpu-vm scp {archive} 'lm-pod:~/lmlife-{rev[:12]}.tar.gz' "
      "--zone=us-east5-a --project=my-proj --worker=all",
      SSH[0] + " --worker=all '--command=rm -rf ~/lmlife && mkdir -p ~/lmlife ~/lmlife-logs && "
      f"tar -xzf ~/lmlife-{rev[:12]}.tar.gz -C ~/lmlife && echo {rev} > ~/lmlife/REVISION && "
      "python3 -m venv ~/lmlife-venv && ~/lmlife-venv/bin/pip install -q --upgrade pip && "
      "~/lmlife-venv/bin/pip install -q -e \"$HOME/lmlife[tpu]\"'"]
  assert _dry("stop") == [SSH[0] + " --worker=all '--command=pkill -TERM -f "
                          "'\"'\"'~/lmlife-venv/bin/python'\"'\"' || true'"]
  assert _dry("delete") == ["gcloud compute tpus tpu-vm delete lm-pod --zone=us-east5-a "
                            "--project=my-proj --quiet"]
  assert _dry("logs", run_name_="llama", worker="all") == [
      SSH[0] + " --worker=all '--command=tail -n +1 -f ~/lmlife-logs/llama.log'"]


def test_preflight_rejects_a_mesh_that_does_not_match_the_hosts(credentials):
  # fsdp=16 x data=1 is 16 devices; a v5p-64 slice has 8 hosts x 4 chips = 32.
  entry = ENTRY + ["--config.mesh.shape.fsdp=16"]
  with pytest.raises(tpu_vm.PreflightError) as e:
    _dry("run", entry, run_name_="x")
  message = str(e.value)
  assert "'fsdp': 16" in message and "v5p-64: 8 host(s) x 4 devices = 32 devices" in message
  # Tensor parallelism across hosts, and a batch the data-parallel size does not divide.
  with pytest.raises(tpu_vm.PreflightError, match="tensor=8 across hosts"):
    _dry("run", ENTRY + ["--config.mesh.shape.tensor=8"], run_name_="x")
  with pytest.raises(tpu_vm.PreflightError, match=r"train.batch_size=500 is not divisible by "
                     r"the data-parallel size 32"):
    _dry("run", ENTRY + ["--config.train.batch_size=500"], run_name_="x")
  with pytest.raises(ValueError, match="no 'lrr' in optim"):
    _dry("run", ENTRY + ["--config.optim.lrr=1"], run_name_="x")


def test_gs_workdir_without_credentials_stops_before_any_command(monkeypatch, tmp_path):
  monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
  monkeypatch.setenv("HOME", str(tmp_path))
  monkeypatch.delenv("CLOUDSDK_CONFIG", raising=False)
  monkeypatch.delenv("GCE_METADATA_HOST", raising=False)
  out = io.StringIO()
  if os.path.exists("/sys/class/dmi/id/product_name") and \
      "Google" in open("/sys/class/dmi/id/product_name").read():
    pytest.fail("This test needs a machine outside Google Cloud")
  with pytest.raises(tpu_vm.PreflightError, match="no Google Cloud credentials"):
    tpu_vm.execute("run", dict(TPU), ENTRY, dry_run=True, out=out, run_name_="x")
  assert out.getvalue() == ""  # nothing was printed, let alone run


def test_remote_preflight_output_is_checked():
  rev = "a" * 40
  good = "\n".join(f"host{i} {rev} writable" for i in range(8))
  tpu_vm.check_remote_output(good, 8, rev, "gs://b/x")
  with pytest.raises(tpu_vm.PreflightError, match="7 worker"):
    tpu_vm.check_remote_output("\n".join(good.splitlines()[:7]), 8, rev, "gs://b/x")
  with pytest.raises(tpu_vm.PreflightError, match="Code revisions differ"):
    tpu_vm.check_remote_output(good.replace(f"host3 {rev}", "host3 " + "b" * 40), 8, rev, "w")
  with pytest.raises(tpu_vm.PreflightError, match="not writable from every worker: host2"):
    tpu_vm.check_remote_output(good.replace(f"host2 {rev} writable", f"host2 {rev} workdir "
                                            "gs://b/x is not writable"), 8, rev, "gs://b/x")


@pytest.mark.cli
def test_training_entry_point_refuses_a_gs_workdir_without_credentials(tmp_path):
  from conftest import pretrain_cmd, subprocess_env
  env = subprocess_env(HOME=str(tmp_path))
  env.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
  cmd = pretrain_cmd("gs://no-such-bucket/run", "--config.train.num_steps=2")
  out = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode != 0
  assert "workdir gs://no-such-bucket/run: no Google Cloud credentials" in out.stderr + out.stdout


def _remote_words(line):
  """The words the remote shell sees in one printed `gcloud ... ssh --command=...` line."""
  import shlex
  command = [a for a in shlex.split(line) if a.startswith("--command=")][0]
  return shlex.split(command[len("--command="):], comments=True)


def test_a_run_name_with_shell_characters_stays_one_word_on_the_remote_shell():
  evil = "x; touch /tmp/pwned #1 $(id)"
  log = f"~/lmlife-logs/{evil}.log"
  logs = _dry("logs", run_name_=evil, worker="all")
  assert len(logs) == 1 and _remote_words(logs[0]) == ["tail", "-n", "+1", "-f", log]
  start, follow = _dry("run", ENTRY, run_name_=evil, skip_preflight=True)
  words = _remote_words(start)
  assert words[words.index(">") + 1] == log and words[-4:] == ["2>&1", "<", "/dev/null", "&"]
  assert ";" not in words and "touch" not in words
  assert _remote_words(follow) == ["tail", "-n", "+1", "-f", log]
