"""How eval's command lines end on bad input: one `error:` line on stderr, exit code 2.

  try:
    ...
  except (CheckpointError, ValueError, OSError) as e:
    exit_with_error(e, verbose=flags.verbose)

The message is folded onto one line (a cause that names a file, line or field stays
readable in a log); `--verbose` prints the traceback above it for debugging.
"""

from __future__ import annotations

import sys
import traceback
from typing import NoReturn

BAD_INPUT_EXIT_CODE = 2


def exit_with_error(cause: BaseException | str, verbose: bool = False,
                    where: str = "") -> NoReturn:
  """Prints `error: [<where>: ]<cause>` as one line on stderr and exits with code 2.

  Args:
    cause: the exception (its message is shown) or a message.
    verbose: also print the exception's traceback first.
    where: what failed, when the message does not say it (e.g. "task gsm8k").
  """
  if verbose and isinstance(cause, BaseException):
    traceback.print_exception(cause, file=sys.stderr)
  message = " ".join(str(cause).split())
  print(f"error: {where + ': ' if where else ''}{message}", file=sys.stderr, flush=True)
  sys.exit(BAD_INPUT_EXIT_CODE)
