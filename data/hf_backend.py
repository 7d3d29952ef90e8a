"""The Hugging Face `tokenizers` backend of the tokenizer interface (`data.tokenizer`).

`HFTokenizer` wraps a `tokenizer.json` (any model the `tokenizers` library reads: byte-level
BPE for Llama-3 / Qwen / Mistral-v3, Metaspace BPE, ...) plus the family's token config:
which added tokens are BOS / EOS / pad / unk (a family may lack some: Llama-3 has no pad,
Qwen has no BOS; those ids are -1) and the Jinja `chat_template`.

It has the SentencePiece `Tokenizer`'s interface: `encode` adds no BOS/EOS (the post-processor
is never run, as `transformers`' `encode(..., add_special_tokens=False)`), added/special tokens
written in the text encode to their ids (as in `transformers`), `decode` drops pad ids and keeps
special tokens, and `to_bytes()` is what a checkpoint stores.

Checkpoint format (`to_bytes`): one JSON object, UTF-8, keys sorted,
`{"format": "lmlife.hf_tokenizer/1", "tokenizer_json": <tokenizer.json text>, "config":
{"bos_token", "eos_token", "pad_token", "unk_token", "chat_template"}}`. It starts with "{",
which no SentencePiece model proto does (their first byte is a protobuf field tag), so
`data.tokenizer.load_tokenizer` tells the backends apart by that byte.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Mapping, Sequence

from tokenizers import AddedToken, Tokenizer as RustTokenizer

BUNDLE_FORMAT = "lmlife.hf_tokenizer/1"
CONFIG_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token", "chat_template")
_ROLE_KEYS = CONFIG_KEYS[:4]


class HFTokenizer:
  """A `tokenizers` tokenizer with per-family special tokens and chat template."""

  def __init__(self, tokenizer_json: str, config: Mapping[str, Any] | None = None,
               source: str = "tokenizer.json", config_source: str | None = None):
    """Builds the tokenizer.

    Args:
      tokenizer_json: The text of a `tokenizer.json`.
      config: `bos_token` / `eos_token` / `pad_token` / `unk_token` (token strings, or None
        when the family has none) and `chat_template` (Jinja source or None).
      source: Names the origin in error messages (e.g. the file read).
      config_source: Names where `config` came from (e.g. tokenizer_config.json).

    Raises:
      ValueError: Unparseable tokenizer.json, or a config token that is not in the
        vocabulary (names `source` and the field).
    """
    try:
      self._tok = RustTokenizer.from_str(tokenizer_json)
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
      raise ValueError(f"{source}: not a readable tokenizer.json ({e})") from e
    self._json = tokenizer_json
    config = dict(config or {})
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
      raise ValueError(f"{source}: unknown tokenizer config field {unknown[0]!r}; "
                       f"expected {list(CONFIG_KEYS)}")
    self._config = {k: config.get(k) for k in CONFIG_KEYS}
    self._ids = {}
    for key in _ROLE_KEYS:
      token = self._config[key]
      if token is None:
        self._ids[key] = -1
        continue
      token_id = self._tok.token_to_id(token)
      if token_id is None:
        raise ValueError(f"{config_source or source}: field {key!r} = {token!r} is not a "
                         f"token of {source}")
      self._ids[key] = token_id
    self._vocab_size = 1 + max(self._tok.get_vocab(with_added_tokens=True).values())

  @classmethod
  def from_bytes(cls, data: bytes) -> "HFTokenizer":
    """Loads a tokenizer from `to_bytes()` output (e.g. stored in a checkpoint)."""
    try:
      bundle = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"tokenizer bytes: not a {BUNDLE_FORMAT} JSON bundle ({e})") from e
    if not isinstance(bundle, dict) or bundle.get("format") != BUNDLE_FORMAT:
      raise ValueError(f"tokenizer bytes: field 'format' is "
                       f"{bundle.get('format') if isinstance(bundle, dict) else bundle!r:.60}, "
                       f"expected {BUNDLE_FORMAT!r}")
    return cls(bundle["tokenizer_json"], bundle.get("config"), source="tokenizer bundle")

  def to_bytes(self) -> bytes:
    """The checkpoint form: a JSON bundle of tokenizer.json and the token config."""
    bundle = {"format": BUNDLE_FORMAT, "tokenizer_json": self._json, "config": self._config}
    return json.dumps(bundle, sort_keys=True, ensure_ascii=False).encode("utf-8")

  @property
  def tokenizer_json(self) -> str:
    """The tokenizer.json text (what `save_hf_tokenizer` writes)."""
    return self._json

  @property
  def config(self) -> dict[str, Any]:
    """The token config: bos/eos/pad/unk token strings (or None) and `chat_template`."""
    return dict(self._config)

  @property
  def fingerprint(self) -> str:
    """sha256 hex digest of `to_bytes()`: cache keys, checkpoint checks."""
    return hashlib.sha256(self.to_bytes()).hexdigest()

  @property
  def chat_template(self) -> str | None:
    """The family's Jinja chat template source, or None."""
    return self._config["chat_template"]

  @property
  def vocab_size(self) -> int:
    """1 + the largest id (added tokens included)."""
    return self._vocab_size

  @property
  def pad_id(self) -> int:
    return self._ids["pad_token"]

  @property
  def unk_id(self) -> int:
    return self._ids["unk_token"]

  @property
  def bos_id(self) -> int:
    return self._ids["bos_token"]

  @property
  def eos_id(self) -> int:
    return self._ids["eos_token"]

  @property
  def special_tokens(self) -> dict[str, int]:
    """Every added token flagged special (content -> id): the control tokens."""
    return {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()
            if t.special}

  def id_to_piece(self, token_id: int) -> str:
    piece = self._tok.id_to_token(int(token_id))
    return "" if piece is None else piece

  def encode(self, text: str) -> list[int]:
    """Encodes text to ids, without BOS/EOS (special-token strings map to their ids)."""
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """`encode` plus each token's (start, end) character span in `text`."""
    enc = self._tok.encode(text, add_special_tokens=False)
    return enc.ids, [tuple(o) for o in enc.offsets]

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Encodes many texts at once (the library's parallel batch encode)."""
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Iterable[int]) -> str:
    """Decodes ids to text; pad ids are dropped, special tokens kept.

    Out-of-vocab ids (a model's vocab padded past the tokenizer's) become unk, or are
    dropped when the family has no unk token (e.g. Llama-3).
    """
    size, unk, pad = self.vocab_size, self.unk_id, self.pad_id  # once: the server decodes often
    cleaned = []
    for i in ids:
      i = int(i)
      if i == pad and i >= 0:
        continue
      if not 0 <= i < size or self._tok.id_to_token(i) is None:
        if unk < 0:
          continue
        i = unk
      cleaned.append(i)
    return self._tok.decode(cleaned, skip_special_tokens=False)

  def with_pieces(self, pieces: Sequence[str]) -> "HFTokenizer":
    """A copy with the missing `pieces` appended as special tokens, existing ids unchanged.

    Returns `self` when every piece is already a token (the fingerprint only changes when
    the vocabulary does).
    """
    if any(not p for p in pieces):
      raise ValueError("HFTokenizer.with_pieces: pieces must be non-empty strings")
    missing = [p for p in dict.fromkeys(pieces) if self._tok.token_to_id(p) is None]
    if not missing:
      return self
    tok = RustTokenizer.from_str(self._json)
    # tokenizers gives a new added token the next id after the current largest.
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in missing])
    return HFTokenizer(tok.to_str(), self._config)

  def __repr__(self) -> str:
    return (f"HFTokenizer(vocab_size={self.vocab_size}, "
            f"fingerprint={self.fingerprint[:12]})")
