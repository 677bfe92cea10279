"""What the console scripts (``same-register``, ``same-apply``) share: exit codes, the version, the
one-line error format for bad command lines, and warnings printed as one line each.

Every error a user can cause ends the program with exit code 2 and one line on stderr:
``PROG: error: <what>: <problem>: <what to do>``; a bad command line is no exception.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from . import __version__

EXIT_BAD_INPUT = 2
EXIT_CANCELLED = 130


class CommandLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line in the project's format (exit code 2), with a
    ``--version`` option."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument("--version", action="version", version=f"%(prog)s {__version__}")

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: command line: {message}: see '{self.prog} --help'\n")


def print_warnings_as_lines(program: str):
    """A ``warnings.showwarning`` replacement printing ``PROGRAM: warning: MESSAGE`` on stderr."""
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"{program}: warning: {message}", file=sys.stderr)

    return show
