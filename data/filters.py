"""Document filters of the curation pipeline: each a pure function of text and config.

  normalize(text, cfg)            NFC, control characters and markup stripped, whitespace
  exact_key(text)                 hash of the normalised, case-folded text (exact duplicates)
  MinHasher / NearDuplicates      MinHash over word n-grams + LSH banding (near duplicates)
  quality_failure(text, cfg)      the first Gopher/C4-style rule a document breaks, or None
  Blocklist / safety_failure      word/phrase blocklist plus any pluggable `Scorer`
  scrub_pii(text)                 e-mail, phone and IP addresses -> typed placeholders
  Decontaminator                  long n-gram overlap with evaluation sets
  ngram_hash_set(texts, n)        the evaluation n-gram index of many texts at once

Every threshold comes from the caller's config (configs/data/*.py); defaults below are the
published ones where they exist (Gopher: Rae et al. 2021, Appendix A; C4: Raffel et al.
2020), so a config that sets nothing gets the literature's filters.
"""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
from typing import Iterable, Protocol, Sequence

import numpy as np
from datasketch import MinHash

# ------------------------------------------------------------------------- normalisation
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u200e\u200f\ufeff]")
# HTML elements only: "<unk>" in WikiText or "<|user|>" in chat data are not markup.
_HTML = ("a|abbr|article|aside|b|blockquote|body|br|button|center|code|dd|div|dl|dt|em|"
         "font|footer|form|h[1-6]|head|header|hr|html|i|iframe|img|input|label|li|link|meta|"
         "nav|ol|option|p|pre|s|section|select|small|span|strong|sub|sup|table|tbody|td|"
         "textarea|th|thead|title|tr|tt|u|ul")
_TAG = re.compile(rf"</?(?:{_HTML})\b[^<>]*/?>", re.I)
_SCRIPT = re.compile(r"<(script|style)\b.*?</\1\s*>", re.S | re.I)
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u3000]+")
_BLANKS = re.compile(r"\n{3,}")


def normalize(text: str, strip_markup: bool = True) -> str:
  """NFC; control characters removed (newline and tab kept); HTML tags and script/style
  blocks removed; runs of spaces/tabs -> one space; lines stripped; >2 newlines -> 2."""
  text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
  text = _CONTROL.sub("", text)
  if strip_markup:
    text = _TAG.sub("", _SCRIPT.sub("", text))
  lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
  return _BLANKS.sub("\n\n", "\n".join(lines)).strip()


def exact_key(text: str) -> str:
  """sha1 of the case-folded text with all whitespace runs collapsed."""
  return hashlib.sha1(" ".join(text.casefold().split()).encode("utf-8")).hexdigest()


_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
  """Lower-cased word tokens (letters/digits), the unit of n-gram filters."""
  return _WORD.findall(text.lower())


def word_tail(text: str, k: int) -> str:
  """The suffix of `text` that starts at its k-th last word (`words` token): its words are
  exactly the last k words of `text` (all of `text` if it has k words or fewer)."""
  starts = [m.start() for m in _WORD.finditer(text)]
  return text[starts[-k]:] if len(starts) > k else text


# ---------------------------------------------------------------------------- MinHash + LSH
def _blake2b32(data: bytes) -> int:
  """A shingle's hash: the low 32 bits of its 64-bit blake2b digest."""
  return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & 0xFFFFFFFF


class MinHasher:
  """MinHash signatures of word n-gram sets, by datasketch (`MinHash`, its `legacy` scheme:
  `num_perm` universal hashes (a * h + b mod 2^61 - 1) of each shingle's 32-bit hash h, so
  P(sig_i(A) == sig_i(B)) = Jaccard(A, B)).

  The hash h (blake2b) and the (a, b) draws (numpy's default_rng(seed)) are those of the
  hand-written MinHash this replaced, so signatures, and the documents near-dedup removes,
  are bit for bit the same as before (a test compares with that version, which
  benchmarks/minhash_speed.py keeps). Measured there on the shared corpora: 5,379 vs 5,286
  signatures per CPU-second (the same work). datasketch's defaults with xxhash
  (`affine32`, xxh32) would give 8,469/s, a few % of a curation run, but other hash
  functions flip pairs at the threshold (a Dolly pair of exact Jaccard 0.798 is estimated
  0.81 there, 0.78 here), so a run would no longer keep the documents earlier runs kept.
  LSH stays ours (`NearDuplicates`, data/curate's band-key GroupByKey): datasketch's
  MinHashLSH is an in-memory index of one process. The template is copied per document.
  """

  def __init__(self, num_perm: int = 128, ngram: int = 5, seed: int = 0):
    self.num_perm, self.ngram = num_perm, ngram
    rng = np.random.default_rng(seed)
    a = rng.integers(1, (1 << 61) - 1, num_perm, dtype=np.uint64)
    b = rng.integers(0, (1 << 61) - 1, num_perm, dtype=np.uint64)
    self._template = MinHash(num_perm=num_perm, scheme="legacy", hashfunc=_blake2b32,
                             permutations=(a, b))

  def shingles(self, text: str) -> set[str]:
    w = words(text)
    n = min(self.ngram, max(len(w), 1))
    return {" ".join(w[i:i + n]) for i in range(max(len(w) - n + 1, 1))} if w else set()

  def signature(self, text: str) -> np.ndarray:
    """uint64 [num_perm]; all 2^32 - 1 for a text without words."""
    m = self._template.copy()
    m.update_batch([x.encode("utf-8") for x in sorted(self.shingles(text))])
    return m.hashvalues.astype(np.uint64)


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
  """(bands, rows) with bands * rows <= num_perm whose S-curve threshold (1/b)^(1/r) is
  closest to `threshold` (ties: more bands, i.e. higher recall)."""
  best = None
  for rows in range(1, num_perm + 1):
    bands = num_perm // rows
    err = abs((1.0 / bands) ** (1.0 / rows) - threshold)
    if best is None or err < best[0] - 1e-12:
      best = (err, bands, rows)
  return best[1], best[2]


class NearDuplicates:
  """Streaming near-duplicate detection: `add(doc_id, text)` returns the id of an earlier
  document with estimated Jaccard >= threshold, or None (the document is kept and indexed).

  Candidates come from LSH banding; each candidate is confirmed by the fraction of equal
  signature entries (the MinHash Jaccard estimate), so banding only has to find them.
  """

  def __init__(self, threshold: float = 0.8, num_perm: int = 128, ngram: int = 5,
               seed: int = 0):
    self.hasher = MinHasher(num_perm, ngram, seed)
    self.threshold = threshold
    self.bands, self.rows = lsh_bands(threshold, num_perm)
    self.buckets: list[dict[bytes, list[str]]] = [{} for _ in range(self.bands)]
    self.signatures: dict[str, np.ndarray] = {}

  def add(self, doc_id: str, text: str) -> str | None:
    return self.add_signature(doc_id, self.hasher.signature(text))

  def add_signature(self, doc_id: str, sig: np.ndarray) -> str | None:
    """`add` with a signature computed elsewhere (by the same MinHasher settings)."""
    keys = [sig[i * self.rows:(i + 1) * self.rows].tobytes() for i in range(self.bands)]
    seen = set()
    for band, key in enumerate(keys):
      for other in self.buckets[band].get(key, ()):
        if other in seen:
          continue
        seen.add(other)
        if float(np.mean(self.signatures[other] == sig)) >= self.threshold:
          return other
    self.signatures[doc_id] = sig
    for band, key in enumerate(keys):
      self.buckets[band].setdefault(key, []).append(doc_id)
    return None


def jaccard(a: str, b: str, ngram: int = 5) -> float:
  """Exact Jaccard similarity of two texts' word n-gram sets (tests, reports)."""
  hasher = MinHasher(1, ngram)
  sa, sb = hasher.shingles(a), hasher.shingles(b)
  return len(sa & sb) / max(len(sa | sb), 1)


# ------------------------------------------------------------------------------ quality
QUALITY_DEFAULTS = {
    # Gopher (Rae et al. 2021, A.1.1)
    "min_words": 50, "max_words": 100_000,
    "min_mean_word_length": 3.0, "max_mean_word_length": 10.0,
    "max_symbol_to_word_ratio": 0.1,          # '#' and '...' per word
    "max_bullet_line_fraction": 0.9,
    "max_ellipsis_line_fraction": 0.3,
    "min_alpha_word_fraction": 0.8,           # words with at least one letter
    "max_duplicate_line_fraction": 0.3,
    "max_top_2gram_fraction": 0.2,            # characters in the most frequent word 2-gram
    # C4 (Raffel et al. 2020): lines ending in terminal punctuation
    "min_punctuated_line_fraction": 0.0,      # C4 drops lines; 0 = off at document level
}
_BULLETS = ("*", "-", "•", "‣", "◦", "⁃")
_TERMINAL = (".", "!", "?", '"', "'", "”", "’", ":", ";", ")")


def quality_failure(text: str, cfg: dict | None = None) -> str | None:
  """The name of the first rule `text` breaks, or None if it passes every rule."""
  c = {**QUALITY_DEFAULTS, **(cfg or {})}
  tokens = text.split()
  n = len(tokens)
  if n < c["min_words"]:
    return "min_words"
  if n > c["max_words"]:
    return "max_words"
  mean_len = sum(len(t) for t in tokens) / n
  if not c["min_mean_word_length"] <= mean_len <= c["max_mean_word_length"]:
    return "mean_word_length"
  symbols = text.count("#") + text.count("...") + text.count("…")
  if symbols / n > c["max_symbol_to_word_ratio"]:
    return "symbol_to_word_ratio"
  lines = [line for line in text.split("\n") if line.strip()]
  if lines:
    if sum(line.lstrip().startswith(_BULLETS) for line in lines) / len(lines) > \
        c["max_bullet_line_fraction"]:
      return "bullet_lines"
    if sum(line.rstrip().endswith(("...", "…")) for line in lines) / len(lines) > \
        c["max_ellipsis_line_fraction"]:
      return "ellipsis_lines"
    if len(lines) - len(set(lines)) > c["max_duplicate_line_fraction"] * len(lines):
      return "duplicate_lines"
    if sum(line.rstrip().endswith(_TERMINAL) for line in lines) / len(lines) < \
        c["min_punctuated_line_fraction"]:
      return "punctuated_lines"
  if sum(any(ch.isalpha() for ch in t) for t in tokens) / n < c["min_alpha_word_fraction"]:
    return "alpha_words"
  w = words(text)
  if len(w) > 2:
    counts: dict[tuple[str, str], int] = {}
    for pair in zip(w, w[1:]):
      counts[pair] = counts.get(pair, 0) + 1
    pair, count = max(counts.items(), key=lambda kv: kv[1])
    if count > 1 and count * (len(pair[0]) + len(pair[1])) / max(
        sum(len(x) for x in w), 1) > c["max_top_2gram_fraction"]:
      return "top_2gram"
  return None


# ------------------------------------------------------------------------------- safety
class Scorer(Protocol):
  """A pluggable safety scorer: higher = more unsafe, in [0, 1]."""

  def __call__(self, text: str) -> float: ...


class Blocklist:
  """Case-insensitive whole-word/phrase matching of a list of terms."""

  def __init__(self, terms: Sequence[str]):
    terms = sorted({t.strip().lower() for t in terms if t.strip()}, key=len, reverse=True)
    self.terms = terms
    self._re = re.compile(r"\b(" + "|".join(re.escape(t) for t in terms) + r")\b", re.I) \
        if terms else None

  def matches(self, text: str) -> list[str]:
    return sorted({m.group(1).lower() for m in self._re.finditer(text)}) if self._re else []


def safety_failure(text: str, blocklist: Blocklist | None, scorer: Scorer | None = None,
                   max_score: float = 0.5) -> str | None:
  """"blocklist" / "scorer" if the document is unsafe by either, else None."""
  if blocklist is not None and blocklist.matches(text):
    return "blocklist"
  if scorer is not None and scorer(text) > max_score:
    return "scorer"
  return None


# ---------------------------------------------------------------------------------- PII
PII_PATTERNS = (
    ("EMAIL", re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")),
    ("IP_ADDRESS", re.compile(
        r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b")),
    ("PHONE", re.compile(
        r"(?<![\w.])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)[\s.-]?|\d{2,4}[\s.-])"
        r"\d{3,4}[\s.-]\d{3,4}(?![\w.])")),
)


def scrub_pii(text: str) -> tuple[str, dict[str, int]]:
  """Replaces e-mail addresses, IPv4 addresses and phone numbers by <EMAIL>, <IP_ADDRESS>,
  <PHONE>; returns the text and the count per kind (IP before phone: dotted quads are not
  phone numbers)."""
  counts = {}
  for kind, pattern in PII_PATTERNS:
    text, n = pattern.subn(f"<{kind}>", text)
    counts[kind] = n
  return text, counts


# ------------------------------------------------------------------------ decontamination
_NGRAM_BASE = np.uint64(0x100000001B3)  # FNV-64 prime: the rolling hash's base


@functools.lru_cache(maxsize=1 << 20)
def _word_hash(word: str) -> int:
  return int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(),
                        "little")


def ngram_hashes(text: str, n: int) -> np.ndarray:
  """64-bit hashes of every word n-gram of `text` (lower-cased word tokens): a polynomial
  rolling hash over per-word blake2b hashes, vectorised over positions (equal n-grams hash
  equal; two different n-grams collide with probability ~2^-64 each)."""
  w = words(text)
  if len(w) < n:
    return np.zeros([0], np.uint64)
  wh = np.fromiter((_word_hash(x) for x in w), np.uint64, len(w))
  m = len(w) - n + 1
  out = np.zeros(m, np.uint64)
  with np.errstate(over="ignore"):  # arithmetic modulo 2^64 by design
    for j in range(n):
      out = out * _NGRAM_BASE + wh[j:j + m]
  return out


def sorted_unique(hashes: np.ndarray) -> np.ndarray:
  """The distinct values of a uint64 array, sorted (np.sort + neighbour test: many times
  faster than np.unique's hash table on millions of 64-bit hashes)."""
  x = np.sort(hashes)
  return x[np.r_[True, x[1:] != x[:-1]]] if len(x) else x


def ngram_hash_set(texts: Sequence[str], n: int) -> np.ndarray:
  """Sorted distinct `ngram_hashes` of all `texts` at once: the texts' word hashes
  concatenated, the rolling hash computed over the whole array, and the n-grams that
  cross from one text into the next dropped (equal to the union of `ngram_hashes`)."""
  ws = [words(t) for t in texts]
  flat = [w for ww in ws for w in ww]
  m = len(flat) - n + 1
  if m <= 0:
    return np.zeros([0], np.uint64)
  wh = np.fromiter((_word_hash(x) for x in flat), np.uint64, len(flat))
  out = np.zeros(m, np.uint64)
  with np.errstate(over="ignore"):  # arithmetic modulo 2^64 by design
    for j in range(n):
      out = out * _NGRAM_BASE + wh[j:j + m]
  text_of = np.repeat(np.arange(len(ws)), [len(ww) for ww in ws])  # per word
  return sorted_unique(out[text_of[:m] == text_of[n - 1:]])  # first and last word agree


class Decontaminator:
  """Flags documents sharing any `ngram`-word sequence with the evaluation texts (GPT-3's
  13-gram rule; n-grams of lower-cased word tokens). The index is a sorted array of the
  evaluation n-gram hashes (`ngram_hashes`); a document is looked up with one binary
  search per n-gram."""

  def __init__(self, eval_texts: Iterable[str], ngram: int = 13):
    self.ngram = ngram
    parts = [ngram_hashes(text, ngram) for text in eval_texts]
    self.index = np.unique(np.concatenate(parts)) if parts else np.zeros([0], np.uint64)

  def contaminated(self, text: str) -> bool:
    h = ngram_hashes(text, self.ngram)
    if not len(h) or not len(self.index):
      return False
    at = np.minimum(np.searchsorted(self.index, h), len(self.index) - 1)
    return bool(np.any(self.index[at] == h))
