"""The one checkpoint format (all Orbax code of the project lives here).

A checkpoint directory is `<workdir>/checkpoints/<step>/` written by an Orbax
`CheckpointManager`, with these items:

  params       the model parameters as a plain nested dict of arrays (trunk and any heads)
  train_state  {"opt_state", "step", "rng"}: everything else needed for exact resume
  data_iter    one opaque blob per process: the tf.data iterator state
  tokenizer    the SentencePiece model bytes (so a checkpoint is self-contained)
  metadata     JSON: format_version, stage, step, resolved config, model config,
               tokenizer fingerprint, parent checkpoint, and free-form extras

Orbax writes each step into a temporary directory and renames it when complete, so an
interrupted save is never listed as a step. A finalized step that fails to restore
(corrupted files) is reported and skipped in favour of the previous step.
Arrays are restored straight onto the shardings of the target (`jax.ShapeDtypeStruct` with
`sharding=`), which may belong to a different mesh than the one that saved them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Mapping

import jax
import orbax.checkpoint as ocp
from etils import epath

FORMAT_VERSION = 1
ITEMS = ("params", "train_state", "data_iter", "tokenizer", "metadata")


class CheckpointError(RuntimeError):
  """A checkpoint cannot be used (missing, unreadable, or incompatible)."""


class CheckpointSaveError(CheckpointError):
  """Writing a checkpoint failed (e.g. the disk is full); earlier steps are intact."""


# --------------------------------------------------------------------------------------
# A small handler for opaque byte blobs (tokenizer model, tf.data iterator state).
# --------------------------------------------------------------------------------------
class BlobHandler(ocp.CheckpointHandler):
  """Saves `bytes`: one shared file (primary host) or one file per process."""

  def save(self, directory: epath.Path, args: "BlobSave"):
    if args.per_process:
      (directory / f"process_{jax.process_index()}.bin").write_bytes(args.data)
    elif jax.process_index() == 0:
      (directory / "blob.bin").write_bytes(args.data)

  def restore(self, directory: epath.Path, args: "BlobRestore | None" = None) -> bytes:
    per_process = args.per_process if args is not None else False
    name = f"process_{jax.process_index()}.bin" if per_process else "blob.bin"
    path = directory / name
    if not path.exists():
      raise FileNotFoundError(f"{path} is missing")
    return path.read_bytes()


@ocp.args.register_with_handler(BlobHandler, for_save=True)
@dataclasses.dataclass
class BlobSave(ocp.args.CheckpointArgs):
  data: bytes
  per_process: bool = False


@ocp.args.register_with_handler(BlobHandler, for_restore=True)
@dataclasses.dataclass
class BlobRestore(ocp.args.CheckpointArgs):
  per_process: bool = False


def _handlers() -> dict[str, ocp.CheckpointHandler]:
  return {
      "params": ocp.StandardCheckpointHandler(),
      "train_state": ocp.StandardCheckpointHandler(),
      "data_iter": BlobHandler(),
      "tokenizer": BlobHandler(),
      "metadata": ocp.JsonCheckpointHandler(),
  }


class Checkpointer:
  """Saves and restores training checkpoints of the shared format.

  Args:
    directory: where step directories go (`<workdir>/checkpoints`); local or gs://.
    keep: number of most recent checkpoints kept (older ones are deleted).
    async_save: write arrays in a background thread while training continues.
  """

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = absolute_path(directory)
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,  # half-written steps from a crash are removed
        create=True,
    )
    self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                       item_handlers=_handlers())
    self._unreadable: set[int] = set()  # steps skipped by restore()
    self._keep = keep

  def all_steps(self) -> list[int]:
    self._mngr.reload()
    return sorted(self._mngr.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, params: Any, train_state: Any, *, metadata: Mapping[str, Any],
           tokenizer: bytes | None = None, data_state: bytes | None = None) -> None:
    """Starts an (async) save of one step; returns before arrays are on disk."""
    meta = {"format_version": FORMAT_VERSION, "step": int(step), **metadata}
    items = {
        "params": ocp.args.StandardSave(params),
        "train_state": ocp.args.StandardSave(train_state),
        "metadata": ocp.args.JsonSave(meta),
    }
    if tokenizer is not None:
      items["tokenizer"] = BlobSave(tokenizer)
    if data_state is not None:
      items["data_iter"] = BlobSave(data_state, per_process=True)
    self._unlink_symlinked_steps_to_prune(step)
    if step in self._unreadable and step in self.all_steps():
      self._mngr.delete(step)  # replace the unreadable copy skipped at restore
      self._unreadable.discard(step)
    try:
      self._mngr.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # noqa: BLE001 - e.g. a full disk; also an earlier async failure
      raise CheckpointSaveError(f"Saving checkpoint step {step} to {self.directory} failed: "
                            f"{type(e).__name__}: {e}") from e

  def _unlink_symlinked_steps_to_prune(self, new_step: int) -> None:
    """A step folder that is a symbolic link (e.g. a step linked in from another run) is
    pruned by removing the link only: Orbax would rmtree it, which fails on a link (and
    must not delete the other run's files)."""
    steps = sorted(set(self.all_steps()) | {new_step})
    to_prune = steps[:-self._keep] if self._keep else []
    unlinked = False
    for s in to_prune:
      path = os.path.join(os.fspath(self.directory), str(s))
      if os.path.islink(path):
        os.unlink(path)
        unlinked = True
    if unlinked:
      self._mngr.reload()

  def check(self) -> None:
    """Raises CheckpointError if a background save has failed (e.g. the disk is full), so
    the run stops at the step it happened instead of steps later."""
    try:
      self._mngr.check_for_errors()
    except Exception as e:  # noqa: BLE001
      raise CheckpointSaveError(f"Saving a checkpoint to {self.directory} failed: "
                            f"{type(e).__name__}: {e}") from e

  def restore(self, abstract_params: Any, abstract_train_state: Any, step: int | None = None,
              validate: Callable[[Mapping[str, Any]], None] | None = None) -> dict[str, Any]:
    """Restores the newest readable step (or `step`) onto the targets' shardings.

    `validate(metadata)` runs before any array is read; a CheckpointError it raises (e.g. a
    model config mismatch) stops the restore instead of falling back to an older step.
    A step that fails to read is skipped (never renamed or deleted: the failure may be
    transient or a config mistake); if the run later saves that step number again, the
    unreadable one is replaced.

    Returns:
      dict with keys params, train_state, metadata, data_iter (bytes or None),
      tokenizer (bytes or None), step.

    Raises:
      CheckpointError: no step could be restored; the message lists each failure.
    """
    candidates = [step] if step is not None else self.all_steps()[::-1]
    errors = []
    for s in candidates:
      try:
        return self._restore_step(s, abstract_params, abstract_train_state, validate)
      except CheckpointError:
        raise
      except Exception as e:  # corrupted files: report and fall back to the previous step
        msg = (f"checkpoint step {s} in {self.directory} is unreadable "
               f"({type(e).__name__}: {e})")
        self._unreadable.add(s)
        logging.warning("%s; trying an older step", msg)
        print(f"WARNING: {msg}; trying an older step", flush=True)
        errors.append(msg)
    raise CheckpointError(f"No restorable checkpoint in {self.directory}: " +
                          ("; ".join(errors) or "no finalized steps"))

  def _restore_step(self, step: int, abstract_params: Any, abstract_train_state: Any,
                    validate: Callable[[Mapping[str, Any]], None] | None = None
                    ) -> dict[str, Any]:
    meta = self._mngr.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
    meta = meta["metadata"]
    check_format(meta, self.directory / str(step))
    if validate is not None:
      validate(meta)
    out = self._mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params),
        train_state=ocp.args.StandardRestore(abstract_train_state)))
    result = {"params": out["params"], "train_state": out["train_state"], "metadata": meta,
              "step": step}
    for name, per_process in (("data_iter", True), ("tokenizer", False)):
      try:
        blob = self._mngr.restore(step, args=ocp.args.Composite(
            **{name: BlobRestore(per_process=per_process)}))
        result[name] = blob[name]
      except Exception:  # optional items (e.g. a run without a data iterator)
        result[name] = None
    return result

  def wait(self) -> None:
    """Blocks until any async save has been committed (CheckpointError if it failed)."""
    try:
      self._mngr.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise CheckpointSaveError(f"Saving a checkpoint to {self.directory} failed: "
                            f"{type(e).__name__}: {e}") from e

  def close(self) -> None:
    """Waits for pending saves (CheckpointSaveError if one failed), then closes."""
    try:
      self.wait()
    finally:
      self._mngr.close()


def absolute_path(path: str) -> epath.Path:
  """Orbax needs absolute paths: a local path is made absolute; URLs (gs://...) stay."""
  path = os.fspath(path)
  return epath.Path(path if "://" in path else os.path.abspath(path))


def check_format(meta: Mapping[str, Any], where: Any) -> None:
  version = meta.get("format_version")
  if version != FORMAT_VERSION:
    raise CheckpointError(f"{where}: checkpoint format_version={version!r}, this code reads "
                          f"version {FORMAT_VERSION}")


def resolve_checkpoint(path: str) -> tuple[epath.Path, int]:
  """Finds a step directory from a workdir, a checkpoints dir, or a step dir.

  `init_from` may point at any of: `runs/x` (workdir), `runs/x/checkpoints`, or
  `runs/x/checkpoints/2000`. Returns (checkpoints directory, step).
  """
  p = absolute_path(path)
  if not p.exists():
    raise CheckpointError(f"init_from={path!r}: no such directory")
  if (p / "checkpoints").is_dir():
    p = p / "checkpoints"
  if p.name.isdigit() and (p / "metadata").exists():
    return p.parent, int(p.name)
  steps = sorted(int(c.name) for c in p.iterdir() if c.name.isdigit() and c.is_dir())
  if not steps:
    raise CheckpointError(f"init_from={path!r}: no finalized checkpoint steps in {p}")
  return p, steps[-1]


def read_metadata(path: str) -> dict[str, Any]:
  """Reads the JSON metadata of the newest (or the named) checkpoint step."""
  directory, step = resolve_checkpoint(path)
  mngr = ocp.CheckpointManager(directory, item_handlers=_handlers(),
                               options=ocp.CheckpointManagerOptions(read_only=True))
  meta = mngr.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
  meta = dict(meta["metadata"])
  check_format(meta, directory / str(step))
  meta["checkpoint_path"] = str(directory / str(step))
  return meta


def load_params(path: str, abstract_params: Any,
                validate: Callable[[Mapping[str, Any]], None] | None = None
                ) -> tuple[Any, dict[str, Any], bytes | None]:
  """Restores only params (onto the target shardings), metadata and tokenizer of a step.

  Used by `init_from`: the next stage takes the trunk of an earlier stage's checkpoint.
  `validate(metadata)` runs before any array is read.
  """
  directory, step = resolve_checkpoint(path)
  mngr = ocp.CheckpointManager(directory, item_handlers=_handlers(),
                               options=ocp.CheckpointManagerOptions(read_only=True))
  meta = read_metadata(str(directory / str(step)))
  if validate is not None:
    validate(meta)
  out = mngr.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract_params)))
  try:
    tok = mngr.restore(step, args=ocp.args.Composite(tokenizer=BlobRestore()))["tokenizer"]
  except Exception:
    tok = None
  return out["params"], meta, tok


def read_tokenizer(path: str) -> bytes:
  """The SentencePiece model bytes stored in the newest (or the named) checkpoint step."""
  directory, step = resolve_checkpoint(path)
  mngr = ocp.CheckpointManager(directory, item_handlers=_handlers(),
                               options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    return mngr.restore(step, args=ocp.args.Composite(tokenizer=BlobRestore()))["tokenizer"]
  except Exception as e:  # noqa: BLE001 - any failure means the item is not there
    raise CheckpointError(f"Checkpoint {directory / str(step)} has no readable tokenizer "
                          f"({type(e).__name__}: {e})") from e
