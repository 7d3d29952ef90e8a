"""Default data config (the `config.data` of every pretraining config) and tokenizer setup.

Stage configs start from `default_data_config()` and override fields, e.g.

  config.data = default_data_config()
  config.data.path = "pretrain/wikitext2_tokens_valid.txt"
  config.data.tokenizer.model_type = "bpe"
  config.data.tokenizer.vocab_size = 4096

`default_sft_data_config()` is the data config of SFT runs (chat conversations,
see `data/sft_pipeline.py`); `default_preference_data_config()` that of reward-model
and DPO runs (preference pairs, see `data/preference_pipeline.py`).

`get_or_train_tokenizer` gives the run its tokenizer: a given model file, the
one a previous attempt of this run wrote (resume), or a new one trained on the
training split only (the validation text never leaks into the vocabulary).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Sequence

import ml_collections

from data.hf_backend import HFTokenizer
from data.hf_tokenizer import tokenizer_from_path
from data.tokenizer import Tokenizer, train_tokenizer


def default_data_config() -> ml_collections.ConfigDict:
  """Returns the data config for nanoGPT-style char-level tinyshakespeare."""
  c = ml_collections.ConfigDict()
  # Where documents come from: "text" | "jsonl" | "tfds" | "corpus" (data/corpus.py) |
  # "curated" (tokenized shards of data/curate/; see curated_dir).
  c.source = "text"
  # text/jsonl file; relative paths resolve under $LM_DATA_DIR, else ../shared/data.
  c.path = "pretrain/tinyshakespeare.txt"
  c.field = "text"            # jsonl record key / TFDS feature holding the text.
  c.split_on = ""             # Text document separator; "" = whole file is one doc.
  c.tfds_name = ""            # For source="tfds".
  c.tfds_data_dir = ""        # "" = the TFDS default directory.
  c.tfds_train_split = "train"
  c.tfds_val_split = "validation"
  # A TFDS text dataset (e.g. "tiny_shakespeare") read when source="text" and the file is
  # missing. "" (default): a missing file is an error at once; a download attempt offline
  # takes minutes to fail and leaves partial files, so it happens only when asked for.
  c.fallback_tfds = ""
  # text: last fraction of characters (nanoGPT's 90/10); jsonl: last fraction of records;
  # corpus: documents whose content hash falls below it.
  c.val_fraction = 0.1
  # source="corpus" only (held-out rules in data/corpus.py):
  # "path[:kind],..." under the data dir; kind text | sft | transcript (default by file).
  c.corpus_sources = ""
  # SFT conversations the SFT stage holds out are left out; must match the SFT run's
  # data.val_fraction and data.seed (defaults: default_sft_data_config()'s).
  c.corpus_sft_val_fraction = default_sft_data_config().val_fraction
  c.corpus_sft_seed = default_sft_data_config().seed
  # HH preference pairs the reward model holds out (split_preference_prefixes) are left out.
  c.corpus_pref_val_fraction = 0.1
  c.corpus_pref_seed = 0
  # source="curated": a data/curate/ workdir; its tokenized shards are the corpus (train
  # and validation split, mixture and eos included) and its tokenizer.model the tokenizer.
  c.curated_dir = ""
  c.seq_len = 64              # Tokens per row (nanoGPT's block_size).
  c.seed = 0                  # Seeds window offsets, packing and row order.
  c.add_eos = True            # Append </s> to every document.
  c.random_offset = True      # Shift each long document's windows every epoch.
  c.prefetch = 2              # Batches prefetched; -1 = tf.data.AUTOTUNE, 0 = off.
  # Streaming sources (source="curated" | "tfds"; data/stream_pipeline.py): the corpus is
  # read from disk, never loaded whole. The training data is cut into `streams` streams
  # (curated: shard i -> stream i % streams; tfds: tfds.even_splits); each process reads
  # streams / process_count of them and each stream gives batch_size / streams rows per
  # step. 0 = one stream per process. The same value on any number of processes that
  # divides it gives the same global batches (so set it for a run that may change size).
  c.streams = 0
  c.shuffle_buffer = 1000     # Documents in each stream's shuffle buffer (<= 1: none).
  c.cycle_length = 4          # Files each stream reads interleaved.
  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.model_type = "char"   # bpe | unigram | char | word.
  c.tokenizer.vocab_size = 0        # 0 = every character (char only).
  c.tokenizer.byte_fallback = False  # Unseen characters -> UTF-8 byte pieces.
  # An existing SentencePiece .model file, a tokenizer.json or a Hugging Face model
  # directory (data.hf_tokenizer.tokenizer_from_path); "" = train one on the training
  # split at run start.
  c.tokenizer.path = ""
  # Comma-separated pieces never split (e.g. the chat markers); used when training.
  c.tokenizer.user_defined_symbols = ""
  # source="tfds" (streamed): a tokenizer is trained on the first this many training
  # documents (the split may not fit in memory).
  c.tokenizer.train_sample_docs = 100_000
  return c


def default_sft_data_config() -> ml_collections.ConfigDict:
  """Returns the SFT data config (`config.data` of SFT runs): chat conversations.

  Read by `data.sft_pipeline.build_sft_pipelines`; the tokenizer comes from the
  checkpoint SFT starts from, with the chat markers added (`Tokenizer.with_pieces`).
  """
  c = ml_collections.ConfigDict()
  # jsonl[.gz] files, comma-separated (or a list), relative to $LM_DATA_DIR else
  # ../shared/data; "path:format" names the format (alpaca | prompt_response |
  # gsm8k | transcript), otherwise it is detected from the first record.
  c.sources = "sft/alpaca_subset.jsonl,sft/dolly_hhrlhf_1k.jsonl"
  # For "tfds:name[/config][:split]" entries (e.g. tfds:lm_instructions/alpaca, see
  # data/tfds_builders.py); "" = the TFDS default directory.
  c.tfds_data_dir = ""
  # data.chat.get_template name: "auto" = the tokenizer's own chat template (an imported
  # model's), else the project markers; "chat" = the markers; "jinja" = the tokenizer's own.
  c.template = "auto"
  c.seq_len = 512             # Tokens per row; an example keeps <= seq_len + 1 tokens.
  c.packing = "pack"          # "pack": first-fit several examples per row | "pad": one.
  # Fraction of conversations in validation, by a seeded hash of the opening prompt.
  c.val_fraction = 0.05
  c.seed = 0                  # Seeds the split, the packing order and the row order.
  # A response cut to fit seq_len must keep at least this many tokens, else the
  # example is dropped.
  c.min_response_tokens = 1
  # Drop examples whose final response (content + <|end|>) is longer than this; 0 = keep
  # all. Set it to the sampling limit so the model learns to finish within it.
  c.max_response_tokens = 0
  c.prefetch = 2              # Fetches prefetched; -1 = tf.data.AUTOTUNE, 0 = off.
  return c


def default_preference_data_config() -> ml_collections.ConfigDict:
  """Returns the preference data config (`config.data` of reward-model and DPO runs).

  Read by `data.preference_pipeline.build_preference_pipelines`; the tokenizer comes from
  the `init_from` checkpoint, with the chat markers added when missing.
  """
  c = ml_collections.ConfigDict()
  # Comma-separated "path[:format]" (format hh | prompt_chosen_rejected | sharegpt, else
  # detected) relative to $LM_DATA_DIR else ../shared/data, or "tfds:name[:split]".
  c.sources = "preference/hh_rlhf_harmless_base_test_shared.jsonl.gz"
  c.tfds_data_dir = ""        # For tfds: sources; "" = the TFDS default directory.
  # data.chat.get_template name: "auto" = the tokenizer's own chat template (an imported
  # model's), else the project markers; "chat" = the markers; "jinja" = the tokenizer's own.
  c.template = "auto"
  c.seq_len = 256             # Tokens per side; prompts are cut from their start to fit.
  # A prompt cut to fit must keep at least this many tokens, else the pair is dropped.
  c.min_prompt_tokens = 16
  # Fraction of distinct prompts in validation (data.corpus.split_preference_prefixes).
  # Must match the pretraining corpus's corpus_pref_val_fraction / corpus_pref_seed so
  # the validation pairs were never pretrained on (both default to 0.1 / 0).
  c.val_fraction = 0.1
  c.seed = 0                  # Seeds the split and the row order.
  # "" = every training pair; "a" / "b" = one of two prompt-disjoint halves of the training
  # split (two reward models that never share a prompt; validation is unchanged).
  c.train_part = ""
  c.prefetch = 2              # Fetches prefetched; -1 = tf.data.AUTOTUNE, 0 = off.
  return c


def get_or_train_tokenizer(data_cfg: Any, train_docs: Sequence[str],
                           out_path: str) -> Tokenizer | HFTokenizer:
  """Loads or trains the run's tokenizer.

  Order: `data_cfg.tokenizer.path` if set; else `out_path` if it exists (a
  resumed run keeps its vocabulary); else train on `train_docs` and save to
  `out_path`, with `data_cfg.tokenizer.user_defined_symbols` (comma-separated)
  as unsplittable pieces.

  Args:
    data_cfg: The data config (`default_data_config()` layout).
    train_docs: Training documents (never the validation split).
    out_path: Where this run keeps its `.model` file (e.g. in the workdir).

  Returns:
    The tokenizer.
  """
  tok_cfg = data_cfg.tokenizer
  if tok_cfg.path:
    return tokenizer_from_path(os.path.expanduser(tok_cfg.path))
  if os.path.exists(out_path):
    return Tokenizer.from_file(out_path)
  if not train_docs:
    raise ValueError("Cannot train a tokenizer: no training documents")
  with tempfile.TemporaryDirectory() as tmp:
    text_path = os.path.join(tmp, "train.txt")
    with open(text_path, "w", encoding="utf-8") as f:
      # The trainer reads lines, so joining documents by "\n" loses nothing.
      f.write("\n".join(train_docs))
    symbols = [s.strip() for s in getattr(tok_cfg, "user_defined_symbols", "").split(",")]
    train_tokenizer([text_path], out_path, vocab_size=tok_cfg.vocab_size,
                    model_type=tok_cfg.model_type,
                    byte_fallback=tok_cfg.byte_fallback,
                    user_defined_symbols=[s for s in symbols if s])
  return Tokenizer.from_file(out_path)
