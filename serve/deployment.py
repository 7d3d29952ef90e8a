"""The served model version(s): one checkpoint, or a registry's current version with hot swap.

  load = model_loader(slots=8, on_step=metrics.on_step)
  deployment = Deployment(load, registry=Registry("runs/registry"), poll_seconds=1.0).start()
  with deployment.lease() as served:           # the version a request runs on, to its end
    handle = served.engine.submit(prompt_ids, params)

Hot swap. With a registry, a thread polls `Registry.snapshot()` (its generation and current
version, read from one file) every `poll_seconds`; when the generation changes (a promote,
or a rollback: the same path) and the current version differs from the served one, the new
version is loaded and its engine warmed up (compiled) while the old one keeps serving; then
new requests switch to it atomically (one assignment under a lock).
Requests already running keep the version they leased: the old engine is stopped (drained)
only when its last lease is given back, so no request is lost or changes model mid-answer.
A version that fails to load is logged and the old one keeps serving (the next generation
change tries again).

A request holds a lease for its whole life (streaming included): `lease()` / `acquire()` +
`release()`. `/v1/models` lists `models()`: the registry's versions with the served one
marked `current`, or the single checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from typing import Any, Callable, Iterator, Mapping, Protocol


from eval.loading import load_checkpoint
from eval.sample import RawTemplate, make_template
from model.transformer import Transformer
from serve.engine import Engine

log = logging.getLogger("serve")


@dataclasses.dataclass(eq=False)
class ServedModel:
  """One loaded version: its engine, tokenizer and templates.

  Attributes:
    name: the registry version name (or the checkpoint's directory name).
    checkpoint: the checkpoint path it was loaded from.
    engine: its started, warmed-up engine.
    tokenizer: the checkpoint's tokenizer.
    chat_template: the model's chat template (data/chat.py get_template("auto")), or None
      for a base model whose tokenizer has none (chat requests are refused).
    text_template: the raw template of /v1/completions (no markers, stops at </s>).
    context: the model's context length in tokens.
    created: unix time it was loaded.
    leases: requests running on it (see module doc).
    retired: replaced by a newer version; stopped when `leases` reaches 0.
  """
  name: str
  checkpoint: str
  engine: Any
  tokenizer: Any
  chat_template: Any
  text_template: Any
  context: int
  created: float = dataclasses.field(default_factory=time.time)
  leases: int = 0
  retired: bool = False

  def stop_ids(self, chat: bool) -> tuple[int, ...]:
    """Ids that end an answer: the template's end-of-turn ids (chat) and the eos."""
    ids = (*self.chat_template.end_ids, self.tokenizer.eos_id) if chat \
        else (self.tokenizer.eos_id,)
    return tuple(dict.fromkeys(i for i in ids if i >= 0))


Loader = Callable[[str, str], ServedModel]


def model_loader(*, slots: int = 8, max_len: int | None = None,
                 mesh_shape: Mapping[str, int] | None = None,
                 on_step: Callable[[int, float], None] | None = None,
                 engine_options: Mapping[str, Any] | None = None,
                 engine_factory: Callable[..., Any] = Engine) -> Loader:
  """A loader of language-model checkpoints into started engines.

  Args:
    slots: concurrent requests each engine decodes.
    max_len: engine cache length (None: the model's context).
    mesh_shape: e.g. {"tensor": 2}; None = one device.
    on_step: the engine's per-step callback (metrics).
    engine_options: more keyword arguments of the engine.
    engine_factory: the engine class (tests may wrap it).

  Returns:
    load(name, checkpoint) -> ServedModel; raises CheckpointError for a checkpoint that
    is missing or not a language model.
  """
  def load(name: str, checkpoint: str) -> ServedModel:
    loaded = load_checkpoint(checkpoint, mesh_shape, expect=Transformer)
    try:
      chat = make_template("auto", loaded.tokenizer)
    except ValueError:  # a base model: /v1/completions only
      chat = None
    engine = engine_factory(loaded.graphdef, loaded.params, loaded.model_cfg, slots=slots,
                            max_len=max_len, mesh=loaded.mesh, rules=loaded.rules,
                            param_shardings=loaded.param_shardings, on_step=on_step,
                            **dict(engine_options or {}))
    engine.warmup()
    engine.start()
    return ServedModel(name, loaded.meta["checkpoint_path"], engine, loaded.tokenizer, chat,
                       RawTemplate(loaded.tokenizer), max_len or loaded.model_cfg.max_seq_len)
  return load


class RegistryLike(Protocol):
  """What the deployment reads of serve/registry.py's Registry."""
  def snapshot(self) -> tuple[int, dict | None]: ...   # (generation, current version)
  def versions(self) -> list[dict]: ...


class Deployment:
  """The version being served and its swaps (module doc).

  Args:
    load: `model_loader(...)` or any (name, checkpoint) -> ServedModel.
    registry: serve the registry's current version and follow its changes; or
    checkpoint: serve this one checkpoint (as `name`, default its directory name).
    poll_seconds: how often the registry's generation is read.
  """

  def __init__(self, load: Loader, *, registry: RegistryLike | None = None,
               checkpoint: str | None = None, name: str | None = None,
               poll_seconds: float = 1.0):
    if (registry is None) == (checkpoint is None):
      raise ValueError("serve either a registry or one checkpoint")
    self.load, self.registry, self.checkpoint = load, registry, checkpoint
    self.name = name or (os.path.basename(os.path.normpath(checkpoint)) if checkpoint else "")
    self.poll_seconds = poll_seconds
    self.swaps = 0
    self._current: ServedModel | None = None
    self._generation: int | None = None
    self._lock = threading.Condition()
    self._stopping = threading.Event()
    self._threads: list[threading.Thread] = []
    self.on_swap: Callable[[ServedModel, ServedModel], None] | None = None

  # ------------------------------------------------------------------ lifecycle
  def start(self) -> "Deployment":
    """Loads the first version (and starts polling a registry).

    Raises:
      ValueError: the registry has no current version.
      CheckpointError: the checkpoint cannot be served.
    """
    if self.registry is None:
      self._current = self.load(self.name, self.checkpoint)
      return self
    self._generation, version = self.registry.snapshot()
    if version is None:
      raise ValueError("the registry has no current version: promote one first "
                       "(python -m serve.registry --root=... promote --name=...)")
    self._current = self.load(version["name"], version["checkpoint"])
    poller = threading.Thread(target=self._poll_loop, name="registry-poll", daemon=True)
    poller.start()
    self._threads.append(poller)
    return self

  def stop(self, timeout: float = 60.0) -> None:
    """Stops polling, then every engine once its requests are done."""
    self._stopping.set()
    with self._lock:
      current, self._current = self._current, None
      if current is not None:
        current.retired = True
    if current is not None:
      self._retire(current)
    for thread in list(self._threads):
      thread.join(timeout)

  # ------------------------------------------------------------------ requests
  def acquire(self) -> ServedModel:
    """The version new requests run on, leased until `release`.

    Raises:
      RuntimeError: the deployment is stopped (or not started).
    """
    with self._lock:
      if self._current is None:
        raise RuntimeError("no model is being served (the server is stopping)")
      self._current.leases += 1
      return self._current

  def release(self, served: ServedModel) -> None:
    with self._lock:
      served.leases -= 1
      self._lock.notify_all()

  @contextlib.contextmanager
  def lease(self) -> Iterator[ServedModel]:
    served = self.acquire()
    try:
      yield served
    finally:
      self.release(served)

  @property
  def current(self) -> ServedModel | None:
    return self._current

  # ------------------------------------------------------------------ versions
  def poll_once(self) -> bool:
    """Swaps to the registry's current version if its generation changed; True if swapped."""
    generation, version = self.registry.snapshot()
    if generation == self._generation:
      return False
    self._generation = generation  # a failed load is retried at the next change only
    served = self._current
    if version is None or served is None or version["name"] == served.name:
      return False  # names are never reused: the same name is the same checkpoint
    started = time.perf_counter()
    new = self.load(version["name"], version["checkpoint"])
    self.swap(new)
    log.warning("serving %s (was %s; loaded and warmed up in %.1f s)", new.name, served.name,
                time.perf_counter() - started)
    return True

  def swap(self, new: ServedModel) -> None:
    """New requests go to `new` from now on; the old version drains in the background."""
    with self._lock:
      if self._stopping.is_set() or self._current is None:  # stopped while `new` loaded
        old = new
      else:
        old, self._current = self._current, new
        self.swaps += 1
      old.retired = True
    if self.on_swap is not None and old is not new:
      self.on_swap(old, new)
    drain = threading.Thread(target=self._retire, args=(old,), name=f"drain-{old.name}",
                             daemon=True)
    drain.start()
    self._threads.append(drain)

  def _retire(self, served: ServedModel) -> None:
    """Waits for the last lease of `served`, then stops its engine."""
    with self._lock:
      while served.leases > 0:
        self._lock.wait()
    served.engine.stop(drain=True)

  def _poll_loop(self) -> None:
    while not self._stopping.wait(self.poll_seconds):
      try:
        self.poll_once()
      except Exception as e:  # noqa: BLE001 - a bad version must not stop the server
        log.error("registry poll: keeping %s: %s: %s",
                  self._current.name if self._current else "nothing", type(e).__name__, e)

  def models(self) -> list[dict[str, Any]]:
    """`/v1/models` entries: every registry version (the served one `current`), or the
    single checkpoint."""
    served = self._current
    name = served.name if served else None
    if self.registry is None:
      versions = [{"name": self.name, "checkpoint": self.checkpoint,
                   "created": served.created if served else time.time()}]
    else:
      versions = self.registry.versions()
    out = []
    for v in versions:
      created = v.get("created", 0)
      out.append({"id": v["name"], "object": "model",
                  "created": int(created) if isinstance(created, (int, float)) else 0,
                  "owned_by": "lmlife", "current": v["name"] == name,
                  **{k: v[k] for k in ("checkpoint", "parent", "metrics", "note") if k in v}})
    return out

  def stats(self) -> tuple[int, int, int]:
    """(queue depth, slots in use, slots) of the engine serving new requests."""
    served = self._current
    if served is None:
      return 0, 0, 0
    engine = served.engine
    return engine.queue_depth, engine.slots_in_use, engine.slots
