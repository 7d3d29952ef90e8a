"""The device programs of the continuous-batching engine (`serve/engine.py`), traced.

  prefill     n requests' prompts, right-padded to a bucket P, through the model into a
              fresh n-row cache whose rows are then written over their slots' rows of the
              engine's cache (slots [0, P)); the first tokens are drawn and the slots'
              decode state set. Compiled once per (n, P) shape.
  decode      up to `steps` decode steps for every slot inside one `lax.while_loop` (one
              host round trip per chunk), over the first `cache_len` slots of the cache
              only: that prefix is sliced out, updated in place by the loop, and only the
              chunk's new slots are written back. Compiled once per cache-length bucket.
  deactivate  stops cancelled slots.

Cache layout. Row r of the cache belongs to slot r; a request's prompt token t sits at
slot t and its i-th generated token is fed at slot L + i (L = prompt length), so slot =
position and every row has its own write index (`cache_index` [B] in the model). The
decode mask is causal per row (key slot <= the row's slot), which is all the masking a
row needs: slots past its own index hold stale keys of an earlier request or prompt
padding, and causality hides them until this request overwrites them. Hence kv segment ids
are all 1 and rows never need re-alignment when requests join or leave.

Sampling is per row, all parameters being [B] arrays of ONE compiled step (`RowParams`):
temperature 0 = greedy (argmax of the raw logits); otherwise logits / T, then per-row
top-k and top-p (nucleus) filtering, then a categorical draw (Gumbel-max) with the row's
own key: token i of a request uses fold_in(key(seed), i), so a draw never depends on the
other rows of the batch. Only what some row needs is computed (`lax.cond`): the
full-vocabulary sort for filtering (a row samples with top_k / top_p), the scaling and
noise (a row samples), the log-softmax (a row asked for log-probabilities) and the top-20
(a row asked for them); an all-greedy batch without log-probabilities does one argmax
per step. Log-probabilities are model/sampling.py's: log softmax(logits / T) of the drawn
token, unfiltered, T = 1 when greedy. Filtering keeps every token whose logit reaches the
cut-off one (ties at the cut-off are kept, as `model.sampling.filter_logits` keeps them
for top-k).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from model.transformer import KVCache, init_cache

TOP_LOGPROBS = 20  # the most top log-probabilities a request may ask for (OpenAI's limit)
MAX_STOP_IDS = 16  # stop ids per request (a static width: no recompilation per request mix)


class RowParams(NamedTuple):
  """Per-row sampling parameters, each [B] (key [B, 2], stop_ids [B, MAX_STOP_IDS])."""
  temperature: jax.Array  # float32, 0 = greedy
  top_p: jax.Array  # float32 in (0, 1], 1 = off
  top_k: jax.Array  # int32, 0 = off
  key: jax.Array  # uint32 raw key data of jax.random.key(seed)
  stop_ids: jax.Array  # int32, -1 = unused
  max_tokens: jax.Array  # int32
  want_logprobs: jax.Array  # bool: the row asked for log-probabilities (or top ones)
  want_top: jax.Array  # bool: the row asked for top log-probabilities


class Draw(NamedTuple):
  """What one step drew per row: token [B], logprob [B], top ids / logprobs [B, 20]."""
  token: jax.Array
  logprob: jax.Array
  top_ids: jax.Array
  top_logprobs: jax.Array


def filter_rows(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """Per-row top-k then top-p filtering of scaled logits [B, V] (-inf outside the set).

  One descending sort per row; the kept set is a prefix of it, so its last logit is the
  cut-off and a token is kept iff its logit reaches the cut-off.
  """
  v = scaled.shape[-1]
  ranks = jnp.arange(v)[None, :]
  ordered = -jnp.sort(-scaled, axis=-1)  # [B, V], most likely first
  k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)[:, None]  # [B, 1]
  in_k = ranks < k
  probs = jax.nn.softmax(jnp.where(in_k, ordered, -jnp.inf), axis=-1)
  # Keep a token if the mass strictly before it is < p (the first token is always kept).
  in_p = (jnp.cumsum(probs, axis=-1) - probs < top_p[:, None]) | (top_p[:, None] >= 1.0)
  n_keep = jnp.sum(in_k & in_p, axis=-1, keepdims=True)  # >= 1
  cutoff = jnp.take_along_axis(ordered, n_keep - 1, axis=-1)  # [B, 1]
  return jnp.where(scaled >= cutoff, scaled, -jnp.inf)


def argmax(x: jax.Array) -> jax.Array:
  """`jnp.argmax(x, -1)` (the first maximal index) for float x [B, V], in two levels.

  XLA:CPU's variadic (value, index) reduction over a whole vocabulary is ~10x slower than
  a plain max (~290 us vs ~20 us for [8, 8192] on the benchmark CPU): the argmax runs over
  ~sqrt(V) block maxima, then within the winning block only.
  """
  b, v = x.shape
  size = 1 << max(0, (v.bit_length() + 1) // 2)  # ~sqrt(V), a power of two
  if v <= size:
    return jnp.argmax(x, axis=-1).astype(jnp.int32)
  blocks = -(-v // size)
  x = jnp.pad(x, ((0, 0), (0, blocks * size - v)), constant_values=-jnp.inf)
  x = x.reshape(b, blocks, size)  # [B, blocks, size]
  block = jnp.argmax(jnp.max(x, axis=-1), axis=-1)  # [B]: the first block holding the max
  within = jnp.take_along_axis(x, block[:, None, None], axis=1)[:, 0]  # [B, size]
  return (block * size + jnp.argmax(within, axis=-1)).astype(jnp.int32)


def sample_rows(logits: jax.Array, rp: RowParams, index: jax.Array) -> Draw:
  """Draws token number `index` [B] of every row from float32 logits [B, V].

  Only what some row needs is computed (`lax.cond`): all-greedy batches skip the scaling,
  filtering and noise; batches where nobody asked for log-probabilities skip the
  log-softmax over the vocabulary.
  """
  greedy = rp.temperature == 0.0
  temperature = jnp.where(greedy, 1.0, rp.temperature)[:, None]  # T = 1 when greedy

  def draw(logits):
    scaled = logits / temperature
    filtering = ~greedy & ((rp.top_k > 0) | (rp.top_p < 1.0))
    filtered = jax.lax.cond(jnp.any(filtering), filter_rows, lambda s, k, p: s, scaled,
                            rp.top_k, rp.top_p)
    keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(rp.key), index)
    noise = jax.vmap(lambda key: jax.random.gumbel(key, logits.shape[-1:]))(keys)
    return jnp.where(greedy, argmax(logits), argmax(filtered + noise))  # Gumbel-max

  token = jax.lax.cond(jnp.any(~greedy), draw, argmax, logits)
  k = min(TOP_LOGPROBS, logits.shape[-1])

  def logprobs(logits, token):
    logp = jax.nn.log_softmax(logits / temperature, axis=-1)
    top_logp, top_ids = jax.lax.cond(
        jnp.any(rp.want_top), lambda x: tuple(jax.lax.top_k(x, k)),
        lambda x: (jnp.zeros((x.shape[0], k), x.dtype), jnp.zeros((x.shape[0], k), jnp.int32)),
        logp)
    return jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0], top_logp, top_ids

  def no_logprobs(logits, token):
    b = logits.shape[0]
    return (jnp.zeros((b,), jnp.float32), jnp.zeros((b, k), jnp.float32),
            jnp.zeros((b, k), jnp.int32))

  logprob, top_logp, top_ids = jax.lax.cond(jnp.any(rp.want_logprobs), logprobs, no_logprobs,
                                            logits, token)
  return Draw(token, logprob, top_ids.astype(jnp.int32), top_logp)


def _is_stop(token: jax.Array, stop_ids: jax.Array) -> jax.Array:
  return jnp.any(token[:, None] == stop_ids, axis=-1)


def prefill(model: nnx.Module, cache: KVCache, state: "DecodeState", rows: jax.Array,
            tokens: jax.Array, lengths: jax.Array, rp: RowParams
            ) -> tuple[KVCache, "DecodeState", Draw]:
  """Runs n prompts (tokens [n, P], right-padded; `lengths` [n] real) into cache `rows` [n].

  The first token of each is drawn (index 0) and the rows' decode state set: feed it at
  slot `length`, active unless it is a stop id or max_tokens is 1. A row index out of
  range (the engine passes `slots`) marks a filler prompt whose writes are dropped.
  Returns the updated cache, state and the draws.
  """
  n, p = tokens.shape
  ones = jnp.ones((n, p), jnp.int32)  # padding comes after the prompt: causality hides it
  positions = jnp.broadcast_to(jnp.arange(p), (n, p))
  h, new = model.hidden(tokens, positions, ones, cache=init_cache(model.cfg, n, p),
                        cache_index=0, kv_segment_ids=ones)
  last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)  # [n, 1, E]
  draw = sample_rows(model.logits(last)[:, 0], rp, jnp.zeros((n,), jnp.int32))
  if model.cfg.scan_layers:  # [L, B, K, S, D]
    write = lambda big, x: big.at[:, rows, :, :p].set(x, mode="drop")
  else:  # L arrays [B, K, S, D]
    write = lambda big, x: big.at[rows, :, :p].set(x, mode="drop")
  active = ~_is_stop(draw.token, rp.stop_ids) & (rp.max_tokens > 1)
  state = DecodeState(*(x.at[rows].set(v, mode="drop") for x, v in zip(
      state, (draw.token, lengths, jnp.ones_like(lengths), active))))
  return jax.tree.map(write, cache, new), state, draw


def deactivate(state: "DecodeState", keep: jax.Array) -> "DecodeState":
  """Stops the rows where `keep` [B] is False (cancelled requests)."""
  return state._replace(active=state.active & keep)


class DecodeState(NamedTuple):
  """Per-slot decode state, each [B]: the token to feed next, its slot (= position), the
  number of tokens generated so far, and whether the slot is still generating."""
  token: jax.Array
  pos: jax.Array
  count: jax.Array
  active: jax.Array


class ChunkOutput(NamedTuple):
  """A chunk's draws [B, steps] (top ones [B, steps, 20]) and the number of tokens each
  row produced in it [B] (a row's tokens are the first n of its draws)."""
  tokens: jax.Array
  logprobs: jax.Array
  top_ids: jax.Array
  top_logprobs: jax.Array
  produced: jax.Array


def _slice_cache(cache: KVCache, n: int, stacked: bool) -> KVCache:
  axis = 3 if stacked else 2
  return jax.tree.map(lambda x: jax.lax.slice_in_dim(x, 0, n, axis=axis), cache)


def decode(model: nnx.Module, cache: KVCache, state: DecodeState, rp: RowParams,
           limit: jax.Array, *, steps: int, cache_len: int
           ) -> tuple[KVCache, DecodeState, ChunkOutput]:
  """Up to `limit` (<= `steps`, a traced scalar: no recompilation) decode steps for every
  active row, attending to slots [0, cache_len).

  The loop ends early once no row is active. A row stops after a stop id or its
  max_tokens-th token; the host cuts its output at `produced`. Free rows are computed and
  ignored (the batch shape never changes). Every active row must have pos + steps <=
  cache_len (the host picks the bucket) or stop before.
  """
  stacked = model.cfg.scan_layers
  b = state.token.shape[0]
  sub = _slice_cache(cache, cache_len, stacked)  # the occupied prefix, updated in place
  kv_seg = jnp.ones((b, cache_len), jnp.int32)
  ones = jnp.ones((b, 1), jnp.int32)

  def cond(carry):
    i, _, st, _ = carry
    return (i < jnp.minimum(limit, steps)) & jnp.any(st.active)

  def body(carry):
    i, sub, st, out = carry
    h, sub = model.hidden(st.token[:, None], st.pos[:, None], ones, cache=sub,
                          cache_index=st.pos, kv_segment_ids=kv_seg)
    d = sample_rows(model.logits(h)[:, 0], rp, st.count)
    out = ChunkOutput(out.tokens.at[:, i].set(d.token), out.logprobs.at[:, i].set(d.logprob),
                      out.top_ids.at[:, i].set(d.top_ids),
                      out.top_logprobs.at[:, i].set(d.top_logprobs),
                      out.produced + st.active.astype(jnp.int32))
    count = st.count + st.active.astype(jnp.int32)
    done = _is_stop(d.token, rp.stop_ids) | (count >= rp.max_tokens)
    st = DecodeState(jnp.where(st.active, d.token, st.token),
                     st.pos + (st.active & ~done).astype(jnp.int32), count, st.active & ~done)
    return i + 1, sub, st, out

  k = min(TOP_LOGPROBS, model.cfg.vocab_size)
  out = ChunkOutput(jnp.zeros((b, steps), jnp.int32), jnp.zeros((b, steps), jnp.float32),
                    jnp.zeros((b, steps, k), jnp.int32), jnp.zeros((b, steps, k), jnp.float32),
                    jnp.zeros((b,), jnp.int32))
  start = state.pos
  _, sub, state, out = jax.lax.while_loop(cond, body, (jnp.int32(0), sub, state, out))
  if cache_len == (cache.k[0] if isinstance(cache.k, tuple) else cache.k).shape[-2]:
    return sub, state, out  # the whole cache: it was updated in place
  # Only slots [pos, pos + steps) of each row changed: copy those back, not the prefix.
  # (A row's window is clamped inside the bucket; a row that was not active writes its
  # own stale slots back unchanged.)
  new = min(steps, cache_len)
  if stacked:  # [L, B, K, S, D]: rows on axis 1
    take = lambda s, i: jax.lax.dynamic_slice_in_dim(s, i, new, axis=2)  # s [L, K, S, D]
    put = lambda c, x, i: jax.lax.dynamic_update_slice_in_dim(c, x, i, axis=2)
    axes = dict(in_axes=(1, 0), out_axes=1)
  else:  # [B, K, S, D]
    take = lambda s, i: jax.lax.dynamic_slice_in_dim(s, i, new, axis=1)  # s [K, S, D]
    put = lambda c, x, i: jax.lax.dynamic_update_slice_in_dim(c, x, i, axis=1)
    axes = dict(in_axes=(0, 0), out_axes=0)
  first = jnp.clip(start, 0, cache_len - new)  # where dynamic_slice reads (it clamps so)

  def write_back(big, s):
    window = jax.vmap(take, **axes)(s, first)
    return jax.vmap(put, in_axes=(axes["in_axes"][0], axes["out_axes"], 0),
                    out_axes=axes["out_axes"])(big, window, first)

  return jax.tree.map(write_back, cache, sub), state, out


def bound(graphdef: Any, fn):
  """`fn(model, ...)` as `fn(params, ...)`: the model is merged from `graphdef` inside jit."""
  def run(params, *args, **kwargs):
    return fn(nnx.merge(graphdef, params), *args, **kwargs)
  return run


def buckets(start: int, limit: int, fine: bool = False) -> list[int]:
  """The compiled lengths: start * 2^k below `limit`, then `limit`. `fine` adds
  start * 1.5 * 2^k (consecutive buckets at most 1.5x apart: decode attention reads the
  whole bucket every step, so finer buckets pay; prefill runs once per request)."""
  out, n = [], start
  while n < limit:
    out.append(n)
    if fine and n * 3 // 2 < limit and n % 2 == 0 and n > start:
      out.append(n * 3 // 2)
    n *= 2
  return out + [limit]


def pick(options: Sequence[int], n: int) -> int:
  return next(x for x in options if x >= n) if n <= options[-1] else options[-1]
