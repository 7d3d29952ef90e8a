"""Tokenizers to and from Hugging Face model directories.

- `tokenizer_from_hf_dir(dir)`: the tokenizer of a Hugging Face model directory, read from
  `tokenizer.json` if present, else a tiktoken BPE file (Llama-3's `tokenizer.model` or
  `*.tiktoken`, converted by `data.tiktoken_convert`), else a SentencePiece `tokenizer.model`;
  `tokenizer_config.json` (with `special_tokens_map.json` / `chat_template.jinja` as the older
  and newer `transformers` layouts) gives BOS / EOS / pad / unk and the chat template.
- `save_hf_tokenizer(tokenizer, template, dir)`: writes tokenizer.json, tokenizer_config.json
  (with the template's Jinja source) and special_tokens_map.json, so `AutoTokenizer` loads the
  export and `apply_chat_template` renders what the template encodes.
- `sp_tokenizer_json(tokenizer)` / `hf_tokenizer(tokenizer)`: our SentencePiece model as a
  `tokenizers` BPE (tokenizer.json) with the same pieces and ids, merges derived from the
  piece scores (SentencePiece BPE applies the merge whose result scores highest first),
  identity normalisation (" " -> "\u2581", no dummy prefix) and the user-defined pieces ("\n",
  the chat markers) as added tokens, so `AutoTokenizer` loads it without sentencepiece and
  encodes exactly as we do. Only the models `data.tokenizer` trains (BPE, identity, no
  prefix) convert.
"""

from __future__ import annotations

import json
import os
from typing import Any

from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, Tokenizer as RustTokenizer, decoders, models, normalizers

from data import tiktoken_convert
from data.hf_backend import HFTokenizer
from data.tokenizer import Tokenizer

SPACE = "\u2581"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_MAP_FILE = "special_tokens_map.json"
# tokenizer_config.json key of an export from a self-trained SentencePiece model: the file
# holding that model. Import reads it back instead of tokenizer.json, so export -> import
# returns the very tokenizer (same backend, same fingerprint); `transformers` ignores the key.
# The model's own Jinja template, if it carried one, is kept under SP_TEMPLATE_KEY: the config's
# `chat_template` is the rendering for `transformers` (the project's markers as Jinja for a
# self-trained model), which the tokenizer itself never held.
SP_MODEL_KEY = "lmlife_sentencepiece_model"
SP_TEMPLATE_KEY = "lmlife_sentencepiece_chat_template"
TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


def sp_tokenizer_json(tokenizer: Tokenizer) -> str:
  """tokenizer.json text that encodes exactly as our (self-trained) SentencePiece model.

  Raises:
    ValueError: Not a model `data.tokenizer` trains (BPE, identity, no dummy prefix).
  """
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(tokenizer.model_proto)
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
  hf = RustTokenizer(model)
  hf.normalizer = normalizers.Replace(" ", SPACE)
  hf.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(),
                                  decoders.Fuse()])
  added = []
  for p in proto.pieces:
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
  return hf.to_str()


def _token_strings(tokenizer: Any) -> dict[str, str | None]:
  """bos/eos/pad/unk token strings of either backend (None where the family has none)."""
  ids = {"bos_token": tokenizer.bos_id, "eos_token": tokenizer.eos_id,
         "pad_token": tokenizer.pad_id, "unk_token": tokenizer.unk_id}
  return {k: tokenizer.id_to_piece(i).replace(SPACE, " ") if i >= 0 else None
          for k, i in ids.items()}


def hf_tokenizer(tokenizer: Any):
  """A transformers PreTrainedTokenizerFast that encodes exactly as `tokenizer`.

  Either backend; a SentencePiece model must be one `data.tokenizer` trains (BPE,
  identity normalisation, no dummy prefix, optional byte fallback).
  """
  # Imported here: transformers is heavy and only this export needs it.
  from transformers import PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top
  text = (tokenizer.tokenizer_json if isinstance(tokenizer, HFTokenizer)
          else sp_tokenizer_json(tokenizer))
  return PreTrainedTokenizerFast(
      tokenizer_object=RustTokenizer.from_str(text), **_token_strings(tokenizer),
      clean_up_tokenization_spaces=False, model_max_length=1_000_000)


def save_hf_tokenizer(tokenizer: Any, template: Any, out_dir: str) -> dict[str, Any]:
  """Writes the tokenizer and chat template in the Hugging Face layout.

  Files: tokenizer.json, tokenizer_config.json (bos/eos/pad/unk tokens, `chat_template` =
  `template.jinja`, `PreTrainedTokenizerFast`), special_tokens_map.json; for a SentencePiece
  tokenizer also its own `tokenizer.model`, named in the config under `SP_MODEL_KEY`.

  Args:
    tokenizer: Either backend (a SentencePiece one must be self-trained, see
      `sp_tokenizer_json`).
    template: The chat template the model was trained with (`data.chat.get_template`), or
      None for a model that was never chat-trained (no `chat_template`; eos only).
    out_dir: The export directory (made if missing).

  Returns:
    The generation-config ids: {"bos_token_id", "eos_token_id": every end-of-turn id of
    the template, "pad_token_id"} (None where the family has no such token).
  """
  text = (tokenizer.tokenizer_json if isinstance(tokenizer, HFTokenizer)
          else sp_tokenizer_json(tokenizer))
  tokens = _token_strings(tokenizer)
  config = {"tokenizer_class": "PreTrainedTokenizerFast", **tokens,
            **({"chat_template": template.jinja} if template is not None else {}),
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000}
  os.makedirs(out_dir, exist_ok=True)
  if isinstance(tokenizer, Tokenizer):
    tokenizer.save(os.path.join(out_dir, "tokenizer.model"))
    config[SP_MODEL_KEY] = "tokenizer.model"
    if tokenizer.chat_template is not None:
      config[SP_TEMPLATE_KEY] = tokenizer.chat_template
  with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
    f.write(text)
  for name, content in ((CONFIG_FILE, config),
                        (SPECIAL_MAP_FILE, {k: v for k, v in tokens.items() if v is not None})):
    with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
      json.dump(content, f, indent=2, ensure_ascii=False)
  none_if_absent = lambda i: i if i >= 0 else None
  return {"bos_token_id": none_if_absent(tokenizer.bos_id),
          "eos_token_id": ([int(i) for i in template.end_ids] if template is not None
                           else none_if_absent(tokenizer.eos_id)),
          "pad_token_id": none_if_absent(tokenizer.pad_id)}


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.isfile(path):
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: not readable JSON ({e})") from e
  if not isinstance(data, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
  return data


def _token_content(value: Any, path: str, key: str) -> str | None:
  """A config token: a string, an AddedToken dict ({"content": ...}) or null."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, dict) and isinstance(value.get("content"), str):
    return value["content"]
  raise ValueError(f"{path}: field {key!r} is {value!r:.80}, expected a token string")


def _chat_template(config: dict[str, Any], hf_dir: str) -> str | None:
  """tokenizer_config.json's `chat_template` (string, or the list form's "default"), else
  `chat_template.jinja` (what newer `transformers` write)."""
  path = os.path.join(hf_dir, CONFIG_FILE)
  value = config.get("chat_template")
  if isinstance(value, list):
    named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
    if "default" not in named:
      raise ValueError(f"{path}: field 'chat_template' is a list without a 'default' "
                       f"entry (names: {sorted(map(str, named))})")
    value = named["default"]
  if value is not None and not isinstance(value, str):
    raise ValueError(f"{path}: field 'chat_template' is {type(value).__name__}, expected a "
                     "Jinja string or a list of {name, template}")
  jinja_path = os.path.join(hf_dir, "chat_template.jinja")
  if value is None and os.path.isfile(jinja_path):
    with open(jinja_path, encoding="utf-8") as f:
      value = f.read()
  return value


def _is_tiktoken(path: str) -> bool:
  """A tiktoken BPE file starts with a '<base64> <int>' line; a SentencePiece proto does not."""
  with open(path, "rb") as f:
    first = f.readline(4096).split()
  return len(first) == 2 and first[1].isdigit() and first[0][:1] not in (b"\n", b"")


def _tiktoken_json(path: str, config: dict[str, Any], config_path: str) -> str:
  """Llama-3's tokenizer.json from its tiktoken file; `added_tokens_decoder` renames ids."""
  specials = tiktoken_convert.llama3_special_tokens()
  num_ranks = len(tiktoken_convert.read_tiktoken_ranks(path))
  for key, entry in (config.get("added_tokens_decoder") or {}).items():
    index = int(key) - num_ranks
    content = _token_content(entry, config_path, f"added_tokens_decoder.{key}")
    if not 0 <= index < len(specials):
      raise ValueError(f"{config_path}: field 'added_tokens_decoder.{key}' ({content!r}) is "
                       f"outside the special ids {num_ranks}..{num_ranks + len(specials) - 1}")
    specials[index] = content
  return tiktoken_convert.tiktoken_to_tokenizer_json(path, specials)


def tokenizer_from_hf_dir(hf_dir: str) -> Tokenizer | HFTokenizer:
  """The tokenizer (with its special tokens and chat template) of a Hugging Face directory.

  Raises:
    ValueError: No tokenizer file, unreadable files, or a config token that is not in the
      vocabulary; the message names the file and field.
  """
  if not os.path.isdir(hf_dir):
    raise ValueError(f"{hf_dir}: not a directory (expected a Hugging Face model directory)")
  config_path = os.path.join(hf_dir, CONFIG_FILE)
  config = {**_read_json(os.path.join(hf_dir, SPECIAL_MAP_FILE)), **_read_json(config_path)}
  tokens = {k: _token_content(config.get(k), config_path, k) for k in TOKEN_KEYS}
  template = _chat_template(config, hf_dir)
  json_path, model_path = (os.path.join(hf_dir, n) for n in ("tokenizer.json", "tokenizer.model"))
  tiktoken_files = sorted(n for n in os.listdir(hf_dir) if n.endswith(".tiktoken"))
  if config.get(SP_MODEL_KEY):  # our own export of a self-trained SentencePiece model
    model_path, json_path = os.path.join(hf_dir, str(config[SP_MODEL_KEY])), ""
    template = config.get(SP_TEMPLATE_KEY)
    if not os.path.isfile(model_path):
      raise ValueError(f"{config_path}: field {SP_MODEL_KEY!r} names {model_path}, which is "
                       "missing (expected the exported SentencePiece model)")
  if not os.path.isfile(json_path) and not tiktoken_files and os.path.isfile(model_path):
    if _is_tiktoken(model_path):
      tiktoken_files = ["tokenizer.model"]
  if os.path.isfile(json_path):
    with open(json_path, encoding="utf-8") as f:
      text, source = f.read(), json_path
  elif tiktoken_files:
    source = os.path.join(hf_dir, tiktoken_files[0])
    text = _tiktoken_json(source, config, config_path)
    if not any(tokens.values()):  # no config: Llama-3's base-model tokens
      tokens.update(bos_token=tiktoken_convert.BEGIN_OF_TEXT,
                    eos_token=tiktoken_convert.END_OF_TEXT)
  elif os.path.isfile(model_path):
    with open(model_path, "rb") as f:
      sp = Tokenizer(f.read(), chat_template=template)
    for key, token in tokens.items():
      if token is not None and token not in sp.special_tokens and token not in {
          sp.id_to_piece(i) for i in (sp.unk_id,) if i >= 0}:
        raise ValueError(f"{config_path}: field {key!r} = {token!r} is not a piece of "
                         f"{model_path}")
    return sp
  else:
    raise ValueError(f"{hf_dir}: no tokenizer file (expected tokenizer.json, a tiktoken "
                     "tokenizer.model / *.tiktoken, or a SentencePiece tokenizer.model)")
  return HFTokenizer(text, {**tokens, "chat_template": template}, source=source,
                     config_source=config_path)


def tokenizer_from_path(path: str) -> Tokenizer | HFTokenizer:
  """`data.tokenizer.path` of a run: a Hugging Face directory (or its tokenizer.json, read
  with the directory's config), another `*.json` tokenizer file, or a SentencePiece
  `.model` file."""
  if os.path.isdir(path):
    return tokenizer_from_hf_dir(path)
  if os.path.basename(path) == "tokenizer.json":
    return tokenizer_from_hf_dir(os.path.dirname(os.path.abspath(path)))
  if path.endswith(".json"):
    if not os.path.isfile(path):
      raise ValueError(f"{path}: tokenizer file not found")
    with open(path, encoding="utf-8") as f:
      return HFTokenizer(f.read(), source=path)
  return Tokenizer.from_file(path)
