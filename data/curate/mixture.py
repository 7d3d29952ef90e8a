"""The mixture: target token shares per source, realised on the training split (the mix phase)."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from data.curate import files


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


def write_mixture(curator: Any) -> dict[str, Any]:
  """The mix phase of a `phases.Curator`: the tokenized shards' training documents resampled
  to the mixture and shuffled -> `tokenized/train-XXXXX.tfrecord`, the validation documents
  -> `tokenized/val-00000.tfrecord`, counts -> `tokenized/info.json` (the marker)."""
  info_path = curator.path("tokenized", "info.json")
  if os.path.exists(info_path):
    return files.read_json(info_path)
  # Imported here: TensorFlow is heavy and only this phase needs it.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  c, names = curator.cfg, [s["name"] for s in curator.sources]
  docs = {n: [] for n in names}   # train documents (token arrays) per source
  val, val_chars = [], 0
  for shard in range(c.num_shards):
    with np.load(curator.shard_path("tokens", shard, "npz")) as npz:
      z = {k: npz[k] for k in npz.files}  # an NpzFile re-reads an array on every access
    starts = np.concatenate([[0], np.cumsum(z["lengths"])])
    for i in range(len(z["lengths"])):
      ids = z["tokens"][starts[i]:starts[i + 1]]
      if z["val"][i]:
        val.append((names[z["source"][i]], ids))
        val_chars += int(z["chars"][i])
      else:
        docs[names[z["source"][i]]].append(ids)
  natural = {n: int(sum(len(d) for d in docs[n])) for n in names}
  m = c.get("mixture")
  if m is not None and m.get("enabled", False):
    shares = mixture_shares(natural, dict(m.get("weights") or {}),
                            float(m.get("temperature", 1.0)))
    total = int(m.get("total_tokens", 0)) or sum(natural.values())
    picked = realise_mixture({n: [len(d) for d in docs[n]] for n in names}, shares,
                             total, c.seed)
  else:
    total = sum(natural.values())
    shares = {n: natural[n] / max(total, 1) for n in names}
    picked = {n: list(range(len(docs[n]))) for n in names}
  order = [(n, i) for n in names for i in picked[n]]
  perm = np.random.default_rng([c.seed, 7]).permutation(len(order))
  num_out = int(curator.setting("tokenize", "num_output_shards", 0)) or c.num_shards
  out_dir = curator.path("tokenized")
  os.makedirs(out_dir, exist_ok=True)
  realised = {n: 0 for n in names}
  for k in range(num_out):
    with tf.io.TFRecordWriter(os.path.join(out_dir, f"train-{k:05d}.tfrecord")) as w:
      for j in perm[k * len(order) // num_out:(k + 1) * len(order) // num_out]:
        n, i = order[j]
        realised[n] += len(docs[n][i])
        w.write(files.tf_example({"tokens": docs[n][i].tolist(), "source": n}))
  with tf.io.TFRecordWriter(os.path.join(out_dir, "val-00000.tfrecord")) as w:
    for n, ids in val:
      w.write(files.tf_example({"tokens": ids.tolist(), "source": n}))
  out_total = max(sum(realised.values()), 1)
  tok = files.cached_tokenizer(curator.path("tokenizer.model"))
  info = {
      "tokenizer": "tokenizer.model", "tokenizer_fingerprint": tok.fingerprint,
      "add_eos": bool(curator.setting("tokenize", "add_eos", True)),
      "train_files": num_out, "train_tokens": sum(realised.values()),
      "train_documents": len(order), "val_tokens": int(sum(len(v) for _, v in val)),
      "val_documents": len(val), "val_chars": val_chars,
      "per_source": {n: {"natural_tokens": natural[n],
                         "natural_share": natural[n] / max(sum(natural.values()), 1),
                         "target_share": shares[n],
                         "tokens": realised[n], "share": realised[n] / out_total,
                         "documents": len(picked[n]),
                         "epochs": realised[n] / natural[n] if natural[n] else 0.0}
                     for n in names}}
  files.atomic_write(info_path, json.dumps(info, indent=1))
  return info
