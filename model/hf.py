"""Hugging Face Llama layout <-> our parameters: pure conversions, no files.

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

Params with fused projections or scanned layers are converted to the plain layout first
(`model.layout`), and back. Reading and writing Hugging Face directories (safetensors,
config.json, tokenizer files) and our checkpoints is `train/hf_convert.py`; the tokenizer
conversion is `data/hf_tokenizer.py`.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from model import layout
from model.config import ModelConfig

# ------------------------------------------------------------------------------- weights
def _per_layer(params: Mapping[str, Any], cfg: ModelConfig) -> list[dict]:
  """The blocks as a list of plain (unfused, unscanned) numpy dicts."""
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
