"""Pretraining entry point: next-token prediction on packed text.

  python -m train.pretrain --config=configs/pretrain/shakespeare_char.py --workdir=runs/sc \
      [--config.optim.lr=3e-4 --config.model.num_layers=8 ...]

Reads the config (locked: unknown fields are errors), writes the resolved config to
`<workdir>/config.json`, trains or loads the tokenizer (`<workdir>/tokenizer.model`), builds
the tf.data pipelines, and runs the shared Trainer with the LM loss. Re-running the same
command resumes from the newest checkpoint in the workdir.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any


def write_config(config: Any, workdir: str) -> None:
  import tensorflow as tf
  tf.io.gfile.makedirs(workdir)
  with tf.io.gfile.GFile(os.path.join(workdir, "config.json"), "w") as f:
    f.write(json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str))


def resolve_vocab(model_cfg_dict: dict, vocab: int) -> dict:
  """vocab_size 0 takes the tokenizer's; a smaller explicit one is an error."""
  if model_cfg_dict["vocab_size"] == 0:
    return {**model_cfg_dict, "vocab_size": vocab}
  if model_cfg_dict["vocab_size"] < vocab:
    raise ValueError(f"config.model.vocab_size={model_cfg_dict['vocab_size']} is smaller than "
                     f"the tokenizer's vocabulary ({vocab}); set it to 0 or >= {vocab}")
  return model_cfg_dict


def run(config: Any, workdir: str) -> dict[str, float]:
  """Trains per `config` in `workdir`; returns the final eval metrics."""
  import jax
  from data.config import get_or_train_tokenizer
  from data.lm_pipeline import build_lm_pipelines
  from data.sources import load_split_documents
  from data.tokenizer import Tokenizer
  from model.config import ModelConfig
  from train.losses import lm_loss
  from train.trainer import Trainer

  if jax.process_index() == 0:
    write_config(config, workdir)
  if config.data.get("source") == "curated":
    # The tokenized shards of a curation run (data/curate.py) and its tokenizer.
    from data.curate import load_tokenized
    tokenizer, train_corpus, val_corpus, info = load_tokenized(config.data.curated_dir)
    if config.data.tokenizer.path and Tokenizer.from_file(
        os.path.expanduser(config.data.tokenizer.path)).fingerprint != tokenizer.fingerprint:
      raise ValueError(f"data.tokenizer.path={config.data.tokenizer.path} is not the "
                       f"tokenizer of the curated shards in {config.data.curated_dir}; "
                       "leave it empty")
    val_chars = info["val_chars"]
    pipeline_input = {"corpora": (train_corpus, val_corpus)}
  else:
    train_docs, val_docs = load_split_documents(config.data)
    tokenizer = get_or_train_tokenizer(config.data, train_docs,
                                       os.path.join(workdir, "tokenizer.model"))
    val_chars = sum(len(d) for d in val_docs)
    pipeline_input = {"documents": (train_docs, val_docs)}
  model_cfg = ModelConfig.from_dict(resolve_vocab(config.model.to_dict(), tokenizer.vocab_size))
  train_iter, val_set = build_lm_pipelines(
      config.data, tokenizer, global_batch_size=config.train.batch_size,
      process_index=jax.process_index(), process_count=jax.process_count(),
      **pipeline_input)
  trainer = Trainer(config, workdir, model_cfg, lm_loss, tokenizer_bytes=tokenizer.to_bytes(),
                    tokenizer_fingerprint=tokenizer.fingerprint)
  print(f"Model: {model_cfg.num_params():,} parameters "
        f"({model_cfg.num_params(include_embedding=False):,} without embeddings); "
        f"mesh {dict(trainer.mesh.shape)}; {jax.device_count()} devices, "
        f"{jax.process_count()} process(es)", flush=True)
  state, data_state = trainer.restore_or_init()
  if data_state is not None:
    train_iter.set_state(data_state)
  trainer.data_state_fn = train_iter.get_state
  trainer.setup_throughput(config.train.batch_size * config.data.seq_len, config.data.seq_len)
  results: dict[str, float] = {}

  def eval_hook(trainer: Trainer, step: int, state: Any) -> None:
    metrics = trainer.evaluate(state.params, val_set(config.train.eval_batch_size))
    metrics["bpc"] = metrics["loss"] * metrics["tokens"] / val_chars / math.log(2)
    results.update(metrics)
    trainer.log_eval(step, metrics, f"loss {metrics['loss']:.4f} | bpc {metrics['bpc']:.4f} | "
                     f"accuracy {metrics['accuracy']:.4f} | {int(metrics['tokens'])} tokens")

  trainer.add_hook(eval_hook, every=config.train.eval_every or config.train.num_steps)
  results.update(trainer.fit(state, iter(train_iter)))
  return results


if __name__ == "__main__":
  from train import entry
  entry.launch(run)
