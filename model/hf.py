"""Hugging Face interop: checkpoints of the shared format <-> `LlamaForCausalLM` directories.

  python -m model.hf export --checkpoint=runs/sft --out=hf/sft
  python -m model.hf import --hf_dir=path/to/llama --workdir=runs/imported

Our `Transformer` is a Llama block for block (pre-RMSNorm, rotary embeddings in the
"rotate half" layout, grouped-query attention with query head n on kv head n // G, SwiGLU,
optional tied embeddings), so the conversion is a relayout of each matrix, no arithmetic:

  ours                              transformers (torch Linear: y = x @ W.T)
  embedding [V, E]                  model.embed_tokens.weight [V, E]
  blocks.i.attn.wq [E, N, D]        model.layers.i.self_attn.q_proj.weight [N*D, E]
  blocks.i.attn.wk / wv [E, K, D]   ...k_proj / v_proj.weight [K*D, E]
  blocks.i.attn.wo [N, D, E]        ...o_proj.weight [E, N*D]
  blocks.i.mlp.w_gate / w_up [E, F] model.layers.i.mlp.gate_proj / up_proj.weight [F, E]
  blocks.i.mlp.w_down [F, E]        ...mlp.down_proj.weight [E, F]
  blocks.i.attn_norm.scale          ...input_layernorm.weight
  blocks.i.mlp_norm.scale           ...post_attention_layernorm.weight
  final_norm.scale                  model.norm.weight
  lm_head [E, V] (untied only)      lm_head.weight [V, E]

Checkpoints with fused projections or scanned layers are converted to the plain layout
first (`model.layout`). Only language models (`Transformer`) export; a reward model's
scalar head has no Llama counterpart.

Export writes `config.json`, `model.safetensors` (float32, or the checkpoint's param dtype),
`generation_config.json` and the tokenizer: our SentencePiece model as `tokenizer.model`
plus an equivalent `tokenizer.json` (a `tokenizers` BPE with the same pieces, merges derived
from the piece scores, identity normalisation, no dummy prefix, the user-defined pieces such
as "\\n" and the chat markers as added tokens), so `AutoTokenizer.from_pretrained` encodes
exactly as we do (tested on real text) without any conversion step on the reader's side.

Import reads a Llama-family directory (`config.json` with `model_type` llama, safetensors
weights, a SentencePiece `tokenizer.model`) and writes a step-0 checkpoint of the shared
format (stage "hf_import") that any stage can `init_from`. Llama-3-style tokenizers (a
tiktoken BPE in tokenizer.json only) cannot be represented by our SentencePiece tokenizer
and are refused with that reason.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Mapping

import numpy as np

from model.config import ModelConfig

SPACE = "\u2581"


# ------------------------------------------------------------------------------- weights
def _per_layer(params: Mapping[str, Any], cfg: ModelConfig) -> list[dict]:
  """The blocks as a list of plain (unfused, unscanned) numpy dicts."""
  from model import layout
  params = layout.unfuse_params(params, cfg) if cfg.fuse_projections else params
  blocks = params["blocks"]
  to_np = lambda tree: {k: (to_np(v) if isinstance(v, Mapping) else np.asarray(v))
                        for k, v in tree.items()}
  if cfg.scan_layers:
    stacked = to_np(blocks)
    return [{k: {n: a[i] for n, a in sub.items()} for k, sub in stacked.items()}
            for i in range(cfg.num_layers)]
  return [to_np(blocks[i] if i in blocks else blocks[str(i)]) for i in range(cfg.num_layers)]


def to_hf_state_dict(params: Mapping[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
  """Our params (pure dict) -> transformers LlamaForCausalLM state dict (numpy)."""
  e, n, k, d = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
  out = {"model.embed_tokens.weight": np.asarray(params["embedding"]),
         "model.norm.weight": np.asarray(params["final_norm"]["scale"])}
  for i, b in enumerate(_per_layer(params, cfg)):
    p = f"model.layers.{i}."
    out[p + "self_attn.q_proj.weight"] = b["attn"]["wq"].reshape(e, n * d).T
    out[p + "self_attn.k_proj.weight"] = b["attn"]["wk"].reshape(e, k * d).T
    out[p + "self_attn.v_proj.weight"] = b["attn"]["wv"].reshape(e, k * d).T
    out[p + "self_attn.o_proj.weight"] = b["attn"]["wo"].reshape(n * d, e).T
    out[p + "mlp.gate_proj.weight"] = b["mlp"]["w_gate"].T
    out[p + "mlp.up_proj.weight"] = b["mlp"]["w_up"].T
    out[p + "mlp.down_proj.weight"] = b["mlp"]["w_down"].T
    out[p + "input_layernorm.weight"] = b["attn_norm"]["scale"]
    out[p + "post_attention_layernorm.weight"] = b["mlp_norm"]["scale"]
  if not cfg.tie_embeddings:
    if "lm_head" not in params:
      raise ValueError("These params have no lm_head (a reward-model trunk?); only language "
                       "models export to LlamaForCausalLM")
    out["lm_head.weight"] = np.asarray(params["lm_head"]).T
  return {name: np.ascontiguousarray(a) for name, a in out.items()}


def from_hf_state_dict(state: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict[str, Any]:
  """transformers LlamaForCausalLM state dict -> our params (plain layout, numpy).

  The layout follows `cfg` (fused projections and scanned layers are produced here).

  Raises:
    ValueError: a missing or misshapen tensor (named), or an unexpected one (e.g. biases).
  """
  from model import layout
  e, n, k, d, f = (cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim,
                   cfg.mlp_dim)
  used = set()

  def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in state:
      raise ValueError(f"The Hugging Face weights have no {name!r}")
    a = np.asarray(state[name])
    if a.shape != shape:
      raise ValueError(f"{name}: shape {a.shape}, expected {shape} from config.json")
    used.add(name)
    return a

  blocks = {}
  for i in range(cfg.num_layers):
    p = f"model.layers.{i}."
    blocks[i] = {
        "attn": {"wq": get(p + "self_attn.q_proj.weight", (n * d, e)).T.reshape(e, n, d),
                 "wk": get(p + "self_attn.k_proj.weight", (k * d, e)).T.reshape(e, k, d),
                 "wv": get(p + "self_attn.v_proj.weight", (k * d, e)).T.reshape(e, k, d),
                 "wo": get(p + "self_attn.o_proj.weight", (e, n * d)).T.reshape(n, d, e)},
        "mlp": {"w_gate": get(p + "mlp.gate_proj.weight", (f, e)).T,
                "w_up": get(p + "mlp.up_proj.weight", (f, e)).T,
                "w_down": get(p + "mlp.down_proj.weight", (e, f)).T},
        "attn_norm": {"scale": get(p + "input_layernorm.weight", (e,))},
        "mlp_norm": {"scale": get(p + "post_attention_layernorm.weight", (e,))},
    }
  params: dict[str, Any] = {
      "embedding": get("model.embed_tokens.weight", (cfg.vocab_size, e)),
      "final_norm": {"scale": get("model.norm.weight", (e,))}}
  if not cfg.tie_embeddings:
    params["lm_head"] = get("lm_head.weight", (cfg.vocab_size, e)).T
  unexpected = sorted(set(state) - used - {"lm_head.weight"})
  unexpected = [u for u in unexpected if not u.endswith("rotary_emb.inv_freq")]
  if unexpected:
    raise ValueError(f"Unexpected Hugging Face tensors (this converter knows the plain Llama "
                     f"layout): {unexpected[:5]}")
  if cfg.scan_layers:
    params["blocks"] = {
        group: {name: np.stack([blocks[i][group][name] for i in range(cfg.num_layers)])
                for name in blocks[0][group]} for group in blocks[0]}
  else:
    params["blocks"] = blocks
  params = {key: (np.ascontiguousarray(v) if isinstance(v, np.ndarray) else v)
            for key, v in params.items()}
  return layout.fuse_params(params, cfg) if cfg.fuse_projections else params


def hf_config(cfg: ModelConfig, tokenizer: Any | None = None) -> dict[str, Any]:
  """config.json of the equivalent LlamaForCausalLM."""
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.embed_dim,
      "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.resolved_head_dim, "max_position_embeddings": cfg.max_seq_len,
      "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
      "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
      "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
      "initializer_range": cfg.init_std, "torch_dtype": cfg.param_dtype,
      **({"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
          "pad_token_id": tokenizer.pad_id} if tokenizer is not None else {}),
  }


def model_config_from_hf(config: Mapping[str, Any], where: str = "config.json") -> ModelConfig:
  """Our ModelConfig of a Llama config.json (fields that change the function are checked)."""
  if config.get("model_type") not in ("llama", "mistral"):
    raise ValueError(f"{where}: model_type={config.get('model_type')!r}; only Llama-family "
                     "models (model_type llama) convert")
  for field, allowed in (("hidden_act", ("silu",)), ("attention_bias", (False, None)),
                         ("mlp_bias", (False, None)), ("rope_scaling", (None,)),
                         ("sliding_window", (None,))):
    if config.get(field) not in allowed:
      raise ValueError(f"{where}: {field}={config.get(field)!r} is not supported (expected "
                       f"{allowed[0]!r})")
  heads = config["num_attention_heads"]
  rope = config.get("rope_parameters") or {}
  if rope.get("rope_type", "default") != "default":
    raise ValueError(f"{where}: rope_parameters.rope_type={rope.get('rope_type')!r} is not "
                     "supported (expected 'default')")
  return ModelConfig(
      vocab_size=config["vocab_size"], embed_dim=config["hidden_size"],
      num_layers=config["num_hidden_layers"], num_heads=heads,
      num_kv_heads=config.get("num_key_value_heads") or heads,
      # 0 = embed_dim // num_heads, our canonical form of the usual case.
      head_dim=(0 if config.get("head_dim") in (None, config["hidden_size"] // heads)
                else config["head_dim"]),
      mlp_dim=config["intermediate_size"],
      max_seq_len=config.get("max_position_embeddings", 2048),
      rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
      norm_eps=float(config.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(config.get("tie_word_embeddings", False)),
      init_std=float(config.get("initializer_range", 0.02)))


# ------------------------------------------------------------------------------ tokenizer
def hf_tokenizer(tokenizer: Any):
  """A transformers PreTrainedTokenizerFast that encodes exactly as our SentencePiece model.

  Supports the models `data.tokenizer` trains (BPE, identity normalisation, no dummy
  prefix, optional byte fallback); other model types are refused.
  """
  from sentencepiece import sentencepiece_model_pb2
  from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, normalizers
  from transformers import PreTrainedTokenizerFast
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(tokenizer.to_bytes())
  spec, norm = proto.trainer_spec, proto.normalizer_spec
  if spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
    raise ValueError("Only SentencePiece BPE tokenizers export to tokenizer.json (this one is "
                     f"{sentencepiece_model_pb2.TrainerSpec.ModelType.Name(spec.model_type)})")
  if norm.add_dummy_prefix or norm.name not in ("identity", ""):
    raise ValueError(f"Tokenizer normalisation {norm.name!r} / add_dummy_prefix="
                     f"{norm.add_dummy_prefix}: only the identity, no-prefix models of "
                     "data.tokenizer export")
  kinds = sentencepiece_model_pb2.ModelProto.SentencePiece
  vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
  # BPE merges from the pieces: a NORMAL piece is the merge of two pieces; SentencePiece
  # applies the merge whose result scores highest first, so merges are ranked by score.
  normal = [(p.score, i, p.piece) for i, p in enumerate(proto.pieces) if p.type == kinds.NORMAL]
  merges = []
  for score, i, piece in sorted(normal, key=lambda x: (-x[0], x[1])):
    for cut in range(1, len(piece)):
      left, right = piece[:cut], piece[cut:]
      if left in vocab and right in vocab:
        merges.append((vocab[left], vocab[right], score, i, left, right))
  merges.sort(key=lambda m: (-m[2], m[3], m[0], m[1]))
  model = models.BPE(vocab=vocab, merges=[(m[4], m[5]) for m in merges],
                     unk_token=proto.pieces[tokenizer.unk_id].piece, fuse_unk=True,
                     byte_fallback=spec.byte_fallback)
  hf = HFTokenizer(model)
  hf.normalizer = normalizers.Replace(" ", SPACE)
  hf.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(),
                                  decoders.Fuse()])
  added = []
  for i, p in enumerate(proto.pieces):
    if p.type in (kinds.CONTROL, kinds.UNKNOWN, kinds.USER_DEFINED):
      added.append(AddedToken(p.piece.replace(SPACE, " "), special=p.type != kinds.USER_DEFINED,
                              normalized=False))
  hf.add_tokens([a for a in added if not a.special])
  hf.add_special_tokens([a for a in added if a.special])
  for a in added:  # added tokens must keep their SentencePiece ids
    got = hf.token_to_id(a.content)
    if got != vocab.get(a.content.replace(" ", SPACE), got):
      raise ValueError(f"Added token {a.content!r} got id {got}, SentencePiece has "
                       f"{vocab.get(a.content)}")
  piece = lambda i: proto.pieces[i].piece if i >= 0 else None
  return PreTrainedTokenizerFast(
      tokenizer_object=hf, bos_token=piece(tokenizer.bos_id), eos_token=piece(tokenizer.eos_id),
      unk_token=piece(tokenizer.unk_id), pad_token=piece(tokenizer.pad_id),
      clean_up_tokenization_spaces=False, model_max_length=1_000_000)


# --------------------------------------------------------------------------- directories
def export_checkpoint(checkpoint: str, out_dir: str) -> dict[str, Any]:
  """Writes `checkpoint` (a language model) as a LlamaForCausalLM directory; returns config."""
  from safetensors.numpy import save_file
  from eval.loading import load_checkpoint
  from model.transformer import Transformer
  loaded = load_checkpoint(checkpoint, expect=Transformer)
  cfg = loaded.model_cfg
  import jax
  params = jax.device_get(loaded.params)
  state = to_hf_state_dict(params, cfg)
  os.makedirs(out_dir, exist_ok=True)
  config = hf_config(cfg, loaded.tokenizer)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
    json.dump({"bos_token_id": loaded.tokenizer.bos_id, "eos_token_id": loaded.tokenizer.eos_id,
               "pad_token_id": loaded.tokenizer.pad_id}, f, indent=2)
  save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
  loaded.tokenizer.save(os.path.join(out_dir, "tokenizer.model"))
  hf_tokenizer(loaded.tokenizer).save_pretrained(out_dir)
  with open(os.path.join(out_dir, "lmlife_source.json"), "w") as f:
    json.dump({"checkpoint": loaded.meta["checkpoint_path"], "stage": loaded.meta.get("stage"),
               "step": loaded.meta.get("step")}, f, indent=2)
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
  import jax
  from data.tokenizer import Tokenizer
  from train import checkpoint as ckpt_lib
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
  from absl import flags as absl_flags
  from train import checkpoint as ckpt_lib
  flags = absl_flags.FLAGS
  if len(argv) != 2 or argv[1] not in ("export", "import"):
    sys.exit("usage: python -m model.hf export --checkpoint=DIR --out=DIR | "
             "import --hf_dir=DIR --workdir=DIR")
  try:
    if argv[1] == "export":
      if not flags.checkpoint or not flags.out:
        raise ValueError("export needs --checkpoint and --out")
      config = export_checkpoint(flags.checkpoint, flags.out)
      print(f"Wrote {flags.out}: LlamaForCausalLM {config['num_hidden_layers']} layers x "
            f"{config['hidden_size']}, vocab {config['vocab_size']}")
    else:
      if not flags.hf_dir or not flags.workdir:
        raise ValueError("import needs --hf_dir and --workdir")
      path = import_hf(flags.hf_dir, flags.workdir, flags.param_dtype)
      print(f"Wrote {path}: use it as --config.init_from")
  except (ckpt_lib.CheckpointError, ValueError, OSError) as e:
    sys.exit("error: " + " ".join(str(e).split()))


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_string("checkpoint", "", "export: checkpoint (workdir, checkpoints or step dir).")
  flags.DEFINE_string("out", "", "export: output directory.")
  flags.DEFINE_string("hf_dir", "", "import: Hugging Face model directory.")
  flags.DEFINE_string("workdir", "", "import: workdir to write checkpoints/0 into.")
  flags.DEFINE_string("param_dtype", "float32", "import: stored parameter dtype.")
  app.run(main)
