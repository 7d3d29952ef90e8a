"""Every config file under configs/ loads, documents its launch command, and describes a
model that builds (abstractly: nothing is allocated) with the parameter count it claims.
"""

import glob
import importlib.util
import os

import pytest
from flax import nnx

from conftest import REPO_ROOT
from data.readers import resolve_data_path
from model import sharding
from train import distributed
from model.config import ModelConfig
from model.transformer import Transformer, count_params
from model.sharding import rules_from_config

ALL_CONFIG_FILES = sorted(
    os.path.relpath(p, REPO_ROOT)
    for p in glob.glob(os.path.join(REPO_ROOT, "configs", "**", "*.py"), recursive=True)
    if "def get_config" in open(p).read())
# Data-curation configs (data/curate/) describe no model or training run.
DATA_CONFIG_FILES = [p for p in ALL_CONFIG_FILES if p.startswith(os.path.join("configs", "data"))]
# Launcher configs (launch/pipeline.py, launch/sweep.py) name run configs; they are not runs.
LAUNCH_CONFIG_FILES = [p for p in ALL_CONFIG_FILES
                       if p.startswith((os.path.join("configs", "pipeline"),
                                        os.path.join("configs", "ablations")))]
# The continual loop's configs (launch/continual.py) name stage configs; checked in
# tests/test_launch_continual.py.
CONTINUAL_CONFIG_FILES = [p for p in ALL_CONFIG_FILES
                          if p.startswith(os.path.join("configs", "continual"))]
# Constitutional AI's data-generation configs (rlhf/cai.py) train nothing; checked in
# tests/test_rlhf_cai.py.
CAI_CONFIG_FILES = [p for p in ALL_CONFIG_FILES if p.startswith(os.path.join("configs", "cai"))]
CONFIG_FILES = [p for p in ALL_CONFIG_FILES if p not in DATA_CONFIG_FILES
                and p not in LAUNCH_CONFIG_FILES and p not in CONTINUAL_CONFIG_FILES
                and p not in CAI_CONFIG_FILES]
SMALL = 200e6  # parameters; bigger models are only counted, never traced
TEST_VOCAB = 256  # stands in for "take it from the tokenizer" (vocab_size 0)


def _load(relpath):
  spec = importlib.util.spec_from_file_location(
      "cfg_" + relpath.replace("/", "_").removesuffix(".py"), os.path.join(REPO_ROOT, relpath))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _variants(relpath):
  """(arg, config) for get_config() and, where the file has it, get_config("runlocal=true")."""
  module = _load(relpath)
  out = [(None, module.get_config())]
  if "runlocal" in open(os.path.join(REPO_ROOT, relpath)).read():
    out.append(("runlocal=true", module.get_config("runlocal=true")))
  return module, out


def _model_cfg(config):
  values = config.model.to_dict()
  if values["vocab_size"] == 0:
    values["vocab_size"] = TEST_VOCAB
  return ModelConfig.from_dict(values)


def test_config_files_are_found():
  names = {os.path.basename(p) for p in CONFIG_FILES}
  assert {"shakespeare_char.py", "shakespeare_bpe.py", "gpt_125m.py", "llama_1b.py"} <= names


@pytest.mark.parametrize("relpath", CONFIG_FILES)
def test_config_loads_and_its_model_builds(relpath):
  module, variants = _variants(relpath)
  assert f"--config={relpath}" in module.__doc__, "the docstring holds the launch command"
  for arg, config in variants:
    where = f"{relpath}:{arg}"
    for section in ("model", "data", "optim", "train", "mesh"):
      assert section in config, where
    assert {"stage", "seed", "init_from"} <= set(config.keys()), where
    if "vocab_size" not in config.model:
      # A fine-tuning stage: the architecture comes from its init_from checkpoint and
      # config.model holds only execution overrides.
      from train.parent import MODEL_OVERRIDES
      assert set(config.model.keys()) <= set(MODEL_OVERRIDES), where
      assert config.init_from, where
      continue
    model_cfg = _model_cfg(config)
    assert model_cfg.max_seq_len >= config.data.seq_len, where
    rules = sharding.normalize_rules(rules_from_config(config.mesh.rules))
    assert dict(rules)["batch"] is not None, where
    assert config.train.batch_size % config.train.grad_accum_steps == 0, where
    if model_cfg.num_params() < SMALL:
      model = nnx.eval_shape(lambda: Transformer(model_cfg, nnx.Rngs(params=0)))
      assert count_params(nnx.state(model)) == model_cfg.num_params(), where
    if arg == "runlocal=true":
      assert config.train.num_steps <= 100, where
      if config.data.source == "text":
        assert os.path.isfile(resolve_data_path(config.data.path)), where


@pytest.mark.parametrize("relpath", DATA_CONFIG_FILES)
def test_data_config_loads_with_its_stages(relpath):
  module, variants = _variants(relpath)
  assert f"--config={relpath}" in module.__doc__, "the docstring holds the launch command"
  for arg, config in variants:
    assert config.sources and config.num_shards > 0, f"{relpath}:{arg}"
    for stage in ("normalize", "quality", "safety", "pii", "decontaminate", "exact_dedup",
                  "near_dedup"):
      assert isinstance(config[stage].enabled, bool), f"{relpath}:{arg} {stage}"
    for source in config.sources:
      assert os.path.exists(resolve_data_path(source["path"])), source


@pytest.mark.parametrize("relpath", LAUNCH_CONFIG_FILES)
def test_launch_config_plans_every_run_it_names(relpath, tmp_path):
  """Each pipeline / ablation config documents its command and every run it names loads
  with its overrides (launch.pipeline.plan / launch.sweep.expand check them all)."""
  from launch import pipeline, sweep
  module = _load(relpath)
  assert f"--config={relpath}" in module.__doc__, "the docstring holds the launch command"
  config = module.get_config()
  if relpath.startswith(os.path.join("configs", "pipeline")):
    stages = pipeline.plan(config, str(tmp_path))
    assert [s["entry"] for s in stages][:2] == ["train.pretrain", "train.sft"]
    assert pipeline.eval_plan(config, stages, str(tmp_path))
  else:
    points = sweep.expand(config)
    assert len(points) >= 2 and len({p["name"] for p in points}) == len(points)


@pytest.mark.parametrize("relpath", ALL_CONFIG_FILES)
def test_unknown_config_argument_is_an_error(relpath):
  with pytest.raises(ValueError, match="runlocl"):
    _load(relpath).get_config("runlocl=true")


def test_big_presets_are_counted_not_built():
  # Known sizes (embedding included), from the shapes alone.
  assert ModelConfig.preset("llama_1b").num_params() == pytest.approx(1.236e9, rel=0.01)
  assert ModelConfig.preset("llama2_7b").num_params() == pytest.approx(6.738e9, rel=0.01)
  assert ModelConfig.preset("llama3_8b").num_params() == pytest.approx(8.030e9, rel=0.01)
  # The Hugging Face presets, against the published parameter counts.
  assert ModelConfig.preset("qwen2_5_0_5b").num_params() == 494_032_768
  assert ModelConfig.preset("qwen3_0_6b").num_params() == 596_049_920
  assert ModelConfig.preset("llama3_2_1b").num_params() == 1_235_814_400
  assert ModelConfig.preset("llama3_1_8b").num_params() == 8_030_261_248
  assert ModelConfig.preset("mistral_7b").num_params() == 7_248_023_552
  assert ModelConfig.preset("shakespeare_char", vocab_size=65).num_params() == \
      pytest.approx(0.81e6, rel=0.02)


def _cpu_configs():
  """(name, config) of the variants meant for a CPU: shakespeare_* and every runlocal one."""
  out = []
  for relpath in CONFIG_FILES:
    _, variants = _variants(relpath)
    for arg, config in variants:
      if arg == "runlocal=true" or "shakespeare" in relpath:
        out.append((f"{relpath}:{arg or ''}", config))
  return out


def test_cpu_configs_run_with_the_default_device_count_of_any_machine():
  # With no --local_devices, train/distributed.py gives a CPU run default_local_devices(cores) and
  # mesh -1 axes fill them; the documented command must then work whatever the core count
  # (the train and the eval batch are both split over the batch axes).
  failures = []
  for name, config in _cpu_configs():
    rules = sharding.normalize_rules(rules_from_config(config.mesh.rules))
    batch_axes = dict(rules)["batch"]
    batch_axes = batch_axes if isinstance(batch_axes, tuple) else (batch_axes,)
    bad_cores = []
    for cores in range(1, 17):
      devices = distributed.default_local_devices(cores)
      dims = dict(zip(sharding.MESH_AXES,
                      sharding.resolve_mesh_shape(dict(config.mesh.shape), devices)))
      dp = 1
      for axis in batch_axes:
        dp *= dims[axis]
      if config.train.batch_size % dp or config.train.eval_batch_size % dp:
        bad_cores.append(cores)
    if bad_cores:
      failures.append(f"{name} (batch_size={config.train.batch_size}, eval_batch_size="
                      f"{config.train.eval_batch_size}, mesh {dict(config.mesh.shape)}) "
                      f"fails on {bad_cores} cores")
  assert not failures, "\n".join(failures)
