"""SentencePiece tokenizer: training, loading, and a lossless encode/decode wrapper.

Every model trained here round-trips text exactly, `decode(encode(s)) == s`, for
characters seen in training (or for all text with `byte_fallback=True`): identity
normalisation (no NFKC), no whitespace collapsing, no dummy-prefix space, and "\\n"
as a user-defined piece. SentencePiece trains on sentences (lines), so it never sees
a newline in its training data; making "\\n" a piece of its own is what lets
multi-line documents encode and decode unchanged.

"word" models are the exception: SentencePiece's word model maps whitespace runs
and unseen words to unk, so it is not lossless; it is kept only for ablations.

Special ids are fixed for every model: pad=0 `<pad>`, unk=1 `<unk>`, bos=2 `<s>`,
eos=3 `</s>`, then "\\n" at 4 and any other user-defined symbols.
`Tokenizer.with_pieces` appends more user-defined symbols (chat markers) at the end
of an existing vocabulary, so a pretrained model's ids keep their meaning.

One interface, two backends: this `Tokenizer` (SentencePiece: self-trained models and
Llama-2-style imports) and `data.hf_backend.HFTokenizer` (Hugging Face tokenizer.json,
Llama-3 / Qwen / Mistral imports). Both have `vocab_size`, `pad_id` / `bos_id` / `eos_id` /
`unk_id` (-1 = the family has none), `fingerprint`, `to_bytes()`, `encode` (no BOS/EOS),
`encode_with_offsets`, `encode_batch`, `decode`, `id_to_piece`, `with_pieces`,
`chat_template` and `special_tokens`; `load_tokenizer(bytes)` picks the backend of a
checkpoint's bytes.

Command line (prints the vocab size and a round-trip sample):

  python -m data.tokenizer --input=a.txt,b.jsonl --output=out.model \\
      --vocab_size=8000 --model_type=bpe [--byte_fallback] [--jsonl_field=text]
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import sys
import tempfile
from typing import Iterable, Iterator, Sequence

from absl import app
from absl import flags as absl_flags
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from data import readers
from data.hf_backend import HFTokenizer

# `to_bytes` of a SentencePiece model that carries a chat template (one imported from a
# Hugging Face directory): a JSON bundle; plain models stay bare protos (old checkpoints).
SP_BUNDLE_FORMAT = "lmlife.sp_tokenizer/1"

MODEL_TYPES = ("bpe", "unigram", "char", "word")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
NEWLINE = "\n"
# SentencePiece's escaped space: a piece's " " is stored as this character.
_SPACE_SYMBOL = "\u2581"
# SentencePiece silently skips sentences longer than max_sentence_length bytes, so
# long lines are cut into pieces of at most this many characters (4 bytes each max).
_MAX_SENTENCE_CHARS = 4096
# Sentences sampled for training; a 1 MB corpus (~40k lines) is used whole, larger
# ones are subsampled (seeded) so training stays seconds-to-minutes on a CPU.
_INPUT_SENTENCE_SIZE = 2_000_000
_SAMPLING_SEED = 0


def _training_sentences(docs: Iterable[str]) -> Iterator[str]:
  """Yields the non-empty lines of `docs`, long lines cut to fit SentencePiece."""
  for doc in docs:
    for line in doc.split(NEWLINE):
      for start in range(0, len(line), _MAX_SENTENCE_CHARS):
        yield line[start:start + _MAX_SENTENCE_CHARS]


def _num_meta_pieces(byte_fallback: bool, user_symbols: Sequence[str]) -> int:
  """Pieces SentencePiece reserves before learning any: specials, symbols, bytes."""
  return 4 + len(user_symbols) + (256 if byte_fallback else 0)


def train_tokenizer(input_files: Sequence[str],
                    model_path: str,
                    vocab_size: int,
                    model_type: str = "bpe",
                    byte_fallback: bool = False,
                    user_defined_symbols: Sequence[str] = (),
                    jsonl_field: str = "text") -> str:
  """Trains a lossless SentencePiece model and writes it to `model_path`.

  Deterministic: the same inputs and arguments give a byte-identical model file.

  Args:
    input_files: Text files (each one document) and/or `.jsonl[.gz]` files (the
      `jsonl_field` of each record is a document).
    model_path: Where to write the `.model` file (parent directories are made).
    vocab_size: For bpe/unigram/word, the target vocabulary size including the
      specials, "\\n", user symbols and (with byte_fallback) 256 byte pieces; it
      is an upper bound, a corpus too small to fill it gives a smaller vocab.
      For char, 0 means every character of the training data (e.g. 65 + 4
      specials = 69 for tinyshakespeare, since "\\n" is one of its 65 chars);
      N > 0 keeps the most frequent characters that fit in N pieces (the rest
      become unk, or bytes with byte_fallback).
    model_type: One of "bpe", "unigram", "char", "word".
    byte_fallback: Encode unseen characters as UTF-8 byte pieces instead of unk.
    user_defined_symbols: Extra pieces that are never split (e.g. chat markers).
    jsonl_field: The record field read from jsonl inputs.

  Returns:
    `model_path`.

  Raises:
    ValueError: Bad model_type or vocab_size, or unreadable inputs (see
      `data.readers`).
    FileNotFoundError: An input file does not exist.
  """
  if model_type not in MODEL_TYPES:
    raise ValueError(f"model_type={model_type!r} is not one of {MODEL_TYPES}")
  if vocab_size < 0 or (vocab_size == 0 and model_type != "char"):
    raise ValueError(f"vocab_size={vocab_size} must be > 0 for model_type="
                     f"{model_type!r} (0 means 'all characters' only for char)")
  if not input_files:
    raise ValueError("train_tokenizer needs at least one input file")
  symbols = [NEWLINE] + [s for s in user_defined_symbols if s != NEWLINE]
  use_all_chars = model_type == "char" and vocab_size == 0
  model = io.BytesIO()
  spm.set_random_generator_seed(_SAMPLING_SEED)
  spm.SentencePieceTrainer.train(
      sentence_iterator=_training_sentences(
          readers.documents_from_files(input_files, jsonl_field)),
      model_writer=model,
      model_type=model_type,
      # With use_all_vocab the char trainer sizes the vocab itself; it only
      # checks that vocab_size covers the reserved pieces.
      vocab_size=(_num_meta_pieces(byte_fallback, symbols) if use_all_chars
                  else vocab_size),
      use_all_vocab=use_all_chars,
      hard_vocab_limit=False,
      pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
      pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
      user_defined_symbols=symbols,
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      add_dummy_prefix=False,
      character_coverage=1.0,
      byte_fallback=byte_fallback,
      input_sentence_size=_INPUT_SENTENCE_SIZE,
      shuffle_input_sentence=True,
      max_sentence_length=4 * _MAX_SENTENCE_CHARS,
      num_threads=min(2, os.cpu_count() or 1),
      minloglevel=2,
  )
  Tokenizer.from_bytes(model.getvalue()).save(model_path)
  return model_path


class Tokenizer:
  """A SentencePiece model that encodes to and decodes from lists of int ids."""

  def __init__(self, model_proto: bytes, chat_template: str | None = None):
    """Wraps a serialized SentencePiece ModelProto (the bytes of a .model file).

    Args:
      model_proto: The model bytes.
      chat_template: The family's Jinja chat template (a model imported from a Hugging
        Face directory), or None (self-trained models use `data.chat`'s markers).
    """
    self._proto = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    self._chat_template = chat_template

  @classmethod
  def from_file(cls, path: str) -> "Tokenizer":
    """Loads a `.model` file."""
    if not os.path.isfile(path):
      raise FileNotFoundError(f"Tokenizer model not found: {path}")
    with open(path, "rb") as f:
      return cls(f.read())

  @classmethod
  def from_bytes(cls, model_proto: bytes) -> "Tokenizer":
    """Loads a model from `to_bytes()` output (e.g. stored in a checkpoint)."""
    if bytes(model_proto[:1]) == b"{":
      bundle = json.loads(bytes(model_proto).decode("utf-8"))
      if bundle.get("format") != SP_BUNDLE_FORMAT:
        raise ValueError(f"tokenizer bytes: field 'format' is {bundle.get('format')!r}, "
                         f"expected {SP_BUNDLE_FORMAT!r}")
      return cls(base64.b64decode(bundle["model"]), bundle.get("chat_template"))
    return cls(model_proto)

  def to_bytes(self) -> bytes:
    """The serialized model proto (the `.model` file contents); with a chat template, a
    JSON bundle of both (`SP_BUNDLE_FORMAT`)."""
    if self._chat_template is None:
      return self._proto
    bundle = {"format": SP_BUNDLE_FORMAT, "chat_template": self._chat_template,
              "model": base64.b64encode(self._proto).decode("ascii")}
    return json.dumps(bundle, sort_keys=True).encode("utf-8")

  @property
  def model_proto(self) -> bytes:
    """The SentencePiece model proto bytes (the `.model` file)."""
    return self._proto

  @property
  def chat_template(self) -> str | None:
    """The Jinja chat template of an imported model, else None (project markers)."""
    return self._chat_template

  @property
  def special_tokens(self) -> dict[str, int]:
    """Control pieces (`<s>`, `</s>`, `<pad>`), `<unk>` and user-defined pieces -> ids.

    SentencePiece itself never maps control-piece text to its id; `encode_with_offsets`
    does (as Hugging Face tokenizers do), which is what rendered chat templates need.
    """
    kinds = sentencepiece_model_pb2.ModelProto.SentencePiece
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(self._proto)
    return {p.piece.replace(_SPACE_SYMBOL, " "): i for i, p in enumerate(proto.pieces)
            if p.type in (kinds.CONTROL, kinds.UNKNOWN, kinds.USER_DEFINED)}

  def save(self, path: str) -> None:
    """Writes the `.model` file atomically (a crash never leaves half a file).

    Hosts sharing a workdir may all save the same (deterministic) model at once:
    each writes its own temporary file and renames it into place.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".tokenizer.",
                                     delete=False) as f:
      f.write(self._proto)
    os.chmod(f.name, 0o644)  # NamedTemporaryFile is private (0600); models are not.
    os.replace(f.name, path)

  def with_pieces(self, pieces: Sequence[str]) -> "Tokenizer":
    """A copy of this tokenizer with `pieces` added as unsplittable symbols.

    Missing pieces are appended at the END of the vocabulary as USER_DEFINED
    pieces, in the given order, so every existing id keeps its meaning (a
    pretrained embedding table stays valid and only grows) and the new ids are
    `vocab_size, vocab_size + 1, ...`. Pieces already in the vocabulary (of any
    type) are left as they are and get no new id. SentencePiece matches
    user-defined pieces before anything else, so each new piece encodes to one
    id wherever it occurs, and text without them encodes exactly as before.

    Args:
      pieces: Piece strings, e.g. the chat markers of `data.chat`. A space
        inside a piece is stored as SentencePiece's escaped space "\u2581",
        which is what the encoder matches it as.

    Returns:
      A new Tokenizer (this one is unchanged); `self` itself when nothing is
      missing, so the fingerprint only changes when the vocabulary does.

    Raises:
      ValueError: An empty piece.
    """
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(self._proto)
    present = {p.piece for p in proto.pieces}
    added = False
    for piece in pieces:
      if not piece:
        raise ValueError("Tokenizer.with_pieces: pieces must be non-empty strings")
      stored = piece.replace(" ", _SPACE_SYMBOL)
      if stored in present:
        continue
      new = proto.pieces.add()
      new.piece = stored
      new.score = 0.0
      new.type = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
      present.add(stored)
      added = True
    return (Tokenizer(proto.SerializeToString(), self._chat_template) if added
            else self)

  @property
  def fingerprint(self) -> str:
    """sha256 hex digest of `to_bytes()`: cache keys, checkpoint checks."""
    return hashlib.sha256(self.to_bytes()).hexdigest()

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def pad_id(self) -> int:
    return self._sp.pad_id()

  @property
  def unk_id(self) -> int:
    return self._sp.unk_id()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  def id_to_piece(self, token_id: int) -> str:
    return self._sp.id_to_piece(int(token_id))

  def encode(self, text: str) -> list[int]:
    """Encodes text to ids, without bos/eos."""
    return self._sp.encode(text, out_type=int)

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and (start, end) character spans of `text`, control-piece text mapped to ids.

    The text is split at the strings of `special_tokens` first (longest first) and
    every other segment is encoded on its own, the way Hugging Face tokenizers treat
    added tokens; used to encode rendered chat templates (`data.jinja_chat`).
    """
    specials = self.special_tokens
    ids, spans, at = [], [], 0
    pattern = "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True))
    parts = re.split(f"({pattern})", text) if pattern else [text]
    for part in parts:
      if part in specials:
        ids.append(specials[part])
        spans.append((at, at + len(part)))
      elif part:
        # SentencePiece offsets are UTF-8 byte offsets into the segment.
        starts = _byte_to_char(part)
        for piece in self._sp.EncodeAsProto(part).pieces:
          ids.append(piece.id)
          spans.append((at + starts[piece.begin], at + starts[piece.end]))
      at += len(part)
    return ids, spans

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Encodes many texts at once (SentencePiece's threaded batch encode)."""
    return self._sp.encode(list(texts), out_type=int,
                           num_threads=min(2, os.cpu_count() or 1))

  def decode(self, ids: Iterable[int]) -> str:
    """Decodes ids to text; pad ids are dropped, out-of-vocab ids become unk.

    Out-of-vocab ids come from models whose vocab is padded past the
    tokenizer's; they decode visibly (as unk) rather than raising.
    """
    size, pad, unk = self.vocab_size, self.pad_id, self.unk_id  # once: the server decodes often
    cleaned = [i if 0 <= i < size else unk for i in map(int, ids) if i != pad]
    return self._sp.decode(cleaned)

  def __repr__(self) -> str:
    return (f"Tokenizer(vocab_size={self.vocab_size}, "
            f"fingerprint={self.fingerprint[:12]})")


def _byte_to_char(text: str) -> list[int]:
  """Character index of every UTF-8 byte offset of `text` (0..len(bytes) inclusive)."""
  starts = []
  for index, char in enumerate(text):
    starts.extend([index] * len(char.encode("utf-8")))
  starts.append(len(text))
  return starts


def fill_id(tokenizer: Tokenizer | HFTokenizer) -> int:
  """The id written at padding positions: pad, else EOS, else 0 (Llama-3 has no pad).

  Padding positions are masked everywhere, so the id only has to be a valid embedding row;
  never compare against it to find padding (it may be a real token of the text).
  """
  for token_id in (tokenizer.pad_id, tokenizer.eos_id):
    if token_id >= 0:
      return token_id
  return 0


def load_tokenizer(data: bytes) -> Tokenizer | HFTokenizer:
  """The tokenizer whose `to_bytes()` is `data` (what a checkpoint stores), either backend.

  SentencePiece protos (every checkpoint before Hugging Face support) and the SentencePiece
  bundle load as `Tokenizer`; the `tokenizers` JSON bundle as `data.hf_backend.HFTokenizer`.

  Raises:
    ValueError: Bytes of neither format.
  """
  data = bytes(data)
  if data[:1] == b"{":
    kind = json.loads(data.decode("utf-8")).get("format")
    return Tokenizer.from_bytes(data) if kind == SP_BUNDLE_FORMAT else HFTokenizer.from_bytes(data)
  try:
    return Tokenizer(data)
  except RuntimeError as e:  # sentencepiece's parse error
    raise ValueError(f"tokenizer bytes: neither a SentencePiece model nor a JSON "
                     f"tokenizer bundle ({e})") from e


def _main(argv: Sequence[str]) -> None:
  del argv  # Everything comes from flags.
  flags = absl_flags.FLAGS
  inputs = [p for p in flags.input.split(",") if p]
  try:
    path = train_tokenizer(inputs, flags.output, flags.vocab_size, flags.model_type,
                           byte_fallback=flags.byte_fallback,
                           jsonl_field=flags.jsonl_field)
  except (ValueError, OSError) as e:  # bad input files: one line naming the file
    sys.exit("error: " + " ".join(str(e).split()))
  tok = Tokenizer.from_file(path)
  print(f"Wrote {path}: vocab_size={tok.vocab_size} fingerprint={tok.fingerprint}")
  sample = next(readers.documents_from_files(inputs[:1], flags.jsonl_field))[:300]
  ids = tok.encode(sample)
  print(f"Sample ({len(sample)} chars -> {len(ids)} tokens), round trip exact: "
        f"{tok.decode(ids) == sample}")
  print(" | ".join(tok.id_to_piece(i) for i in ids[:60]))


if __name__ == "__main__":
  # Flags are defined only when run, so library users never see (or parse) them.
  absl_flags.DEFINE_string("input", None, "Comma-separated text/jsonl files.",
                           required=True)
  absl_flags.DEFINE_string("output", None, "Path of the .model file to write.",
                           required=True)
  absl_flags.DEFINE_integer("vocab_size", 0, "Vocab size (0 = all chars, char only).")
  absl_flags.DEFINE_enum("model_type", "bpe", list(MODEL_TYPES), "Model type.")
  absl_flags.DEFINE_bool("byte_fallback", False, "Unseen chars -> byte pieces.")
  absl_flags.DEFINE_string("jsonl_field", "text", "Text field of jsonl records.")
  app.run(_main)
