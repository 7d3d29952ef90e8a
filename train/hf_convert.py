"""Hugging Face directories <-> checkpoints of the shared format.

  python -m train.hf_convert export --checkpoint=runs/sft --out=hf/sft [--merge]
  python -m train.hf_convert import --hf_dir=path/to/llama --workdir=runs/imported

Export writes `config.json`, `model.safetensors` (the checkpoint's param dtype),
`generation_config.json` and the tokenizer: our SentencePiece model as `tokenizer.model` plus
the equivalent `tokenizer.json` of `data.hf_tokenizer`. Only language models (`Transformer`)
export; a reward model's scalar head has no Llama counterpart.

Import reads a Llama-family directory (`config.json` with model_type llama, safetensors
weights, a SentencePiece `tokenizer.model` with pad and eos pieces) and writes a step-0
checkpoint (stage "hf_import") that any stage can `init_from`. Llama-3-style tokenizers (a
tiktoken BPE in tokenizer.json only) cannot be represented by our SentencePiece tokenizer and
are refused with that reason. The weight relayout is `model/hf.py`.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import jax
import numpy as np
from absl import app, flags

from data.hf_tokenizer import hf_tokenizer
from data.tokenizer import Tokenizer
from model import lora
from model import sharding as msharding
from model.config import ModelConfig
from model.hf import from_hf_state_dict, hf_config, model_config_from_hf, to_hf_state_dict
from model.transformer import Transformer
from train import checkpoint as ckpt_lib
from train import quiet
from train.state import abstract_model, mesh_shardings, with_shardings


def _load_language_model(checkpoint: str) -> tuple[Any, Any, dict[str, Any], Any]:
  """(ModelConfig, params as numpy, metadata, Tokenizer) of a language-model checkpoint."""
  meta = ckpt_lib.read_metadata(checkpoint)
  name = meta.get("model_class") or Transformer.__name__
  if name != Transformer.__name__:
    raise ValueError(f"{checkpoint} holds a {name}; only language models (Transformer) "
                     "export to LlamaForCausalLM")
  cfg = ModelConfig.from_dict(meta["model_config"])
  mesh = msharding.make_mesh({}, jax.devices()[:1])
  _, abstract, logical = abstract_model(Transformer, cfg)
  shardings = mesh_shardings(logical, mesh, msharding.normalize_rules(None))
  params, meta, tokenizer = ckpt_lib.load_params(meta["checkpoint_path"],
                                                 with_shardings(abstract, shardings))
  if not tokenizer:
    raise ValueError(f"Checkpoint {meta['checkpoint_path']} holds no tokenizer")
  return cfg, jax.device_get(params), meta, Tokenizer.from_bytes(tokenizer)


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
  """Writes `checkpoint` (a language model) as a LlamaForCausalLM directory; returns config.
  `merge`: a LoRA checkpoint is written with W + (alpha / r) A @ B (model/lora.py)."""
  from safetensors.numpy import save_file
  cfg, params, meta, tokenizer = _load_language_model(checkpoint)
  cfg, params = merged_model(cfg, params, merge, meta["checkpoint_path"])
  state = to_hf_state_dict(params, cfg)
  os.makedirs(out_dir, exist_ok=True)
  config = hf_config(cfg, tokenizer)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
    json.dump({"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
               "pad_token_id": tokenizer.pad_id}, f, indent=2)
  save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
  tokenizer.save(os.path.join(out_dir, "tokenizer.model"))
  hf_tokenizer(tokenizer).save_pretrained(out_dir)
  with open(os.path.join(out_dir, "lmlife_source.json"), "w") as f:
    json.dump({"checkpoint": meta["checkpoint_path"], "stage": meta.get("stage"),
               "step": meta.get("step")}, f, indent=2)
  return config


def read_hf_weights(hf_dir: str) -> dict[str, np.ndarray]:
  """All tensors of the directory's safetensors files (sharded or not), as numpy float32."""
  from safetensors import safe_open
  files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
  if not files:
    raise ValueError(f"{hf_dir} holds no *.safetensors weights (PyTorch .bin files are not "
                     "read: convert them with transformers' save_pretrained first)")
  state = {}
  for name in files:
    with safe_open(os.path.join(hf_dir, name), framework="numpy") as f:
      for key in f.keys():
        state[key] = f.get_tensor(key)
  return state


def import_hf(hf_dir: str, workdir: str, param_dtype: str = "float32") -> str:
  """Writes a step-0 checkpoint of the shared format from a Llama HF directory; returns it."""
  config_path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(config_path):
    raise ValueError(f"{config_path} does not exist")
  with open(config_path) as f:
    cfg = model_config_from_hf(json.load(f), config_path).replace(param_dtype=param_dtype)
  sp_path = os.path.join(hf_dir, "tokenizer.model")
  if not os.path.isfile(sp_path):
    raise ValueError(f"{sp_path} does not exist: this codebase's tokenizer is SentencePiece, "
                     "so only Llama-family models with a SentencePiece tokenizer.model import "
                     "(Llama-3's tiktoken BPE does not)")
  tokenizer = Tokenizer.from_file(sp_path)
  if min(tokenizer.pad_id, tokenizer.eos_id) < 0:
    raise ValueError(f"{sp_path} has no pad or no eos piece (pad_id={tokenizer.pad_id}, "
                     f"eos_id={tokenizer.eos_id}); the pipelines and the sampler need both")
  if tokenizer.vocab_size > cfg.vocab_size:
    raise ValueError(f"{sp_path} has {tokenizer.vocab_size} pieces, more than config.json's "
                     f"vocab_size={cfg.vocab_size}")
  state = read_hf_weights(hf_dir)
  params = from_hf_state_dict(state, cfg)
  params = jax.tree.map(lambda a: np.asarray(a, np.dtype(param_dtype)), params)
  metadata = {"stage": "hf_import", "step": 0, "config": {"hf_dir": os.path.abspath(hf_dir)},
              "model_config": cfg.to_dict(), "model_class": "Transformer",
              "tokenizer_fingerprint": tokenizer.fingerprint, "parent": None}
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  checkpointer.save(0, params, {"step": np.zeros((), np.int32)}, metadata=metadata, tokenizer=tokenizer.to_bytes())
  checkpointer.close()
  return os.path.join(workdir, "checkpoints", "0")


def main(argv: list[str]) -> None:
  FLAGS = flags.FLAGS
  quiet.set_library_logs(FLAGS.verbose)
  if len(argv) != 2 or argv[1] not in ("export", "import"):
    sys.exit("usage: python -m train.hf_convert export --checkpoint=DIR --out=DIR | "
             "import --hf_dir=DIR --workdir=DIR")
  try:
    if argv[1] == "export":
      if not FLAGS.checkpoint or not FLAGS.out:
        raise ValueError("export needs --checkpoint and --out")
      config = export_checkpoint(FLAGS.checkpoint, FLAGS.out, merge=FLAGS.merge)
      print(f"Wrote {FLAGS.out}: LlamaForCausalLM {config['num_hidden_layers']} layers x "
            f"{config['hidden_size']}, vocab {config['vocab_size']}")
    else:
      if not FLAGS.hf_dir or not FLAGS.workdir:
        raise ValueError("import needs --hf_dir and --workdir")
      path = import_hf(FLAGS.hf_dir, FLAGS.workdir, FLAGS.param_dtype)
      print(f"Wrote {path}: use it as --config.init_from")
  except (ckpt_lib.CheckpointError, ValueError, OSError) as e:
    sys.exit("error: " + " ".join(str(e).split()))


if __name__ == "__main__":
  flags.DEFINE_string("checkpoint", "", "export: checkpoint (workdir, checkpoints or step dir).")
  flags.DEFINE_string("out", "", "export: output directory.")
  flags.DEFINE_bool("merge", False, "export: fold a LoRA checkpoint's adapters into its weights.")
  flags.DEFINE_string("hf_dir", "", "import: Hugging Face model directory.")
  flags.DEFINE_string("workdir", "", "import: workdir to write checkpoints/0 into.")
  flags.DEFINE_string("param_dtype", "float32", "import: stored parameter dtype.")
  flags.DEFINE_bool("verbose", False, "Show the libraries' INFO/WARNING logs.")
  app.run(main)
