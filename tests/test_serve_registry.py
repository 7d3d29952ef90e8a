"""Tests for serve/registry.py: register / versions / promote / rollback / generation, the
refusals (duplicate name, missing checkpoint, unknown version, nothing to roll back to),
lineage read from checkpoint metadata, atomic files, and the CLI."""

import json
import os
import subprocess
import sys
import threading

import jax.numpy as jnp
import pytest

from conftest import REPO_ROOT, subprocess_env
from serve.registry import Registry, RegistryError
from train import checkpoint as ckpt_lib


def _checkpoint(workdir, step, stage, parent=None, lora=None):
  """A small checkpoint of the shared format (no model): its step directory."""
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  meta = {"stage": stage, "model_config": {}, "parent": parent, "model_class": "Transformer"}
  if lora:
    meta["lora"] = lora
  ck.save(step, {"w": jnp.ones(3) * step}, {"step": jnp.asarray(step)}, metadata=meta)
  ck.close()
  return os.path.join(workdir, "checkpoints", str(step))


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
  """pretrain (step 4) -> sft (step 2) -> LoRA dpo (step 3): their step directories."""
  root = tmp_path_factory.mktemp("chain")
  base = _checkpoint(str(root / "base"), 4, "pretrain")
  sft = _checkpoint(str(root / "sft"), 2, "sft", parent={"path": base, "step": 4,
                                                          "stage": "pretrain"})
  parent = {"path": sft, "step": 2, "stage": "sft"}
  dpo = _checkpoint(str(root / "dpo"), 3, "dpo", parent=parent,
                    lora={"rank": 4, "alpha": 8.0, "targets": "q,v", "base": parent,
                          "base_checksum": "x"})
  return {"base": base, "sft": sft, "dpo": dpo, "sft_workdir": str(root / "sft")}


def test_register_reads_lineage_and_stores_the_step_directory(tmp_path, chain):
  reg = Registry(str(tmp_path / "reg"))
  v = reg.register("v0", chain["sft_workdir"], note="first")  # a workdir resolves to its step
  assert v["checkpoint"] == chain["sft"]
  assert v["lineage"]["stage"] == "sft" and v["lineage"]["step"] == 2
  assert [p["path"] for p in v["lineage"]["parents"]] == [chain["base"]]
  assert v["lineage"]["lora"] is None
  d = reg.register("v1", chain["dpo"], parent="v0", metrics={"score": 1.5})
  assert [p["stage"] for p in d["lineage"]["parents"]] == ["sft", "pretrain"]
  assert d["lineage"]["lora"]["rank"] == 4 and d["lineage"]["lora"]["base"]["path"] == chain["sft"]
  assert d["parent"] == "v0" and d["metrics"] == {"score": 1.5}
  # Nothing is copied: the version names the checkpoint where it is.
  assert sorted(os.listdir(tmp_path / "reg" / "versions" / "v1")) == ["version.json"]
  assert [x["name"] for x in reg.versions()] == ["v0", "v1"]
  assert reg.get("v1") == d
  assert reg.current() is None and reg.generation() == 0


def test_refusals(tmp_path, chain):
  reg = Registry(str(tmp_path / "reg"))
  reg.register("v0", chain["sft"])
  with pytest.raises(RegistryError, match="already exists"):
    reg.register("v0", chain["dpo"])
  with pytest.raises(RegistryError, match="no readable checkpoint"):
    reg.register("v9", str(tmp_path / "missing"))
  with pytest.raises(RegistryError, match="no version 'nope'"):
    reg.register("v2", chain["dpo"], parent="nope")
  for bad in ("", "../x", "a/b", ".hidden", "x" * 65):
    with pytest.raises(RegistryError, match="version name"):
      reg.register(bad, chain["dpo"])
  with pytest.raises(RegistryError, match="no version 'nope'"):
    reg.promote("nope")
  with pytest.raises(RegistryError, match="nothing to roll back"):
    reg.rollback()
  assert [v["name"] for v in reg.versions()] == ["v0"]  # refusals changed nothing


def test_promote_rollback_and_generation(tmp_path, chain):
  reg = Registry(str(tmp_path / "reg"))
  for name in ("a", "b", "c"):
    reg.register(name, chain["sft"])
  reg.promote("a")
  assert reg.current()["name"] == "a" and reg.generation() == 1
  with pytest.raises(RegistryError, match="already current"):
    reg.promote("a")
  reg.promote("b")
  reg.promote("c")
  assert reg.snapshot() == (3, reg.get("c"))
  assert reg.rollback()["name"] == "b" and reg.generation() == 4
  assert reg.rollback()["name"] == "a" and reg.generation() == 5
  with pytest.raises(RegistryError, match="nothing to roll back"):
    reg.rollback()
  assert reg.generation() == 5
  # A second Registry on the same root (another process) sees the same state and history.
  other = Registry(str(tmp_path / "reg"))
  assert other.current()["name"] == "a"
  with open(tmp_path / "reg" / "current.json") as f:
    history = json.load(f)["history"]
  assert [(h["action"], h["name"], h["from"]) for h in history] == [
      ("promote", "a", None), ("promote", "b", "a"), ("promote", "c", "b"),
      ("rollback", "b", "c"), ("rollback", "a", "b")]


def test_concurrent_promotes_lose_no_generation(tmp_path, chain):
  reg = Registry(str(tmp_path / "reg"))
  names = [f"v{i}" for i in range(8)]
  for name in names:
    reg.register(name, chain["sft"])
  errors = []

  def promote(name):
    try:
      Registry(reg.root).promote(name)  # one Registry per thread, as separate processes
    except RegistryError as e:  # "already current" when two threads race on one name
      errors.append(e)

  threads = [threading.Thread(target=promote, args=(n,)) for n in names * 2]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert reg.generation() == 16 - len(errors)
  with open(tmp_path / "reg" / "current.json") as f:
    assert len(json.load(f)["history"]) == reg.generation()
  assert not [n for n in os.listdir(reg.root) if n.startswith(".tmp-")]


def test_promote_refuses_a_version_whose_checkpoint_is_gone(tmp_path):
  workdir = str(tmp_path / "run")
  step = _checkpoint(workdir, 1, "sft")
  reg = Registry(str(tmp_path / "reg"))
  reg.register("v0", step)
  os.rename(workdir, workdir + ".moved")
  with pytest.raises(RegistryError, match="is gone"):
    reg.promote("v0")
  assert reg.generation() == 0


def _cli(root, *args):
  return subprocess.run([sys.executable, "-m", "serve.registry", f"--root={root}", *args],
                        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True,
                        timeout=120)


@pytest.mark.cli
def test_cli(tmp_path, chain):
  root = str(tmp_path / "reg")
  out = _cli(root, "register", "--name=v0", f"--checkpoint={chain['sft']}", "--note=base")
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == f"registered v0: {chain['sft']} (sft, step 2)"
  assert _cli(root, "register", "--name=v1", f"--checkpoint={chain['dpo']}",
              "--parent=v0").returncode == 0
  assert _cli(root, "promote", "--name=v0").stdout.strip() == "promoted v0 (generation 1)"
  assert _cli(root, "promote", "--name=v1").returncode == 0
  lines = _cli(root, "list").stdout.splitlines()
  assert len(lines) == 2
  assert lines[0].startswith("  v0  sft step 2  parent -") and lines[0].endswith("base")
  assert lines[1].startswith("* v1  dpo lora r4 step 3  parent v0")
  out = _cli(root, "rollback")
  assert out.stdout.strip() == "rolled back to v0 (generation 3)"
  assert Registry(root).current()["name"] == "v0"
  # Each refusal of the library (test_refusals) reaches the CLI as one line, as these do.
  for args, cause in ((["register", "--name=v0", f"--checkpoint={chain['sft']}"],
                       "already exists"),
                      (["promote"], "promote needs --name"),
                      (["rollback"], "nothing to roll back"),
                      (["delete"], "expected one command"),
                      (["list", "--bogus=1"], "Unknown command line flag 'bogus'")):
    out = _cli(root, *args)
    assert out.returncode == 2, (args, out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and cause in lines[0], (args, lines)
