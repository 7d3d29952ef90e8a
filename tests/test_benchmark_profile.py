"""benchmarks/xla_profile.py: trace events are summed into the right categories."""

import gzip
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import xla_profile  # noqa: E402


@pytest.mark.parametrize("name, category", [
    ("ynn_fusion.117", "matmul"), ("dot.3", "matmul"), ("all-reduce.30", "collective"),
    ("all-gather-start", "collective"), ("copy_bitcast_fusion.66", "data_move"),
    ("add_pad_fusion.1", "data_move"), ("transpose_copy_fusion.32", "data_move"),
    ("multiply_add_fusion.40", "elementwise"), ("wrapped_reduce.1", "elementwise"),
    ("Rendezvous", None), ("ThunkExecutor::Execute", None), ("$api.py:2479 block_until_ready", None),
    ("PjitFunction(_train_step)", None),
])
def test_event_names_are_categorized(name, category):
  assert xla_profile.categorize(name) == category


def test_summary_is_per_step_per_device(tmp_path):
  events = [{"ph": "M", "name": "thread_name", "pid": 1, "tid": 9, "args": {"name": "python"}},
            {"ph": "X", "name": "shard_args", "dur": 9000, "pid": 1, "tid": 9},  # host
            {"ph": "X", "name": "ynn_fusion.1", "dur": 3000},
            {"ph": "X", "name": "ynn_fusion.2", "dur": 1000},
            {"ph": "X", "name": "all-reduce", "dur": 2000},
            {"ph": "X", "name": "Rendezvous", "dur": 1500},  # nested in the all-reduce
            {"ph": "X", "name": "copy_fusion", "dur": 400}]
  path = tmp_path / "t.json.gz"
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": events}, f)
  out = xla_profile.summarize(str(path), steps=2, devices=2)
  assert out == {"profile_collective_ms": 0.5, "profile_data_move_ms": 0.1,
                 "profile_matmul_ms": 1.0, "profile_busy_ms": 1.6}
