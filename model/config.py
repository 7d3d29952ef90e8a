"""`ModelConfig`: the frozen description of a decoder-only transformer, with named presets.

A config is plain data: every module in `model/` reads its shapes and switches from it, so a
model is fully described by `ModelConfig` plus its parameters (this is what a checkpoint stores
in its metadata, and what `init_from` compares when a later stage loads a trunk).

Presets (`ModelConfig.preset(name, **overrides)`):
  tiny              2 layers, 64 wide: unit tests.
  qwen2_5_0_5b      Qwen2.5-0.5B (24 x 896, GQA 14/2, q/k/v biases, tied, vocab 151936).
  qwen3_0_6b        Qwen3-0.6B (28 x 1024, GQA 16/8, head_dim 128, q/k norm, tied).
  llama3_2_1b       Llama-3.2-1B (16 x 2048, GQA 32/8, llama3 rope scaling x32, tied).
  llama3_1_8b       Llama-3.1-8B (32 x 4096, GQA 32/8, llama3 rope scaling x8).
  mistral_7b        Mistral-7B-v0.3 (32 x 4096, GQA 32/8, vocab 32768, no sliding window).
  shakespeare_char  nanoGPT's CPU "baby GPT" size (4 layers, 4 heads, 128 wide, ~0.8M params).
  gpt_125m          GPT-2 small shape with Llama blocks (12 x 768).
  llama_1b          Llama-3.2-1B's shape for pretraining from scratch (no rope scaling,
                    2048 context, scanned and rematerialised).
  llama2_7b         Llama-2-7B shape (32 x 4096, MHA, vocab 32000).
  llama3_8b         Llama-3-8B shape (32 x 4096, GQA 32/8, vocab 128256).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from absl import logging

ATTENTION_IMPLS = ("xla", "chunked", "cudnn", "splash", "auto")  # model/attention.py
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DTYPES = ("float32", "bfloat16")
# Which Hugging Face architecture a model is (export writes it; import reads model_type).
FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
ROPE_SCALING_TYPES = ("none", "llama3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and switches of the decoder-only transformer.

  Attributes:
    vocab_size: number of token ids (0 = "take it from the tokenizer" in run configs; a
      built model always has a positive value).
    embed_dim: residual stream width.
    num_layers: number of pre-norm blocks.
    num_heads: query heads.
    num_kv_heads: key/value heads (grouped-query attention; must divide num_heads).
    head_dim: per-head width (0 = embed_dim // num_heads).
    mlp_dim: SwiGLU hidden width.
    max_seq_len: longest sequence the model is configured for (rope tables, samplers).
    rope_theta: rotary embedding base.
    norm_eps: RMSNorm epsilon.
    tie_embeddings: output projection is the transposed token embedding.
    attention_impl: the attention kernel (`model/attention.py`): "xla" (reference einsum
      softmax, materialises [T, S] scores), "chunked" (online softmax over chunks, O(T)
      memory, any backend), "cudnn" (cuDNN flash attention, GPU), "splash" (Pallas splash
      attention, TPU) or "auto" (cudnn on GPU, splash on TPU, xla/chunked on CPU). A kernel
      whose constraints fail falls back, logged once. The old "dot_product" (which ran XLA
      attention) is read as "xla" from saved configs, with a warning.
    attention_block_size: chunk size of "chunked" and block size of "splash".
    scan_layers: stack block parameters on a leading `layers` axis and run them with
      `lax.scan` (one compiled block: faster compiles for deep models).
    remat_policy: what to keep for the backward pass: "none" (keep everything), "full"
      (recompute the block), "dots" (keep matmul outputs), "dots_no_batch" (keep
      matmuls without batch dims, i.e. weight-stationary ones).
    dtype: compute dtype of activations and matmuls.
    param_dtype: storage dtype of parameters.
    init_std: std of the normal initialiser (output projections are further scaled by
      1/sqrt(2 * num_layers), as in GPT-2/nanoGPT).
    one_hot_embed: look tokens up with a one-hot matmul instead of a gather. Faster on
      CPU/TPU for small vocabularies (the gather's backward is a scatter-add).
    fuse_projections: store Q/K/V as one matrix per kv-head group (`attn.wqkv`
      [E, K, G+2, D]) and SwiGLU gate/up as one (`mlp.w_gate_up` [E, 2, F]), so each runs
      as one matmul. Fewer, larger matmuls are faster on CPU and in decoding; it is a
      parameter layout, so checkpoints of the two layouts are converted with
      `model.layout.fuse_params` / `unfuse_params` (HF interop uses the unfused one).
    family: the Hugging Face architecture this model is (one of FAMILIES): what export
      writes as `model_type`; the function itself is set by the fields below.
    qkv_bias: query/key/value projections have biases (Qwen2).
    qk_norm: queries and keys are RMS-normalised per head (learned [D] scales) before the
      rotary embedding (Qwen3).
    rope_scaling_type: "none" or "llama3" (Llama 3.1/3.2's frequency-dependent rescaling of
      the rotary frequencies, with the four rope_scaling_* fields below).
    rope_scaling_factor: llama3 `factor` (low frequencies are divided by it).
    rope_scaling_low_freq_factor: llama3 `low_freq_factor`.
    rope_scaling_high_freq_factor: llama3 `high_freq_factor`.
    rope_scaling_original_max_len: llama3 `original_max_position_embeddings`.
    sliding_window: 0 (none) or the Mistral attention window W: a token attends to itself
      and the W - 1 slots before it (transformers' `kv_idx > q_idx - W`), in every kernel
      (`model.attention.attend(window=...)`) and in decoding.
  """

  vocab_size: int = 0
  embed_dim: int = 128
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int = 0
  mlp_dim: int = 344
  max_seq_len: int = 256
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = False
  attention_impl: str = "xla"
  attention_block_size: int = 512
  scan_layers: bool = False
  remat_policy: str = "none"
  dtype: str = "float32"
  param_dtype: str = "float32"
  init_std: float = 0.02
  one_hot_embed: bool = False
  fuse_projections: bool = False
  family: str = "llama"
  qkv_bias: bool = False
  qk_norm: bool = False
  rope_scaling_type: str = "none"
  rope_scaling_factor: float = 1.0
  rope_scaling_low_freq_factor: float = 1.0
  rope_scaling_high_freq_factor: float = 4.0
  rope_scaling_original_max_len: int = 8192
  sliding_window: int = 0
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: str = "attn,mlp"

  def __post_init__(self):
    def bad(field, expected):
      raise ValueError(
          f"ModelConfig.{field}={getattr(self, field)!r}: expected {expected}")

    for name in ("embed_dim", "num_layers", "num_heads", "num_kv_heads", "mlp_dim",
                 "max_seq_len"):
      if getattr(self, name) <= 0:
        bad(name, "a positive integer")
    if self.vocab_size < 0:
      bad("vocab_size", "a positive integer (0 only before the tokenizer is known)")
    if self.num_heads % self.num_kv_heads:
      bad("num_kv_heads", f"a divisor of num_heads={self.num_heads}")
    if not self.head_dim and self.embed_dim % self.num_heads:
      bad("num_heads", f"a divisor of embed_dim={self.embed_dim} (or set head_dim)")
    if self.resolved_head_dim % 2:
      bad("head_dim", "an even number (rotary embeddings rotate pairs)")
    if self.attention_impl == "dot_product":
      bad("attention_impl", f"one of {ATTENTION_IMPLS}; 'dot_product' ran XLA attention (no "
          "cuDNN), so it is gone: use 'cudnn' or 'auto' on GPU, 'splash' on TPU, 'xla' to keep "
          "the old behaviour")
    if self.attention_impl not in ATTENTION_IMPLS:
      bad("attention_impl", f"one of {ATTENTION_IMPLS}")
    if self.attention_block_size <= 0:
      bad("attention_block_size", "a positive integer")
    if self.remat_policy not in REMAT_POLICIES:
      bad("remat_policy", f"one of {REMAT_POLICIES}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        bad(name, f"one of {DTYPES}")
    if self.family not in FAMILIES:
      bad("family", f"one of {FAMILIES}")
    if self.rope_scaling_type not in ROPE_SCALING_TYPES:
      bad("rope_scaling_type", f"one of {ROPE_SCALING_TYPES}")
    if self.rope_scaling_type == "llama3":
      if self.rope_scaling_factor < 1:
        bad("rope_scaling_factor", ">= 1")
      if not 0 < self.rope_scaling_low_freq_factor < self.rope_scaling_high_freq_factor:
        bad("rope_scaling_low_freq_factor",
            f"in (0, rope_scaling_high_freq_factor={self.rope_scaling_high_freq_factor})")
      if self.rope_scaling_original_max_len <= 0:
        bad("rope_scaling_original_max_len", "a positive integer")
    if self.sliding_window < 0:
      bad("sliding_window", "0 (no window) or a positive integer")
    if self.lora_rank < 0:
      bad("lora_rank", "0 (no adapters) or a positive rank")
    if self.lora_rank and not self.lora_targets.strip(" ,"):
      bad("lora_targets", "at least one of q,k,v,o,gate,up,down (or attn, mlp)")

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.embed_dim // self.num_heads

  def replace(self, **changes: Any) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "ModelConfig":
    """Builds a config from a mapping, rejecting unknown fields by name."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"Unknown ModelConfig field(s) {unknown}; known fields: {sorted(known)}")
    values = dict(values)
    if values.get("attention_impl") == "dot_product":
      # Checkpoints saved before the kernel registry: "dot_product" always ran XLA attention.
      logging.warning("ModelConfig.attention_impl='dot_product' is read as 'xla' (what it "
                      "ran); choose 'cudnn'/'auto' on GPU or 'splash' on TPU for fused kernels")
      values["attention_impl"] = "xla"
    return cls(**values)

  @classmethod
  def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
    """Returns the named preset with `overrides` applied (unknown names raise)."""
    if name not in PRESETS:
      raise ValueError(f"Unknown model preset {name!r}; presets: {sorted(PRESETS)}")
    return cls.from_dict({**PRESETS[name], **overrides})

  def num_params(self, include_embedding: bool = True) -> int:
    """Parameter count from shapes alone (matches the built model exactly)."""
    d, hd = self.embed_dim, self.resolved_head_dim
    attn = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
    if self.qkv_bias:
      attn += hd * (self.num_heads + 2 * self.num_kv_heads)
    if self.qk_norm:
      attn += 2 * hd
    mlp = 3 * d * self.mlp_dim
    per_layer = attn + mlp + 2 * d  # two RMSNorm scales
    total = self.num_layers * per_layer + d  # final norm
    embed = self.vocab_size * d
    if include_embedding:
      total += embed
    if not self.tie_embeddings:
      total += embed
    return total


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=128, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 mlp_dim=128, max_seq_len=64),
    # nanoGPT baby GPT: n_layer=4, n_head=4, n_embd=128, block_size=64. SwiGLU width 344
    # (= 2/3 * 4 * 128 rounded to 8) keeps the MLP at nanoGPT's 4*d*d*2 parameter count.
    "shakespeare_char": dict(embed_dim=128, num_layers=4, num_heads=4, num_kv_heads=4,
                             mlp_dim=344, max_seq_len=64),
    "gpt_125m": dict(vocab_size=32000, embed_dim=768, num_layers=12, num_heads=12,
                     num_kv_heads=12, mlp_dim=2048, max_seq_len=2048, tie_embeddings=True),
    "llama_1b": dict(vocab_size=128256, embed_dim=2048, num_layers=16, num_heads=32,
                     num_kv_heads=8, mlp_dim=8192, max_seq_len=2048, rope_theta=500000.0,
                     tie_embeddings=True, scan_layers=True, remat_policy="dots_no_batch"),
    "llama2_7b": dict(vocab_size=32000, embed_dim=4096, num_layers=32, num_heads=32,
                      num_kv_heads=32, mlp_dim=11008, max_seq_len=4096, scan_layers=True,
                      remat_policy="dots_no_batch"),
    # The real shapes of Hugging Face models (`init_from=hf:<dir>` derives the same config
    # from their config.json; these are for sizing, sharding goldens and benchmarks).
    "qwen2_5_0_5b": dict(family="qwen2", vocab_size=151936, embed_dim=896, num_layers=24,
                         num_heads=14, num_kv_heads=2, mlp_dim=4864, max_seq_len=32768,
                         rope_theta=1000000.0, norm_eps=1e-6, tie_embeddings=True,
                         qkv_bias=True),
    "qwen3_0_6b": dict(family="qwen3", vocab_size=151936, embed_dim=1024, num_layers=28,
                       num_heads=16, num_kv_heads=8, head_dim=128, mlp_dim=3072,
                       max_seq_len=40960, rope_theta=1000000.0, norm_eps=1e-6,
                       tie_embeddings=True, qk_norm=True),
    "llama3_2_1b": dict(vocab_size=128256, embed_dim=2048, num_layers=16, num_heads=32,
                        num_kv_heads=8, mlp_dim=8192, max_seq_len=131072,
                        rope_theta=500000.0, tie_embeddings=True, rope_scaling_type="llama3",
                        rope_scaling_factor=32.0, rope_scaling_original_max_len=8192),
    "llama3_1_8b": dict(vocab_size=128256, embed_dim=4096, num_layers=32, num_heads=32,
                        num_kv_heads=8, mlp_dim=14336, max_seq_len=131072,
                        rope_theta=500000.0, rope_scaling_type="llama3",
                        rope_scaling_factor=8.0, rope_scaling_original_max_len=8192,
                        scan_layers=True, remat_policy="dots_no_batch"),
    "mistral_7b": dict(family="mistral", vocab_size=32768, embed_dim=4096, num_layers=32,
                       num_heads=32, num_kv_heads=8, mlp_dim=14336, max_seq_len=32768,
                       rope_theta=1000000.0, scan_layers=True, remat_policy="dots_no_batch"),
    "llama3_8b": dict(vocab_size=128256, embed_dim=4096, num_layers=32, num_heads=32,
                      num_kv_heads=8, mlp_dim=14336, max_seq_len=8192, rope_theta=500000.0,
                      scan_layers=True, remat_policy="dots_no_batch"),
}
