"""Tests for model/sharding.py: mesh shapes, rules and logical -> mesh specs (8 fake devices)."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from model import sharding


def test_conftest_gives_eight_fake_cpu_devices():
  assert jax.device_count() == 8
  assert {d.platform for d in jax.devices()} == {"cpu"}


@pytest.mark.parametrize("shape,devices,expected", [
    ({"data": -1}, 8, (8, 1, 1)),
    ({"data": 2, "fsdp": -1, "tensor": 2}, 8, (2, 2, 2)),
    ({"data": 1, "fsdp": 1, "tensor": 1}, 1, (1, 1, 1)),
    ((2, 1, -1), 4, (2, 1, 2)),
])
def test_resolve_mesh_shape_fills_minus_one(shape, devices, expected):
  assert sharding.resolve_mesh_shape(shape, devices) == expected


def test_mesh_that_does_not_match_the_device_count_is_an_error_naming_both():
  with pytest.raises(ValueError, match=r"needs 3 devices but 8 are available"):
    sharding.make_mesh({"data": 3, "fsdp": 1, "tensor": 1})
  with pytest.raises(ValueError, match=r"cannot fill 8 devices.*not divisible by 3"):
    sharding.make_mesh({"data": 3, "fsdp": -1, "tensor": 1})
  with pytest.raises(ValueError, match="unknown axes.*model"):
    sharding.make_mesh({"data": 2, "model": 4})
  with pytest.raises(ValueError, match="at most one of them -1"):
    sharding.resolve_mesh_shape({"data": -1, "fsdp": -1}, 8)


def test_make_mesh_over_a_subset_of_devices():
  mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 1}, jax.devices()[2:4])
  assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 1}
  assert list(mesh.devices.flat) == jax.devices()[2:4]
  full = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": -1})
  assert dict(full.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert sorted(d.id for d in full.devices.flat) == list(range(8))


def test_rules_map_logical_names_to_mesh_axes():
  rules = sharding.normalize_rules({"batch": ["data", "fsdp"], "embed": "fsdp", "mlp": None})
  assert dict(rules)["batch"] == ("data", "fsdp")  # a list in a config means "both axes"
  assert sharding.logical_to_spec(("embed", "mlp"), rules) == P("fsdp", None)
  assert sharding.logical_to_spec(("embed", "heads", "head_dim"), sharding.DEFAULT_RULES) == \
      P("fsdp", "tensor", None)
  assert sharding.logical_to_spec(("layers", None, "vocab"), sharding.DEFAULT_RULES) == \
      P(None, None, "tensor")
  with pytest.raises(ValueError, match="embedding"):
    sharding.normalize_rules({"embedding": "fsdp"})
  with pytest.raises(ValueError, match="model"):
    sharding.normalize_rules({"embed": "model"})


def test_batch_parallel_size_multiplies_the_batch_axes():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  assert sharding.batch_parallel_size(mesh) == 4
  assert sharding.batch_parallel_size(mesh, (("batch", "data"),)) == 2
  assert sharding.batch_parallel_size(mesh, (("batch", None),)) == 1
