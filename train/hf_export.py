"""Checkpoints of the shared format -> Hugging Face directories `transformers` loads.

  export_checkpoint(checkpoint, out_dir)  writes config.json (cfg.family's architecture,
                                          `model.hf_config`), model.safetensors in the
                                          checkpoint's parameter dtype, generation_config.json
                                          and the tokenizer files

Only language models (`Transformer`) export; a reward model's scalar head has no
*ForCausalLM counterpart. The tokenizer is written by `save_hf_tokenizer_files`, the one call
that knows the tokenizer backend; it returns the generation ids (every end-of-turn id is an
`eos_token_id`, so `generate` stops at the end of a turn).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_dtypes  # noqa: F401 - numpy bfloat16 for safetensors

from data.chat import get_template
from data.hf_tokenizer import save_hf_tokenizer
from data.tokenizer import load_tokenizer
from model import lora
from model import sharding as msharding
from model.config import ModelConfig
from model.hf import to_hf_state_dict
from model.hf_config import hf_config
from model.transformer import Transformer
from train import checkpoint as ckpt_lib
from train.state import abstract_model, mesh_shardings, with_shardings


def load_language_model(checkpoint: str) -> tuple[ModelConfig, Any, dict[str, Any], Any]:
  """(ModelConfig, params as numpy, metadata, Tokenizer) of a language-model checkpoint."""
  meta = ckpt_lib.read_metadata(checkpoint)
  name = meta.get("model_class") or Transformer.__name__
  if name != Transformer.__name__:
    raise ValueError(f"{checkpoint} holds a {name}; only language models (Transformer) "
                     "export to a *ForCausalLM")
  cfg = ModelConfig.from_dict(meta["model_config"])
  mesh = msharding.make_mesh({}, jax.devices()[:1])
  _, abstract, logical = abstract_model(Transformer, cfg)
  shardings = mesh_shardings(logical, mesh, msharding.normalize_rules(None))
  params, meta, tokenizer = ckpt_lib.load_params(meta["checkpoint_path"],
                                                 with_shardings(abstract, shardings))
  if not tokenizer:
    raise ValueError(f"Checkpoint {meta['checkpoint_path']} holds no tokenizer")
  return cfg, jax.device_get(params), meta, load_tokenizer(tokenizer)


def export_template(tokenizer: Any, meta: dict[str, Any]) -> Any:
  """The chat template a checkpoint was trained with, for the export's `chat_template`.

  The run config's `data.template` (default "auto": the tokenizer's own template, else the
  project's markers when the tokenizer has them). None when the tokenizer has neither (a
  pretrained base that never saw a chat format): the export then has no chat template.
  """
  name = ((meta.get("config") or {}).get("data") or {}).get("template") or "auto"
  try:
    return get_template(name, tokenizer)
  except ValueError:
    return None


def save_hf_tokenizer_files(tokenizer: Any, out_dir: str, template: Any) -> dict[str, Any]:
  """THE tokenizer write of an export: `data.hf_tokenizer.save_hf_tokenizer` (tokenizer.json,
  tokenizer_config.json with the chat template, special_tokens_map.json, and the
  SentencePiece `tokenizer.model` of a SentencePiece-backed tokenizer). Returns the
  generation ids (every end-of-turn id is an `eos_token_id`)."""
  return save_hf_tokenizer(tokenizer, template, out_dir)


def write_hf_model(cfg: ModelConfig, params: Any, out_dir: str,
                   ids: dict[str, Any] | None = None) -> dict[str, Any]:
  """config.json, generation_config.json and model.safetensors of `params` (numpy, any
  layout); tensors keep the params' dtype. Returns config.json's dict."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  state = to_hf_state_dict(params, cfg)
  dtypes = {str(a.dtype) for a in state.values()}
  config = hf_config(cfg.replace(param_dtype=dtypes.pop() if len(dtypes) == 1
                                 else cfg.param_dtype), ids)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
    json.dump(dict(ids or {}), f, indent=2)
  save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
  return config


def merged_model(cfg: ModelConfig, params: Any, merge: bool, where: str
                 ) -> tuple[ModelConfig, Any]:
  """A LoRA checkpoint's adapters folded into its weights (`merge`), else refused."""
  if not cfg.lora_rank:
    return cfg, params
  if not merge:
    raise ValueError(f"{where}: model_config.lora_rank={cfg.lora_rank}: the checkpoint holds "
                     "LoRA adapters; export with --merge to write merged weights")
  return cfg.replace(lora_rank=0), jax.device_get(lora.merge(params, cfg))


def export_checkpoint(checkpoint: str, out_dir: str, merge: bool = False) -> dict[str, Any]:
  """Writes `checkpoint` (a language model) as a directory of its family; returns config.
  `merge`: a LoRA checkpoint is written with W + (alpha / r) A @ B (model/lora.py)."""
  cfg, params, meta, tokenizer = load_language_model(checkpoint)
  cfg, params = merged_model(cfg, params, merge, meta["checkpoint_path"])
  os.makedirs(out_dir, exist_ok=True)
  ids = save_hf_tokenizer_files(tokenizer, out_dir, export_template(tokenizer, meta))
  config = write_hf_model(cfg, params, out_dir, ids)
  with open(os.path.join(out_dir, "lmlife_source.json"), "w") as f:
    json.dump({"checkpoint": meta["checkpoint_path"], "stage": meta.get("stage"),
               "step": meta.get("step")}, f, indent=2)
  return config
