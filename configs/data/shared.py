"""Curation of the shared pretraining sources (data/curate/, an Apache Beam pipeline).

  python -m data.curate --config=configs/data/shared.py --workdir=runs/curated --workers=2
Smoke run: --config=configs/data/shared.py:runlocal=true

Sources: the same files as the english_bpe pretraining corpus (configs/pretrain/english_bpe.py)
plus tiny Shakespeare: WikiText-2 valid (the test file is an evaluation set) split into
articles, Shakespeare's speeches, the three instruction files rendered as dialogue without
the conversations the SFT stage holds out, and the HH `chosen` transcripts without the
reward model's validation prompts (held-out rules as in data/corpus.py).

Stages: everything on, with the published thresholds where they apply (data/filters.py:
Gopher / C4 quality rules, MinHash at Jaccard 0.8 over word 5-grams, 13-gram
decontamination against the shared HellaSwag / ARC / PIQA / MMLU files). Per-source quality
overrides, because Gopher's rules were written for web pages:
- WikiText-2 is tokenised text that detaches punctuation and writes <unk>, "@-@" as
  words, so the alphabetic-word fraction is relaxed to 0.6;
- a Shakespeare speech or a chat exchange is short by nature: min_words 5 for Shakespeare
  (the speaker's name and a line: "All:\nSpeak, speak." is a speech, not boilerplate) and
  10 for dialogue (Gopher's 50 drops 61% of the speeches even at 20); dialogue lines are code,
  lists and arithmetic often enough that the symbol ratio and alphabetic-word fraction
  are relaxed (GSM8K's "<<48/2=24>>" annotations are words without letters); Gopher's
  top-2-gram limit (0.2 of the characters) fires on any short text that names its subject
  twice ("The Evergreen Game is a famous chess game ...", "We know't, we know't."), so
  short sources get 0.3.

Mixture: temperature sampling with T = 2 over the training tokens (p ~ n^(1/2), the
square-root rule of multilingual mixtures): it up-weights the small sources (Shakespeare,
HH dialogue) and down-weights the largest (the Alpaca subset) while keeping the total
number of training tokens. Then a 4096-piece BPE with the chat markers, as english_bpe.
"""

import ml_collections

from configs import common
from data.chat import CHAT_MARKERS

DIALOGUE_QUALITY = {"min_words": 10, "max_symbol_to_word_ratio": 0.5,
                    "min_alpha_word_fraction": 0.5, "max_mean_word_length": 12.0,
                    "max_top_2gram_fraction": 0.3}


def stage(enabled=True, **fields):
  c = ml_collections.ConfigDict()
  c.enabled = enabled
  c.update(fields)
  return c


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False)
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_shards = 8  # curated/shard-*.tfrecord (and tokenized/train-* by default)
  c.examples_per_filter = 3
  c.tfds_data_dir = ""   # for sources with "path": "tfds:name[:split]"
  c.sources = [
      {"name": "wikitext2", "path": "pretrain/wikitext2_tokens_valid.txt", "kind": "text",
       "split": "articles", "quality": {"min_alpha_word_fraction": 0.6}},
      {"name": "shakespeare", "path": "pretrain/tinyshakespeare.txt", "kind": "text",
       "split": "paragraphs",
       "quality": {"min_words": 5, "max_top_2gram_fraction": 0.3}},
      {"name": "alpaca", "path": "sft/alpaca_subset.jsonl", "kind": "sft",
       "quality": DIALOGUE_QUALITY},
      {"name": "dolly", "path": "sft/dolly_hhrlhf_1k.jsonl", "kind": "sft",
       "quality": DIALOGUE_QUALITY},
      {"name": "gsm8k", "path": "sft/gsm8k_train.jsonl.gz", "kind": "sft",
       "quality": DIALOGUE_QUALITY},
      {"name": "hh", "path": "preference/hh_rlhf_harmless_base_test_shared.jsonl.gz",
       "kind": "transcript", "quality": DIALOGUE_QUALITY},
  ]
  # Held-out rules (data/corpus.py); the defaults are the SFT and RM stages' own.
  c.held_out = ml_collections.ConfigDict(dict(sft_val_fraction=0.05, sft_seed=0,
                                              pref_val_fraction=0.1, pref_seed=0))
  c.normalize = stage(strip_markup=True)
  c.quality = stage(rules={})  # Gopher/C4 defaults (filters.QUALITY_DEFAULTS) + overrides
  c.safety = stage(blocklist=["kill yourself", "child pornography"])
  c.pii = stage()
  c.decontaminate = stage(eval_tasks=["hellaswag", "arc_easy", "arc_challenge", "piqa",
                                      "mmlu"], ngram=13)
  c.exact_dedup = stage()
  c.near_dedup = stage(threshold=0.8, num_perm=128, ngram=5)
  c.mixture = stage(weights={}, temperature=2.0, total_tokens=0)  # 0 = the natural total
  c.tokenize = stage(tokenizer_path="", model_type="bpe", vocab_size=4096,
                     byte_fallback=False, user_defined_symbols=",".join(CHAT_MARKERS),
                     val_fraction=0.05, add_eos=True, num_output_shards=0,
                     sample_docs=200_000)  # tokenizer sample: the shared corpora whole
  if arg.runlocal:  # one small source, two shards, no evaluation sets, a small vocabulary
    c.sources = c.sources[1:2]
    c.num_shards = 2
    c.decontaminate.enabled = False
    c.tokenize.vocab_size = 512
  return c
