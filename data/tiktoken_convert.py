"""A tiktoken-format BPE file (Llama-3's `tokenizer.model`) as an equivalent `tokenizer.json`.

The file has one `<base64 token bytes> <rank>` per line. tiktoken encodes a pre-token by
repeatedly merging the adjacent pair whose concatenation has the lowest rank (a whole
pre-token found in the table is one token). The equivalent `tokenizers` model is a byte-level
BPE whose vocabulary is the table (bytes mapped to GPT-2's printable byte alphabet) and whose
merges are, for every multi-byte token in rank order, each split of it into two tokens of
the table (`ignore_merges=True` gives the whole-pre-token rule). This is the construction of
`transformers`' `TikTokenConverter`, done here without `transformers` or `tiktoken`.

Llama-3's special tokens are not in the file: the 256 ids after the last rank are
`<|begin_of_text|>`, `<|end_of_text|>`, `<|reserved_special_token_0..3|>`,
`<|start_header_id|>`, `<|end_header_id|>`, `<|reserved_special_token_4|>`, `<|eot_id|>`,
then `<|reserved_special_token_5..250|>` (Meta's `llama/tokenizer.py`); a model's
`tokenizer_config.json` may rename some (Llama-3.1's `<|eom_id|>`, `<|python_tag|>`).
"""

from __future__ import annotations

import base64
import json
import os

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

# Meta's Llama-3 pre-tokenizer (llama/tokenizer.py `pat_str`).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?"
                  r"[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
NUM_LLAMA3_SPECIAL = 256
BEGIN_OF_TEXT, END_OF_TEXT, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"


def llama3_special_tokens() -> list[str]:
  """Llama-3's 256 special tokens in id order (the first is id = number of ranks)."""
  named = [BEGIN_OF_TEXT, END_OF_TEXT, *[f"<|reserved_special_token_{i}|>" for i in range(4)],
           "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", EOT]
  return named + [f"<|reserved_special_token_{i}|>"
                  for i in range(5, NUM_LLAMA3_SPECIAL - len(named) + 5)]


def _byte_alphabet() -> dict[int, str]:
  """GPT-2's byte -> printable character map (byte-level BPE's alphabet)."""
  keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
  chars, extra = {}, 0
  for b in range(256):
    if b in keep:
      chars[b] = chr(b)
    else:
      chars[b] = chr(256 + extra)
      extra += 1
  return chars


def read_tiktoken_ranks(path: str) -> dict[bytes, int]:
  """The `{token bytes: rank}` table of a tiktoken file.

  Raises:
    ValueError: A malformed line or repeated rank (names the file and line).
  """
  ranks: dict[bytes, int] = {}
  with open(path, "rb") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        token, rank = line.split()
        ranks[base64.b64decode(token, validate=True)] = int(rank)
      except ValueError as e:
        raise ValueError(f"{path}: line {number} is not '<base64 token> <rank>' ({e})") from e
  if sorted(ranks.values()) != list(range(len(ranks))):
    raise ValueError(f"{path}: ranks are not 0..{len(ranks) - 1} without repeats")
  return ranks


def tiktoken_to_tokenizer_json(path: str, special_tokens: list[str] | None = None,
                               pattern: str = LLAMA3_PATTERN) -> str:
  """The `tokenizer.json` text equivalent to the tiktoken file `path`.

  Args:
    path: The tiktoken BPE file.
    special_tokens: Added after the last rank, in order; None = Llama-3's 256.
    pattern: The pre-tokenizer regex (Llama-3's by default).

  Returns:
    tokenizer.json text: byte-level BPE, ignore_merges, the split regex, a ByteLevel
    decoder, and a post-processor that prepends the first special token (as Llama-3's
    tokenizer.json does; `data` never runs it, `transformers` does with
    add_special_tokens=True).
  """
  if not os.path.isfile(path):
    raise ValueError(f"{path}: tiktoken BPE file not found")
  ranks = read_tiktoken_ranks(path)
  alphabet = _byte_alphabet()
  text = lambda b: "".join(alphabet[x] for x in b)
  vocab = {text(token): rank for token, rank in ranks.items()}
  merges = []
  for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
    splits = [(token[:i], token[i:]) for i in range(1, len(token))
              if token[:i] in ranks and token[i:] in ranks]
    splits.sort(key=lambda lr: (ranks[lr[0]], ranks[lr[1]]))
    merges.extend((text(a), text(b)) for a, b in splits)
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=True))
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  specials = llama3_special_tokens() if special_tokens is None else list(special_tokens)
  tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
  if specials:
    first = specials[0]
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{first} $A", pair=f"{first} $A {first} $B:1",
                                      special_tokens=[(first, len(ranks))])])
  # Round-trip through JSON so the text is the library's canonical serialisation.
  return json.dumps(json.loads(tok.to_str()), ensure_ascii=False)
