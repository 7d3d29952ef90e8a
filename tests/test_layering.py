"""The import contracts in `.importlinter` hold: the project layers (DESIGN.md section 3),
configs importing data and model only, and data/ layered with its leaf readers at the bottom.

import-linter builds the graph with grimp, which counts function-local imports too, so a
lazy import cannot hide an upward arrow.
"""

import os
import subprocess
import sys

import grimp

from conftest import REPO_ROOT

_LINT = ("import sys; from importlinter.cli import lint_imports; "
         "sys.exit(lint_imports(config_filename='.importlinter', no_cache=True, no_logo=True))")


def test_import_contracts_are_kept():
  # A fresh interpreter in the repository root, so the graph is of this checkout's packages.
  env = {**os.environ, "PYTHONPATH": REPO_ROOT}
  result = subprocess.run([sys.executable, "-c", _LINT], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stdout + result.stderr


def test_function_local_imports_are_in_the_graph():
  # data.tokenized imports tensorflow only inside a function: the contracts see such imports.
  graph = grimp.build_graph("data", include_external_packages=True)
  assert "tensorflow" in graph.find_modules_directly_imported_by("data.tokenized")
