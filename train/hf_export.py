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

from data.chat import END_OF_TURN
from data.hf_tokenizer import hf_tokenizer
from data.tokenizer import Tokenizer
from model import sharding as msharding
from model.config import ModelConfig
from model.hf import to_hf_state_dict
from model.hf_config import hf_config
from model.transformer import Transformer
from train import checkpoint as ckpt_lib
from train.state import abstract_model, mesh_shardings, with_shardings


def load_language_model(checkpoint: str) -> tuple[ModelConfig, Any, dict[str, Any], Tokenizer]:
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
  return cfg, jax.device_get(params), meta, Tokenizer.from_bytes(tokenizer)


def save_hf_tokenizer_files(tokenizer: Tokenizer, out_dir: str) -> dict[str, Any]:
  """THE tokenizer write of an export (one call, so the backend can change).

  Today: our SentencePiece model as `tokenizer.model` plus the equivalent `tokenizer.json`
  (`data.hf_tokenizer`). Returns the generation ids: bos, pad, and as `eos_token_id` the
  eos id followed by the end-of-turn marker's id when the tokenizer has it.
  """
  tokenizer.save(os.path.join(out_dir, "tokenizer.model"))
  hf_tokenizer(tokenizer).save_pretrained(out_dir)
  eos = [tokenizer.eos_id]
  end = tokenizer.encode(END_OF_TURN)
  if len(end) == 1 and tokenizer.id_to_piece(end[0]) == END_OF_TURN:
    eos.append(end[0])
  return {"bos_token_id": tokenizer.bos_id, "eos_token_id": eos if len(eos) > 1 else eos[0],
          "pad_token_id": tokenizer.pad_id}


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


def export_checkpoint(checkpoint: str, out_dir: str) -> dict[str, Any]:
  """Writes `checkpoint` (a language model) as a directory of its family; returns config."""
  cfg, params, meta, tokenizer = load_language_model(checkpoint)
  os.makedirs(out_dir, exist_ok=True)
  ids = save_hf_tokenizer_files(tokenizer, out_dir)
  config = write_hf_model(cfg, params, out_dir, ids)
  with open(os.path.join(out_dir, "lmlife_source.json"), "w") as f:
    json.dump({"checkpoint": meta["checkpoint_path"], "stage": meta.get("stage"),
               "step": meta.get("step")}, f, indent=2)
  return config
