"""Tiny random Hugging Face model directories of real families with the REAL tokenizers, for
the end-to-end chain (tests/test_e2e_hf_chain.py).

  llama3_dir: LlamaForCausalLM with Llama-3's shapes in miniature (GQA 4/2, llama3 rope
      scaling, tied embeddings, vocab 128256) and Meta's layout of the tokenizer: the real
      tiktoken BPE file as `tokenizer.model` plus a tokenizer_config.json with Llama-3
      Instruct's special tokens and chat template.
  qwen2_dir: Qwen2ForCausalLM (q/k/v biases, tied embeddings) with a Qwen-style
      tokenizer.json: the real Llama-3 byte-level BPE ranks (converted by
      data/tiktoken_convert.py) with Qwen's specials <|endoftext|>, <|im_start|>, <|im_end|>
      after them, no BOS, and a Qwen2.5-style ChatML template. (Qwen's own vocabulary is not
      in ../shared/data; the Llama-2 SentencePiece file is checked by
      tests/test_data_hf_tokenizer.py.)

Everything is built locally (transformers' config classes + save_pretrained); nothing is
downloaded.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
import transformers

from chat_template_fixtures import LLAMA3_TEMPLATE, QWEN25_TEMPLATE, QWEN_SPECIAL_TOKENS
from data import tiktoken_convert
from data.readers import resolve_data_path

LLAMA3_FILE = "tokenizers/tokenizer_llama3.tiktoken"
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             initializer_range=0.05)


def _save_model(config, path: str, seed: int = 0) -> None:
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1 and "norm" not in name:  # biases: random, so they matter
        p.copy_(0.1 * torch.randn_like(p))
  model.save_pretrained(path)


def llama3_dir(path: str) -> str:
  """A Llama-3.2-style directory (see the module docstring)."""
  config = transformers.LlamaConfig(
      **SMALL, vocab_size=128256, tie_word_embeddings=True, bos_token_id=128000,
      eos_token_id=[128001, 128008, 128009],
      rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0,
                           low_freq_factor=1.0, high_freq_factor=4.0,
                           original_max_position_embeddings=64))
  _save_model(config, path)
  shutil.copy(resolve_data_path(LLAMA3_FILE), os.path.join(path, "tokenizer.model"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
               "chat_template": LLAMA3_TEMPLATE}, f)
  return path


def qwen2_dir(path: str) -> str:
  """A Qwen2-architecture directory (see the module docstring)."""
  os.makedirs(path, exist_ok=True)
  text = tiktoken_convert.tiktoken_to_tokenizer_json(resolve_data_path(LLAMA3_FILE),
                                                     QWEN_SPECIAL_TOKENS)
  with open(os.path.join(path, "tokenizer.json"), "w", encoding="utf-8") as f:
    f.write(text)
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None,
               "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
               "chat_template": QWEN25_TEMPLATE}, f)
  vocab = 128000 + len(QWEN_SPECIAL_TOKENS)
  config = transformers.Qwen2Config(**SMALL, vocab_size=vocab, tie_word_embeddings=True,
                                    eos_token_id=128002)
  _save_model(config, path)
  return path
