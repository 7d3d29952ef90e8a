"""Pretraining stage: next-token prediction on packed text.

  python -m train.pretrain --config=configs/pretrain/shakespeare_char.py --workdir=runs/sc \
      [--config.optim.lr=3e-4 --config.model.num_layers=8 ...]

Reads the documents (or a curation run's tokenized shards), trains or loads the tokenizer
(kept as `<workdir>/tokenizer.model`), builds the tf.data pipelines and trains the model with
the LM loss through the shared driver (train/stage.py). Re-running the same command resumes
from the newest checkpoint.
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Any

import jax
import numpy as np

from data.config import get_or_train_tokenizer
from data.tokenized import load_tokenized
from data.lm_pipeline import build_lm_pipelines
from data.documents import load_split_documents
from data.hf_tokenizer import tokenizer_from_path
from model.config import ModelConfig
from model.transformer import Transformer
from train import entry
from train.losses import lm_loss
from train.stage import Program, Run, Stage, evaluate_on
from train.trainer import Trainer

TOKENIZER_FILE = "tokenizer.model"


def resolve_vocab(model_cfg_dict: dict, vocab: int) -> dict:
  """vocab_size 0 takes the tokenizer's; a smaller explicit one is an error."""
  if model_cfg_dict["vocab_size"] == 0:
    return {**model_cfg_dict, "vocab_size": vocab}
  if model_cfg_dict["vocab_size"] < vocab:
    raise ValueError(f"config.model.vocab_size={model_cfg_dict['vocab_size']} is smaller than "
                     f"the tokenizer's vocabulary ({vocab}); set it to 0 or >= {vocab}")
  return model_cfg_dict


def lm_batch(b: int, t: int) -> dict[str, jax.ShapeDtypeStruct]:
  """The LM batch contract (data/lm_pipeline.py; SFT's too): [B, T] arrays."""
  ints = {k: jax.ShapeDtypeStruct((b, t), np.int32)
          for k in ("tokens", "targets", "positions", "segment_ids")}
  return {**ints, "loss_mask": jax.ShapeDtypeStruct((b, t), np.float32)}


def programs(config: Any, model_cfg: ModelConfig) -> list[Program]:
  """One trainer: the Transformer with the LM loss on LM batches."""
  del model_cfg
  b = config.train.batch_size // config.train.grad_accum_steps
  return [Program("train", config, Transformer, lm_loss, lm_batch(b, config.data.seq_len))]


def _tokenizer(config: Any, workdir: str, train_docs: list[str]
               ) -> tuple[Any, dict[str, bytes]]:
  """The run's tokenizer and, if it was trained now, the file to keep in the workdir (it is
  trained in a temporary folder: nothing goes to the workdir before the run is validated)."""
  kept = os.path.join(workdir, TOKENIZER_FILE)
  if config.data.tokenizer.path or os.path.exists(kept):
    return get_or_train_tokenizer(config.data, train_docs, kept), {}
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer = get_or_train_tokenizer(config.data, train_docs,
                                       os.path.join(tmp, TOKENIZER_FILE))
  return tokenizer, {TOKENIZER_FILE: tokenizer.to_bytes()}


def build(config: Any, workdir: str) -> Run:
  """Documents, tokenizer, pipelines and the Trainer of a pretraining run."""
  files: dict[str, bytes] = {}
  if config.data.get("source") == "curated":
    # The tokenized shards of a curation run (data/curate.py) and its tokenizer.
    tokenizer, train_corpus, val_corpus, info = load_tokenized(config.data.curated_dir)
    if config.data.tokenizer.path and tokenizer_from_path(
        os.path.expanduser(config.data.tokenizer.path)).fingerprint != tokenizer.fingerprint:
      raise ValueError(f"data.tokenizer.path={config.data.tokenizer.path} is not the "
                       f"tokenizer of the curated shards in {config.data.curated_dir}; "
                       "leave it empty")
    val_chars = info["val_chars"]
    pipeline_input = {"corpora": (train_corpus, val_corpus)}
  else:
    train_docs, val_docs = load_split_documents(config.data)
    tokenizer, files = _tokenizer(config, workdir, train_docs)
    val_chars = sum(len(d) for d in val_docs)
    pipeline_input = {"documents": (train_docs, val_docs)}
  model_cfg = ModelConfig.from_dict(resolve_vocab(config.model.to_dict(), tokenizer.vocab_size))
  train_iter, val_set = build_lm_pipelines(
      config.data, tokenizer, global_batch_size=config.train.batch_size,
      process_index=jax.process_index(), process_count=jax.process_count(),
      **pipeline_input)
  (program,) = programs(config, model_cfg)
  trainer = Trainer(config, workdir, model_cfg, program.loss_fn,
                    tokenizer_bytes=tokenizer.to_bytes(),
                    tokenizer_fingerprint=tokenizer.fingerprint)
  evaluate = evaluate_on(trainer, val_set, config.train.eval_batch_size)

  def evaluate_bpc(params: Any) -> dict[str, float]:
    metrics = evaluate(params)
    metrics["bpc"] = metrics["loss"] * metrics["tokens"] / val_chars / math.log(2)
    return metrics

  return Run(
      trainers=[trainer], train_iter=train_iter, evaluate=evaluate_bpc,
      summary=lambda m: (f"loss {m['loss']:.4f} | bpc {m['bpc']:.4f} | accuracy "
                         f"{m['accuracy']:.4f} | {int(m['tokens'])} tokens"),
      tokens_per_step=config.train.batch_size * config.data.seq_len,
      seq_len=config.data.seq_len, files=files,
      info=[f"Model: {model_cfg.num_params():,} parameters "
            f"({model_cfg.num_params(include_embedding=False):,} without embeddings); "
            f"mesh {dict(trainer.mesh.shape)}; {jax.device_count()} devices, "
            f"{jax.process_count()} process(es)"])


STAGE = Stage("pretrain", programs=programs, build=build)


if __name__ == "__main__":
  entry.launch(STAGE)
