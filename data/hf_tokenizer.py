"""Our SentencePiece tokenizer as a Hugging Face `PreTrainedTokenizerFast` (tokenizer.json).

`hf_tokenizer(tokenizer)` builds a `tokenizers` BPE with the same pieces and ids, merges
derived from the piece scores (SentencePiece BPE applies the merge whose result scores
highest first), identity normalisation (" " -> "\u2581", no dummy prefix) and the
user-defined pieces ("\n", the chat markers) as added tokens, so `AutoTokenizer` loads it
without sentencepiece and encodes exactly as we do (tests/test_model_hf.py checks real text).
Only the models `data.tokenizer` trains (BPE, identity, no prefix) convert.
"""

from __future__ import annotations

from typing import Any

from sentencepiece import sentencepiece_model_pb2

SPACE = "\u2581"


def hf_tokenizer(tokenizer: Any):
  """A transformers PreTrainedTokenizerFast that encodes exactly as our SentencePiece model.

  Supports the models `data.tokenizer` trains (BPE, identity normalisation, no dummy
  prefix, optional byte fallback); other model types are refused.
  """
  # Imported here: the Hugging Face packages are heavy and only this export needs them.
  # pylint: disable=g-import-not-at-top
  from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, normalizers
  from transformers import PreTrainedTokenizerFast
  # pylint: enable=g-import-not-at-top
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(tokenizer.to_bytes())
  spec, norm = proto.trainer_spec, proto.normalizer_spec
  if spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
    raise ValueError("Only SentencePiece BPE tokenizers export to tokenizer.json (this one is "
                     f"{sentencepiece_model_pb2.TrainerSpec.ModelType.Name(spec.model_type)})")
  if norm.add_dummy_prefix or norm.name not in ("identity", ""):
    raise ValueError(f"Tokenizer normalisation {norm.name!r} / add_dummy_prefix="
                     f"{norm.add_dummy_prefix}: only the identity, no-prefix models of "
                     "data.tokenizer export")
  kinds = sentencepiece_model_pb2.ModelProto.SentencePiece
  vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
  # BPE merges from the pieces: a NORMAL piece is the merge of two pieces; SentencePiece
  # applies the merge whose result scores highest first, so merges are ranked by score.
  normal = [(p.score, i, p.piece) for i, p in enumerate(proto.pieces) if p.type == kinds.NORMAL]
  merges = []
  for score, i, piece in sorted(normal, key=lambda x: (-x[0], x[1])):
    for cut in range(1, len(piece)):
      left, right = piece[:cut], piece[cut:]
      if left in vocab and right in vocab:
        merges.append((vocab[left], vocab[right], score, i, left, right))
  merges.sort(key=lambda m: (-m[2], m[3], m[0], m[1]))
  model = models.BPE(vocab=vocab, merges=[(m[4], m[5]) for m in merges],
                     unk_token=proto.pieces[tokenizer.unk_id].piece, fuse_unk=True,
                     byte_fallback=spec.byte_fallback)
  hf = HFTokenizer(model)
  hf.normalizer = normalizers.Replace(" ", SPACE)
  hf.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(),
                                  decoders.Fuse()])
  added = []
  for i, p in enumerate(proto.pieces):
    if p.type in (kinds.CONTROL, kinds.UNKNOWN, kinds.USER_DEFINED):
      added.append(AddedToken(p.piece.replace(SPACE, " "), special=p.type != kinds.USER_DEFINED,
                              normalized=False))
  hf.add_tokens([a for a in added if not a.special])
  hf.add_special_tokens([a for a in added if a.special])
  for a in added:  # added tokens must keep their SentencePiece ids
    got = hf.token_to_id(a.content)
    if got != vocab.get(a.content.replace(" ", SPACE), got):
      raise ValueError(f"Added token {a.content!r} got id {got}, SentencePiece has "
                       f"{vocab.get(a.content)}")
  piece = lambda i: proto.pieces[i].piece if i >= 0 else None
  return PreTrainedTokenizerFast(
      tokenizer_object=hf, bos_token=piece(tokenizer.bos_id), eos_token=piece(tokenizer.eos_id),
      unk_token=piece(tokenizer.unk_id), pad_token=piece(tokenizer.pad_id),
      clean_up_tokenization_spaces=False, model_max_length=1_000_000)
