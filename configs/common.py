"""Shared config pieces: every run config starts from `base_config()`.

A run config is a plain Python file whose `get_config(arg=None)` returns an
`ml_collections.ConfigDict`. Entry points load it with `lock_config=True`, so an override of
a field that does not exist (`--config.optim.lrr=1`) is an error naming the field.

Sections: model (every ModelConfig field), data, optim, train, mesh; top-level stage, seed,
init_from.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from data.config import default_data_config
from model.config import ModelConfig
from model.sharding import DEFAULT_RULES


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses `--config=file.py:key=value,key2=value2` variants (big_vision style).

  Values take the type of the default; unknown keys raise.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"Unknown config argument {key!r}; known: {sorted(defaults)}")
    kind = type(defaults[key])
    out[key] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
  return out


def model_config(preset: str, **overrides: Any) -> ml_collections.ConfigDict:
  """All ModelConfig fields of a preset, so any of them can be overridden on the CLI."""
  return ml_collections.ConfigDict(ModelConfig.preset(preset, **overrides).to_dict())


def mesh_config(data: int = -1, fsdp: int = 1, tensor: int = 1) -> ml_collections.ConfigDict:
  """Mesh shape (-1 fills the remaining devices) and logical -> mesh axis rules.

  Rules are strings so they can be overridden from the command line:
  "" = replicated, "fsdp" = one mesh axis, "data,fsdp" = several.
  """
  c = ml_collections.ConfigDict()
  c.shape = ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))
  c.rules = ml_collections.ConfigDict({
      logical: ",".join(axes) if isinstance(axes, tuple) else (axes or "")
      for logical, axes in DEFAULT_RULES})
  return c


def optim_config(**overrides: Any) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.lr = 1e-3            # Peak learning rate.
  c.end_lr = 1e-4        # Rate at the end of the cosine (nanoGPT's min_lr).
  c.warmup_steps = 100   # Linear warmup from 0.
  c.decay_steps = 0      # Cosine length in steps; 0 = train.num_steps.
  c.schedule = "cosine"  # cosine | constant.
  c.b1 = 0.9
  c.b2 = 0.95
  c.eps = 1e-8
  c.weight_decay = 0.1   # Decoupled (AdamW); matrices and embeddings only.
  c.grad_clip = 1.0      # Global-norm clipping; 0 = off.
  # Clip + Adam on one concatenated vector: much faster for tiny models on CPU; only valid
  # when parameters are replicated (mesh fsdp = tensor = 1). See train/optim.py.
  c.flatten_update = False
  # "float32": keep a float32 master copy of the parameters in the optimizer state and
  # update it (mixed precision with model.param_dtype="bfloat16"; see train/optim.py).
  # "" = update the parameters in their own dtype.
  c.master_dtype = ""
  c.update(overrides)
  return c


def train_config(**overrides: Any) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.batch_size = 12           # Global batch (rows) per optimizer step, all hosts together.
  c.num_steps = 2000          # Optimizer steps.
  c.grad_accum_steps = 1      # Micro-batches per step (batch_size must divide evenly).
  c.log_every = 50            # Console/TensorBoard/metrics.jsonl interval.
  c.eval_every = 500          # Validation interval (0 = only at the end).
  c.eval_batch_size = 64      # Rows per eval batch (global).
  c.checkpoint_every = 1000   # Checkpoint interval (the last step is always saved).
  c.keep_checkpoints = 3      # Most recent checkpoints kept.
  c.async_checkpoint = True   # Write checkpoints in the background.
  c.steps_per_call = 1        # Train steps per jitted call (a scan; see train/loop.py).
  c.max_calls_in_flight = 2   # Dispatched-but-unfinished calls (see train/loop.py).
  c.peak_flops = 0.0          # FLOP/s for MFU; 0 = vendor figure or measured matmul peak.
  c.update(overrides)
  return c


def lora_config(**overrides: Any) -> ml_collections.ConfigDict:
  """Low-rank adapters (model/lora.py) for the fine-tuning stages; rank 0 = full fine-tuning."""
  c = ml_collections.ConfigDict()
  c.rank = 0               # Adapter rank; > 0 freezes the base and trains adapters (+ heads).
  c.alpha = 16.0           # Update scale alpha / rank.
  c.targets = "attn,mlp"   # Projections: q,k,v,o,gate,up,down, or the groups attn, mlp.
  c.base_dtype = ""        # "bfloat16": store the frozen base in bf16 ("" = param_dtype).
  c.update(overrides)
  return c


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = "pretrain"    # Recorded in checkpoint metadata.
  c.seed = 0              # Parameter init and per-step PRNG.
  c.init_from = ""        # A checkpoint (workdir, checkpoints dir or step dir) to start from.
  c.model = model_config("shakespeare_char")
  c.data = default_data_config()
  c.optim = optim_config()
  c.train = train_config()
  c.mesh = mesh_config()
  return c


def finetune_config(stage: str, init_from: str) -> ml_collections.ConfigDict:
  """`base_config()` of a stage that starts from a checkpoint (SFT, reward model, DPO, PPO).

  The architecture and tokenizer come from `init_from`, so `config.model` holds only the
  execution overrides of the parent's model config (`train.parent.MODEL_OVERRIDES`;
  "" / 0 = keep the parent's value).
  """
  c = base_config()
  c.stage = stage
  c.init_from = init_from
  c.model = ml_collections.ConfigDict(
      {"dtype": "", "param_dtype": "", "remat_policy": "", "attention_impl": "",
       "max_seq_len": 0})
  c.lora = lora_config()
  return c


def smoke_train(config: ml_collections.ConfigDict, **overrides: Any) -> None:
  """The `runlocal` schedule of the fine-tuning configs: 10 steps of batch 8, every step
  logged, evaluated and checkpointed at the end, one step per call."""
  config.train.update(dict(batch_size=8, num_steps=10, log_every=5, eval_every=10,
                           eval_batch_size=16, checkpoint_every=10, steps_per_call=1))
  config.train.update(overrides)
  config.optim.warmup_steps = 2


def wikitext_smoke(config: ml_collections.ConfigDict) -> None:
  """The `runlocal` data and schedule of the GPU/TPU configs: a few steps on local
  WikiText-2 text with a 2048-piece tokenizer, float32, so they run on a laptop CPU."""
  config.model.vocab_size = 0  # take the tokenizer's vocabulary
  config.model.dtype = "float32"
  config.data.source = "text"
  config.data.path = "pretrain/wikitext2_tokens_valid.txt"
  config.data.seq_len = 128
  config.data.tokenizer.vocab_size = 2048
  config.train.update(dict(batch_size=8, eval_batch_size=8, num_steps=10, log_every=5))
  config.optim.warmup_steps = 2


def baby_gpt_sweep() -> ml_collections.ConfigDict:
  """What the ablations of configs/ablations/ share (launch/sweep.py): the baby GPT of
  configs/pretrain/shakespeare_char.py for 1000 of its 2000 steps, eval every 250 steps,
  seeds 0 and 1; a sweep file adds its `points`."""
  c = ml_collections.ConfigDict()
  c.entry = "train.pretrain"
  c.base = "configs/pretrain/shakespeare_char.py"
  c.fixed = {"train": {"num_steps": 1000, "eval_every": 250, "log_every": 50,
                       "checkpoint_every": 1000, "keep_checkpoints": 1}}
  c.product = [("seed", (0, 1))]
  c.metric = "eval/loss"
  return c
