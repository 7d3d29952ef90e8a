"""Tests for data/filters.py on hand-made inputs with obvious outcomes, MinHash recall and
false positives on real shared documents, and decontamination against HellaSwag."""

import gzip
import json
import random

import pytest

from data import filters
from data.readers import resolve_data_path


def _wikitext_paragraphs(n):
  with open(resolve_data_path("pretrain/wikitext2_tokens_valid.txt")) as f:
    paras = [p.strip() for p in f.read().split("\n") if len(p.split()) >= 80]
  return paras[:n]


def test_normalize_strips_controls_markup_and_whitespace():
  text = "Cafe\u0301\x07 <b>bold</b>  and\t\ttabs<script>x=1</script>\r\n\n\n\nend  "
  assert filters.normalize(text) == "Caf\u00e9 bold and tabs\n\nend"
  assert filters.normalize("a < b and c > d") == "a < b and c > d"  # not markup
  assert filters.normalize("a <unk> word <|user|>") == "a <unk> word <|user|>"
  assert filters.normalize('<p class="x">para</p><br/>') == "para"


def test_exact_key_ignores_case_and_whitespace_only():
  assert filters.exact_key("Hello  World\n") == filters.exact_key("hello world")
  assert filters.exact_key("hello world") != filters.exact_key("hello world!")


def test_near_duplicate_with_a_few_words_changed_is_found():
  doc = _wikitext_paragraphs(1)[0]
  w = doc.split()
  changed = " ".join(w[:10] + ["zebra"] + w[11:40] + ["quokka"] + w[41:])
  assert filters.jaccard(doc, changed) > 0.8
  nd = filters.NearDuplicates(threshold=0.8)
  assert nd.add("a", doc) is None
  assert nd.add("b", changed) == "a"
  assert nd.add("c", "An entirely different document about cheese " * 12) is None


def test_minhash_recall_and_false_positives_on_shared_documents():
  docs = _wikitext_paragraphs(400)
  assert len(docs) == 400
  rng = random.Random(0)
  nd = filters.NearDuplicates(threshold=0.8, num_perm=128, ngram=5)
  false_positive = sum(nd.add(f"d{i}", d) is not None for i, d in enumerate(docs[:300]))
  # Near-copies: a few words substituted (true Jaccard >= 0.8 checked exactly).
  copies, found = 0, 0
  for i, doc in enumerate(docs[:300]):
    w = doc.split()
    for _ in range(max(1, len(w) // 100)):
      w[rng.randrange(len(w))] = rng.choice(["alpha", "beta", "gamma", "delta"])
    copy = " ".join(w)
    if filters.jaccard(doc, copy) < 0.8:
      continue
    copies += 1
    found += nd.add(f"copy{i}", copy) == f"d{i}"
  unrelated = sum(nd.add(f"u{i}", d) is not None for i, d in enumerate(docs[300:]))
  assert copies >= 200
  assert found / copies >= 0.9
  assert (false_positive + unrelated) / 400 <= 0.01


def test_lsh_bands_put_the_s_curve_at_the_threshold():
  bands, rows = filters.lsh_bands(0.8, 128)
  assert bands * rows <= 128
  assert abs((1 / bands) ** (1 / rows) - 0.8) < 0.05


@pytest.mark.parametrize("text,rule", [
    ("word " * 10, "min_words"),
    ("# $ % " * 40, "mean_word_length"),
    (("A fine line of prose here. " * 3 + "# # #\n") * 20, "symbol_to_word_ratio"),
    ("\n".join(f"- bullet point number {i} describes another product" for i in range(20)),
     "bullet_lines"),
    ("\n".join(["This exact line repeats here."] * 20 + ["Other line number one here."] * 2),
     "duplicate_lines"),
    ("1234 5678 9012 3456 7890 " * 20 + "words with letters", "alpha_words"),
])
def test_quality_rules_catch_obvious_junk(text, rule):
  assert filters.quality_failure(text) == rule


def test_quality_passes_real_prose():
  # The shared WikiText-2 is the tokenised release: punctuation stands apart as words
  # (" , " " ( "), so 20-30% of its "words" have no letter; Gopher's 0.8 is relaxed to 0.6.
  for doc in _wikitext_paragraphs(20):
    assert filters.quality_failure(doc, {"min_alpha_word_fraction": 0.6}) is None, doc[:200]


def test_blocklist_and_pluggable_scorer():
  block = filters.Blocklist(["bad word", "evil"])
  assert block.matches("This has a Bad Word in it") == ["bad word"]
  assert block.matches("medieval times") == []  # whole words only
  assert filters.safety_failure("evil plan", block) == "blocklist"
  assert filters.safety_failure("fine text", block, scorer=lambda t: 0.9) == "scorer"
  assert filters.safety_failure("fine text", block, scorer=lambda t: 0.1) is None


def test_pii_is_replaced_by_typed_placeholders():
  text = ("Mail jane.doe@example.com or call +1 415-555-0123 / (020) 7946 0958; "
          "server 192.168.0.12. Version 1.2.3 and year 2024 stay.")
  out, counts = filters.scrub_pii(text)
  assert out == ("Mail <EMAIL> or call <PHONE> / <PHONE>; server <IP_ADDRESS>. "
                 "Version 1.2.3 and year 2024 stay.")
  assert counts == {"EMAIL": 1, "IP_ADDRESS": 1, "PHONE": 2}


def test_decontamination_finds_a_hellaswag_item_verbatim():
  with gzip.open(resolve_data_path("eval/hellaswag_val_shared.jsonl.gz"), "rt") as f:
    items = [json.loads(line) for line in f][:200]
  texts = [f"{r['ctx']} {r['endings'][r['label']]}" for r in items]
  deco = filters.Decontaminator(texts, ngram=13)
  train_doc = "Some preamble text. " + texts[57] + " And an unrelated ending."
  assert deco.contaminated(train_doc)
  assert not any(deco.contaminated(d) for d in _wikitext_paragraphs(50))


def test_ngram_hash_set_is_the_union_of_every_texts_ngrams():
  import numpy as np
  texts = _wikitext_paragraphs(30) + ["too short", "", "exactly five words here ok"]
  union = np.unique(np.concatenate([filters.ngram_hashes(t, 5) for t in texts]))
  assert np.array_equal(filters.ngram_hash_set(texts, 5), union) and len(union) > 1000
  assert filters.ngram_hash_set(["a b", "c d e"], 3).tolist() == \
      filters.ngram_hashes("c d e", 3).tolist()  # no 3-gram across the two texts
  assert np.array_equal(filters.sorted_unique(np.array([5, 1, 5, 3], np.uint64)), [1, 3, 5])


def test_eval_index_texts_have_exactly_the_requests_ngrams():
  # data.curate indexes each context once plus each continuation after the context's last
  # n-1 words; the n-gram set must equal that of every full request text.
  import numpy as np
  from data.curate import eval_texts
  from data import benchmarks as tasks
  items = tasks.hellaswag(tasks.task_path("hellaswag"))[:300]
  full = np.unique(np.concatenate([filters.ngram_hashes(c + x, 13)
                                   for item in items for c, x in item.requests()]))
  short = []
  for item in items:
    for c, x in item.requests():
      short += [c, filters.word_tail(c, 12) + x]
  assert np.array_equal(np.unique(np.concatenate([filters.ngram_hashes(t, 13)
                                                  for t in short])), full)
  assert len(eval_texts(["arc_challenge"], 13)) > 922


def test_minhash_signatures_equal_the_closed_form_of_the_former_hand_written_version():
  """filters.MinHasher (datasketch, legacy scheme) must give the signatures of the formula
  the project used before (so near-dedup keeps what earlier runs kept): per permutation i,
  min over shingles s of (((a_i * h(s) + b_i) mod 2^64) mod (2^61 - 1)) mod 2^32 (uint64
  arithmetic wraps), h = blake2b-64 low 32 bits, (a, b) drawn by numpy's default_rng(seed)."""
  import hashlib
  import numpy as np
  num_perm, seed = 16, 3
  rng = np.random.default_rng(seed)
  a = [int(x) for x in rng.integers(1, (1 << 61) - 1, num_perm, dtype=np.uint64)]
  b = [int(x) for x in rng.integers(0, (1 << 61) - 1, num_perm, dtype=np.uint64)]
  hasher = filters.MinHasher(num_perm=num_perm, ngram=3, seed=seed)
  texts = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind",
           "one", "Ünïcödé wörds and more words here", ""]
  for text in texts:
    hashes = [int.from_bytes(hashlib.blake2b(s.encode("utf-8"), digest_size=8).digest(),
                             "little") & 0xFFFFFFFF for s in hasher.shingles(text)]
    want = [min((((ai * h + bi) % (1 << 64)) % ((1 << 61) - 1)) & 0xFFFFFFFF for h in hashes)
            if hashes else 0xFFFFFFFF for ai, bi in zip(a, b)]
    assert hasher.signature(text).tolist() == want, text
