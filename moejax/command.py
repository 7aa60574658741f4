"""What moejax's commands on a trained workdir (`moejax.evaluate`, `moejax.sample`) share:
argument parsing and the exit statuses of `moejax.main`.

    0   done.
    1   an error: its traceback is printed; a checkpoint that does not restore says so in one
        line ("moejax: ...").
    2   bad input: a flag value, a workdir without a config or checkpoint, a config value. One
        line "moejax: <message>" on stderr; `--traceback` prints the traceback before it.

As in `moejax.main`, every ValueError counts as bad input (moejax raises one, naming the field or
flag, for every setting it rejects).

Flags are parsed with argparse (`--workdir=DIR` or `--workdir DIR`), not absl: these commands
import the library next to `moejax.main`, and absl's flags are global to a process.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable, Sequence

from moejax import checkpoint

EXIT_USAGE = 2


def say(line: str) -> None:
  print(f"moejax: {line}", file=sys.stderr, flush=True)


class Parser(argparse.ArgumentParser):
  """An ArgumentParser whose errors are one line "moejax: ..." and exit status 2."""

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.add_argument("--traceback", action="store_true",
                      help="print the traceback of a bad-input error before its one line")

  def error(self, message: str):
    say(f"{message} (see --help)")
    sys.exit(EXIT_USAGE)


def run(parser: Parser, body: Callable[[argparse.Namespace], None],
        argv: Sequence[str] | None) -> int:
  """Parses `argv` (default: the process's), runs `body(args)`; returns the exit status."""
  args = parser.parse_args(argv)
  try:
    body(args)
  except ValueError as error:
    return _one_line(error, EXIT_USAGE, args.traceback)
  except checkpoint.CheckpointError as error:
    return _one_line(error, 1, args.traceback)
  return 0


def _one_line(error: Exception, status: int, with_traceback: bool) -> int:
  if with_traceback:
    traceback.print_exception(error)
  say(str(error) or type(error).__name__)
  return status
