"""SFT rows: encoded conversations -> truncated examples laid out in fixed-length rows.

Used by `data/sft_pipeline.py`. Per example (`ids, mask = template.encode(messages)`):
inputs = ids[:-1], targets = ids[1:], loss_mask = mask[1:], so the loss mask of a
slot is the template mask of its TARGET token.

Decisions:
- Length: an example keeps at most seq_len + 1 tokens (seq_len pairs). The
  "response" is the last run of loss tokens (the final assistant turn and its
  `<|end|>`), the prompt everything before it. Too long -> the prompt loses tokens
  from its START (its end, which holds the question and the `<|assistant|>` marker,
  and the whole response are kept). If the response does not fit even after a
  1-token prompt, the prompt is kept whole and the response's END is cut (a
  response without its question teaches nothing); if that leaves fewer than
  `min_response_tokens` (at least 1) response tokens, the example is dropped.
  Examples with no loss token are dropped, and so are examples whose response
  (content + `<|end|>`) is longer than `max_response_tokens` when that is set: a
  model trained on responses longer than its sampling limit learns to run past it.
  `build_rows` counts each outcome.
- Rows are built once, in numpy, as one int32 [rows, seq_len] table of token
  indices ("pairs"): `pack` puts whole examples first-fit into rows (segment ids
  1, 2, ... per example, positions restarting at 0, so no example attends to
  another), `pad` puts one example per row. Training examples are shuffled
  (seeded) before packing so rows mix sources; the rows are then fixed for the
  run. Only the table and the concatenated tokens are stored (4 bytes per slot
  plus 16 per token); `SFTRows.materializer` builds batch tensors with TF
  gathers inside tf.data.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

from data.chat import AnyTemplate, Message

# Rows are CPU work; TF must not grab the accelerator that JAX trains on.
try:
  tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError):  # Devices already initialised.
  pass

PACKING_MODES = ("pack", "pad")
# Fill for padding slots: they are masked (segment id 0, loss mask 0), so any valid id works;
# 0 exists in every vocabulary, including families without a pad token (Llama-3).
PAD_TOKEN = 0
STATUSES = ("kept", "truncated_prompt", "truncated_response", "dropped_too_long",
            "dropped_no_response", "dropped_long_response")


def fit_example(ids: np.ndarray, mask: np.ndarray, max_tokens: int,
                min_response_tokens: int = 1, max_response_tokens: int = 0
                ) -> tuple[np.ndarray | None, np.ndarray | None, str]:
  """Truncates one encoded example to `max_tokens` (see the module doc).

  Returns:
    (ids, mask, status), status in `STATUSES`; ids and mask are None when the
    status is a drop.
  """
  loss = np.flatnonzero(mask[1:] > 0) + 1  # Tokens that are loss targets.
  if loss.size == 0:
    return None, None, "dropped_no_response"
  n = len(ids)
  gaps = np.flatnonzero(np.diff(loss) != 1)
  response_start = int(loss[gaps[-1] + 1] if gaps.size else loss[0])
  if max_response_tokens and n - response_start > max_response_tokens:
    return None, None, "dropped_long_response"
  if n <= max_tokens:
    return ids, mask, "kept"
  if n - response_start + 1 <= max_tokens:
    return ids[n - max_tokens:], mask[n - max_tokens:], "truncated_prompt"
  if mask[response_start:max_tokens].sum() < max(1, min_response_tokens):
    return None, None, "dropped_too_long"
  return ids[:max_tokens], mask[:max_tokens], "truncated_response"


def first_fit(sizes: Sequence[int], capacity: int) -> np.ndarray:
  """Bin of each item under greedy first-fit, in O(n log n).

  A max segment tree over the remaining room of n bins (unopened bins have the
  full `capacity`, and first-fit only opens bin k after bins 0..k-1, so the
  first leaf with room is exactly first-fit's choice).
  """
  n = len(sizes)
  leaves = 1 << max(0, (n - 1).bit_length())
  tree = [capacity] * (2 * leaves)
  bins = np.zeros(n, np.int64)
  for item, size in enumerate(sizes):
    if size > capacity:
      raise ValueError(f"Item {item} of size {size} exceeds the capacity {capacity}")
    node = 1
    while node < leaves:  # Descend to the leftmost leaf with room.
      node = 2 * node if tree[2 * node] >= size else 2 * node + 1
    bins[item] = node - leaves
    tree[node] -= size
    node //= 2
    while node:
      tree[node] = max(tree[2 * node], tree[2 * node + 1])
      node //= 2
  return bins


@dataclasses.dataclass(frozen=True)
class SFTRows:
  """Kept examples' tokens and the row table that lays them out.

  Slot (r, s) holds pair p = row_pairs[r, s]: input tokens[p], target
  tokens[p + 1] with loss_mask[p + 1]; p = -1 is padding.
  """
  tokens: np.ndarray       # int32 [N], kept examples concatenated.
  loss_mask: np.ndarray    # float32 [N], the template mask of each token.
  positions: np.ndarray    # int32 [N], index of each token in its example.
  example_ids: np.ndarray  # int32 [N], which example each token belongs to.
  row_pairs: np.ndarray    # int32 [R, seq_len].

  @property
  def num_rows(self) -> int:
    return int(self.row_pairs.shape[0])

  @property
  def seq_len(self) -> int:
    return int(self.row_pairs.shape[1])

  @property
  def num_loss_tokens(self) -> int:
    """Target tokens with loss_mask 1 over all rows (one epoch)."""
    pairs = self.row_pairs[self.row_pairs >= 0]
    return int(self.loss_mask[pairs + 1].sum())

  def fingerprint(self) -> str:
    h = hashlib.sha256()
    for array in (self.tokens, self.loss_mask, self.row_pairs):
      h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()

  def materializer(self) -> Callable[[tf.Tensor], dict[str, tf.Tensor]]:
    """A TF function: int64 [B] row indices -> the batch tensors of those rows.

    Indices >= num_rows give all-padding rows (validation's last batch).
    """
    table = tf.constant(np.concatenate(
        [self.row_pairs, np.full([1, self.seq_len], -1, np.int32)]))
    tokens, loss_mask = tf.constant(self.tokens), tf.constant(self.loss_mask)
    positions, example_ids = tf.constant(self.positions), tf.constant(self.example_ids)
    num_rows = self.num_rows

    def materialize(rows: tf.Tensor) -> dict[str, tf.Tensor]:
      pair = tf.gather(table, tf.minimum(rows, num_rows))          # [B, S]
      valid = pair >= 0
      p = tf.maximum(pair, 0)
      example = tf.gather(example_ids, p)
      new_segment = tf.concat([tf.ones_like(example[:, :1], tf.bool),
                               example[:, 1:] != example[:, :-1]], axis=1)
      segment_ids = tf.cumsum(tf.cast(new_segment, tf.int32), axis=1)
      zero = tf.zeros_like(pair)
      return {
          "tokens": tf.where(valid, tf.gather(tokens, p), PAD_TOKEN + zero),
          "targets": tf.where(valid, tf.gather(tokens, p + 1), PAD_TOKEN + zero),
          "positions": tf.where(valid, tf.gather(positions, p), zero),
          "segment_ids": tf.where(valid, segment_ids, zero),
          "loss_mask": tf.where(valid, tf.gather(loss_mask, p + 1), 0.0),
      }

    return materialize


def build_rows(conversations: Sequence[Sequence[Message]], template: AnyTemplate, *,
               seq_len: int, packing: str = "pack", min_response_tokens: int = 1,
               max_response_tokens: int = 0,
               shuffle_seed: int | None = None) -> tuple[SFTRows, dict[str, int]]:
  """Encodes, truncates and lays out conversations into rows.

  Args:
    conversations: Message lists.
    template: The chat template (and its tokenizer).
    seq_len: Slots per row; an example keeps at most seq_len + 1 tokens.
    packing: "pack" (first-fit, several examples per row) or "pad" (one per row).
    min_response_tokens: Fewest response tokens a truncated response may keep.
    max_response_tokens: Drop examples with a longer final response (0 = keep all).
    shuffle_seed: Shuffle the examples before packing (training); None keeps
      their order (validation).

  Returns:
    (rows, counts): counts per status in `STATUSES` plus "examples", "rows",
    "loss_tokens" and "slots".
  """
  if packing not in PACKING_MODES:
    raise ValueError(f"packing={packing!r} must be one of {PACKING_MODES}")
  if seq_len <= 0:
    raise ValueError(f"seq_len={seq_len} must be positive")
  counts = dict.fromkeys(STATUSES, 0)
  kept = []
  for ids, mask in template.encode_batch(conversations):
    ids, mask, status = fit_example(ids, mask, seq_len + 1, min_response_tokens,
                                    max_response_tokens)
    counts[status] += 1
    if ids is not None:
      kept.append((ids, mask))
  if shuffle_seed is not None:
    order = np.random.default_rng(shuffle_seed).permutation(len(kept))
    kept = [kept[i] for i in order]
  lengths = np.array([len(ids) for ids, _ in kept], np.int64)
  starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
  pairs = lengths - 1
  bins = (first_fit(pairs.tolist(), seq_len) if packing == "pack"
          else np.arange(len(kept)))
  num_rows = int(bins.max()) + 1 if len(kept) else 0
  row_pairs = np.full([num_rows, seq_len], -1, np.int32)
  fill = np.zeros(num_rows, np.int64)
  for start, n, row in zip(starts, pairs, bins):
    row_pairs[row, fill[row]:fill[row] + n] = np.arange(start, start + n)
    fill[row] += n
  empty = np.zeros([0], np.int32)
  rows = SFTRows(
      tokens=np.concatenate([i for i, _ in kept]).astype(np.int32) if kept else empty,
      loss_mask=(np.concatenate([m for _, m in kept]).astype(np.float32) if kept
                 else empty.astype(np.float32)),
      positions=(np.concatenate([np.arange(n) for n in lengths]).astype(np.int32)
                 if kept else empty),
      example_ids=np.repeat(np.arange(len(kept), dtype=np.int32), lengths),
      row_pairs=row_pairs)
  counts.update(examples=len(conversations), rows=num_rows,
                loss_tokens=rows.num_loss_tokens, slots=num_rows * seq_len)
  return rows, counts
