"""The HTTP part (c) of benchmarks/serve_load.py: a checkpoint, the server, the clients.

`run_http_phases` saves the benchmark model as a checkpoint of the shared format (with a
SentencePiece tokenizer of the model's vocabulary size trained on tinyshakespeare),
starts `python -m serve` on it as a subprocess on 127.0.0.1, and for each client count N
runs N concurrent asyncio clients (httpx), each sending its requests one after another
as streaming `/v1/completions`. Time to first token is measured to the first streamed
chunk that carries text; completion tokens come from the final usage chunk
(stream_options.include_usage) or, if the server sends none, from the chunk count.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def save_checkpoint(cfg: Any, params: Any, workdir: str) -> str:
  """Writes params + a trained tokenizer of cfg.vocab_size pieces; returns the run dir."""
  import numpy as np
  from data.readers import resolve_data_path
  from data.tokenizer import Tokenizer, train_tokenizer
  from train.checkpoint import Checkpointer
  model_path = os.path.join(workdir, "tokenizer.model")
  train_tokenizer([resolve_data_path("pretrain/tinyshakespeare.txt")], model_path,
                  vocab_size=cfg.vocab_size, model_type="bpe", byte_fallback=True)
  tokenizer = Tokenizer.from_file(model_path)
  if tokenizer.vocab_size != cfg.vocab_size:
    raise SystemExit(f"error: the benchmark tokenizer has {tokenizer.vocab_size} pieces, "
                     f"the model {cfg.vocab_size}")
  run = os.path.join(workdir, "run")
  checkpointer = Checkpointer(os.path.join(run, "checkpoints"), async_save=False)
  checkpointer.save(0, params, {"step": np.zeros((), np.int32)}, tokenizer=tokenizer.to_bytes(),
                    metadata={"stage": "benchmark", "config": {},
                              "model_config": cfg.to_dict()})
  checkpointer.close()
  return run


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_server(checkpoint: str, slots: int, log_path: str) -> tuple[subprocess.Popen, str]:
  """Starts `python -m serve` and waits until /health answers; returns (process, url)."""
  import httpx
  port = _free_port()
  env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
  env.pop("XLA_FLAGS", None)
  with open(log_path, "w") as log:
    proc = subprocess.Popen(
        [sys.executable, "-m", "serve", f"--checkpoint={checkpoint}", "--host=127.0.0.1",
         f"--port={port}", f"--slots={slots}"], cwd=REPO, env=env, stdout=log,
        stderr=subprocess.STDOUT)
  url = f"http://127.0.0.1:{port}"
  deadline = time.time() + 600
  while time.time() < deadline:
    if proc.poll() is not None:
      raise SystemExit(f"error: the server exited ({proc.returncode}); see {log_path}:\n"
                       + open(log_path).read()[-3000:])
    try:
      if httpx.get(url + "/health", timeout=2).status_code == 200:
        return proc, url
    except httpx.HTTPError:
      pass
    time.sleep(0.5)
  proc.kill()
  raise SystemExit(f"error: the server did not answer /health within 600 s; see {log_path}")


async def _one_request(client, url: str, body: dict) -> dict:
  """One streaming completion: (time to first text, end to end, completion tokens). The
  client parses as little as it can (the JSON of chunks up to the first text and of the
  usage chunk only): it shares the machine with the server it measures."""
  t0 = time.perf_counter()
  ttft, chunks, usage = None, 0, None
  async with client.stream("POST", url + "/v1/completions", json=body) as response:
    if response.status_code != 200:
      await response.aread()
      return {"error": f"{response.status_code} {response.text[:200]}"}
    async for line in response.aiter_lines():
      if not line.startswith("data: ") or line == "data: [DONE]":
        continue
      if ttft is None or '"usage"' in line:
        data = json.loads(line[6:])
        usage = data.get("usage") or usage
        if ttft is None and any(c.get("text") for c in data.get("choices", [])):
          ttft = time.perf_counter() - t0
      chunks += 1
  tokens = usage["completion_tokens"] if usage else chunks
  return {"ttft": ttft if ttft is not None else float("nan"), "e2e": time.perf_counter() - t0,
          "tokens": tokens}


def _cpu_seconds(pid: int) -> float:
  """User + system CPU seconds of a process so far (Linux /proc)."""
  with open(f"/proc/{pid}/stat") as f:
    fields = f.read().rsplit(")", 1)[1].split()
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _phase(url: str, model: str, n_clients: int, requests_per_client: int,
                 new_tokens: int, prompts: list[str], timeout_s: float) -> dict:
  import httpx
  limits = httpx.Limits(max_connections=n_clients + 4, max_keepalive_connections=n_clients + 4)
  async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
    async def run_client(c: int) -> list[dict]:
      out = []
      for r in range(requests_per_client):
        body = {"model": model, "prompt": prompts[(c * requests_per_client + r) % len(prompts)],
                "max_tokens": new_tokens, "temperature": 0.0, "stream": True,
                "stream_options": {"include_usage": True}}
        out.append(await _one_request(client, url, body))
      return out
    t0 = time.perf_counter()
    done = await asyncio.wait_for(asyncio.gather(*(run_client(c) for c in range(n_clients))),
                                  timeout=timeout_s)
    wall = time.perf_counter() - t0
  results = [r for client_results in done for r in client_results]
  ok = [r for r in results if "error" not in r]
  pct = lambda xs, q: float(sorted(xs)[min(len(xs) - 1, int(q * len(xs)))]) if xs else 0.0
  return {"tokens_per_sec": sum(r["tokens"] for r in ok) / wall,
          "p50_ttft_s": pct([r["ttft"] for r in ok], 0.5),
          "p95_ttft_s": pct([r["ttft"] for r in ok], 0.95),
          "p50_e2e_s": pct([r["e2e"] for r in ok], 0.5),
          "p95_e2e_s": pct([r["e2e"] for r in ok], 0.95),
          "errors": len(results) - len(ok), "wall_s": wall}


def run_http_phases(cfg: Any, params: Any, workdir: str, clients: list[int], *,
                    requests_per_client: int, new_tokens: int, slots: int,
                    steps_per_sync: int, timeout_s: float) -> dict[int, dict]:
  """Runs part (c); returns {N: figures}. The server log is kept in `workdir`."""
  del steps_per_sync  # the server's own default
  import httpx
  logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
  from data.readers import resolve_data_path
  checkpoint = save_checkpoint(cfg, params, workdir)
  lines = [l.strip() for l in open(resolve_data_path("pretrain/tinyshakespeare.txt"))
           if len(l.strip()) > 40]
  prompts = [l[:60] for l in lines[:256]]
  log_path = os.path.join(workdir, "server.log")
  proc, url = start_server(checkpoint, slots, log_path)
  try:
    model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
    asyncio.run(_phase(url, model, slots, 1, new_tokens, prompts, timeout_s))  # warm-up
    out = {}
    for n in clients:
      server_cpu, client_cpu = _cpu_seconds(proc.pid), time.process_time()
      out[n] = asyncio.run(_phase(url, model, n, requests_per_client, new_tokens, prompts,
                                  timeout_s))
      # Where the 2 machines' worth of CPU went: the server (engine + HTTP) and this client.
      out[n]["server_cpu_s"] = _cpu_seconds(proc.pid) - server_cpu
      out[n]["client_cpu_s"] = time.process_time() - client_cpu
      print(f"(c) {n} clients: {out[n]['tokens_per_sec']:,.0f} tokens/s, server CPU "
            f"{out[n]['server_cpu_s']:.1f} s, client CPU {out[n]['client_cpu_s']:.1f} s in "
            f"{out[n]['wall_s']:.1f} s", flush=True)
    return out
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
