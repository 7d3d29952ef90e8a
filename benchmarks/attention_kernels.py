"""Benchmark: the attention kernels of model/attention.py on CPU, forward and forward+backward.

  python benchmarks/attention_kernels.py [--seq_len=4096] [--batch=1] [--heads=8]
      [--kv_heads=2] [--head_dim=64] [--chunk=512] [--repeats=3]

For each kernel this CPU runs (xla, chunked; cudnn and splash fall back here and are left
out) and each program (`fwd`: attention output; `grad`: gradients of sum(out * cot) with
respect to q, k, v), the step is jitted once and timed as the best of `--repeats` runs
after a warm-up, on a causal packed batch (two documents per row, float32). Peak temporary
memory is XLA's own estimate for the compiled program (`memory_analysis().temp_size_in_bytes`),
which is what decides whether a long context fits.

Last line: one JSON object with, per kernel and program, `<kernel>_<program>_seconds` and
`<kernel>_<program>_temp_bytes`, plus the shape and the largest absolute difference between
the chunked and xla outputs (`max_abs_diff`).
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model.attention import Options, attend  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("seq_len", 4096, "Query and key length T = S.")
flags.DEFINE_integer("batch", 1, "Rows.")
flags.DEFINE_integer("heads", 8, "Query heads N.")
flags.DEFINE_integer("kv_heads", 2, "Key/value heads K (GQA).")
flags.DEFINE_integer("head_dim", 64, "Head dimension D.")
flags.DEFINE_integer("chunk", 512, "Chunk size of the chunked kernel.")
flags.DEFINE_integer("repeats", 3, "Timed runs (best of).")


def _inputs():
  rng = np.random.default_rng(0)
  b, t = FLAGS.batch, FLAGS.seq_len
  q = rng.normal(size=(b, t, FLAGS.heads, FLAGS.head_dim)).astype(np.float32)
  k = rng.normal(size=(b, t, FLAGS.kv_heads, FLAGS.head_dim)).astype(np.float32)
  v = rng.normal(size=(b, t, FLAGS.kv_heads, FLAGS.head_dim)).astype(np.float32)
  seg = np.where(np.arange(t) < t // 3, 1, 2)[None].repeat(b, 0).astype(np.int32)
  return q, k, v, seg


def _programs(impl: str, seg: np.ndarray, cot: np.ndarray):
  opts = Options(impl, block_size=FLAGS.chunk)
  fwd = lambda q, k, v: attend(q, k, v, seg, seg, opts=opts)
  loss = lambda q, k, v: jnp.sum(fwd(q, k, v) * cot)
  return {"fwd": fwd, "grad": jax.grad(loss, argnums=(0, 1, 2))}


def _measure(fn, args) -> tuple[float, int, object]:
  compiled = jax.jit(fn).lower(*args).compile()
  temp = int(compiled.memory_analysis().temp_size_in_bytes)
  out = jax.block_until_ready(compiled(*args))  # warm-up
  best = float("inf")
  for _ in range(FLAGS.repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    best = min(best, time.perf_counter() - start)
  return best, temp, out


def main(argv):
  del argv
  q, k, v, seg = _inputs()
  cot = np.random.default_rng(1).normal(size=q.shape).astype(np.float32)
  result = dict(seq_len=FLAGS.seq_len, batch=FLAGS.batch, heads=FLAGS.heads,
                kv_heads=FLAGS.kv_heads, head_dim=FLAGS.head_dim, chunk=FLAGS.chunk,
                backend=jax.default_backend())
  outputs = {}
  for impl in ("xla", "chunked"):
    for name, fn in _programs(impl, seg, cot).items():
      seconds, temp, out = _measure(fn, (q, k, v))
      outputs[impl, name] = out
      result[f"{impl}_{name}_seconds"] = round(seconds, 4)
      result[f"{impl}_{name}_temp_bytes"] = temp
      print(f"{impl:8s} {name:4s} {seconds * 1e3:9.1f} ms   temp {temp / 2**20:9.1f} MiB",
            flush=True)
  diffs = [np.abs(np.asarray(outputs["chunked", "fwd"]) - np.asarray(outputs["xla", "fwd"]))]
  diffs += [np.abs(np.asarray(a) - np.asarray(b))
            for a, b in zip(outputs["chunked", "grad"], outputs["xla", "grad"])]
  result["max_abs_diff"] = float(max(d.max() for d in diffs))
  print(f"largest |chunked - xla| over the output and the three gradients: "
        f"{result['max_abs_diff']:.2e}")
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
