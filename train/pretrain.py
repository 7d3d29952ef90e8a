"""Pretraining stage: next-token prediction on packed text.

  python -m train.pretrain --config=configs/pretrain/shakespeare_char.py --workdir=runs/sc \
      [--config.optim.lr=3e-4 --config.model.num_layers=8 ...]

Reads the documents, trains or loads the tokenizer (kept as `<workdir>/tokenizer.model`),
builds the tf.data pipelines and trains the model with the LM loss through the shared driver
(train/stage.py). Re-running the same command resumes from the newest checkpoint.

Two data paths: `data.source` "curated" (a curation run's tokenized shards, with its
tokenizer) and "tfds" are streamed from disk per host (data/stream_sources.py: never
loaded whole; a TFDS run's tokenizer is `data.tokenizer.path` or trained on the first
`data.tokenizer.train_sample_docs` documents); the small text / jsonl / corpus sources are
loaded and tokenized in memory (data/lm_pipeline.py).
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Any

import jax
import numpy as np

from data import stream_sources
from data.config import get_or_train_tokenizer
from data.documents import load_split_documents
from data.hf_tokenizer import tokenizer_from_path
from data.lm_pipeline import build_lm_pipelines
from data.tokenized import curated_shards
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


def _pipelines(config: Any, workdir: str) -> tuple[Any, Any, Any, int, dict[str, bytes]]:
  """(tokenizer, train pipeline, validation set, validation characters, files to keep)."""
  data, files = config.data, {}
  hosts = dict(global_batch_size=config.train.batch_size,
               process_index=jax.process_index(), process_count=jax.process_count())
  source = data.get("source")
  if source == "curated":
    # The tokenized shards of a curation run (data/curate/) and its tokenizer, streamed.
    shards = curated_shards(data.curated_dir)
    tokenizer = shards.tokenizer
    if data.tokenizer.path and tokenizer_from_path(
        os.path.expanduser(data.tokenizer.path)).fingerprint != tokenizer.fingerprint:
      raise ValueError(f"data.tokenizer.path={data.tokenizer.path} is not the "
                       f"tokenizer of the curated shards in {data.curated_dir}; "
                       "leave it empty")
    train_iter, val_set = stream_sources.build_stream_pipelines(
        data, tokenizer, curated=shards, **hosts)
    return tokenizer, train_iter, val_set, shards.info["val_chars"], files
  if source == "tfds":
    kept = data.tokenizer.path or os.path.exists(os.path.join(workdir, TOKENIZER_FILE))
    sample = [] if kept else stream_sources.tfds_sample_documents(data)
    tokenizer, files = _tokenizer(config, workdir, sample)
    train_iter, val_set = stream_sources.build_stream_pipelines(data, tokenizer, **hosts)
    return tokenizer, train_iter, val_set, stream_sources.tfds_val_chars(data), files
  train_docs, val_docs = load_split_documents(data)
  tokenizer, files = _tokenizer(config, workdir, train_docs)
  train_iter, val_set = build_lm_pipelines(data, tokenizer, documents=(train_docs, val_docs),
                                           **hosts)
  return tokenizer, train_iter, val_set, sum(len(d) for d in val_docs), files


def build(config: Any, workdir: str) -> Run:
  """Documents, tokenizer, pipelines and the Trainer of a pretraining run."""
  tokenizer, train_iter, val_set, val_chars, files = _pipelines(config, workdir)
  model_cfg = ModelConfig.from_dict(resolve_vocab(config.model.to_dict(), tokenizer.vocab_size))
  reads = getattr(train_iter, "describe", "")
  if reads:  # Every process says what it streams (launch.local prefixes the process).
    print(f"Data: process {jax.process_index()} reads {reads}", flush=True)
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
