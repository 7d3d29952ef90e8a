"""Hugging Face `config.json` <-> `ModelConfig`, for the Llama, Qwen2, Qwen3 and Mistral families.

  model_config_from_hf(config, where)  config.json dict -> ModelConfig (unsupported values
                                       raise ValueError naming the file and field)
  hf_config(cfg, ids)                  ModelConfig -> config.json dict of cfg.family

What each family adds to the Llama block, and the ModelConfig field that carries it:
  llama    rope scaling "llama3" (3.1 / 3.2)           rope_scaling_*
  qwen2    q/k/v biases, tied embeddings when small    qkv_bias, tie_embeddings
  qwen3    per-head q/k RMSNorm, explicit head_dim     qk_norm, head_dim
  mistral  sliding_window                              sliding_window
Gemma is not converted: its block differs in more than switches (embeddings scaled by
sqrt(E), (1 + w) norm scales, GeGLU, Gemma 2's soft-capping and post-norms).
"""

from __future__ import annotations

from typing import Any, Mapping

from model.config import ModelConfig

# family -> (architectures[0], model_type, head_dim default when config.json has none)
FAMILY_ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM"}
# transformers' class defaults where a config.json may omit the field.
_MAX_POSITIONS = {"llama": 2048, "qwen2": 32768, "qwen3": 32768, "mistral": 131072}
# The switches each family's transformers class has (True: required; sliding_window: allowed).
_SWITCHES = {
    "llama": {"qkv_bias": False, "qk_norm": False, "sliding_window": False},
    "qwen2": {"qkv_bias": True, "qk_norm": False, "sliding_window": False},
    "qwen3": {"qkv_bias": False, "qk_norm": True, "sliding_window": False},
    "mistral": {"qkv_bias": False, "qk_norm": False, "sliding_window": True}}
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor")


def _bad(where: str, field: str, value: Any, expected: str) -> ValueError:
  return ValueError(f"{where}: {field}={value!r} is not supported (expected {expected})")


def _rope(config: Mapping[str, Any], where: str) -> dict[str, Any]:
  """ModelConfig rope fields from `rope_parameters` (transformers 5) or `rope_scaling` +
  `rope_theta` (older files)."""
  params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
  field = "rope_parameters" if config.get("rope_parameters") else "rope_scaling"
  kind = params.get("rope_type", params.get("type", "default"))
  theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
  partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
  if partial not in (None, 1, 1.0):
    raise _bad(where, "partial_rotary_factor", partial, "1.0")
  if kind == "default":
    return {"rope_theta": theta}
  if kind != "llama3":
    raise _bad(where, f"{field}.rope_type", kind, "'default' or 'llama3'")
  missing = [k for k in _LLAMA3_KEYS if k not in params]
  if missing:
    raise ValueError(f"{where}: {field} of rope_type 'llama3' has no {missing[0]!r}")
  return {"rope_theta": theta, "rope_scaling_type": "llama3",
          "rope_scaling_factor": float(params["factor"]),
          "rope_scaling_low_freq_factor": float(params["low_freq_factor"]),
          "rope_scaling_high_freq_factor": float(params["high_freq_factor"]),
          "rope_scaling_original_max_len": int(params.get(
              "original_max_position_embeddings", config.get("max_position_embeddings")))}


def _family_fields(family: str, config: Mapping[str, Any], where: str) -> dict[str, Any]:
  """The family's switches, refusing the values our block cannot compute."""
  def expect(field: str, allowed: tuple, expected: str) -> None:
    if config.get(field) not in allowed:
      raise _bad(where, field, config.get(field), expected)

  expect("hidden_act", ("silu", None), "'silu'")
  expect("mlp_bias", (False, None), "false")
  if family in ("llama", "qwen3"):  # their attention_bias also adds an o_proj bias
    expect("attention_bias", (False, None), "false")
  if family in ("qwen2", "qwen3"):
    expect("use_sliding_window", (False, None), "false: Qwen's per-layer windows "
           "(max_window_layers) are not converted")
    kinds = set(config.get("layer_types") or ["full_attention"])
    if kinds != {"full_attention"}:
      raise _bad(where, "layer_types", sorted(kinds), "only 'full_attention'")
  out: dict[str, Any] = {"family": family, "qkv_bias": family == "qwen2",
                         "qk_norm": family == "qwen3"}
  if family == "mistral" and config.get("sliding_window"):
    out["sliding_window"] = int(config["sliding_window"])
  return out


def model_config_from_hf(config: Mapping[str, Any], where: str = "config.json") -> ModelConfig:
  """Our ModelConfig of a Llama / Qwen2 / Qwen3 / Mistral config.json.

  Every field that changes the function is read or checked; `param_dtype` stays float32
  (a run chooses its own). A Mistral sliding window is kept (every attention kernel applies it).

  Raises:
    ValueError: "<where>: <field>=<value> is not supported (expected ...)" for an unknown
      model_type or a value the block cannot compute.
  """
  family = config.get("model_type")
  if family not in FAMILY_ARCHITECTURES:
    raise _bad(where, "model_type", family, f"one of {sorted(FAMILY_ARCHITECTURES)}")
  for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size"):
    if not isinstance(config.get(field), int):
      raise ValueError(f"{where}: {field} is missing or not an integer")
  fields = {**_family_fields(family, config, where), **_rope(config, where)}
  heads, hidden = config["num_attention_heads"], config["hidden_size"]
  head_dim = config.get("head_dim") or (128 if family == "qwen3" else hidden // heads)
  max_len = int(config.get("max_position_embeddings") or _MAX_POSITIONS[family])
  try:
    return ModelConfig(
        vocab_size=config["vocab_size"], embed_dim=hidden,
        num_layers=config["num_hidden_layers"], num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        # 0 = embed_dim // num_heads, our canonical form of the usual case.
        head_dim=0 if head_dim * heads == hidden else head_dim,
        mlp_dim=config["intermediate_size"], max_seq_len=max_len,
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        init_std=float(config.get("initializer_range", 0.02)), **fields)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from e


def hf_config(cfg: ModelConfig, ids: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """config.json of cfg's family (transformers 5 `rope_parameters`, plus `rope_theta` and
  `rope_scaling` for older readers). `ids`: bos/eos/pad token ids to record.

  Raises:
    ValueError: a combination of switches that cfg.family's transformers class cannot hold.
  """
  want = _SWITCHES[cfg.family]
  have = {"qkv_bias": cfg.qkv_bias, "qk_norm": cfg.qk_norm,
          "sliding_window": bool(cfg.sliding_window)}
  for field, value in have.items():
    if value and not want[field] or field != "sliding_window" and want[field] and not value:
      raise ValueError(f"ModelConfig.{field}={getattr(cfg, field)!r} with family="
                       f"{cfg.family!r} has no {FAMILY_ARCHITECTURES[cfg.family]} counterpart")
  rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling_type == "llama3":
    rope.update(rope_type="llama3", factor=cfg.rope_scaling_factor,
                low_freq_factor=cfg.rope_scaling_low_freq_factor,
                high_freq_factor=cfg.rope_scaling_high_freq_factor,
                original_max_position_embeddings=cfg.rope_scaling_original_max_len)
  out: dict[str, Any] = {
      "architectures": [FAMILY_ARCHITECTURES[cfg.family]], "model_type": cfg.family,
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.embed_dim,
      "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.resolved_head_dim, "max_position_embeddings": cfg.max_seq_len,
      "rms_norm_eps": cfg.norm_eps, "rope_parameters": rope, "rope_theta": cfg.rope_theta,
      "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
      "attention_dropout": 0.0, "initializer_range": cfg.init_std, "dtype": cfg.param_dtype,
      "torch_dtype": cfg.param_dtype, **dict(ids or {})}
  if cfg.rope_scaling_type != "none":
    out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
  if cfg.family in ("llama", "qwen3"):
    out["attention_bias"] = False
  if cfg.family == "llama":
    out["mlp_bias"] = False
  if cfg.family in ("qwen2", "qwen3"):
    out.update(use_sliding_window=False, sliding_window=None,
               max_window_layers=cfg.num_layers)
  if cfg.family == "mistral":
    out["sliding_window"] = cfg.sliding_window or None
  return out
