"""Benchmark: the serving engine and its HTTP server under load, against transformers.

  python benchmarks/serve_load.py [--clients=1,4,16,64] [--requests_per_client=4]
      [--new_tokens=128] [--prompt_len=16] [--skip_http] [--skip_hf]

Model: benchmarks/sample_throughput.py's SHAPE (4 layers, 256 wide, SwiGLU 688, vocab
8192, random weights, float32), fused projections on our side; transformers gets the same
weights (model/hf.py export), so greedy outputs are comparable. Every request: a
`prompt_len`-token prompt, `new_tokens` greedy tokens, no stop id (EOS off).

  (a) transformers LlamaForCausalLM.generate (torch CPU, eager): batch 1 sequentially
      (`hf_generate_tokens_per_sec`), then batch 8 and 16.
  (b) serve/engine.py without HTTP: `slots` requests submitted at once to an engine of
      that many slots (prefill, decode and the scheduler thread included), for 8 and 16
      slots; decode_speedup_batch8 = engine at 8 / transformers at batch 8.
  (c) the server (`python -m serve`, a subprocess on 127.0.0.1, --slots=--server_slots)
      serving a checkpoint of the same model with a SentencePiece tokenizer of 8192
      pieces trained on tinyshakespeare; N concurrent streaming clients (N in --clients)
      each send --requests_per_client `/v1/completions` requests (stream, temperature 0,
      max_tokens new_tokens); per N: tokens/s (completion tokens / wall time), p50/p95
      time to first token and end-to-end latency. --skip_http leaves (c) out.

Timings of (a) and (b) are the best of --repeats after one warm-up call each
(compilation / allocator), the runs interleaved (a round runs every measurement once) so
that the machine's load changes hit both frameworks alike; (c) runs each N once after
warm-up requests. Bounded: every phase has fixed work and
(c) a --phase_timeout_s. Prints a table per part; the last line is one JSON object with
tokens_per_sec_16, p95_ttft_s_16, hf_generate_tokens_per_sec, speedup_vs_hf_sequential,
speedup_vs_hf_batch16, decode_speedup_batch8 and the measured figures behind them.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import Any, Callable

from absl import app, flags, logging

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from serve_load_http import run_http_phases  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("clients", ["1", "4", "16", "64"], "Concurrent HTTP clients per phase.")
flags.DEFINE_integer("requests_per_client", 4, "Requests each HTTP client sends.")
flags.DEFINE_integer("new_tokens", 128, "Tokens generated per request.")
flags.DEFINE_integer("prompt_len", 16, "Prompt length (tokens) for (a) and (b).")
flags.DEFINE_integer("repeats", 5, "Timed repetitions of (a) and (b) (best is reported).")
flags.DEFINE_integer("hf_sequential_prompts", 4, "Prompts generated one by one in (a).")
flags.DEFINE_integer("steps_per_sync", 16, "Engine decode steps per host round trip.")
flags.DEFINE_integer("server_slots", 16, "Engine slots of the HTTP server.")
flags.DEFINE_float("phase_timeout_s", 300.0, "Limit of one HTTP phase.")
flags.DEFINE_bool("skip_http", False, "Leave out the HTTP load (c).")
flags.DEFINE_bool("skip_hf", False, "Leave out transformers (a) (and the speedups).")

# benchmarks/sample_throughput.py's SHAPE and layout (that module defines absl flags of the
# same names, so it cannot be imported here).
SHAPE = dict(vocab_size=8192, embed_dim=256, num_layers=4, num_heads=4, num_kv_heads=4,
             mlp_dim=688, max_seq_len=512, rope_theta=10000.0, tie_embeddings=False)
JAX_LAYOUT = dict(fuse_projections=True)


def build_models():
  """Our model (fused layout) and transformers' LlamaForCausalLM with the same weights."""
  import numpy as np
  import torch
  import transformers
  from flax import nnx
  from model.config import ModelConfig
  from model.hf import to_hf_state_dict
  from model.transformer import build_model
  cfg = ModelConfig.from_dict({**ModelConfig().to_dict(), **SHAPE, **JAX_LAYOUT})
  graphdef, state = nnx.split(build_model(cfg, seed=0))
  params = nnx.to_pure_dict(state)
  config = transformers.LlamaConfig(
      vocab_size=SHAPE["vocab_size"], hidden_size=SHAPE["embed_dim"],
      intermediate_size=SHAPE["mlp_dim"], num_hidden_layers=SHAPE["num_layers"],
      num_attention_heads=SHAPE["num_heads"], num_key_value_heads=SHAPE["num_kv_heads"],
      max_position_embeddings=SHAPE["max_seq_len"], rope_theta=SHAPE["rope_theta"],
      rms_norm_eps=cfg.norm_eps, tie_word_embeddings=False, bos_token_id=2,
      eos_token_id=None, pad_token_id=0)
  hf = transformers.LlamaForCausalLM(config).eval()
  state_dict = {k: torch.from_numpy(np.ascontiguousarray(v))
                for k, v in to_hf_state_dict(params, cfg).items()}
  hf.load_state_dict(state_dict, strict=False)  # rotary inv_freq buffers are not weights
  return cfg, graphdef, params, hf


def best_times(fns: dict[str, Any], repeats: int) -> dict[str, float]:
  """Best wall time of each function: one warm-up call each, then `repeats` rounds that
  run them in turn (interleaved, so a change in the machine's load hits all alike)."""
  for fn in fns.values():
    fn()
  times: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  return {name: min(t) for name, t in times.items()}


def hf_run(hf, prompts: list[list[int]], out: list) -> Callable[[], None]:
  """transformers.generate on `prompts` as one batch (the generated ids into `out`)."""
  import torch
  input_ids = torch.tensor(prompts, dtype=torch.long)

  def run():
    with torch.inference_mode():
      ids = hf.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                        max_new_tokens=FLAGS.new_tokens, min_new_tokens=FLAGS.new_tokens,
                        do_sample=False, pad_token_id=0)
    assert ids.shape == (len(prompts), FLAGS.prompt_len + FLAGS.new_tokens)
    out[:] = ids[:, FLAGS.prompt_len:].tolist()
  return run


def hf_sequential_run(hf, prompts: list[list[int]]) -> Callable[[], None]:
  """transformers.generate on each prompt alone, one after another."""
  runs = [hf_run(hf, [p], []) for p in prompts]
  return lambda: [run() for run in runs]


def engine_run(engine, prompts: list[list[int]], out: list) -> Callable[[], None]:
  """All `prompts` submitted at once to `engine` (slots = len(prompts)); waits for all."""
  from serve.engine import GenerationParams
  gen = GenerationParams(max_tokens=FLAGS.new_tokens, temperature=0.0)

  def run():
    handles = [engine.submit(p, gen) for p in prompts]
    results = [h.result(timeout=600) for h in handles]
    assert all(fin.completion_tokens == FLAGS.new_tokens for _, fin in results)
    out[:] = [[e.token for e in events] for events, _ in results]
  return run


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
  """Mean fraction of leading tokens two greedy runs share (float32 rounding may split
  them late)."""
  def prefix(x, y):
    n = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), len(x))
    return n / len(x)
  return sum(prefix(x, y) for x, y in zip(a, b)) / len(a)


def measure_local(cfg, graphdef, params, hf, prompts: list[list[int]]) -> dict[str, float]:
  """Parts (a) and (b): prints their lines, returns their figures."""
  from serve.engine import Engine
  engines = {b: Engine(graphdef, params, cfg, slots=b, prompt_bucket=FLAGS.prompt_len,
                       steps_per_sync=FLAGS.steps_per_sync).start() for b in (8, 16)}
  fns: dict[str, Callable[[], None]] = {}
  outs: dict[str, list] = {}
  for b in (8, 16):
    outs[f"engine{b}"], outs[f"hf{b}"] = [], []
    fns[f"engine{b}"] = engine_run(engines[b], prompts[:b], outs[f"engine{b}"])
    if not FLAGS.skip_hf:
      fns[f"hf{b}"] = hf_run(hf, prompts[:b], outs[f"hf{b}"])
  if not FLAGS.skip_hf:
    fns["hf1"] = hf_sequential_run(hf, prompts[:FLAGS.hf_sequential_prompts])
  best = best_times(fns, FLAGS.repeats)
  for engine in engines.values():
    engine.stop()
  rows = {"hf1": FLAGS.hf_sequential_prompts, "hf8": 8, "engine8": 8, "hf16": 16,
          "engine16": 16}
  rate = {name: rows[name] * FLAGS.new_tokens / best[name] for name in best}
  summary: dict[str, float] = {}
  if not FLAGS.skip_hf:
    import torch
    summary["hf_generate_tokens_per_sec"] = rate["hf1"]
    print(f"(a) transformers.generate batch 1 (sequential): {rate['hf1']:8,.0f} tokens/s "
          f"(torch threads: {torch.get_num_threads()})")
    for b in (8, 16):
      summary[f"hf_tokens_per_sec_batch{b}"] = rate[f"hf{b}"]
      print(f"(a) transformers.generate batch {b:2d}:             {rate[f'hf{b}']:8,.0f} "
            "tokens/s")
  for b in (8, 16):
    summary[f"engine_tokens_per_sec_batch{b}"] = rate[f"engine{b}"]
    line = (f"(b) engine, {b:2d} slots busy:                    "
            f"{rate[f'engine{b}']:8,.0f} tokens/s")
    if not FLAGS.skip_hf:
      summary[f"greedy_agreement_with_hf_batch{b}"] = agreement(outs[f"engine{b}"],
                                                                outs[f"hf{b}"])
      line += (f" ({rate[f'engine{b}'] / rate[f'hf{b}']:.2f}x transformers at batch {b}; "
               "greedy tokens shared with transformers: "
               f"{summary[f'greedy_agreement_with_hf_batch{b}']:.0%})")
    print(line, flush=True)
  if not FLAGS.skip_hf:
    summary["decode_speedup_batch8"] = rate["engine8"] / rate["hf8"]
  return summary


def check_flags() -> list[int]:
  """The client counts; a bad flag is one line `error: ...` and exit status 2."""
  try:
    clients = [int(n) for n in FLAGS.clients]
  except ValueError:
    clients = []
  problems = [
      (not clients or min(clients) < 1, f"--clients={','.join(FLAGS.clients)}: expected "
       "positive integers, e.g. 1,4,16,64"),
      (FLAGS.requests_per_client < 1, "--requests_per_client must be >= 1"),
      (min(FLAGS.new_tokens, FLAGS.prompt_len) < 1,
       "--new_tokens and --prompt_len must be >= 1"),
      (FLAGS.prompt_len + FLAGS.new_tokens > SHAPE["max_seq_len"],
       f"--prompt_len + --new_tokens must fit the model context of {SHAPE['max_seq_len']}"),
      (min(FLAGS.repeats, FLAGS.hf_sequential_prompts, FLAGS.steps_per_sync,
           FLAGS.server_slots) < 1,
       "--repeats, --hf_sequential_prompts, --steps_per_sync and --server_slots must be >= 1")]
  for bad, message in problems:
    if bad:
      print(f"error: {message}", file=sys.stderr)
      sys.exit(2)
  return clients


def main(argv):
  del argv
  clients = check_flags()
  logging.set_verbosity(logging.ERROR)  # Orbax logs every file operation of the checkpoint
  import numpy as np
  cfg, graphdef, params, hf = build_models()
  rng = np.random.default_rng(0)
  prompts = rng.integers(4, cfg.vocab_size, (16, FLAGS.prompt_len)).tolist()
  summary = measure_local(cfg, graphdef, params, hf, prompts)
  if not FLAGS.skip_http:
    with tempfile.TemporaryDirectory(prefix="serve_load_") as tmp:
      phases = run_http_phases(cfg, params, tmp, clients,
                               requests_per_client=FLAGS.requests_per_client,
                               new_tokens=FLAGS.new_tokens, slots=FLAGS.server_slots,
                               steps_per_sync=FLAGS.steps_per_sync,
                               timeout_s=FLAGS.phase_timeout_s)
    print(f"(c) HTTP server, {FLAGS.server_slots} slots, {FLAGS.requests_per_client} "
          f"streaming requests per client, {FLAGS.new_tokens} tokens each")
    print(f"{'clients':>8} {'tokens/s':>10} {'p50 TTFT s':>11} {'p95 TTFT s':>11} "
          f"{'p50 e2e s':>10} {'p95 e2e s':>10} {'errors':>7}")
    for n, ph in phases.items():
      print(f"{n:>8} {ph['tokens_per_sec']:>10,.0f} {ph['p50_ttft_s']:>11.3f} "
            f"{ph['p95_ttft_s']:>11.3f} {ph['p50_e2e_s']:>10.3f} {ph['p95_e2e_s']:>10.3f} "
            f"{ph['errors']:>7}")
      for key, value in ph.items():
        summary[f"{key}_{n}"] = value
    if 16 in phases:
      tps16 = phases[16]["tokens_per_sec"]
      summary.update(tokens_per_sec_16=tps16, p95_ttft_s_16=phases[16]["p95_ttft_s"])
      if not FLAGS.skip_hf:
        summary.update(
            speedup_vs_hf_sequential=tps16 / summary["hf_generate_tokens_per_sec"],
            speedup_vs_hf_batch16=tps16 / summary["hf_tokens_per_sec_batch16"])
  summary.update(new_tokens=FLAGS.new_tokens, prompt_len=FLAGS.prompt_len)
  print(json.dumps(summary))


if __name__ == "__main__":
  app.run(main)
