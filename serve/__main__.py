"""`python -m serve`: the OpenAI-compatible server on uvicorn.

  python -m serve --checkpoint=runs/sft --port=8000              # one checkpoint
  python -m serve --registry=runs/registry --api_keys_file=keys.txt \
      --safety_config=safety.json --slots=16                     # versions, hot swap

The server listens on 127.0.0.1 unless --host says otherwise. With --registry it serves the
current version, follows promotions and rollbacks (polled every --poll_seconds) and records
every completion in <registry>/feedback.db (--feedback_db overrides; with --checkpoint only
when given). Keys: --api_keys_file, else $LMLIFE_API_KEYS, else an open server (logged
loudly). Safety: --safety_config (JSON, serve/safety.py), or --blocklist / --safety_checkpoint
/ --safety_threshold.

The console gets a start-up summary and one line per request (its id, endpoint, version,
key name, tokens, seconds and finish reason); library logs are off unless --verbose. Bad
input (both or neither of --checkpoint / --registry, a missing file, an unusable checkpoint,
a port in use) ends in one `error:` line and exit code 2.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from typing import Any, Sequence

import jax
import uvicorn
from absl import app, flags

from eval.cli import exit_with_error
from eval.loading import parse_mesh
from serve.app import create_app
from serve.auth import KeyLimits, ServerLimits, load_keys
from serve.deployment import Deployment, model_loader
from serve.feedback import FeedbackStore
from serve.metrics import ServerMetrics
from serve.registry import Registry
from serve.safety import SafetyConfig, SafetyFilter
from train import checkpoint as ckpt_lib
from train.quiet import set_library_logs

FEEDBACK_FILE = "feedback.db"


def _limits(f: Any) -> ServerLimits:
  return ServerLimits(max_body_bytes=f.max_body_bytes, max_tokens_cap=f.max_tokens_cap,
                      default_key_limits=KeyLimits(f.requests_per_minute, f.tokens_per_window,
                                                   f.window_seconds))


def _safety_config(f: Any) -> SafetyConfig:
  cfg = SafetyConfig.from_json(f.safety_config) if f.safety_config else SafetyConfig()
  overrides = {k: v for k, v in (("blocklist_file", f.blocklist),
                                 ("reward_checkpoint", f.safety_checkpoint)) if v}
  if f.safety_threshold is not None:
    overrides["reward_threshold"] = f.safety_threshold
  return SafetyConfig.from_dict({**{k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
                                 **overrides, "blocklist": list(cfg.blocklist)})


def _check_flags(f: Any) -> None:
  """Cheap checks first: a typo should not wait for a checkpoint to load."""
  if bool(f.checkpoint) == bool(f.registry):
    raise ValueError("give exactly one of --checkpoint (one model) or --registry (versions)")
  if not 0 <= f.port <= 65535:
    raise ValueError(f"--port={f.port} is not a port number")
  if f.slots < 1:
    raise ValueError(f"--slots={f.slots} must be >= 1")
  if f.poll_seconds <= 0:
    raise ValueError(f"--poll_seconds={f.poll_seconds} must be > 0")
  for name in ("api_keys_file", "safety_config", "blocklist"):
    path = getattr(f, name)
    if path and not os.path.isfile(path):
      raise ValueError(f"--{name}={path}: no such file")
  if f.registry and not os.path.isdir(f.registry):
    raise ValueError(f"--registry={f.registry}: no such directory")


def _log_to_console() -> None:
  """The server's own lines (start-up, one per request, swaps, refusals) on stderr with the
  time; absl owns the root logger, so "serve" gets its own handler."""
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
  log = logging.getLogger("serve")
  log.addHandler(handler)
  log.setLevel(logging.INFO)
  log.propagate = False


def _listen(host: str, port: int) -> socket.socket:
  """The listening socket, bound before the model loads (a port in use fails at once)."""
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind((host, port))
  except OSError as e:
    sock.close()
    raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
  return sock


def main(argv: Sequence[str]) -> None:
  f = flags.FLAGS
  if len(argv) > 1:
    exit_with_error(f"unexpected arguments {argv[1:]}")
  set_library_logs(f.verbose)
  _log_to_console()
  try:
    _check_flags(f)
    limits, safety_cfg = _limits(f), _safety_config(f)
    keys = load_keys(f.api_keys_file or None, limits.default_key_limits)
    if f.local_devices:
      jax.config.update("jax_num_cpu_devices", f.local_devices)
    sock = _listen(f.host, f.port)
    safety = SafetyFilter.from_config(safety_cfg) if safety_cfg.enabled else None
    metrics = ServerMetrics()
    load = model_loader(slots=f.slots, max_len=f.max_len or None,
                        mesh_shape=parse_mesh(f.mesh), on_step=metrics.on_step)
    registry = Registry(f.registry) if f.registry else None
    deployment = Deployment(load, registry=registry, checkpoint=f.checkpoint or None,
                            poll_seconds=f.poll_seconds).start()
  except (ckpt_lib.CheckpointError, ValueError, OSError, KeyError) as e:
    exit_with_error(e, f.verbose)
  metrics.engine_stats = deployment.stats
  feedback_path = f.feedback_db or (os.path.join(f.registry, FEEDBACK_FILE) if f.registry
                                    else "")
  feedback = FeedbackStore(feedback_path) if feedback_path else None
  server_app = create_app(deployment, keys=keys, limits=limits, safety=safety,
                          feedback=feedback, metrics=metrics)
  host, port = sock.getsockname()[:2]
  served = deployment.current
  print(f"Serving {served.name} ({served.checkpoint}) on http://{host}:{port}/v1 | "
        f"{f.slots} slots | {len(keys) or 'no'} API key(s) | "
        f"{safety.describe() if safety else 'safety: off'} | feedback: "
        f"{feedback_path or 'off'}", file=sys.stderr, flush=True)
  server = uvicorn.Server(uvicorn.Config(server_app, log_level="warning", access_log=False,
                                         lifespan="off", timeout_graceful_shutdown=30))
  # uvicorn shuts down gracefully on SIGINT / SIGTERM, then re-raises the signal to the
  # handler it found: make both a normal end (exit 0) that stops the engines first.
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
  try:
    server.run(sockets=[sock])
  except KeyboardInterrupt:
    pass
  finally:
    deployment.stop()
    print("Server stopped.", file=sys.stderr, flush=True)


def define_flags() -> None:
  """The command-line flags (defined only when this module is the program)."""
  flags.DEFINE_string("checkpoint", "", "Serve this checkpoint (workdir, checkpoints dir or "
                      "step dir).")
  flags.DEFINE_string("registry", "", "Serve the current version of this registry "
                      "(serve/registry.py) and follow its promotions / rollbacks.")
  flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
  flags.DEFINE_integer("port", 8000, "Port to listen on (0 = any free port).")
  flags.DEFINE_integer("slots", 8, "Requests the engine decodes at once.")
  flags.DEFINE_integer("max_len", 0, "Engine cache length (0 = the model's context).")
  flags.DEFINE_string("mesh", "", "Mesh to shard weights over, e.g. 'tensor=2' (default: "
                      "one device).")
  flags.DEFINE_integer("local_devices", 0, "CPU devices to expose (CPU runs; 0 = default).")
  flags.DEFINE_float("poll_seconds", 1.0, "How often the registry is checked for a new "
                     "current version.")
  flags.DEFINE_string("api_keys_file", "", "API keys: one per line, or JSON with per-key "
                      "limits (serve/auth.py). Default: $LMLIFE_API_KEYS; none = open.")
  flags.DEFINE_float("requests_per_minute", 0, "Default per-key request rate (0 = no limit).")
  flags.DEFINE_integer("tokens_per_window", 0, "Default per-key prompt + completion tokens "
                       "per window (0 = no limit).")
  flags.DEFINE_float("window_seconds", 60.0, "Token quota window.")
  flags.DEFINE_integer("max_body_bytes", 1 << 20, "Largest request body.")
  flags.DEFINE_integer("max_tokens_cap", 1024, "Largest max_tokens a request may ask for.")
  flags.DEFINE_string("safety_config", "", "Safety filter config (JSON, serve/safety.py).")
  flags.DEFINE_string("blocklist", "", "Blocklist file: one term (or re:regex) per line.")
  flags.DEFINE_string("safety_checkpoint", "", "Reward-model checkpoint scoring input and "
                      "output.")
  flags.DEFINE_float("safety_threshold", None, "Refuse when the reward score is below this.")
  flags.DEFINE_string("feedback_db", "", "SQLite feedback store (default: "
                      "<registry>/feedback.db with --registry, none with --checkpoint).")
  flags.DEFINE_bool("verbose", False, "Library logs and tracebacks too.")


if __name__ == "__main__":
  define_flags()
  app.run(main)
