"""The mixture: target token shares per source, realised on the training split, and the
place of every training document (copy) in the output shards (`assign_mixture`)."""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import apache_beam as beam
import numpy as np

Key = tuple[int, int, int]


def mixture_shares(tokens: Mapping[str, int], weights: Mapping[str, float] | None = None,
                   temperature: float = 1.0) -> dict[str, float]:
  """Target token share per source: explicit `weights` (normalised; every source named),
  else temperature sampling p_s ~ n_s^(1/T) (T=1: natural shares, T->inf: uniform)."""
  names = list(tokens)
  if weights:
    unknown = sorted(set(weights) - set(names))
    missing = [n for n in names if n not in weights]
    if unknown or missing:
      raise ValueError(f"mixture.weights: unknown sources {unknown}, sources without a "
                       f"weight {missing} (sources: {names})")
    raw = {n: float(weights[n]) for n in names}
    if any(v < 0 for v in raw.values()) or sum(raw.values()) <= 0:
      raise ValueError(f"mixture.weights must be >= 0 with a positive sum, got {raw}")
  else:
    if temperature <= 0:
      raise ValueError(f"mixture.temperature must be > 0, got {temperature}")
    raw = {n: float(tokens[n]) ** (1.0 / temperature) if tokens[n] else 0.0 for n in names}
  total = sum(raw.values())
  return {n: v / total for n, v in raw.items()}



def realise_mixture(lengths: Mapping[str, Sequence[int]], shares: Mapping[str, float],
                    total_tokens: int, seed: int) -> dict[str, list[int]]:
  """Document indices per source whose tokens come closest to share * total_tokens:
  a seeded permutation of the source's documents, cycled (whole epochs repeat each
  document equally often) and cut where the running total is nearest the target."""
  out = {}
  for k, (name, lens) in enumerate(lengths.items()):
    target, picked, running = shares[name] * total_tokens, [], 0
    if not len(lens) or target <= 0:
      out[name] = []
      continue
    rng = np.random.default_rng([seed, k])
    while True:
      for i in rng.permutation(len(lens)):
        if running + lens[i] / 2 > target:  # adding it would overshoot by more than half
          out[name] = picked
          break
        picked.append(int(i))
        running += int(lens[i])
      else:
        continue
      break
  return out


def assign_mixture(train: Sequence[tuple[int, Key, int]], names: Sequence[str],
                   mixture: Mapping[str, Any] | None, seed: int, num_out: int
                   ) -> Iterator[Any]:
  """The training documents [(source index, key, tokens)] -> their places in the output:
  (key, (shard, position)) once per copy (a document repeated by the mixture has several),
  and the tagged output "info": the token counts and shares per source.

  Per source, documents in key (document) order; `realise_mixture` picks them (the
  mixture's `weights` or `temperature`, `total_tokens` 0 = the natural total; disabled:
  every document once), then one seeded permutation of all picks cuts into `num_out`
  shards."""
  lengths: dict[str, list[int]] = {n: [] for n in names}
  keys: dict[str, list[Key]] = {n: [] for n in names}
  for s, key, length in sorted(train, key=lambda t: t[1]):
    lengths[names[s]].append(length)
    keys[names[s]].append(key)
  natural = {n: int(sum(lengths[n])) for n in names}
  if mixture is not None and mixture.get("enabled", False):
    shares = mixture_shares(natural, dict(mixture.get("weights") or {}),
                            float(mixture.get("temperature", 1.0)))
    total = int(mixture.get("total_tokens", 0)) or sum(natural.values())
    picked = realise_mixture(lengths, shares, total, seed)
  else:
    total = sum(natural.values())
    shares = {n: natural[n] / max(total, 1) for n in names}
    picked = {n: list(range(len(lengths[n]))) for n in names}
  order = [(n, i) for n in names for i in picked[n]]
  perm = np.random.default_rng([seed, 7]).permutation(len(order))
  realised = {n: 0 for n in names}
  for k in range(num_out):
    lo, hi = k * len(order) // num_out, (k + 1) * len(order) // num_out
    for pos, j in enumerate(perm[lo:hi]):
      n, i = order[j]
      realised[n] += lengths[n][i]
      yield keys[n][i], (k, pos)
  out_total = max(sum(realised.values()), 1)
  yield beam.pvalue.TaggedOutput("info", {
      "train_tokens": sum(realised.values()), "train_documents": len(order),
      "per_source": {n: {"natural_tokens": natural[n],
                         "natural_share": natural[n] / max(sum(natural.values()), 1),
                         "target_share": shares[n],
                         "tokens": realised[n], "share": realised[n] / out_total,
                         "documents": len(picked[n]),
                         "epochs": realised[n] / natural[n] if natural[n] else 0.0}
                     for n in names}})
