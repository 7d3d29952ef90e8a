"""Shared setup of the server tests (tests/test_serve_*.py): tiny checkpoints written the way
the project writes them, and a uvicorn server on a free localhost port in a thread.

  workdir = write_checkpoint(tmp / "v1", seed=0)               # a tiny LM, char tokenizer
  rm = write_checkpoint(tmp / "rm", seed=0, reward=True)        # a tiny reward model
  with running(app) as base_url:                               # http://127.0.0.1:<port>/v1
    client = openai.OpenAI(base_url=base_url, api_key="k", max_retries=0)

The tokenizer is a SentencePiece char model with the chat markers, so the project's chat
template applies and greedy outputs can be compared with the offline sampler token by token.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from typing import Any, Iterator

import jax
import uvicorn

from conftest import tiny_run_config
from data.chat import CHAT_MARKERS
from data.tokenizer import Tokenizer, train_tokenizer
from model.config import ModelConfig
from model.heads import RewardModel
from model.transformer import Transformer
from rlhf.reward import reward_loss
from train.losses import lm_loss
from train.trainer import Trainer

TEXT = ("Name three colors. Red, green and blue.\nhello there! hi, how are you?\n"
        "The quick brown fox jumps over the lazy dog; ROMEO: what light? caf\u00e9 \u00fcber\n"
        ) * 40
CONTEXT = 128


def tokenizer(root: str) -> Tokenizer:
  """A char SentencePiece model of TEXT with the chat markers (cached per directory)."""
  path = os.path.join(root, "tok.model")
  if not os.path.exists(path):
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "text.txt"), "w") as f:
      f.write(TEXT)
    train_tokenizer([os.path.join(root, "text.txt")], path, 0, "char",
                    user_defined_symbols=CHAT_MARKERS)
  return Tokenizer.from_file(path)


def write_checkpoint(workdir: str, seed: int, *, reward: bool = False,
                     tok: Tokenizer | None = None) -> str:
  """A freshly initialised tiny model (LM, or reward model) saved as a checkpoint; its
  workdir. Different seeds give different weights (and greedy outputs)."""
  tok = tok or tokenizer(os.path.join(os.path.dirname(workdir), "tok"))
  config = tiny_run_config()
  config.seed = seed
  model_cfg = ModelConfig.from_dict({**config.model.to_dict(), "vocab_size": tok.vocab_size,
                                     "max_seq_len": CONTEXT})
  trainer = Trainer(config, workdir, model_cfg, reward_loss if reward else lm_loss,
                    model_factory=RewardModel if reward else Transformer,
                    tokenizer_bytes=tok.to_bytes(), tokenizer_fingerprint=tok.fingerprint,
                    devices=jax.devices()[:1])
  state = trainer.init_state()
  trainer.save(state)
  trainer.checkpointer.wait()
  trainer.close()
  return workdir


@contextlib.contextmanager
def running(app: Any, timeout: float = 30.0) -> Iterator[str]:
  """Serves `app` with uvicorn in a thread on a free 127.0.0.1 port; yields the /v1 URL."""
  sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  sock.bind(("127.0.0.1", 0))
  port = sock.getsockname()[1]
  server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                         lifespan="off"))
  thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
  thread.start()
  deadline = time.monotonic() + timeout
  while not server.started:
    if not thread.is_alive() or time.monotonic() > deadline:
      raise RuntimeError("the test server did not start")
    time.sleep(0.01)
  try:
    yield f"http://127.0.0.1:{port}/v1"
  finally:
    server.should_exit = True
    thread.join(timeout)
    sock.close()
