"""What every post-pretraining stage does first: read its `init_from` parent and derive its
own model config, tokenizer and chat template from it.

SFT, reward modeling, DPO and PPO all start from a checkpoint: the architecture and the
tokenizer come from there (`config.model` holds only execution overrides, `MODEL_OVERRIDES`),
the chat markers are appended to a tokenizer that lacks them when the project's template
is used (new ids at the end, every existing id unchanged; an imported model with its own
`chat_template` keeps its tokenizer, `data.chat.get_template("auto", ...)`), and the
vocabulary of the model grows to match
(`model.layout.extend_vocab`, applied by the stage's init adapter).

The parent is a checkpoint of the shared format or a Hugging Face model directory
(`init_from=hf:<dir>`: config.json gives the model, `train/hf_import.py` the tokenizer and
the streamed weights). A Hugging Face parent is read into any parameter layout, so its
children may also set the `LAYOUT_FIELDS`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from data.chat import CHAT_MARKERS, get_template, uses_project_markers
from data.tokenizer import load_tokenizer
from model import layout
from model.lora import parse_targets
from model.config import ModelConfig
from train import checkpoint as ckpt_lib
from train.hf_import import hf_dir_of, load_hf_parent
from train.restore import InitAdapter

# Fields of ModelConfig a child run may change relative to its parent (not the parameters).
MODEL_OVERRIDES = ("dtype", "param_dtype", "remat_policy", "attention_impl", "max_seq_len")
# Parameter layouts a Hugging Face parent can be read into directly (a checkpoint parent
# keeps its own).
LAYOUT_FIELDS = ("scan_layers", "fuse_projections")


class Parent(NamedTuple):
  """A stage's parent checkpoint and what the child derives from it."""
  model_cfg: Any     # the parent's ModelConfig (as saved)
  tokenizer: Any     # the parent's Tokenizer
  meta: dict         # the parent's checkpoint metadata
  child_cfg: Any     # this run's ModelConfig: grown vocabulary + execution overrides
  child_tokenizer: Any  # the parent's tokenizer with the chat markers
  template: Any      # the chat template bound to child_tokenizer

  def lm_adapter(self, seed: int) -> InitAdapter:
    """init_from for a language model: the parent's params with the vocabulary grown to the
    child's (new rows near the mean of the old ones, every old row unchanged)."""
    vocab = self.child_cfg.vocab_size
    return InitAdapter(self.execution_cfg, lambda p: layout.extend_vocab(p, vocab, seed))

  @property
  def execution_cfg(self) -> Any:
    """The parent's config with this run's execution fields (how the parent is loaded)."""
    return self.model_cfg.replace(**{k: getattr(self.child_cfg, k) for k in MODEL_OVERRIDES
                                     if k != "max_seq_len"})


def lora_fields(lora_cfg: Any) -> dict[str, Any]:
  """ModelConfig's adapter fields from a run's `config.lora` (None: no adapters). The
  parent's own adapters are merged at init_from, so they never carry over."""
  if lora_cfg is None or not lora_cfg.rank:
    return {"lora_rank": 0}
  targets = lora_cfg.targets
  targets = ",".join(targets) if isinstance(targets, (list, tuple)) else str(targets)
  if lora_cfg.base_dtype not in ("", "float32", "bfloat16"):
    raise ValueError(f"config.lora.base_dtype={lora_cfg.base_dtype!r}: expected '', "
                     "'float32' or 'bfloat16'")
  return {"lora_rank": int(lora_cfg.rank), "lora_alpha": float(lora_cfg.alpha),
          "lora_targets": ",".join(parse_targets(targets))}


def child_model_config(parent_cfg: Any, overrides: Any, vocab_size: int,
                       allowed: tuple[str, ...] = MODEL_OVERRIDES, lora_cfg: Any = None):
  """The run's ModelConfig: the parent's, with a vocabulary >= the tokenizer's, overrides
  (of the `allowed` fields) and this run's adapters (`config.lora`; none by default)."""
  unknown = sorted(set(overrides.keys()) - set(allowed))
  if unknown:
    raise ValueError(f"config.model.{unknown[0]} cannot be changed here (the architecture "
                     f"comes from the init_from checkpoint); allowed: {list(allowed)}")
  changes = {k: v for k, v in overrides.items() if v not in ("", 0, None)}
  return parent_cfg.replace(vocab_size=max(parent_cfg.vocab_size, vocab_size), **changes,
                            **lora_fields(lora_cfg))


def load_parent(init_from: str) -> tuple[Any, Any, dict[str, Any]]:
  """(parent ModelConfig, parent Tokenizer, parent metadata) of an `init_from` checkpoint or
  `hf:<dir>` Hugging Face directory."""
  hf_dir = hf_dir_of(init_from)
  if hf_dir is not None:
    return load_hf_parent(hf_dir)
  meta = ckpt_lib.read_metadata(init_from)
  tokenizer = load_tokenizer(ckpt_lib.read_tokenizer(init_from))
  return ModelConfig.from_dict(meta["model_config"]), tokenizer, meta


def setup_child(config: Any, what: str) -> Parent:
  """Reads `config.init_from` and derives the child's model config, tokenizer and template.

  Raises:
    ValueError: no init_from (`what` names the stage's expected parent), a model override
      that is not an execution field, or `config.data.seq_len` beyond the model context.
    CheckpointError: an unreadable parent.
  """
  if not config.init_from:
    raise ValueError(f"This stage starts from a checkpoint: set --config.init_from to {what}")
  parent_cfg, parent_tok, meta = load_parent(config.init_from)
  allowed = MODEL_OVERRIDES
  if hf_dir_of(config.init_from) is not None:  # read straight into the run's layout
    allowed += LAYOUT_FIELDS
    parent_cfg = parent_cfg.replace(**{k: bool(config.model[k]) for k in LAYOUT_FIELDS
                                       if k in config.model})
  # The project's markers are appended only when its template is used ("chat", or "auto" on
  # a tokenizer without a template of its own); an imported model keeps its vocabulary.
  tokenizer = (parent_tok.with_pieces(CHAT_MARKERS)
               if uses_project_markers(config.data.template, parent_tok) else parent_tok)
  template = get_template(config.data.template, tokenizer)
  child = child_model_config(parent_cfg, config.model, tokenizer.vocab_size, allowed,
                             config.get("lora"))
  if child.max_seq_len < config.data.seq_len:
    raise ValueError(f"config.data.seq_len={config.data.seq_len} exceeds the model context "
                     f"({child.max_seq_len}); lower it or set config.model.max_seq_len")
  return Parent(parent_cfg, parent_tok, meta, child, tokenizer, template)
