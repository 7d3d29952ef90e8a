"""A random tiny Llama in transformers, saved with a 500-piece SentencePiece tokenizer, for
tests that compare our scoring with transformers / lm-eval on the same weights."""

import torch
import transformers

from data import readers
from data.hf_tokenizer import hf_tokenizer
from data.tokenizer import Tokenizer, train_tokenizer


def random_llama_dir(tmp, max_positions: int) -> tuple[transformers.LlamaForCausalLM, str]:
  """Writes `tmp/llama` (weights, tokenizer.model and the tokenizer.json files); returns the
  model (eval mode) and the directory."""
  path = train_tokenizer([readers.resolve_data_path("pretrain/tinyshakespeare.txt")],
                         str(tmp / "t.model"), vocab_size=500)
  tokenizer = Tokenizer.from_file(path)
  config = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=64,
                                    intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=max_positions,
                                    tie_word_embeddings=False, initializer_range=0.2)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(config).eval()
  model.save_pretrained(tmp / "llama")
  tokenizer.save(str(tmp / "llama" / "tokenizer.model"))
  hf_tokenizer(tokenizer).save_pretrained(tmp / "llama")
  return model, str(tmp / "llama")
