"""Log-likelihood requests scored the way EleutherAI's lm-evaluation-harness scores them.

  scorer = LoglikScorer(load_checkpoint("runs/base"), batch_size=32)
  scorer.loglikelihood([("Question: 2+2?\\nAnswer:", " 4"), ...])  # -> [(logp, is_greedy)]
  scorer.rolling_loglikelihood(["a whole document", ...])          # -> [(logp, tokens)]

The encoding follows lm-eval's `_encode_pair` for causal models, so per-item numbers can be
compared with it one for one (benchmarks/lm_eval_parity.py):
- trailing whitespace of the context moves to the start of the continuation;
- the continuation's tokens are those of encode(context + continuation) after the first
  len(encode(context)) tokens (the pair is encoded whole, so a word split across the
  boundary tokenises as it would in running text);
- an empty context is replaced by the end-of-document token `</s>` (lm-eval's
  `prefix_token_id`: the token our pretraining puts between documents);
- no BOS (our models never saw one); sequences longer than the model context keep their
  last max_seq_len + 1 tokens (lm-eval's left truncation).
`is_greedy` is whether every continuation token is the argmax of its logits.

Rolling log-likelihood (perplexity) scores a whole text: the first window predicts tokens
1.. from `</s>`, then disjoint windows of max_seq_len tokens, each conditioned on as much
preceding text as fits (lm-eval's `get_rolling_token_windows` with context_len 1).

Requests are sorted by length and batched into a few padded shapes (powers of two up to the
model context), so a long task compiles a handful of programs; batches are sharded over the
checkpoint's mesh by the sharded-apply runtime (train/runtime.py), which compiles each
function once per padded shape.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from data.tokenizer import fill_id
from eval.loading import LoadedCheckpoint


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """(context ids, continuation ids) as lm-eval encodes a causal-LM request."""
  if not context:
    cont = tokenizer.encode(continuation)
    if cont and cont[0] == tokenizer.eos_id:
      return cont[:1], cont[1:]
    return [tokenizer.eos_id], cont
  n_spaces = len(context) - len(context.rstrip())
  if n_spaces:
    context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
  whole = tokenizer.encode(context + continuation)
  ctx = tokenizer.encode(context)
  return ctx, whole[len(ctx):]


def rolling_windows(tokens: Sequence[int], prefix: int, max_len: int
                    ) -> list[tuple[list[int], list[int]]]:
  """(context, targets) windows covering every token of `tokens` once (lm-eval's rolling
  windows with context_len 1): each window holds at most max_len input tokens."""
  if not tokens:
    return []
  out = []
  first = min(max_len, len(tokens))
  out.append(([prefix], list(tokens[:first])))  # input: prefix + targets[:-1]
  done = first
  while done < len(tokens):
    n = min(max_len, len(tokens) - done)
    # Inputs are the max_len tokens before the last target; the targets are the new n.
    window = list(tokens[max(0, done + n - max_len - 1):done + n])
    out.append((window[:-n], window[-n:]))
    done += n
  return out


def _bucket(length: int, max_len: int) -> int:
  return min(max_len, max(16, 1 << math.ceil(math.log2(max(length, 1)))))


def continuation_logps(model: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """(sum of continuation log-probs [B], all greedy [B]) of right-padded rows.

  Only the K target slots of each row (from `starts`) are projected to the vocabulary: the
  [B, T, V] log-softmax would cost as much as the model.
  """
  tokens, starts, targets, mask = (batch[k] for k in ("tokens", "starts", "targets", "mask"))
  h = model.hidden(tokens)  # [B, T, E]
  index = starts[:, None] + jnp.arange(targets.shape[1])[None]  # [B, K]
  h = jnp.take_along_axis(h, index[..., None], axis=1)
  logits = model.logits(h).astype(jnp.float32)  # [B, K, V]
  logp = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  greedy = jnp.argmax(logits, axis=-1) == targets
  return jnp.sum(picked * mask, axis=1), jnp.all(greedy | (mask == 0), axis=1)


def next_token_logps(model: Any, batch: dict[str, jax.Array]) -> jax.Array:
  """log p(. | inputs) at each row's last input slot: [B, V]."""
  tokens, lengths = batch["tokens"], batch["lengths"]
  h = jnp.take_along_axis(model.hidden(tokens), (lengths - 1)[:, None, None], axis=1)
  return jax.nn.log_softmax(model.logits(h)[:, 0].astype(jnp.float32), axis=-1)


class LoglikScorer:
  """Batched continuation log-likelihoods of one language-model checkpoint."""

  def __init__(self, loaded: LoadedCheckpoint, batch_size: int = 32,
               progress: Callable[[int, int], None] | None = None):
    self.loaded, self.tokenizer = loaded, loaded.tokenizer
    self.max_len = loaded.model_cfg.max_seq_len
    self.runtime = loaded.runtime
    self.batch_size = self.runtime.padded_batch_size(batch_size)
    self.progress = progress

  def score_tokens(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]
                   ) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), greedy?) for token-id pairs."""
    rows = []
    for ctx, cont in pairs:
      if not cont:
        raise ValueError("A request with an empty continuation (nothing to score)")
      seq = (list(ctx) + list(cont))[-(self.max_len + 1):]
      rows.append((seq, min(len(cont), len(seq) - 1)))
    # One-token continuations of the same inputs (MMLU's " A" .. " D" after one prompt)
    # share a forward pass: the next-token distribution is read once for all of them.
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (seq, n) in enumerate(rows):
      if n == 1:
        groups.setdefault(tuple(seq[:-1]), []).append(i)
    shared = [g for g in groups.values() if len(g) > 1]
    in_shared = {i for g in shared for i in g}
    single = [i for i in range(len(rows)) if i not in in_shared]
    out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    self._done, self._total = 0, len(rows)
    self._score_shared(rows, shared, out)
    self._score_each(rows, single, out)
    return out

  def _tick(self, n: int) -> None:
    self._done += n
    if self.progress:
      self.progress(self._done, self._total)

  def _score_shared(self, rows, groups: list[list[int]], out) -> None:
    groups = sorted(groups, key=lambda g: -len(rows[g[0]][0]))
    for first in range(0, len(groups), self.batch_size):
      chunk = groups[first:first + self.batch_size]
      width = _bucket(len(rows[chunk[0][0]][0]) - 1, self.max_len)
      tokens = np.full((self.batch_size, width), fill_id(self.tokenizer), np.int32)
      lengths = np.ones(self.batch_size, np.int32)
      for r, group in enumerate(chunk):
        inputs = rows[group[0]][0][:-1]
        tokens[r, :len(inputs)] = inputs
        lengths[r] = len(inputs)
      logp = self.runtime.apply(next_token_logps, self.loaded.params,
                                {"tokens": tokens, "lengths": lengths}, self.batch_size)
      for r, group in enumerate(chunk):
        best = int(np.argmax(logp[r]))
        for i in group:
          target = rows[i][0][-1]
          out[i] = (float(logp[r, target]), best == target)
      self._tick(sum(len(g) for g in chunk))

  def _score_each(self, rows, indices: list[int], out) -> None:
    order = sorted(indices, key=lambda i: -len(rows[i][0]))
    for start in range(0, len(order), self.batch_size):
      chunk = order[start:start + self.batch_size]
      width = _bucket(len(rows[chunk[0]][0]) - 1, self.max_len)
      window = min(width, 1 << math.ceil(math.log2(max(rows[i][1] for i in chunk))))
      tokens = np.full((self.batch_size, width), fill_id(self.tokenizer), np.int32)
      starts = np.zeros(self.batch_size, np.int32)
      targets = np.zeros((self.batch_size, window), np.int32)
      mask = np.zeros((self.batch_size, window), np.float32)
      for r, i in enumerate(chunk):
        seq, n = rows[i]
        length = len(seq) - 1
        tokens[r, :length] = seq[:-1]  # right padding: causal, so padding never leaks back
        # Slots [first, first + window) hold the n continuation targets at their end.
        first = max(0, length - window)
        starts[r] = first
        got = seq[1 + first:1 + first + window]
        targets[r, :len(got)] = got
        mask[r, length - n - first:length - first] = 1.0
      total, greedy = self.runtime.apply(
          continuation_logps, self.loaded.params,
          {"tokens": tokens, "starts": starts, "targets": targets, "mask": mask},
          self.batch_size)
      for r, i in enumerate(chunk):
        out[i] = (float(total[r]), bool(greedy[r]))
      self._tick(len(chunk))

  def loglikelihood(self, requests: Iterable[tuple[str, str]]) -> list[tuple[float, bool]]:
    """lm-eval's `loglikelihood` for (context, continuation) strings."""
    return self.score_tokens([encode_pair(self.tokenizer, c, x) for c, x in requests])

  def rolling_loglikelihood(self, texts: Sequence[str]) -> list[tuple[float, int]]:
    """(total log-likelihood, number of tokens) of each whole text."""
    windows, owner, counts = [], [], []
    for t, text in enumerate(texts):
      tokens = self.tokenizer.encode(text)
      counts.append(len(tokens))
      for window in rolling_windows(tokens, self.tokenizer.eos_id, self.max_len):
        windows.append(window)
        owner.append(t)
    totals = np.zeros(len(texts))
    for t, (logp, _) in zip(owner, self.score_tokens(windows)):
      totals[t] += logp
    return [(float(totals[t]), counts[t]) for t in range(len(texts))]
