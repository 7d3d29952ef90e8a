"""The model registry: named versions of checkpoints, the one being served, and its history.

  python -m serve.registry --root=runs/registry register --name=v0 --checkpoint=runs/sft
  python -m serve.registry --root=runs/registry promote --name=v0
  python -m serve.registry --root=runs/registry list        # one line per version, * = current
  python -m serve.registry --root=runs/registry rollback    # back to the previous current

A registry is a directory:

  versions/<name>/version.json   name, checkpoint (the step directory, absolute), parent (the
                                 version it was made from, or null), created (unix time),
                                 metrics (the evaluation that admitted it), lineage (read
                                 from the checkpoint's metadata: stage, step, model class,
                                 the chain of parent checkpoints, the LoRA base if any), note
  current.json                   current (name or null), previous (the earlier currents, a
                                 stack rollback pops), generation, history (every promote /
                                 rollback with its time)
  .lock                          held while a writer reads, changes and replaces a file

Nothing is copied: a version names a checkpoint step directory of the shared format
(train/checkpoint.py), so the checkpoint must stay where it is. Every file is written to a
temporary file and renamed over the old one (`os.replace`), so a reader (the server polls
`generation()` about once a second) sees the old or the new file, never half of one.
Writers (the CLI, the continual loop) serialise on `.lock` (`fcntl.flock`).

`generation()` grows by one on every promote and rollback; the server reloads when it
changes. Bad input to the CLI (an unknown version, a duplicate name, a missing checkpoint,
rollback with no earlier version) ends in one `error:` line and exit code 2.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import tempfile
import time
from typing import Any, Iterator, Sequence

from absl import app, flags

from eval.cli import exit_with_error
from train import checkpoint as ckpt_lib
from train import entry, quiet

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_LINEAGE = 32  # parent checkpoints followed (a guard against a cycle of links)
COMMANDS = ("register", "list", "promote", "rollback")


class RegistryError(ValueError):
  """A request the registry refuses (unknown or duplicate name, missing checkpoint, ...)."""


def write_json(path: str, value: Any) -> None:
  """Writes `value` as JSON to `path` atomically (a temporary file in the same folder,
  flushed to disk, then renamed over `path`)."""
  folder = os.path.dirname(path)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(value, f, indent=1, sort_keys=True)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


def lineage(checkpoint: str) -> dict[str, Any]:
  """What a checkpoint's metadata says about where it came from.

  Returns {"checkpoint" (the resolved step directory), "stage", "step", "model_class",
  "parents": [{"path", "step", "stage"}, ...] nearest first (an unreadable one ends the
  chain with "unreadable": true), "lora": {rank, alpha, targets, base} or None}.

  Raises:
    RegistryError: no readable checkpoint at `checkpoint`.
  """
  try:
    meta = ckpt_lib.read_metadata(checkpoint)
  except Exception as e:  # noqa: BLE001 - missing, not a checkpoint, unreadable
    raise RegistryError(f"no readable checkpoint at {checkpoint!r} "
                        f"({type(e).__name__}: {e})") from e
  parents, seen = [], {meta["checkpoint_path"]}
  parent = meta.get("parent")
  while parent and len(parents) < MAX_LINEAGE:
    record = {k: parent.get(k) for k in ("path", "step", "stage")}
    parents.append(record)
    path = parent.get("path")
    if not path or path in seen:
      break
    seen.add(path)
    try:
      parent = ckpt_lib.read_metadata(path).get("parent")
    except Exception:  # noqa: BLE001 - e.g. a deleted run or an hf: directory
      record["unreadable"] = True
      break
  lora = meta.get("lora")
  return {"checkpoint": meta["checkpoint_path"], "stage": meta.get("stage"),
          "step": meta.get("step"), "model_class": meta.get("model_class"),
          "parents": parents,
          "lora": ({k: lora.get(k) for k in ("rank", "alpha", "targets", "base")}
                   if lora else None)}


class Registry:
  """Versions of served models in a directory (module doc).

  Args:
    root: the registry directory (created if missing).
  """

  def __init__(self, root: str):
    self.root = os.path.abspath(os.path.expanduser(root))
    os.makedirs(os.path.join(self.root, "versions"), exist_ok=True)

  # ------------------------------------------------------------------ files
  def _version_path(self, name: str) -> str:
    return os.path.join(self.root, "versions", name, "version.json")

  def _state(self) -> dict[str, Any]:
    path = os.path.join(self.root, "current.json")
    if not os.path.exists(path):
      return {"current": None, "previous": [], "generation": 0, "history": []}
    with open(path) as f:
      return json.load(f)

  @contextlib.contextmanager
  def _locked(self) -> Iterator[None]:
    with open(os.path.join(self.root, ".lock"), "a") as f:
      fcntl.flock(f, fcntl.LOCK_EX)
      try:
        yield
      finally:
        fcntl.flock(f, fcntl.LOCK_UN)

  # ------------------------------------------------------------------ reading
  def versions(self) -> list[dict]:
    """Every version, oldest first."""
    folder = os.path.join(self.root, "versions")
    out = []
    for name in os.listdir(folder):
      if os.path.exists(self._version_path(name)):
        out.append(self.get(name))
    return sorted(out, key=lambda v: (v["created"], v["name"]))

  def get(self, name: str) -> dict:
    """The version named `name` (RegistryError if there is none)."""
    if not NAME_RE.fullmatch(name or ""):
      raise RegistryError(f"no version {name!r} in {self.root}")
    try:
      with open(self._version_path(name)) as f:
        return json.load(f)
    except FileNotFoundError:
      raise RegistryError(f"no version {name!r} in {self.root}") from None

  def current(self) -> dict | None:
    """The version being served, or None before the first promote."""
    name = self._state()["current"]
    return self.get(name) if name else None

  def generation(self) -> int:
    """Grows by one on every promote and rollback (0 before the first)."""
    return int(self._state()["generation"])

  def snapshot(self) -> tuple[int, dict | None]:
    """(generation, current version) read from one file: a consistent pair for a poller."""
    state = self._state()
    return int(state["generation"]), (self.get(state["current"]) if state["current"] else None)

  # ------------------------------------------------------------------ writing
  def register(self, name: str, checkpoint: str, *, parent: str | None = None,
               metrics: dict | None = None, note: str = "") -> dict:
    """Adds a version (not served until promoted); returns it.

    Raises:
      RegistryError: a name that is taken or not [A-Za-z0-9._-] (64 at most), a missing or
        unreadable checkpoint, or an unknown parent version.
    """
    if not NAME_RE.fullmatch(name or ""):
      raise RegistryError(f"version name {name!r}: use letters, digits, '.', '_' or '-' "
                          "(64 at most, not starting with '.', '_' or '-')")
    if parent is not None:
      self.get(parent)
    info = lineage(checkpoint)  # before the lock: reading metadata takes a moment
    with self._locked():
      folder = os.path.dirname(self._version_path(name))
      try:
        os.makedirs(folder)
      except FileExistsError:
        raise RegistryError(f"version {name!r} already exists in {self.root}") from None
      version = {"name": name, "checkpoint": info.pop("checkpoint"), "parent": parent,
                 "created": time.time(), "metrics": dict(metrics or {}), "lineage": info,
                 "note": note}
      write_json(self._version_path(name), version)
    return version

  def promote(self, name: str) -> dict:
    """Makes `name` the current version (the one before is kept for rollback)."""
    with self._locked():
      version = self.get(name)
      state = self._state()
      if state["current"] == name:
        raise RegistryError(f"version {name!r} is already current")
      if state["current"]:
        state["previous"].append(state["current"])
      self._commit(state, name, "promote")
    return version

  def rollback(self) -> dict:
    """Makes the previous current version current again; returns it."""
    with self._locked():
      state = self._state()
      if not state["previous"]:
        raise RegistryError(f"nothing to roll back to in {self.root} (current: "
                            f"{state['current']}, no earlier version was current)")
      name = state["previous"].pop()
      version = self.get(name)
      self._commit(state, name, "rollback")
    return version

  def _commit(self, state: dict[str, Any], name: str, action: str) -> None:
    checkpoint = self.get(name)["checkpoint"]
    if not ckpt_lib.absolute_path(checkpoint).exists():
      raise RegistryError(f"version {name!r}: its checkpoint {checkpoint} is gone; it cannot "
                          "be served")
    state["generation"] = int(state["generation"]) + 1
    state["history"].append({"action": action, "name": name, "from": state["current"],
                             "time": time.time(), "generation": state["generation"]})
    state["current"] = name
    write_json(os.path.join(self.root, "current.json"), state)


# ---------------------------------------------------------------------------- CLI
def describe(version: dict, current: bool) -> str:
  """One `list` line: `* name  stage step N  parent P  created  checkpoint  note`."""
  lin = version.get("lineage", {})
  created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(version["created"]))
  lora = f" lora r{lin['lora']['rank']}" if lin.get("lora") else ""
  parts = [f"{'*' if current else ' '} {version['name']}", f"{lin.get('stage')}{lora} step "
           f"{lin.get('step')}", f"parent {version.get('parent') or '-'}", created,
           version["checkpoint"]]
  if version.get("note"):
    parts.append(version["note"])
  return "  ".join(parts)


def run_command(command: str, registry: Registry, name: str, checkpoint: str,
                parent: str, note: str) -> list[str]:
  """One CLI command; returns the lines to print (RegistryError on bad input)."""
  if command == "list":
    current = (registry.current() or {}).get("name")
    return [describe(v, v["name"] == current) for v in registry.versions()]
  if command == "rollback":
    v = registry.rollback()
    return [f"rolled back to {v['name']} (generation {registry.generation()})"]
  if not name:
    raise RegistryError(f"{command} needs --name")
  if command == "promote":
    registry.promote(name)
    return [f"promoted {name} (generation {registry.generation()})"]
  if not checkpoint:
    raise RegistryError("register needs --checkpoint")
  v = registry.register(name, checkpoint, parent=parent or None, note=note)
  return [f"registered {name}: {v['checkpoint']} ({v['lineage']['stage']}, step "
          f"{v['lineage']['step']})"]


def main(argv: Sequence[str]) -> None:
  FLAGS = flags.FLAGS
  quiet.set_library_logs(False)
  try:
    if len(argv) != 2 or argv[1] not in COMMANDS:
      raise RegistryError(f"expected one command of {list(COMMANDS)}, got {argv[1:]}")
    if not FLAGS.root:
      raise RegistryError("--root is required")
    lines = run_command(argv[1], Registry(FLAGS.root), FLAGS.name, FLAGS.checkpoint,
                        FLAGS.parent, FLAGS.note)
  except (RegistryError, OSError) as e:
    exit_with_error(e)
  for line in lines:
    print(line)


def define_flags() -> None:
  flags.DEFINE_string("root", "", "The registry directory.")
  flags.DEFINE_string("name", "", "Version name (register, promote).")
  flags.DEFINE_string("checkpoint", "", "Checkpoint of the version (register): a workdir, "
                      "its checkpoints/ directory or a step directory.")
  flags.DEFINE_string("parent", "", "The version this one was made from (register).")
  flags.DEFINE_string("note", "", "Free text kept with the version (register).")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=entry.parse_flags)  # a bad flag: one error line, exit 2
