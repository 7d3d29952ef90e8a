"""Cloud TPU VMs with plain `gcloud`: create, set up, run on every worker, logs, stop, delete.

  python -m launch.tpu_vm create --name=lm --zone=us-east5-a --accelerator_type=v5p-64
  python -m launch.tpu_vm setup  --name=lm --zone=us-east5-a
  python -m launch.tpu_vm run    --name=lm --zone=us-east5-a --accelerator_type=v5p-64 -- \
      -m train.pretrain --config=configs/pretrain/llama_1b.py --workdir=gs://BUCKET/runs/llama_1b
  python -m launch.tpu_vm logs   --name=lm --zone=us-east5-a [--worker=all]
  python -m launch.tpu_vm stop   --name=lm --zone=us-east5-a
  python -m launch.tpu_vm delete --name=lm --zone=us-east5-a
Add --dry_run to any of them to print every command instead of running it.

What each action runs (every command is printed before it runs):
  create   gcloud compute tpus tpu-vm create (one VM or a pod slice; --spot optional)
  setup    ships this checkout's committed HEAD (`git archive`, so every host gets exactly
           one revision, recorded in ~/lmlife/REVISION) to every worker with `tpu-vm scp
           --worker=all`, then on every worker: a venv and `pip install -e ".[tpu]"` (setup.py
           with jax[tpu]). A dirty working tree is refused: what runs must be a commit.
  run      preflight (below), then on every worker (`tpu-vm ssh --worker=all`) the entry point
           with `--distributed_auto` (jax.distributed finds the pod's hosts itself), detached
           with nohup into ~/lmlife-logs/<run>.log, then streams worker 0's log
  logs     tail -f of the run's log on --worker (0 or all)
  stop     kills the entry point on every worker (a SIGTERM: the Trainer saves a checkpoint)
  delete   gcloud compute tpus tpu-vm delete
Preflight, before anything starts on the TPU (each failure names both sides):
  - the config's mesh (data x fsdp x tensor, -1 filled) against the slice's layout: hosts
    (= processes) x devices per host, from --accelerator_type (or --num_hosts and
    --devices_per_host); the tensor axis must stay within one host
  - the global batch (and the eval batch) divisible by the data-parallel size and by the
    number of processes
  - the workdir: a gs:// path needs credentials here (train/storage.py) and is written from
    every worker; a local path is created and written on every worker
  - the code: the same REVISION on every worker, equal to this checkout's HEAD
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from typing import Any, Sequence

from absl import app, flags

from launch import overrides as ov
from launch.stages import REPO

REMOTE_DIR = "~/lmlife"
REMOTE_VENV = "~/lmlife-venv"
REMOTE_LOGS = "~/lmlife-logs"
ACTIONS = ("create", "setup", "run", "logs", "stop", "delete", "preflight")

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command-line flags (defined only when this module is the program)."""
  flags.DEFINE_string("name", None, "TPU VM (or pod slice) name.")
  flags.DEFINE_string("zone", None, "Zone, e.g. us-east5-a.")
  flags.DEFINE_string("project", "", "GCP project (default: gcloud's configured one).")
  flags.DEFINE_string("accelerator_type", "", "e.g. v4-8, v5p-64, v5litepod-16, v6e-32.")
  flags.DEFINE_string("version", "", "TPU software version (default per generation).")
  flags.DEFINE_bool("spot", False, "Create a Spot VM.")
  flags.DEFINE_integer("num_hosts", 0, "Hosts of the slice (default: from accelerator_type).")
  flags.DEFINE_integer("devices_per_host", 0, "JAX devices per host (default: from "
                       "accelerator_type).")
  flags.DEFINE_string("run_name", "", "Log file name of a run (default: from the workdir).")
  flags.DEFINE_string("worker", "0", "Worker(s) whose log `logs` streams (0, 1, ... or all).")
  flags.DEFINE_bool("follow", True, "run: stream worker 0's log after starting.")
  flags.DEFINE_bool("skip_preflight", False, "run: skip the checks (not recommended).")
  flags.DEFINE_bool("dry_run", False, "Print every command instead of running it.")


class PreflightError(ValueError):
  """A run that would fail on the TPU, found before it starts (names both sides)."""


# --------------------------------------------------------------------------- layouts
# Devices (JAX devices = chips with megacore, or TensorCores on v2/v3) per host and how the
# accelerator type's number counts: "cores" (TensorCores, 2 per chip) or "chips".
_FAMILIES = {
    "v2": ("cores", 8, 1),          # (unit, devices per host, units per device)
    "v3": ("cores", 8, 1),
    "v4": ("cores", 4, 2),
    "v5p": ("cores", 4, 2),
    "v5litepod": ("chips", 4, 1),
    "v5e": ("chips", 4, 1),
    "v6e": ("chips", 4, 1),
}
_DEFAULT_VERSION = {"v2": "tpu-ubuntu2204-base", "v3": "tpu-ubuntu2204-base",
                    "v4": "tpu-ubuntu2204-base", "v5p": "v2-alpha-tpuv5",
                    "v5litepod": "v2-alpha-tpuv5-lite", "v5e": "v2-alpha-tpuv5-lite",
                    "v6e": "v2-alpha-tpuv6e"}


def host_layout(accelerator_type: str) -> tuple[int, int]:
  """(hosts, devices per host) of a slice, e.g. v5p-64 -> (8, 4), v4-8 -> (1, 4).

  v2/v3: the number counts TensorCores, one JAX device each, 8 per host. v4/v5p: it counts
  TensorCores, 2 per chip, one device per chip (megacore), 4 chips per host. v5e/v6e: it
  counts chips, one device each; single-host slices have up to 8 (v5litepod-8, v6e-8),
  multi-host slices 4 per host.
  """
  m = re.fullmatch(r"(v2|v3|v4|v5p|v5litepod|v5e|v6e)-(\d+)", accelerator_type)
  if not m:
    raise PreflightError(f"Unknown accelerator type {accelerator_type!r}; expected "
                         f"<family>-<size> with family in {sorted(_FAMILIES)} (or give "
                         "--num_hosts and --devices_per_host)")
  family, size = m.group(1), int(m.group(2))
  unit, per_host, units_per_device = _FAMILIES[family]
  devices = size // units_per_device
  if devices < 1 or size % units_per_device:
    raise PreflightError(f"{accelerator_type}: size {size} is not a multiple of "
                         f"{units_per_device} {unit}")
  if unit == "chips" and devices <= 8:
    return 1, devices
  if devices <= per_host:
    return 1, devices
  if devices % per_host:
    raise PreflightError(f"{accelerator_type}: {devices} devices do not fill hosts of "
                         f"{per_host}")
  return devices // per_host, per_host


# --------------------------------------------------------------------------- commands
def _gcloud(action: str, name: str, zone: str, project: str, *extra: str) -> list[str]:
  cmd = ["gcloud", "compute", "tpus", "tpu-vm", action, name, f"--zone={zone}"]
  if project:
    cmd.append(f"--project={project}")
  return cmd + list(extra)


def ssh(tpu: dict[str, str], command: str, worker: str = "all") -> list[str]:
  return _gcloud("ssh", tpu["name"], tpu["zone"], tpu.get("project", ""),
                 f"--worker={worker}", f"--command={command}")


def create_command(tpu: dict[str, str], accelerator_type: str, version: str = "",
                   spot: bool = False) -> list[str]:
  family = accelerator_type.split("-")[0]
  version = version or _DEFAULT_VERSION.get(family, "tpu-ubuntu2204-base")
  extra = [f"--accelerator-type={accelerator_type}", f"--version={version}"]
  return _gcloud("create", tpu["name"], tpu["zone"], tpu.get("project", ""), *extra,
                 *(["--spot"] if spot else []))


def delete_command(tpu: dict[str, str]) -> list[str]:
  return _gcloud("delete", tpu["name"], tpu["zone"], tpu.get("project", ""), "--quiet")


def setup_commands(tpu: dict[str, str], revision: str, archive: str) -> list[list[str]]:
  """Ship `archive` (git archive of `revision`) to every worker, unpack, install."""
  remote_archive = f"lmlife-{revision[:12]}.tar.gz"
  script = " && ".join([
      f"rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} {REMOTE_LOGS}",
      f"tar -xzf ~/{shlex.quote(remote_archive)} -C {REMOTE_DIR}",
      f"echo {shlex.quote(revision)} > {REMOTE_DIR}/REVISION",
      f"python3 -m venv {REMOTE_VENV}",
      f"{REMOTE_VENV}/bin/pip install -q --upgrade pip",
      f"{REMOTE_VENV}/bin/pip install -q -e \"$HOME/lmlife[tpu]\""])
  scp = ["gcloud", "compute", "tpus", "tpu-vm", "scp", archive,
         f"{tpu['name']}:~/{remote_archive}", f"--zone={tpu['zone']}"]
  if tpu.get("project"):
    scp.append(f"--project={tpu['project']}")
  return [["git", "archive", "--format=tar.gz", f"--output={archive}", revision],
          scp + ["--worker=all"], ssh(tpu, script)]


def run_name(entry_args: Sequence[str]) -> str:
  workdir = _flag(entry_args, "workdir")
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(workdir.rstrip("/")) or "run")


def remote_log(name: str) -> str:
  """The run's log path for the remote shell: `~` unquoted (the shell expands it), the
  user's run name quoted (a `;` or space in --run_name must not end the command)."""
  return f"{REMOTE_LOGS}/{shlex.quote(f'{name}.log')}"


def run_commands(tpu: dict[str, str], entry_args: Sequence[str], name: str,
                 follow: bool = True) -> list[list[str]]:
  """Start the entry point on every worker (detached, logging), then stream worker 0."""
  log = remote_log(name)
  # `~` must stay unquoted for the remote shell to expand it.
  program = f"{REMOTE_VENV}/bin/python " + shlex.join([*entry_args, "--distributed_auto"])
  start = (f"mkdir -p {REMOTE_LOGS} && cd {REMOTE_DIR} && nohup {program} > {log} 2>&1 "
           "< /dev/null &")
  cmds = [ssh(tpu, start)]
  if follow:
    cmds.append(ssh(tpu, f"tail -n +1 -f {log}", worker="0"))
  return cmds


def logs_command(tpu: dict[str, str], name: str, worker: str) -> list[str]:
  return ssh(tpu, f"tail -n +1 -f {remote_log(name)}", worker=worker)


def stop_command(tpu: dict[str, str]) -> list[str]:
  return ssh(tpu, f"pkill -TERM -f '{REMOTE_VENV}/bin/python' || true")


def sweep_point_command(tpu: dict[str, str], entry_args: Sequence[str]) -> list[str]:
  """The launch.tpu_vm run command of one sweep point (printed by launch.sweep)."""
  cmd = ["python", "-m", "launch.tpu_vm", "run", f"--name={tpu['name']}",
         f"--zone={tpu['zone']}"]
  if tpu.get("project"):
    cmd.append(f"--project={tpu['project']}")
  if tpu.get("accelerator_type"):
    cmd.append(f"--accelerator_type={tpu['accelerator_type']}")
  return cmd + ["--", *entry_args]


# --------------------------------------------------------------------------- preflight
def _flag(args: Sequence[str], name: str) -> str:
  for a in args:
    if a.startswith(f"--{name}="):
      return a.split("=", 1)[1]
  raise PreflightError(f"The entry point's arguments have no --{name}=...: {list(args)}")


def entry_config(entry_args: Sequence[str]) -> Any:
  """The run config the entry point will see: --config plus its --config.x=y overrides."""
  config = ov.load_config(_flag(entry_args, "config"))
  extra = ov.parse_assignments([a[len("--config."):] for a in entry_args
                                if a.startswith("--config.")], "config.")
  return ov.apply_overrides(config, extra, "the run's --config overrides")


def check_layout(config: Any, hosts: int, devices_per_host: int, where: str) -> dict[str, int]:
  """Mesh vs slice and batch vs data parallelism; returns the resolved mesh."""
  from model import sharding
  from model.sharding import rules_from_config
  total = hosts * devices_per_host
  shape = dict(config.mesh.shape)
  layout = f"{where}: {hosts} host(s) x {devices_per_host} devices = {total} devices"
  try:
    dims = dict(zip(sharding.MESH_AXES, sharding.resolve_mesh_shape(shape, total)))
  except ValueError as e:
    raise PreflightError(f"The config's mesh {shape} does not match the host layout of "
                         f"{layout} ({e})") from None
  if dims["tensor"] > devices_per_host or devices_per_host % dims["tensor"]:
    raise PreflightError(f"The config's mesh {dims} puts tensor={dims['tensor']} across "
                         f"hosts: {layout}; the tensor axis must divide the devices of one "
                         "host")
  rules = sharding.normalize_rules(rules_from_config(config.mesh.rules))
  batch_axes = dict(rules).get("batch")
  dp = sharding.batch_parallel_size(dims, rules)
  t = config.train
  for field, value in (("batch_size", t.batch_size // t.grad_accum_steps),
                       ("eval_batch_size", t.eval_batch_size)):
    for what, size in (("data-parallel size", dp), ("process count", hosts)):
      if value % size:
        label = ("micro-batch of train.batch_size" if field == "batch_size"
                 and t.grad_accum_steps > 1 else f"train.{field}")
        raise PreflightError(f"{label}={value} is not divisible by the {what} {size} (mesh "
                             f"{dims}, batch over {batch_axes}; {layout})")
  return dims


def local_revision() -> str:
  rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                       text=True, check=True).stdout.strip()
  return rev


def local_tree_dirty() -> bool:
  out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                       capture_output=True, text=True, check=True).stdout
  return bool(out.strip())


def remote_check_commands(tpu: dict[str, str], workdir: str) -> list[list[str]]:
  """Every worker prints `<host> <REVISION> <workdir probe result>`."""
  script = (f"cd {REMOTE_DIR} && echo \"$(hostname) $(cat REVISION 2>/dev/null || echo none) "
            f"$({REMOTE_VENV}/bin/python -m train.storage {shlex.quote(workdir)} 2>&1 | "
            "tail -n 1)\"")
  return [ssh(tpu, script)]


def check_remote_output(output: str, hosts: int, revision: str, workdir: str) -> None:
  lines = [line.split(None, 2) for line in output.strip().splitlines() if line.strip()]
  if len(lines) != hosts:
    raise PreflightError(f"{len(lines)} worker(s) answered the preflight; the slice has "
                         f"{hosts} host(s)")
  revs = {line[1] for line in lines if len(line) > 1}
  if revs != {revision}:
    raise PreflightError(f"Code revisions differ: workers have {sorted(revs)}, this checkout "
                         f"is {revision}; run `launch.tpu_vm setup` again")
  bad = [f"{line[0]}: {line[2] if len(line) > 2 else '?'}" for line in lines
         if len(line) < 3 or line[2].strip() != "writable"]
  if bad:
    raise PreflightError(f"workdir {workdir} is not writable from every worker: "
                         + "; ".join(bad))


def preflight(tpu: dict[str, str], entry_args: Sequence[str], hosts: int,
              devices_per_host: int, dry_run: bool, runner) -> None:
  from train import storage
  config = entry_config(entry_args)
  check_layout(config, hosts, devices_per_host, tpu.get("accelerator_type") or tpu["name"])
  workdir = _flag(entry_args, "workdir")
  try:
    storage.check_workdir(workdir, probe=False)  # gs:// needs credentials here too
  except storage.WorkdirError as e:
    raise PreflightError(str(e)) from None
  revision = local_revision()
  for cmd in remote_check_commands(tpu, workdir):
    out = runner(cmd, capture=True)
    if not dry_run:
      check_remote_output(out, hosts, revision, workdir)


# --------------------------------------------------------------------------- main
class Runner:
  """Prints every command; runs it unless dry_run. `capture` returns stdout."""

  def __init__(self, dry_run: bool, out=sys.stdout):
    self.dry_run, self.out = dry_run, out

  def __call__(self, cmd: list[str], capture: bool = False) -> str:
    print(("" if self.dry_run else "$ ") + shlex.join(cmd), file=self.out, flush=True)
    if self.dry_run:
      return ""
    if capture:
      res = subprocess.run(cmd, capture_output=True, text=True)
      if res.returncode:
        raise PreflightError(f"{cmd[0]} {cmd[4]} failed (rc={res.returncode}): "
                             f"{res.stderr.strip()[-2000:]}")
      return res.stdout
    rc = subprocess.run(cmd).returncode
    if rc:
      raise SystemExit(f"error: command failed (rc={rc}): {shlex.join(cmd)}")
    return ""


def execute(action: str, tpu: dict[str, str], entry_args: Sequence[str], *,
            dry_run: bool, version: str = "", spot: bool = False, num_hosts: int = 0,
            devices_per_host: int = 0, run_name_: str = "", worker: str = "0",
            follow: bool = True, skip_preflight: bool = False, out=sys.stdout) -> None:
  """One action (module doc); raises PreflightError before anything runs on the TPU."""
  runner = Runner(dry_run, out)
  accel = tpu.get("accelerator_type", "")
  if action == "create":
    if not accel:
      raise PreflightError("create needs --accelerator_type")
    runner(create_command(tpu, accel, version, spot))
  elif action == "delete":
    runner(delete_command(tpu))
  elif action == "setup":
    if not dry_run and local_tree_dirty():
      raise PreflightError("The working tree has uncommitted changes; commit them first "
                           "(setup ships the committed HEAD so every host runs one revision)")
    revision = local_revision()
    archive = os.path.join("/tmp", f"lmlife-{revision[:12]}.tar.gz")
    for cmd in setup_commands(tpu, revision, archive):
      runner(cmd)
  elif action in ("run", "preflight"):
    if not entry_args:
      raise PreflightError(f"{action} needs the entry point after `--`, e.g. -- -m "
                           "train.pretrain --config=configs/pretrain/llama_1b.py "
                           "--workdir=gs://BUCKET/runs/x")
    if num_hosts and devices_per_host:
      hosts, per_host = num_hosts, devices_per_host
    elif accel:
      hosts, per_host = host_layout(accel)
    else:
      raise PreflightError(f"{action} needs --accelerator_type (or --num_hosts and "
                           "--devices_per_host) for the preflight checks")
    if not skip_preflight:
      preflight(tpu, entry_args, hosts, per_host, dry_run, runner)
    if action == "run":
      name = run_name_ or f"{run_name(entry_args)}-{time.strftime('%Y%m%d-%H%M%S')}"
      for cmd in run_commands(tpu, entry_args, name, follow):
        runner(cmd)
  elif action == "logs":
    if not run_name_:
      raise PreflightError("logs needs --run_name (the name `run` printed)")
    runner(logs_command(tpu, run_name_, worker))
  elif action == "stop":
    runner(stop_command(tpu))
  else:
    raise PreflightError(f"Unknown action {action!r}; expected one of {ACTIONS}")


def main(argv: Sequence[str]) -> None:
  if len(argv) < 2 or argv[1] not in ACTIONS:
    raise app.UsageError(f"usage: python -m launch.tpu_vm {{{'|'.join(ACTIONS)}}} --name=... "
                         "--zone=... [-- entry point args]")
  action, entry_args = argv[1], list(argv[2:])
  if entry_args and entry_args[0] == "--":
    entry_args = entry_args[1:]
  if not FLAGS.name or not FLAGS.zone:
    raise app.UsageError("--name and --zone are required")
  tpu = {"name": FLAGS.name, "zone": FLAGS.zone, "project": FLAGS.project,
         "accelerator_type": FLAGS.accelerator_type}
  try:
    execute(action, tpu, entry_args, dry_run=FLAGS.dry_run, version=FLAGS.version,
            spot=FLAGS.spot, num_hosts=FLAGS.num_hosts, devices_per_host=FLAGS.devices_per_host,
            run_name_=FLAGS.run_name, worker=FLAGS.worker, follow=FLAGS.follow,
            skip_preflight=FLAGS.skip_preflight)
  except (PreflightError, ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
