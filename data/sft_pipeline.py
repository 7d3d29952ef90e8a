"""The SFT pipeline: chat conversations -> tokenized, packed or padded LM batches.

Entry point:

  build_sft_pipelines(data_cfg, template, *, global_batch_size: int,
                      process_index: int = 0, process_count: int = 1,
                      conversations: tuple[list, list] | None = None,
                      ) -> tuple[RowPipeline, RowValidationSet, dict]

`data_cfg` is `data.config.default_sft_data_config()`; `template` a
`data.chat.ChatTemplate`. Batches have the pretraining contract (see
`data/lm_pipeline.py`), so `train.losses.lm_loss` and `Trainer.evaluate` work
unchanged; every array is [per_host_batch, seq_len]:
  tokens, targets, positions, segment_ids  int32
  loss_mask  float32: 1 where the TARGET is an assistant content token or the
             `<|end|>` closing an assistant turn; 0 on prompts, markers, padding.
Truncation, dropping and packing ("pack" | "pad") are in `data/sft_rows.py`.

Order, resume, multi-host layout and validation padding: `data/row_pipeline.py`
(`RowPipeline`, `RowValidationSet`).
"""

from __future__ import annotations

import logging
from typing import Any

from data import sft_sources
from data.chat import AnyTemplate
from data.row_pipeline import RowPipeline, RowValidationSet
from data.sft_rows import build_rows


def format_stats(stats: dict[str, Any]) -> str:
  """One log line from `build_sft_pipelines` stats."""
  parts = []
  for split in ("train", "val"):
    s = {k.split("/", 1)[1]: v for k, v in stats.items() if k.startswith(split + "/")}
    truncated = s["truncated_prompt"] + s["truncated_response"]
    dropped = s["dropped_too_long"] + s["dropped_no_response"] + s["dropped_long_response"]
    parts.append(
        f"{split}: {s['examples']} examples, {truncated} truncated "
        f"({s['truncated_prompt']} prompt, {s['truncated_response']} response), "
        f"{dropped} dropped ({s['dropped_too_long']} too long, "
        f"{s['dropped_long_response']} response over max_response_tokens, "
        f"{s['dropped_no_response']} no response), {s['rows']} rows, "
        f"{s['loss_tokens']} loss tokens ({s['loss_tokens'] / max(s['slots'], 1):.1%} "
        "of slots)")
  return (f"SFT data ({stats['skipped_records']} records skipped): "
          + "; ".join(parts))


def build_sft_pipelines(data_cfg: Any, template: AnyTemplate, *, global_batch_size: int,
                        process_index: int = 0, process_count: int = 1,
                        conversations: tuple[list, list] | None = None,
                        ) -> tuple[RowPipeline, RowValidationSet, dict[str, Any]]:
  """Builds this host's SFT training pipeline, validation set and data stats.

  Args:
    data_cfg: The SFT data ConfigDict (`default_sft_data_config()`): `sources`,
      `seq_len`, `packing`, `val_fraction`, `seed`, `min_response_tokens`,
      `prefetch`.
    template: The chat template with the run's tokenizer.
    global_batch_size: Training rows per step over all hosts.
    process_index: This host's index (`jax.process_index()`).
    process_count: Number of hosts (`jax.process_count()`).
    conversations: (train, val) conversations if already split; None reads
      `data_cfg.sources` and splits by `sft_sources.split_examples`.

  Returns:
    (train pipeline, validation set, stats): stats has "train/<count>" and
    "val/<count>" for the counts of `build_rows` and "skipped_records".
  """
  skipped = 0
  if conversations is None:
    examples, files = sft_sources.read_sft_sources(
        data_cfg.sources, getattr(data_cfg, "tfds_data_dir", ""))
    skipped = sum(f.skipped for f in files)
    conversations = sft_sources.split_examples(
        examples, data_cfg.val_fraction, data_cfg.seed)
  train_convs, val_convs = conversations
  common = dict(seq_len=data_cfg.seq_len, packing=data_cfg.packing,
                min_response_tokens=data_cfg.min_response_tokens,
                max_response_tokens=data_cfg.max_response_tokens)
  train_rows, train_counts = build_rows(train_convs, template,
                                        shuffle_seed=data_cfg.seed, **common)
  val_rows, val_counts = build_rows(val_convs, template, **common)
  stats: dict[str, Any] = {"skipped_records": skipped}
  stats.update({f"train/{k}": v for k, v in train_counts.items()})
  stats.update({f"val/{k}": v for k, v in val_counts.items()})
  logging.info("%s", format_stats(stats))
  fingerprint = f"{template.name}:{template.tokenizer.fingerprint}:{data_cfg.packing}"
  train = RowPipeline(train_rows, global_batch_size=global_batch_size,
                      seed=data_cfg.seed, prefetch=data_cfg.prefetch,
                      process_index=process_index, process_count=process_count,
                      fingerprint=fingerprint)
  val = RowValidationSet(val_rows, process_index=process_index,
                         process_count=process_count)
  return train, val, stats
