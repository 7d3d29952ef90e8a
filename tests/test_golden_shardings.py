"""Golden shardings: every run config's train step, compiled abstractly on 8 fake CPU devices.

For every run config under configs/ (each variant: default, `runlocal`, PPO's `size=pod`)
and two meshes of the 8 devices:
  config   the config's own mesh shape, its -1 axis filled with as many of the 8 devices as
           its batches divide over (all 8 for every config but the small-batch CPU ones)
  2x2x2    data=2, fsdp=2, tensor=2: every sharding rule exercised (a vocabulary taken from
           a 65-character tokenizer is rounded up to 72 here: an explicit model.vocab_size
           larger than the tokenizer's is what a tensor-parallel char model needs)
`launch.shapes.report` builds the real Trainer with `jax.eval_shape` parameters and optimizer
state (nothing allocated: the 8B model compiles on this laptop-sized machine), lowers and
compiles its train step(s) and reports each parameter's PartitionSpec and XLA's per-device
memory estimate. Both are compared with tests/golden/shardings/<config>__<mesh>.json; a
change shows as a unified diff of the two JSON files. After an intended change:

  .venv/bin/python -m pytest -q tests/test_golden_shardings.py --regen-golden -m "slow or not slow"

Sizes (parameters, shard bytes, step arguments and outputs) must match exactly; XLA's
temporary-buffer estimate within 5% (it moves with XLA's scheduling between versions).
Fine-tuning configs take the model of configs/pretrain/english_bpe.py (their documented
parent; `:runlocal=true` variants the parent's runlocal model). The 2x2x2 mesh runs with
optim.flatten_update=False (the flat update needs replicated parameters).

The big models' (gpt_125m, llama_1b, llama3_8b, PPO at pod size) default variants, the
`runlocal=true` variants and the 2x2x2 compiles are marked slow (about 7 minutes together);
run them with `-m slow`.
"""

import difflib
import json
import os

import jax
import pytest

from conftest import REPO_ROOT
from test_configs import CONFIG_FILES, _load

GOLDEN_DIR = os.path.join(REPO_ROOT, "tests", "golden", "shardings")
MESHES = {"config": None, "2x2x2": {"data": 2, "fsdp": 2, "tensor": 2}}
BIG = ("gpt_125m.py", "llama_1b.py", "llama3_8b.py")
RUN_CONFIGS = CONFIG_FILES  # every run config (not data curation or launcher configs)


def _variants():
  out = []
  for relpath in RUN_CONFIGS:
    text = open(os.path.join(REPO_ROOT, relpath)).read()
    args = [None] + (["runlocal=true"] if "runlocal" in text else []) + \
        (["size=pod"] if 'size == "pod"' in text else [])
    for arg in args:
      big = arg is None and relpath.endswith(BIG) or arg == "size=pod"
      for mesh in MESHES:
        # runlocal variants: the same sharding rules on the config's smaller model, kept out
        # of the default suite (its 10-minute budget).
        marks = [pytest.mark.slow] if big or mesh == "2x2x2" or arg == "runlocal=true" else []
        out.append(pytest.param(relpath, arg, mesh, marks=marks,
                                id=f"{relpath}:{arg or ''}@{mesh}"))
  return out


def _golden_path(relpath, arg, mesh):
  slug = relpath.removeprefix("configs/").removesuffix(".py").replace("/", "_")
  if arg:
    slug += "_" + arg.replace("=", "-").replace("true", "")
  return os.path.join(GOLDEN_DIR, f"{slug.rstrip('-')}__{mesh}.json")


def _parent(arg):
  from launch.overrides import load_config
  from launch.shapes import DEFAULT_PARENT
  return load_config(DEFAULT_PARENT + (":runlocal=true" if arg == "runlocal=true" else ""))


def _compare(golden, now):
  """Human-readable differences (empty when equal within the tolerances above)."""
  problems = []
  if set(golden) != set(now):
    problems.append(f"programs {sorted(golden)} -> {sorted(now)}")
  for name in set(golden) & set(now):
    g, n = golden[name], now[name]
    for key in ("mesh", "params", "param_count", "param_bytes_per_device",
                "opt_state_bytes_per_device"):
      if g[key] != n[key]:
        problems.append(f"{name}.{key} changed")
    for key, value in g["memory"].items():
      new = n["memory"].get(key)
      tol = 0.05 * value if key == "temp_bytes" else 0
      if new is None or abs(new - value) > tol:
        problems.append(f"{name}.memory.{key}: {value:,} -> {new if new is None else f'{new:,}'}")
  return problems


def _fitting_devices(config):
  """The most of the 8 devices the config's own mesh can use: its -1 axis filled so that the
  train and eval batches divide over the batch axes (a CPU config runs on as many devices
  as the machine has cores; shakespeare_char's batch of 12 fits 4 of 8)."""
  from model import sharding
  from model.sharding import rules_from_config
  rules = sharding.normalize_rules(rules_from_config(config.mesh.rules))
  for n in range(8, 0, -1):
    try:
      dims = dict(zip(sharding.MESH_AXES,
                      sharding.resolve_mesh_shape(dict(config.mesh.shape), n)))
    except ValueError:
      continue
    dp = sharding.batch_parallel_size(dims, rules)
    micro = config.train.batch_size // config.train.grad_accum_steps
    if micro % dp == 0 and config.train.eval_batch_size % dp == 0:
      return n
  raise AssertionError(f"{dict(config.mesh.shape)} fits none of 1-8 devices")


@pytest.mark.parametrize("relpath,arg,mesh", _variants())
def test_golden_shardings(relpath, arg, mesh, regen_golden):
  from launch import shapes
  config = _load(relpath).get_config(arg)
  parent = None if "vocab_size" in config.model else _parent(arg)
  if mesh == "config":
    devices = jax.devices()[:_fitting_devices(config)]
  else:
    devices = jax.devices()[:8]
    vocab = shapes.resolved_vocab(config) if parent is None else 0
    if vocab % 4:  # a tokenizer's vocabulary (65 characters) cannot split over fsdp x tensor
      config.model.vocab_size = -(-vocab // 8) * 8
  now = shapes.report(config, devices, parent, MESHES[mesh])
  # Every parameter has a spec of its rank, and the 2x2x2 mesh shards the big matrices.
  for name, r in now.items():
    assert r["params"], name
    if mesh == "2x2x2":
      assert any("tensor" in s for s in r["params"].values()), name
      assert any("fsdp" in s for s in r["params"].values()), name
  path = _golden_path(relpath, arg, mesh)
  text = json.dumps(now, indent=1, sort_keys=True) + "\n"
  if regen_golden:
    os.makedirs(GOLDEN_DIR, exist_ok=True)
    with open(path, "w") as f:
      f.write(text)
    return
  assert os.path.exists(path), (f"No golden file {os.path.relpath(path, REPO_ROOT)}; create it "
                                "with --regen-golden")
  with open(path) as f:
    golden_text = f.read()
  problems = _compare(json.loads(golden_text), now)
  if problems:
    diff = "".join(difflib.unified_diff(golden_text.splitlines(True), text.splitlines(True),
                                        "golden", "now", n=1))
    pytest.fail(f"{relpath}:{arg or ''} on the {mesh} mesh differs from "
                f"{os.path.relpath(path, REPO_ROOT)}: {'; '.join(problems)}\n{diff}\n"
                "If intended, regenerate with --regen-golden (module doc).")


def test_a_changed_sharding_rule_shows_as_a_readable_diff():
  """The comparison catches a changed rule and names the parameter in the diff."""
  from launch import shapes
  relpath = "configs/pretrain/shakespeare_bpe.py"
  config = _load(relpath).get_config("runlocal=true")
  golden = shapes.report(config, jax.devices()[:8], None, MESHES["2x2x2"])
  with config.unlocked():
    config.mesh.rules.mlp = ""  # MLP matrices no longer tensor-parallel
  changed = shapes.report(config, jax.devices()[:8], None, MESHES["2x2x2"])
  problems = _compare(golden, changed)
  assert "train.params changed" in problems
  assert any(k.startswith("train.memory.") for k in problems)
  g, c = golden["train"]["params"], changed["train"]["params"]
  moved = sorted(k for k in g if g[k] != c[k])
  assert moved and all("mlp" in k for k in moved), moved
