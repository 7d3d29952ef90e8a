"""Serving: a trained or imported model behind an OpenAI-compatible API, and the versions
and feedback that feed the next update (DESIGN.md: deployment closes the loop).

  engine    continuous batching over the KV cache: fixed slots, prefill on admission, one
            jitted decode step for every running request, per-request sampling parameters.
  registry  a directory of model versions (checkpoints with their lineage), the current one
            and its history (promote / rollback).
  feedback  the SQLite store of served completions and users' ratings / preferred answers.
  auth      API keys (stored hashed), per-key request-rate and token quotas.
  safety    input / output filters: a blocklist and a reward-model score threshold.
  metrics   Prometheus counters and histograms of the server.
  app       the FastAPI application (/v1/chat/completions, /v1/completions, /v1/models,
            /v1/feedback, /health, /metrics); `python -m serve` runs it on uvicorn.

Layering: serve imports eval, rlhf, train, model and data; only launch imports serve.
"""
