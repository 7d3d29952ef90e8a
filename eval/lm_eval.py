"""lm-eval's own command line, with the "lmlife" model registered.

  python -m eval.lm_eval_tasks --out=runs/lm_eval_tasks        # offline task YAMLs
  HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 python -m eval.lm_eval run --model lmlife \
      --model_args checkpoint=runs/chain/base --batch_size 32 \
      --include_path runs/lm_eval_tasks --tasks lmlife_lambada_openai_cloze,lmlife_gsm8k \
      --limit 200 --log_samples --output_path runs/chain/base/lm_eval

Every argument is lm-eval's (`python -m eval.lm_eval --help`), plus `--verbose`; this
module imports eval.lm_eval_adapter, whose `@register_model("lmlife")` adds the model to
lm-eval's registry, and then calls lm-eval's CLI entry point
(`lm_eval.__main__.cli_evaluate`). A bad checkpoint or model_args ends in one `error:`
line and exit code 2 (`--verbose` adds the traceback).

Why a wrapper rather than the bare `lm_eval` console script: lm-eval 0.4.13 finds models
only in its registry, which is filled from the fixed MODEL_MAPPING of lm_eval/models
(`lm_eval.api.registry.get_model` looks the `--model` name up there). It reads no
`lm_eval.models` entry points (importlib.metadata is used only for lazy placeholders it
registers itself), `--model` takes a registered name, not "module:Class", and
`--include_path` indexes task YAMLs without importing Python from them (a `!function`
in a task named by `--tasks` is imported only when the task is built, after the model;
only a task given as a YAML file path is built earlier, a trick too fragile to rely on).
So nothing a package can declare makes the bare command see a third-party model; a
process that has imported the adapter can (this one, or any script calling
`lm_eval.simple_evaluate`).
"""

from __future__ import annotations

import sys

from lm_eval.__main__ import cli_evaluate

import eval.lm_eval_adapter  # noqa: F401 - registers the "lmlife" model with lm-eval
from eval.cli import exit_with_error
from train.checkpoint import CheckpointError


def main() -> None:
  """lm-eval's CLI on sys.argv, with the lmlife model available."""
  verbose = "--verbose" in sys.argv
  sys.argv = [a for a in sys.argv if a != "--verbose"]
  try:
    cli_evaluate()
  except (CheckpointError, ValueError) as e:
    exit_with_error(e, verbose)


if __name__ == "__main__":
  main()
