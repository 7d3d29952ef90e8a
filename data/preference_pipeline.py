"""The preference pipeline: (prompt, chosen, rejected) pairs -> [B, 2, T] batches.

Entry point:

  build_preference_pipelines(data_cfg, template, *, global_batch_size: int,
                             process_index: int = 0, process_count: int = 1,
                             ) -> (RowPipeline, RowValidationSet, stats, (train, val))

`data_cfg` is `data.config.default_preference_data_config()`. A row is one pair, so a
batch always holds both sides of each pair (and a data-parallel shard of the batch holds
whole pairs). Per host, with B pairs, T = seq_len, side 0 = chosen, 1 = rejected:
  tokens       int32   [B, 2, T]  prompt + response + <|end|>, right-padded with 0
  positions    int32   [B, 2, T]  0, 1, ... over the real tokens, 0 on padding
  segment_ids  int32   [B, 2, T]  1 on real tokens, 0 on padding
  score_index  int32   [B, 2]     index of the response's <|end|>: where the score is read
  response_start int32 [B, 2]     index of the response's first token (the prompt's length)
  margin       float32 [B]        the pair's margin (0 unless the data gives one)
  pair_mask    float32 [B]        1 for a real pair, 0 for validation padding rows
  ref_logp     float32 [B, 2]     (DPO rows only) the reference model's response log-probs

Decisions:
- Each side is rendered with the chat template: `template.prompt_ids(prompt)` (which ends
  with `<|assistant|>`), the response's tokens, and `<|end|>`. The score index is that
  `<|end|>`'s position, computed here from the lengths, never from padding side or "last
  position" (the recurring bug of the anchors' issue trackers).
- Too long for T: the prompt loses tokens from its START, the same number on both sides
  (both responses are kept whole, and both see the same prompt), keeping at least
  `min_prompt_tokens` prompt tokens; otherwise the pair is dropped and counted
  (`dropped_too_long`). A response is never cut: its score is read at its end.
- Rows are built once in numpy ([N, 2, T] int32: 4 MB for 2,000 pairs of 256 tokens);
  order, resume and multi-host sharding are `data/row_pipeline.py`'s.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import Any, Callable, Sequence

import numpy as np
import tensorflow as tf

from data import preferences
from data.chat import AnyTemplate
from data.preferences import PreferencePair
from data.row_pipeline import RowPipeline, RowValidationSet

# Fill for slots past a side's length. Those slots are masked (segment id 0, outside the
# scored response), so any valid id works; 0 exists in every vocabulary, even a family's
# without a pad token (Llama-3).
PAD_TOKEN = 0
STATUSES = ("kept", "truncated_prompt", "dropped_too_long")


def encode_pair(pair: PreferencePair, template: AnyTemplate, seq_len: int,
                min_prompt_tokens: int = 16) -> tuple[list[np.ndarray] | None, int, str]:
  """The two token sequences of a pair (chosen, rejected), truncated to `seq_len`.

  Returns:
    ([chosen ids, rejected ids] or None when dropped, the prompt's length, status in
    `STATUSES`); both sides start with the same (possibly truncated) prompt.
  """
  # One rendering for prompt and response (the template's own end of turn), as in SFT.
  (prompt, chosen), (_, rejected) = (template.encode_response(list(pair.prompt), r)
                                     for r in (pair.chosen, pair.rejected))
  responses = [chosen, rejected]
  longest = len(prompt) + max(len(r) for r in responses)
  status = "kept"
  if longest > seq_len:
    cut = longest - seq_len
    if len(prompt) - cut < min(min_prompt_tokens, len(prompt)):
      return None, 0, "dropped_too_long"
    prompt, status = prompt[cut:], "truncated_prompt"
  return [np.concatenate([prompt, r]) for r in responses], len(prompt), status


@dataclasses.dataclass(frozen=True)
class PreferenceRows:
  """Encoded pairs, one per row (the `data.row_pipeline.Rows` protocol)."""
  tokens: np.ndarray   # int32 [N, 2, T], 0-padded on the right.
  lengths: np.ndarray  # int32 [N, 2], real tokens per side (>= 2).
  prompt_lengths: np.ndarray  # int32 [N], tokens before the responses (same both sides).
  margin: np.ndarray   # float32 [N].
  source_index: np.ndarray  # int32 [N]: the row's pair in the list given to build_rows.
  # float32 [N, 2]: the frozen reference model's response log-probs (DPO), or None.
  ref_logps: np.ndarray | None = None

  @property
  def num_rows(self) -> int:
    return int(self.tokens.shape[0])

  @property
  def seq_len(self) -> int:
    return int(self.tokens.shape[2])

  def fingerprint(self) -> str:
    h = hashlib.sha256()
    for array in (self.tokens, self.lengths, self.margin, self.ref_logps):
      if array is None:
        continue
      h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()

  def materializer(self) -> Callable[[tf.Tensor], dict[str, tf.Tensor]]:
    """A TF function: int64 [B] row indices -> the batch tensors (module doc)."""
    n, t = self.num_rows, self.seq_len
    # One all-padding row at index n for validation padding (length 1: its score index 0
    # is a valid slot, and pair_mask 0 removes it from every metric).
    tokens = tf.constant(np.concatenate([self.tokens, np.zeros([1, 2, t], np.int32)]))
    lengths = tf.constant(np.concatenate([self.lengths, np.ones([1, 2], np.int32)]))
    margin = tf.constant(np.concatenate([self.margin, np.zeros([1], np.float32)]))
    prompt_lengths = tf.constant(np.concatenate([self.prompt_lengths, np.zeros([1], np.int32)]))
    ref = (None if self.ref_logps is None else
           tf.constant(np.concatenate([self.ref_logps, np.zeros([1, 2], np.float32)])))

    def materialize(rows: tf.Tensor) -> dict[str, tf.Tensor]:
      index = tf.minimum(rows, n)
      length = tf.gather(lengths, index)                      # [B, 2]
      slots = tf.range(t, dtype=tf.int32)[None, None, :]      # [1, 1, T]
      real = slots < length[:, :, None]                       # [B, 2, T]
      return {
          "tokens": tf.gather(tokens, index),
          "positions": tf.where(real, slots, 0),
          "segment_ids": tf.cast(real, tf.int32),
          "score_index": length - 1,
          "response_start": tf.tile(tf.gather(prompt_lengths, index)[:, None], [1, 2]),
          "margin": tf.gather(margin, index),
          "pair_mask": tf.cast(rows < n, tf.float32),
          **({} if ref is None else {"ref_logp": tf.gather(ref, index)}),
      }

    return materialize


def build_rows(pairs: Sequence[PreferencePair], template: AnyTemplate, *, seq_len: int,
               min_prompt_tokens: int = 16) -> tuple[PreferenceRows, dict[str, int]]:
  """Encodes and truncates pairs; returns the rows and counts per status + "pairs"."""
  counts = dict.fromkeys(STATUSES, 0)
  kept, lengths, margins, index, prompt_lengths = [], [], [], [], []
  for i, pair in enumerate(pairs):
    sides, prompt_len, status = encode_pair(pair, template, seq_len, min_prompt_tokens)
    counts[status] += 1
    if sides is None:
      continue
    row = np.full([2, seq_len], PAD_TOKEN, np.int32)
    for s, ids in enumerate(sides):
      row[s, :len(ids)] = ids
    kept.append(row)
    lengths.append([len(ids) for ids in sides])
    margins.append(pair.margin)
    index.append(i)
    prompt_lengths.append(prompt_len)
  rows = PreferenceRows(
      tokens=np.stack(kept) if kept else np.zeros([0, 2, seq_len], np.int32),
      lengths=np.asarray(lengths, np.int32).reshape(-1, 2),
      prompt_lengths=np.asarray(prompt_lengths, np.int32),
      margin=np.asarray(margins, np.float32), source_index=np.asarray(index, np.int32))
  counts["pairs"] = len(pairs)
  return rows, counts


def format_stats(stats: dict[str, Any]) -> str:
  """One log line from `build_preference_pipelines` stats."""
  skipped = {k.split("/", 1)[1]: v for k, v in stats.items()
             if k.startswith("skipped/") and v}
  parts = [f"{stats['records']} records, skipped {sum(skipped.values())} {skipped or ''}"
           .rstrip(),
           f"{stats['branches_dropped']} train pairs branching from a validation prompt "
           "dropped"]
  for split in ("train", "val"):
    parts.append(f"{split}: {stats[split + '/pairs']} pairs, {stats[split + '/kept']} kept "
                 f"whole, {stats[split + '/truncated_prompt']} prompt-truncated, "
                 f"{stats[split + '/dropped_too_long']} dropped as too long")
  return "Preference data: " + "; ".join(parts)


def build_preference_rows(data_cfg: Any, template: AnyTemplate):
  """Reads, splits and encodes the preference sources of `data_cfg`.

  Args:
    data_cfg: `default_preference_data_config()`: `sources`, `seq_len`, `val_fraction`,
      `seed`, `train_part`, `min_prompt_tokens`, `tfds_data_dir`.
    template: The chat template with the run's tokenizer.

  Returns:
    (train rows, val rows, stats, (train pairs, val pairs)); stats has "records",
    "skipped/<reason>", "branches_dropped", "train/<status>", "val/<status>".
  """
  pairs, files = preferences.read_sources(data_cfg.sources, data_cfg.tfds_data_dir)
  train_pairs, val_pairs, branches = preferences.split_pairs(
      pairs, data_cfg.val_fraction, data_cfg.seed)
  train_pairs = preferences.select_part(train_pairs, data_cfg.train_part, data_cfg.seed)
  stats: dict[str, Any] = {"records": sum(f.records for f in files),
                           "branches_dropped": branches}
  for reason in preferences.SKIP_REASONS:
    stats[f"skipped/{reason}"] = sum(f.skipped[reason] for f in files)
  common = dict(seq_len=data_cfg.seq_len, min_prompt_tokens=data_cfg.min_prompt_tokens)
  train_rows, train_counts = build_rows(train_pairs, template, **common)
  val_rows, val_counts = build_rows(val_pairs, template, **common)
  stats.update({f"train/{k}": v for k, v in train_counts.items()})
  stats.update({f"val/{k}": v for k, v in val_counts.items()})
  logging.info("%s", format_stats(stats))
  return train_rows, val_rows, stats, (train_pairs, val_pairs)


def preference_pipelines(train_rows: PreferenceRows, val_rows: PreferenceRows, data_cfg: Any,
                         template: AnyTemplate, *, global_batch_size: int,
                         process_index: int = 0, process_count: int = 1
                         ) -> tuple[RowPipeline, RowValidationSet]:
  """This host's training pipeline and validation set over encoded rows."""
  fingerprint = f"{template.name}:{template.tokenizer.fingerprint}:preference"
  train = RowPipeline(train_rows, global_batch_size=global_batch_size, seed=data_cfg.seed,
                      prefetch=data_cfg.prefetch, process_index=process_index,
                      process_count=process_count, fingerprint=fingerprint)
  val = RowValidationSet(val_rows, process_index=process_index, process_count=process_count)
  return train, val


def build_preference_pipelines(data_cfg: Any, template: AnyTemplate, *,
                               global_batch_size: int, process_index: int = 0,
                               process_count: int = 1):
  """`build_preference_rows` then `preference_pipelines`.

  Returns:
    (train pipeline, validation set, stats, (train pairs, val pairs)).
  """
  train_rows, val_rows, stats, pairs = build_preference_rows(data_cfg, template)
  train, val = preference_pipelines(train_rows, val_rows, data_cfg, template,
                                    global_batch_size=global_batch_size,
                                    process_index=process_index, process_count=process_count)
  return train, val, stats, pairs
