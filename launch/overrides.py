"""Run configs by name and dotted overrides, checked before anything runs.

The sweep and pipeline launchers describe runs as (config file, {dotted field: value}) and
start each run as a subprocess with `--config=<file> --config.<field>=<value>` flags. Every
override is applied here first to the loaded, locked config, so a misspelt field or a value
of the wrong type stops the launcher before the first run with a message naming the field,
where it came from and the fields that do exist.
"""

from __future__ import annotations

import ast
import copy
import difflib
import importlib.util
import os
from typing import Any, Mapping

import ml_collections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(spec: str) -> ml_collections.ConfigDict:
  """`configs/x.py[:arg]` (relative to the repository or absolute) -> its get_config(arg)."""
  path, _, arg = spec.partition(":")
  full = path if os.path.isabs(path) else os.path.join(REPO, path)
  if not os.path.isfile(full):
    raise FileNotFoundError(f"Config file {path} does not exist")
  module_name = "launch_cfg_" + os.path.abspath(full).replace(os.sep, "_").removesuffix(".py")
  spec_ = importlib.util.spec_from_file_location(module_name, full)
  module = importlib.util.module_from_spec(spec_)
  spec_.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"Config file {path} has no get_config()")
  return module.get_config(arg or None)


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any],
                    where: str) -> ml_collections.ConfigDict:
  """A copy of `config` with each `a.b.c: value` set; unknown fields and wrong types raise.

  Raises:
    ValueError: naming `where` (e.g. "configs/ablations/lr.py point 2"), the field, and the
      existing fields of its section (closest first) or the expected type.
  """
  config = copy.deepcopy(config)
  config.lock()
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for depth, part in enumerate(parents + [leaf]):
      section = ".".join(parents[:depth]) or "<top level>"
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        close = difflib.get_close_matches(part, known, n=3)
        raise ValueError(
            f"{where}: override {key}={value!r} names a field that does not exist: no "
            f"{part!r} in {section}" + (f" (did you mean {', '.join(close)}?)" if close else "")
            + (f"; fields there: {', '.join(known)}" if known else ""))
      if depth < len(parents):
        node = node[part]
    try:
      node[leaf] = value
    except (TypeError, ValueError) as e:
      raise ValueError(f"{where}: override {key}={value!r}: {e}") from e
  return config


def flag_value(value: Any) -> str:
  """How `--config.x=<value>` spells a Python value for ml_collections' flag parser."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, (tuple, list)):
    return "(" + ",".join(flag_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return str(value)


def override_flags(overrides: Mapping[str, Any]) -> list[str]:
  return [f"--config.{k}={flag_value(v)}" for k, v in overrides.items()]


def parse_assignments(values: list[str], flag: str) -> dict[str, Any]:
  """["a.b=1", "c=x"] from the command line -> {"a.b": 1, "c": "x"} (Python literals where
  they parse, strings otherwise)."""
  out: dict[str, Any] = {}
  for item in values:
    key, sep, raw = item.partition("=")
    if not sep or not key:
      raise ValueError(f"--{flag}={item!r}: expected field=value")
    try:
      out[key] = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      out[key] = raw
  return out
