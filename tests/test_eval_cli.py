"""eval/cli.py: bad input ends in one `error:` line and exit code 2; --verbose adds the
traceback."""

import pytest

from eval.cli import exit_with_error


def _raise_and_exit(verbose):
  try:
    raise ValueError("data.jsonl:3: field 'gold'\n  is missing")
  except ValueError as e:
    exit_with_error(e, verbose, where="task arc_easy")


def test_one_error_line_and_exit_code_2(capsys):
  with pytest.raises(SystemExit) as e:
    _raise_and_exit(verbose=False)
  assert e.value.code == 2
  out = capsys.readouterr()
  assert out.out == ""
  assert out.err == "error: task arc_easy: data.jsonl:3: field 'gold' is missing\n"


def test_verbose_prints_the_traceback_before_the_error_line(capsys):
  with pytest.raises(SystemExit) as e:
    _raise_and_exit(verbose=True)
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("Traceback") and "_raise_and_exit" in err
  assert err.splitlines()[-1] == "error: task arc_easy: data.jsonl:3: field 'gold' is missing"
