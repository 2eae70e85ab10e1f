"""What vlab's command lines share: a parser whose usage errors are one line and exit code 2,
and the one-line form of an error.

Bad input is reported as one line without a traceback. `vlab` (vlab/cli.py) and
`python -m vlab.migrate` (vlab/migration/command.py) both build on this module, so neither
command line imports the other. Only the standard library here: building a parser stays cheap.
"""
from __future__ import annotations

import argparse

from vlab._errors import UsageError


class UsageParser(argparse.ArgumentParser):
    """argparse, but a usage error raises `UsageError` (one line; the caller exits 2) instead of
    printing the usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sub = self.prog.removeprefix("vlab").strip()
        raise UsageError(f"{sub}: {message}" if sub else message)


def one_line(e: BaseException) -> str:
    """The error's text on one line (its type's name if it has no text)."""
    return " ".join(str(e).split()) or type(e).__name__
