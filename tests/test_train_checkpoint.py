"""Tests for train/checkpoint.py in-process (small arrays, no model): the format round trip,
restore onto other shardings, atomicity (tmp dirs never restored), falling back over a
corrupted newest step, keep-N, format versions and `init_from` path resolution.
"""

import glob
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from model.sharding import make_mesh
from train import checkpoint as ckpt_lib


def _params(scale):
  return {"w": jnp.arange(32.0).reshape(8, 4) * scale, "norm": {"scale": jnp.ones(4) * scale}}


def _train_state(step):
  return {"step": jnp.asarray(step, jnp.int32), "opt_state": {"mu": jnp.full((8, 4), step * 0.5)},
          "rng": jnp.asarray([0, step], jnp.uint32)}


def _targets(mesh=None, spec=P()):
  """Abstract restore targets; `spec` shards the [8, 4] matrices."""
  mesh = mesh or make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  rep = NamedSharding(mesh, P())
  sds = lambda shape, dtype, s=rep: jax.ShapeDtypeStruct(shape, dtype, sharding=s)
  params = {"w": sds((8, 4), jnp.float32, NamedSharding(mesh, spec)),
            "norm": {"scale": sds((4,), jnp.float32)}}
  train_state = {"step": sds((), jnp.int32),
                 "opt_state": {"mu": sds((8, 4), jnp.float32, NamedSharding(mesh, spec))},
                 "rng": sds((2,), jnp.uint32)}
  return params, train_state


def _save_steps(directory, steps, **kwargs):
  ck = ckpt_lib.Checkpointer(directory, async_save=False, **kwargs)
  for s in steps:
    ck.save(s, _params(s), _train_state(s), metadata={"stage": "test", "model_config": {}},
            tokenizer=b"tok-bytes", data_state=f"data-{s}".encode())
  ck.wait()
  return ck


def test_round_trip_of_every_item(tmp_path):
  _save_steps(str(tmp_path), [3])
  out = ckpt_lib.Checkpointer(str(tmp_path)).restore(*_targets())
  assert out["step"] == 3
  np.testing.assert_array_equal(out["params"]["w"], _params(3)["w"])
  np.testing.assert_array_equal(out["params"]["norm"]["scale"], np.full(4, 3.0))
  np.testing.assert_array_equal(out["train_state"]["opt_state"]["mu"], np.full((8, 4), 1.5))
  assert int(out["train_state"]["step"]) == 3
  assert out["data_iter"] == b"data-3" and out["tokenizer"] == b"tok-bytes"
  assert out["metadata"]["format_version"] == ckpt_lib.FORMAT_VERSION
  assert out["metadata"]["step"] == 3 and out["metadata"]["stage"] == "test"


def test_restore_places_arrays_on_a_different_mesh(tmp_path):
  _save_steps(str(tmp_path), [1])  # saved from single-device arrays
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  out = ckpt_lib.Checkpointer(str(tmp_path)).restore(*_targets(mesh, P("fsdp", "tensor")))
  w = out["params"]["w"]
  assert w.sharding.spec == P("fsdp", "tensor") and w.sharding.mesh.shape == mesh.shape
  assert {s.data.shape for s in w.addressable_shards} == {(4, 2)}
  np.testing.assert_array_equal(w, _params(1)["w"])
  mu = out["train_state"]["opt_state"]["mu"]
  assert mu.sharding.spec == P("fsdp", "tensor")
  np.testing.assert_array_equal(mu, np.full((8, 4), 0.5))


def test_corrupted_newest_step_is_reported_and_the_previous_one_restored(tmp_path, capsys):
  _save_steps(str(tmp_path), [1, 2])
  for f in glob.glob(str(tmp_path / "2" / "params" / "**" / "d" / "*"), recursive=True):
    with open(f, "wb") as fh:
      fh.write(b"garbage" * 50)
  out = ckpt_lib.Checkpointer(str(tmp_path)).restore(*_targets())
  assert out["step"] == 1
  np.testing.assert_array_equal(out["params"]["w"], _params(1)["w"])
  printed = capsys.readouterr().out
  assert "checkpoint step 2" in printed and "unreadable" in printed


def test_a_step_with_missing_params_is_skipped(tmp_path):
  _save_steps(str(tmp_path), [1, 2])
  shutil.rmtree(tmp_path / "2" / "params")
  assert ckpt_lib.Checkpointer(str(tmp_path)).restore(*_targets())["step"] == 1


def test_after_falling_back_the_corrupted_step_can_be_saved_again(tmp_path):
  # A resumed run that fell back from corrupted step 2 to step 1 reaches step 2 again and
  # saves it: that save must not fail because the unreadable step 2 is still on disk.
  _save_steps(str(tmp_path), [1, 2])
  shutil.rmtree(tmp_path / "2" / "params")
  ck = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  assert ck.restore(*_targets())["step"] == 1
  ck.save(2, _params(20), _train_state(2), metadata={"stage": "test"})
  ck.wait()
  out = ckpt_lib.Checkpointer(str(tmp_path)).restore(*_targets())
  assert out["step"] == 2
  np.testing.assert_array_equal(out["params"]["w"], _params(20)["w"])


def test_half_written_tmp_directory_is_never_restored(tmp_path):
  _save_steps(str(tmp_path), [1, 2])
  # What a crash in the middle of saving step 3 leaves behind: Orbax's tmp name, complete
  # enough to be readable (if it were picked, step 3's values would come back).
  tmp_dir = tmp_path / "3.orbax-checkpoint-tmp-1234567890"
  _save_steps(str(tmp_path / "other"), [3])
  shutil.copytree(tmp_path / "other" / "3", tmp_dir)
  ck = ckpt_lib.Checkpointer(str(tmp_path))
  assert ck.all_steps() == [1, 2]
  out = ck.restore(*_targets())
  assert out["step"] == 2
  np.testing.assert_array_equal(out["params"]["w"], _params(2)["w"])


def test_only_the_newest_checkpoints_are_kept(tmp_path):
  ck = _save_steps(str(tmp_path), [1, 2, 3, 4], keep=2)
  assert ck.all_steps() == [3, 4]
  assert sorted(n for n in os.listdir(tmp_path) if n.isdigit()) == ["3", "4"]


def test_nothing_to_restore_and_wrong_format_version_are_errors(tmp_path):
  with pytest.raises(ckpt_lib.CheckpointError, match="no finalized steps"):
    ckpt_lib.Checkpointer(str(tmp_path / "empty")).restore(*_targets())
  ck = ckpt_lib.Checkpointer(str(tmp_path / "v0"), async_save=False)
  ck.save(1, _params(1), _train_state(1), metadata={"format_version": 0})
  ck.wait()
  with pytest.raises(ckpt_lib.CheckpointError, match="format_version=0"):
    ck.restore(*_targets())


def test_init_from_accepts_a_workdir_checkpoints_dir_or_step_dir(tmp_path):
  _save_steps(str(tmp_path / "run" / "checkpoints"), [5, 7])
  ckdir = str(tmp_path / "run" / "checkpoints")
  for path, step in [(tmp_path / "run", 7), (tmp_path / "run" / "checkpoints", 7),
                     (tmp_path / "run" / "checkpoints" / "5", 5)]:
    directory, found = ckpt_lib.resolve_checkpoint(str(path))
    assert (str(directory), found) == (ckdir, step)
  params, meta, tok = ckpt_lib.load_params(str(tmp_path / "run"), _targets()[0])
  np.testing.assert_array_equal(params["w"], _params(7)["w"])
  assert meta["checkpoint_path"] == os.path.join(ckdir, "7") and tok == b"tok-bytes"
  with pytest.raises(ckpt_lib.CheckpointError, match="no such directory"):
    ckpt_lib.resolve_checkpoint(str(tmp_path / "missing"))
  with pytest.raises(ckpt_lib.CheckpointError, match="no finalized checkpoint steps"):
    os.makedirs(tmp_path / "bare")
    ckpt_lib.resolve_checkpoint(str(tmp_path / "bare"))


def test_a_relative_directory_saves_and_restores(tmp_path, monkeypatch):
  # Orbax refuses relative paths; the README's commands use --workdir=runs/...
  monkeypatch.chdir(tmp_path)
  _save_steps("runs/x/checkpoints", [1])
  ckpt = ckpt_lib.Checkpointer("runs/x/checkpoints")
  assert ckpt.all_steps() == [1]
  assert str(ckpt.directory) == str(tmp_path / "runs/x/checkpoints")
  assert ckpt_lib.resolve_checkpoint("runs/x") == (ckpt.directory, 1)
  ckpt.close()
