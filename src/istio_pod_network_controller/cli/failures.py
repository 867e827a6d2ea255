"""One line on stderr and a distinct exit code for every mistake a user can make (cli/exitcodes.py).

A traceback is a bug: the commands catch the project's own errors and the OS errors their inputs can cause,
and end here.
"""

from __future__ import annotations

from typing import NoReturn

import click

from ..dataplane.discovery import PodNetnsNotFound
from ..errors import ControllerError, DownwardAPIError, HostNetnsRefused, SpecError
from . import exitcodes

_PERMISSION = ("Permission denied", "Operation not permitted")
_MISSING = ("No such file", "No such process")


def fail(message: str, code: int) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    raise SystemExit(code)


def code_of(exc: Exception) -> int:
    """The exit code of one of our errors: by type, else by the OS error its message carries."""
    if isinstance(exc, SpecError | DownwardAPIError | HostNetnsRefused):
        return exitcodes.USAGE
    if isinstance(exc, PodNetnsNotFound):
        return exitcodes.NOT_FOUND
    text = str(exc)
    if any(marker in text for marker in _PERMISSION):
        return exitcodes.PERMISSION
    if any(marker in text for marker in _MISSING):
        return exitcodes.NOT_FOUND
    return exitcodes.DATAPLANE if isinstance(exc, ControllerError) else exitcodes.USAGE


def fail_with(exc: Exception, hint: str = "") -> NoReturn:
    fail(f"{exc}{hint}", code_of(exc))
