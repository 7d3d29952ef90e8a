"""LoRA in the Trainer (train/state.py, step.py, restore.py, trainer.py): only adapters and
heads train, the optimizer state is adapter-shaped, the base is frozen (optionally bf16),
checkpoints resume exactly and name their base, a later stage sees merged weights; and the
stages (SFT, reward model, DPO, PPO) run with `--config.lora.rank`.
"""

import json
import os

import jax
import numpy as np
import pytest

from configs import common
from conftest import SFT_FLAGS, random_lm_batch, run_cmd, sft_cmd, tiny_run_config
from model import lora
from model.config import ModelConfig
from train import checkpoint as ckpt_lib
from train.losses import lm_loss
from train.restore import InitAdapter
from train.trainer import Trainer

DEVICES = 2


def _parent(tmp_path, cfg):
  """A saved, freshly initialised parent checkpoint of `cfg` (no adapters)."""
  config = tiny_run_config()
  trainer = Trainer(config, str(tmp_path / "parent"), cfg, lm_loss,
                    devices=jax.devices()[:DEVICES])
  trainer.open()
  trainer.save(trainer.init_state())
  trainer.close()
  return str(tmp_path / "parent")


def _lora_trainer(workdir, parent, parent_cfg, rank=4, base_dtype="", steps=3):
  config = tiny_run_config(num_steps=steps, checkpoint_every=steps)
  with config.unlocked():
    config.init_from = parent
    config.lora = common.lora_config(rank=rank, alpha=8.0, base_dtype=base_dtype)
    config.optim.lr = 1e-2
  model_cfg = parent_cfg.replace(lora_rank=rank, lora_alpha=8.0)
  return Trainer(config, workdir, model_cfg, lm_loss, devices=jax.devices()[:DEVICES],
                 init_adapter=InitAdapter(parent_cfg, lambda p: p))


def _train(trainer, state, steps, seed=0):
  rng = np.random.default_rng(seed)
  with trainer.mesh_context():
    for _ in range(steps):
      batch = trainer.to_global(random_lm_batch(rng, 8, 16, trainer.model_cfg.vocab_size))
      state, _ = trainer.step(state, batch)
  return state


def _flat(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


@pytest.mark.parametrize("scan,fuse", [(False, False), (True, True)])
def test_only_adapters_train_and_the_optimizer_holds_only_them(tmp_path, scan, fuse):
  cfg = ModelConfig.preset("tiny", scan_layers=scan, fuse_projections=fuse)
  parent = _parent(tmp_path, cfg)
  trainer = _lora_trainer(str(tmp_path / "run"), parent, cfg)
  state, _ = trainer.restore_or_init()
  before = _flat(state.params)
  state = _train(trainer, state, 3)
  after = _flat(state.params)
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  adapters = {k for k in before if "lora_" in k}
  assert adapters and changed == {k for k in adapters if k.endswith("/b") or k.endswith("/a")}
  # The base is bit-identical to the parent checkpoint.
  parent_params, _, _ = ckpt_lib.load_params(parent, lora.base_params(
      trainer.abstract_state.params))
  for k, v in _flat(parent_params).items():
    np.testing.assert_array_equal(after[k], v, err_msg=k)
  # Adam moments: one per adapter leaf (mu and nu), nothing of base shape.
  moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
  adapter_shapes = sorted(v.shape for k, v in before.items() if "lora_" in k)
  assert sorted(x.shape for x in moments) == sorted(adapter_shapes * 2)
  assert trainer.compile_counts()["step"] == 1
  trainer.close()


def test_bf16_base_resume_and_metadata(tmp_path):
  cfg = ModelConfig.preset("tiny")
  parent = _parent(tmp_path, cfg)
  workdir = str(tmp_path / "run")
  trainer = _lora_trainer(workdir, parent, cfg, base_dtype="bfloat16", steps=2)
  state, _ = trainer.restore_or_init()
  dtypes = {k: v.dtype for k, v in _flat(state.params).items()}
  assert all((v == np.float32) == ("lora_" in k) for k, v in dtypes.items()), dtypes
  state = _train(trainer, state, 2)
  trainer.save(state)
  trainer.close()
  meta = ckpt_lib.read_metadata(workdir)
  assert meta["lora"]["rank"] == 4 and meta["lora"]["base_dtype"] == "bfloat16"
  assert meta["lora"]["base"]["path"].startswith(parent)
  assert meta["lora"]["base_checksum"].startswith("sum=")
  # Resume: params and optimizer state exactly as saved.
  again = _lora_trainer(workdir, parent, cfg, base_dtype="bfloat16", steps=2)
  restored, _ = again.restore_or_init()
  assert int(restored.step) == 2
  for a, b in ((state.params, restored.params), (state.opt_state, restored.opt_state)):
    for k, v in _flat(a).items():
      np.testing.assert_array_equal(_flat(b)[k], v, err_msg=k)
  assert again.base_checksum == trainer.base_checksum
  again.close()


def test_init_from_a_lora_checkpoint_sees_merged_weights(tmp_path):
  cfg = ModelConfig.preset("tiny")
  parent = _parent(tmp_path, cfg)
  workdir = str(tmp_path / "run")
  trainer = _lora_trainer(workdir, parent, cfg, steps=3)
  state = _train(trainer, *trainer.restore_or_init()[:1], 3)
  trainer.save(state)
  trainer.close()
  lora_cfg = trainer.model_cfg
  merged = jax.device_get(lora.merge(jax.device_get(state.params), lora_cfg))
  # A full fine-tuning child of the LoRA run starts from the merged weights.
  child = _lora_trainer(str(tmp_path / "child"), workdir, lora_cfg, rank=0)
  params, _ = child.load_init_params()
  flat = _flat(params)
  assert not any("lora_" in k for k in flat)
  for k, v in _flat(merged).items():
    np.testing.assert_allclose(flat[k], v, rtol=0, atol=0, err_msg=k)
  child.close()
  # The same logits: merged plain model == adapted model.
  rng = np.random.default_rng(1)
  batch = random_lm_batch(rng, 2, 16, cfg.vocab_size)
  from flax import nnx
  from model.transformer import Transformer
  adapted = nnx.merge(trainer.graphdef, jax.device_get(state.params))
  plain = nnx.merge(nnx.split(Transformer(cfg, nnx.Rngs(params=0)))[0], merged)
  np.testing.assert_allclose(plain(batch["tokens"]), adapted(batch["tokens"]), atol=1e-5)


# ------------------------------------------------------------------------------ stages (cli)
@pytest.fixture(scope="module")
def lora_sft_run(tmp_path_factory, base_run):
  workdir = str(tmp_path_factory.mktemp("sft") / "run")
  # The 40-step char base barely knows text: adapters (base and new marker rows frozen)
  # need more steps than full fine-tuning's 30 (measured: 3.762 -> 3.697 at 30, 3.682 at 60).
  out = run_cmd(sft_cmd(workdir, base_run, *SFT_FLAGS, "--config.lora.rank=16",
                        "--config.lora.alpha=32", "--config.optim.lr=5e-3",
                        "--config.train.num_steps=60", "--config.sample_every=0"))
  assert out.returncode == 0, out.stdout[-5000:]
  return workdir, out.stdout


@pytest.mark.cli
def test_sft_with_lora_lowers_held_out_response_loss(lora_sft_run):
  workdir, _ = lora_sft_run
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    evals = [r for r in map(json.loads, f) if "eval/loss" in r]
  assert [r["step"] for r in evals] == [0, 30, 60]
  assert evals[-1]["eval/loss"] < evals[0]["eval/loss"] - 0.05, evals
  assert evals[-1]["eval/accuracy"] > evals[0]["eval/accuracy"], evals
  meta = ckpt_lib.read_metadata(workdir)
  assert meta["model_config"]["lora_rank"] == 16 and meta["lora"]["base"]["stage"] == "pretrain"


@pytest.mark.cli
def test_reward_dpo_and_ppo_run_with_lora(english_sft_run, tmp_path):
  """Reward model and DPO (CLI) and PPO (in process, value model from the LoRA reward
  model) each run a few steps with adapters; PPO's reference is the policy's base, so the
  first iteration's KL is zero."""
  import sys
  from conftest import _subset_file, reward_cmd
  from rlhf.ppo import PPO
  from configs.ppo.hh import get_config
  sft, _ = english_sft_run
  pairs = _subset_file(tmp_path / "pairs.jsonl", n=24)
  common_flags = (f"--config.data.sources={pairs}", "--config.data.val_fraction=0.25",
                  "--config.data.seq_len=128", "--config.model.max_seq_len=128",
                  "--config.train.num_steps=4", "--config.train.eval_every=4",
                  "--config.train.checkpoint_every=4", "--config.lora.rank=4",
                  "--config.lora.base_dtype=bfloat16")
  rm = str(tmp_path / "rm")
  out = run_cmd(reward_cmd(rm, sft, *common_flags))
  assert out.returncode == 0, out.stdout[-4000:]
  meta = ckpt_lib.read_metadata(rm)
  assert meta["lora"]["rank"] == 4 and meta["lora"]["base"]["stage"] == "sft"
  dpo = str(tmp_path / "dpo")
  out = run_cmd([sys.executable, "-m", "rlhf.dpo", "--config=configs/dpo/hh.py:runlocal=true",
                 f"--workdir={dpo}", f"--config.init_from={sft}", "--local_devices=2",
                 "--config.train.peak_flops=1e9", *common_flags])
  assert out.returncode == 0, out.stdout[-4000:]
  with open(os.path.join(dpo, "metrics.jsonl")) as f:
    first = next(r for r in map(json.loads, f) if "train/loss" in r)
  assert abs(first["train/loss"] - np.log(2)) < 0.05  # reference == policy at the start
  config = get_config("runlocal=true")
  config.init_from, config.reward_from = sft, rm
  config.ppo.update(dict(iterations=2, rollout_batch_size=16, minibatches=2,
                         checkpoint_every=0, sample_every=0))
  config.train.update(dict(peak_flops=1e9, async_checkpoint=False))
  config.lora.rank = 4
  ppo = PPO(config, str(tmp_path / "ppo"))
  assert ppo.reference is None and ppo.value.model_cfg.lora_rank == 4
  history = ppo.train()
  assert len(history) == 2 and abs(history[0]["ppo/kl"]) < 1e-5
  assert history[0]["ppo/first_ratio_max_dev"] < 1e-5
  assert np.isfinite(history[1]["value/loss"])
  meta = ckpt_lib.read_metadata(os.path.join(tmp_path, "ppo", "value"))
  assert meta["lora"]["base"]["stage"] == "reward"
