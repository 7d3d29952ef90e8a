"""Streaming Hugging Face import: time and peak host memory for Qwen2.5-0.5B's real shapes.

  .venv/bin/python benchmarks/hf_import.py [--dir=/tmp/qwen25_05b_random] [--keep]

1. Writes (once; reused with --keep) a random-weight directory with Qwen2.5-0.5B's config
   and tensor shapes (`ModelConfig.preset("qwen2_5_0_5b")`: 24 x 896, GQA 14/2, q/k/v biases,
   tied 151936 x 896 embedding), bf16, in safetensors shards of <= 300 MB listed by
   `model.safetensors.index.json`, straight from numpy (no torch model is instantiated).
2. In a fresh process with 2 CPU devices (XLA_FLAGS host device count 2) and an fsdp=2 mesh
   (every matrix split over its embed axis, so each device holds half), imports it with
   `train.hf_import.load_hf_params` as bf16 and reports:
     seconds         wall time of the import (until every array is ready)
     model_bytes     bytes of the imported parameters (both devices together)
     baseline_rss_bytes  the process's RSS before the import (JAX, devices, abstract model)
     peak_rss_bytes  the process's peak RSS (ru_maxrss) after it
   and checks peak_rss_bytes < 1.5 x model_bytes + baseline_rss_bytes: the reader never
   holds more than one device shard of one tensor on the host next to the device arrays
   (on CPU, device memory is host memory, so model_bytes is the floor).
The last line is one JSON object with those keys and `ok`.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SHARD_BYTES = 300 * 2**20


def make_dir(out: str) -> None:
  """Random bf16 Qwen2.5-0.5B-shaped weights and config.json, sharded with an index."""
  import ml_dtypes
  from safetensors.numpy import save_file
  from model.config import ModelConfig
  from model.hf import hf_sources
  from model.hf_config import hf_config
  cfg = ModelConfig.preset("qwen2_5_0_5b")
  os.makedirs(out, exist_ok=True)
  shapes: dict[str, tuple[int, ...]] = {}
  for source in hf_sources(cfg).values():
    shapes.update(source.hf_tensors())
  rng = np.random.default_rng(0)
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  names = []
  for name, shape in shapes.items():
    a = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    if size + a.nbytes > SHARD_BYTES and shards[-1]:
      names.append(_flush(out, shards[-1], len(names), save_file))
      shards.append({})
      size = 0
    shards[-1][name], size = a, size + a.nbytes
  names.append(_flush(out, shards[-1], len(names), save_file))
  total = len(names)
  weight_map = {}
  for i, tmp in enumerate(names):
    final = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
    os.replace(os.path.join(out, tmp), os.path.join(out, final))
    from safetensors import safe_open
    with safe_open(os.path.join(out, final), framework="numpy") as f:
      weight_map.update({k: final for k in f.keys()})
  with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": sum(int(np.prod(s)) * 2 for s in shapes.values())},
               "weight_map": weight_map}, f)
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(hf_config(cfg.replace(param_dtype="bfloat16")), f, indent=2)


def _flush(out: str, tensors: dict, i: int, save_file) -> str:
  name = f"part-{i}.safetensors"
  save_file(tensors, os.path.join(out, name), metadata={"format": "pt"})
  tensors.clear()
  return name


def _rss() -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) * 1024
  return 0


def child(hf_dir: str) -> None:
  """The measured import (fresh process, 2 CPU devices)."""
  import jax
  from model import sharding as msharding
  from model.transformer import Transformer
  from train.hf_import import load_hf_params, read_hf_config
  from train.state import abstract_model, mesh_shardings, with_shardings
  cfg = read_hf_config(hf_dir).replace(param_dtype="bfloat16")
  mesh = msharding.make_mesh({"fsdp": 2})
  _, abstract, logical = abstract_model(Transformer, cfg)
  target = with_shardings(abstract, mesh_shardings(logical, mesh, msharding.DEFAULT_RULES))
  baseline = _rss()
  start = time.perf_counter()
  params = jax.block_until_ready(load_hf_params(hf_dir, cfg, target))
  seconds = time.perf_counter() - start
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  leaves = jax.tree.leaves(params)
  model_bytes = sum(a.nbytes for a in leaves)
  per_device = {str(d): 0 for d in jax.devices()}
  for a in leaves:
    for s in a.addressable_shards:
      per_device[str(s.device)] += s.data.nbytes
  print(json.dumps({"seconds": seconds, "peak_rss_bytes": peak, "model_bytes": model_bytes,
                    "baseline_rss_bytes": baseline, "per_device_bytes": per_device,
                    "num_params": sum(a.size for a in leaves)}))


def main() -> None:
  args = dict(a.removeprefix("--").split("=", 1) if "=" in a else (a.removeprefix("--"), "1")
              for a in sys.argv[1:])
  if "child" in args:
    child(args["child"])
    return
  hf_dir = args.get("dir") or os.path.join(tempfile.gettempdir(), "qwen25_05b_random")
  if not os.path.exists(os.path.join(hf_dir, "model.safetensors.index.json")):
    t = time.perf_counter()
    make_dir(hf_dir)
    print(f"Wrote {hf_dir} in {time.perf_counter() - t:.1f}s", flush=True)
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, os.path.abspath(__file__), f"--child={hf_dir}"],
                       env=env, capture_output=True, text=True, check=False)
  if out.returncode:
    sys.exit(f"error: the import failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
  r = json.loads(out.stdout.strip().splitlines()[-1])
  if "keep" not in args and "dir" not in args:
    import shutil
    shutil.rmtree(hf_dir)
  limit = 1.5 * r["model_bytes"] + r["baseline_rss_bytes"]
  r["ok"] = r["peak_rss_bytes"] < limit
  mib = lambda b: f"{b / 2**20:,.0f} MiB"
  print(f"params:        {r['num_params']:,} (bf16), per device "
        + ", ".join(f"{d}: {mib(b)}" for d, b in r["per_device_bytes"].items()))
  print(f"seconds:       {r['seconds']:.2f}")
  print(f"model_bytes:   {mib(r['model_bytes'])}")
  print(f"baseline RSS:  {mib(r['baseline_rss_bytes'])}")
  print(f"peak RSS:      {mib(r['peak_rss_bytes'])}  (limit 1.5 x model + baseline = "
        f"{mib(limit)}: {'OK' if r['ok'] else 'EXCEEDED'})")
  print(json.dumps({k: r[k] for k in ("seconds", "peak_rss_bytes", "model_bytes",
                                      "baseline_rss_bytes", "ok")}))


if __name__ == "__main__":
  main()
