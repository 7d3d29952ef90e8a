"""Benchmark: batched sampling with the KV cache, without it, and Hugging Face `generate`.

  python benchmarks/sample_throughput.py [--batch=8] [--new_tokens=128] [--prompt_len=16]

A 4-layer, 256-wide Llama-shaped model (random weights, the same shape in both frameworks:
RMSNorm, RoPE, SwiGLU 688, 4 heads, vocab 8192, untied output) generates `new_tokens`
tokens for `batch` prompts of `prompt_len` tokens, greedily and without an EOS so every
run produces exactly batch x new_tokens tokens. Timed after one warm-up call (compilation
for JAX, allocator warm-up for torch), best of `--repeats`.

  tokens_per_sec_cached       model/sampling.py with the KV cache (one CPU device)
  tokens_per_sec_uncached     the same loop recomputing the whole sequence every step
  tokens_per_sec_transformers transformers' LlamaForCausalLM.generate (torch CPU, eager)

Needs the `hf` extra (`pip install -e ".[hf]"`: torch 2.13.0 CPU and transformers). The
issue's reference: transformers generated ~730 tokens/s for this shape on these CPUs.
Last line: one JSON object with the keys above and `speedup_vs_transformers`.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 8, "Prompts per batch.")
flags.DEFINE_integer("new_tokens", 128, "Tokens generated per prompt.")
flags.DEFINE_integer("prompt_len", 16, "Prompt length (tokens).")
flags.DEFINE_integer("repeats", 5, "Timed repetitions (best is reported).")

SHAPE = dict(vocab_size=8192, embed_dim=256, num_layers=4, num_heads=4, num_kv_heads=4,
             mlp_dim=688, max_seq_len=512, rope_theta=10000.0, tie_embeddings=False)
# Our side stores Q/K/V and gate/up fused (the same parameters in another layout, see
# model/layout.py): fewer, larger matmuls per decode step.
JAX_LAYOUT = dict(fuse_projections=True)


def best_time(fn, repeats: int) -> float:
  fn()  # warm-up (compilation)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)


def jax_tokens_per_sec(prompts, use_cache: bool) -> float:
  from flax import nnx
  from model.config import ModelConfig
  from model.sampling import Sampler, SamplingConfig
  from model.transformer import build_model
  cfg = ModelConfig.from_dict({**ModelConfig().to_dict(), **SHAPE, **JAX_LAYOUT})
  graphdef, state = nnx.split(build_model(cfg, seed=0))
  params = nnx.to_pure_dict(state)
  sampler = Sampler(graphdef, cfg)
  scfg = SamplingConfig(max_new_tokens=FLAGS.new_tokens, temperature=0.0,
                        prompt_bucket=FLAGS.prompt_len, use_cache=use_cache)

  def run():
    out = sampler.generate(params, prompts, scfg)
    assert out.response_mask.sum() == FLAGS.batch * FLAGS.new_tokens
  return FLAGS.batch * FLAGS.new_tokens / best_time(run, FLAGS.repeats)


def transformers_tokens_per_sec(prompts) -> float:
  try:
    import torch
    import transformers
  except ImportError as e:
    raise SystemExit(f"{e}: this benchmark compares against Hugging Face transformers; "
                     "install the hf extra: pip install -e '.[hf]'") from e
  config = transformers.LlamaConfig(
      vocab_size=SHAPE["vocab_size"], hidden_size=SHAPE["embed_dim"],
      intermediate_size=SHAPE["mlp_dim"], num_hidden_layers=SHAPE["num_layers"],
      num_attention_heads=SHAPE["num_heads"], num_key_value_heads=SHAPE["num_kv_heads"],
      max_position_embeddings=SHAPE["max_seq_len"], rope_theta=SHAPE["rope_theta"],
      tie_word_embeddings=False, bos_token_id=2, eos_token_id=None, pad_token_id=0)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(config).eval()
  input_ids = torch.tensor(prompts, dtype=torch.long)

  def run():
    with torch.inference_mode():
      out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                           max_new_tokens=FLAGS.new_tokens, min_new_tokens=FLAGS.new_tokens,
                           do_sample=False, pad_token_id=0)
    assert out.shape == (FLAGS.batch, FLAGS.prompt_len + FLAGS.new_tokens)
  return FLAGS.batch * FLAGS.new_tokens / best_time(run, FLAGS.repeats)


def main(argv):
  del argv
  import numpy as np
  rng = np.random.default_rng(0)
  prompts = rng.integers(4, SHAPE["vocab_size"], (FLAGS.batch, FLAGS.prompt_len)).tolist()
  cached = jax_tokens_per_sec(prompts, use_cache=True)
  print(f"JAX with KV cache:    {cached:,.0f} tokens/s", flush=True)
  uncached = jax_tokens_per_sec(prompts, use_cache=False)
  print(f"JAX without cache:    {uncached:,.0f} tokens/s", flush=True)
  hf = transformers_tokens_per_sec(prompts)
  print(f"transformers.generate: {hf:,.0f} tokens/s", flush=True)
  print(f"batch {FLAGS.batch}, prompt {FLAGS.prompt_len}, {FLAGS.new_tokens} new tokens; "
        f"cached / transformers = {cached / hf:.2f}x, cached / uncached = "
        f"{cached / uncached:.2f}x")
  print(json.dumps({"tokens_per_sec_cached": cached, "tokens_per_sec_uncached": uncached,
                    "tokens_per_sec_transformers": hf, "speedup_vs_transformers": cached / hf,
                    "batch": FLAGS.batch, "new_tokens": FLAGS.new_tokens,
                    "prompt_len": FLAGS.prompt_len}))


if __name__ == "__main__":
  app.run(main)
