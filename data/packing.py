"""How LM rows are cut from documents and packed, as pure TF ops (used by lm_pipeline).

Terms, for a corpus whose documents' token ids are concatenated into one `tokens`
array (document d occupies `[start_d, start_d + length_d)`):

- pair g: (input `tokens[g]`, target `tokens[g + 1]`) for every g inside a document
  except its last token. A document of L tokens has L - 1 pairs; a target never
  crosses a document boundary. An epoch uses every pair exactly once.
- chunk: up to `seq_len` consecutive pairs of one document, i.e. a piece of at
  most `seq_len + 1` tokens (inputs = piece[:-1], targets = piece[1:]).
- row: `seq_len` slots, each holding one pair (or padding).

Epoch layout (`epoch_layout`):
1. Each document longer than `seq_len` pairs gets an offset r in [0, seq_len)
   (stateless random from (seed, epoch), or 0 for fixed windows): its chunks are
   r pairs, then full chunks of `seq_len` pairs, then the remainder. r = seq_len
   would equal r = 0, so [0, seq_len) covers every distinct window phase.
   Shorter documents are one chunk each (cutting them would only lose context).
2. The full chunks (in document order) then the short chunks (in a seeded random
   order) are laid end to end into a stream of slots, which is cut into rows of
   `seq_len` slots. Full chunks come first and are exactly one row long, so each
   is a row of its own: for one long document (tinyshakespeare) with r = 0, row k
   is inputs `tokens[64k:64k+64]`, targets `tokens[64k+1:64k+65]` for seq_len 64,
   nanoGPT's x/y windows. Short chunks are packed back to back (concat-and-chunk),
   so one may straddle two rows: it then becomes two segments. No target is lost,
   but the second part cannot attend to the first.
3. Rows are visited in a stateless random order (`index_shuffle`), so the
   iterator state is a few counters, not a shuffle buffer.

Waste: because each slot holds an (input, target) pair, no slot holds a token
without a target; the only padding is the tail of the last row of each epoch
(fewer than `seq_len` slots per epoch).

Row tensors (`materialize_rows`): `tokens`, `targets`, `positions` (restart at 0
for every segment in the row), `segment_ids` (1, 2, ... per segment; 0 = padding)
as int32, and `loss_mask` float32 (1 at every real pair, 0 on padding).
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf

# Fill for padding slots (masked: segment id 0, loss mask 0), so any valid id works; 0 exists
# in every vocabulary, including families without a pad token (Llama-3).
PAD_TOKEN = 0

# Salts that keep the random streams for offsets, chunk order and row order apart.
_OFFSET_SALT, _CHUNK_ORDER_SALT, _ROW_ORDER_SALT = 0, 1, 2
_NUM_SALTS = 3


class Layout(NamedTuple):
  """Where each chunk of an epoch lives in the token array and in the slot stream."""
  starts: tf.Tensor   # int64 [C]: token index of each chunk's first pair.
  lengths: tf.Tensor  # int64 [C]: pairs in each chunk.
  ends: tf.Tensor     # int64 [C]: cumulative sum of lengths (slot stream end).
  num_rows: tf.Tensor  # int64 []: rows this epoch, the last one maybe padded.


def _seed(seed: int, epoch: tf.Tensor, salt: int) -> tf.Tensor:
  """A stateless-RNG seed, distinct for every (seed, epoch, salt)."""
  epoch = tf.cast(epoch, tf.int64)
  return tf.stack([tf.constant(seed, tf.int64), epoch * _NUM_SALTS + salt])


def chunk_offsets(doc_pairs: tf.Tensor, seq_len: int, seed: int, epoch: tf.Tensor,
                  random_offset: bool) -> tf.Tensor:
  """Per-document offset of the first full chunk (int64 [D]); see module doc."""
  if not random_offset:
    return tf.zeros_like(doc_pairs)
  offsets = tf.random.stateless_uniform(
      tf.shape(doc_pairs), seed=_seed(seed, epoch, _OFFSET_SALT),
      minval=0, maxval=seq_len, dtype=tf.int64)
  return tf.where(doc_pairs > seq_len, offsets, tf.zeros_like(offsets))


def num_rows(doc_pairs: tf.Tensor, seq_len: int, offsets: tf.Tensor) -> tf.Tensor:
  """Rows in an epoch with these offsets, without building the layout."""
  num_full = tf.reduce_sum((doc_pairs - offsets) // seq_len)
  short_pairs = tf.reduce_sum(doc_pairs) - num_full * seq_len
  return num_full + (short_pairs + seq_len - 1) // seq_len


def epoch_layout(doc_starts: tf.Tensor, doc_pairs: tf.Tensor, seq_len: int,
                 offsets: tf.Tensor, shuffle_seed: tf.Tensor | None) -> Layout:
  """Cuts documents into chunks and orders them into the slot stream.

  Args:
    doc_starts: int64 [D], token index of each document's first token.
    doc_pairs: int64 [D], pairs (= tokens - 1) per document, all > 0.
    seq_len: Slots per row.
    offsets: int64 [D], from `chunk_offsets`.
    shuffle_seed: Seed for the order of the short chunks, or None to keep them
      in document order (validation).

  Returns:
    The epoch's `Layout`.
  """
  num_full = (doc_pairs - offsets) // seq_len                # [D]
  full_begin = doc_starts + offsets                           # [D]
  full_starts = tf.ragged.range(
      full_begin, full_begin + num_full * seq_len, seq_len).flat_values  # [F]
  tail_begin = full_begin + num_full * seq_len                # [D]
  tail_pairs = doc_pairs - offsets - num_full * seq_len       # [D]
  has_head, has_tail = offsets > 0, tail_pairs > 0
  short_starts = tf.concat([tf.boolean_mask(doc_starts, has_head),
                            tf.boolean_mask(tail_begin, has_tail)], 0)
  short_lengths = tf.concat([tf.boolean_mask(offsets, has_head),
                             tf.boolean_mask(tail_pairs, has_tail)], 0)
  if shuffle_seed is not None:
    order = tf.argsort(tf.random.stateless_uniform(
        tf.shape(short_lengths), seed=shuffle_seed))
    short_starts = tf.gather(short_starts, order)
    short_lengths = tf.gather(short_lengths, order)
  starts = tf.concat([full_starts, short_starts], 0)
  lengths = tf.concat(
      [tf.fill(tf.shape(full_starts), tf.constant(seq_len, tf.int64)), short_lengths], 0)
  ends = tf.cumsum(lengths)
  rows = (tf.reduce_sum(lengths) + seq_len - 1) // seq_len
  return Layout(starts, lengths, ends, rows)


def train_layout(doc_starts: tf.Tensor, doc_pairs: tf.Tensor, seq_len: int, seed: int,
                 epoch: tf.Tensor, random_offset: bool) -> Layout:
  """The shuffled, randomly offset layout of training epoch `epoch`."""
  offsets = chunk_offsets(doc_pairs, seq_len, seed, epoch, random_offset)
  return epoch_layout(doc_starts, doc_pairs, seq_len, offsets,
                      _seed(seed, epoch, _CHUNK_ORDER_SALT))


def shuffled_rows(indices: tf.Tensor, seed: int, epoch: tf.Tensor,
                  rows: tf.Tensor) -> tf.Tensor:
  """The rows visited `indices`-th in epoch `epoch` (a stateless permutation)."""
  return tf.random.experimental.index_shuffle(
      indices, _seed(seed, epoch, _ROW_ORDER_SALT), rows - 1)


def materialize_rows(rows: tf.Tensor, layout: Layout, tokens: tf.Tensor,
                     seq_len: int) -> dict[str, tf.Tensor]:
  """Builds the tensors of rows `rows` of `layout`; rows past the end are padding.

  Vectorized over rows: one call per block of rows keeps tf.data's per-call
  overhead (not the gathers) from dominating at short seq_len.

  Args:
    rows: int64 [R] row indices (>= layout.num_rows gives all-padding rows).
    layout: The epoch layout.
    tokens: int32 [N], the concatenated token ids.
    seq_len: Slots per row.

  Returns:
    Dict of `tokens, targets, positions, segment_ids` (int32 [R, seq_len]) and
    `loss_mask` (float32 [R, seq_len]).
  """
  row_begin = rows[:, None] * seq_len                                # [R, 1]
  slot = row_begin + tf.range(seq_len, dtype=tf.int64)[None, :]      # [R, S]
  valid = slot < tf.reduce_sum(layout.lengths)                      # [R, S]
  last_chunk = tf.maximum(tf.size(layout.ends, out_type=tf.int64) - 1, 0)
  chunk = tf.minimum(tf.reshape(tf.searchsorted(
      layout.ends, tf.reshape(slot, [-1]), side="right", out_type=tf.int64),
      tf.shape(slot)), last_chunk)                                   # [R, S]
  chunk_begin = tf.gather(layout.ends, chunk) - tf.gather(layout.lengths, chunk)
  pair = tf.where(valid, tf.gather(layout.starts, chunk) + slot - chunk_begin, 0)
  # A segment starts at each row's first slot and wherever the chunk changes.
  new_segment = tf.concat([tf.ones_like(chunk[:, :1], tf.bool),
                           chunk[:, 1:] != chunk[:, :-1]], axis=1)
  segment_ids = tf.cumsum(tf.cast(new_segment, tf.int32), axis=1)
  positions = tf.cast(slot - tf.maximum(row_begin, chunk_begin), tf.int32)
  pad = tf.constant(PAD_TOKEN, tf.int32)
  zero = tf.constant(0, tf.int32)
  return {
      "tokens": tf.where(valid, tf.gather(tokens, pair), pad),
      "targets": tf.where(valid, tf.gather(tokens, pair + 1), pad),
      "positions": tf.where(valid, positions, zero),
      "segment_ids": tf.where(valid, segment_ids, zero),
      "loss_mask": tf.cast(valid, tf.float32),
  }
