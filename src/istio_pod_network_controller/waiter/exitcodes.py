"""The waiter's exit codes: each failure class has its own, so a crash-looping init container says why."""

from __future__ import annotations

from typing import Final

CAPTURED: Final = 0
"""Capture proven by the probe (or accepted from the annotation where that is allowed)."""
INTERNAL: Final = 1
"""An unexpected error (reported in one line, never as a traceback)."""
USAGE: Final = 2
"""Invalid command line or flag/environment value (click's own usage errors use 2 as well)."""
BAD_FILE: Final = 3
"""The downward-API annotations file exists but cannot be read or parsed."""
BAD_ANNOTATION: Final = 4
"""A pod annotation holds a value the controller refuses, so capture will never be installed."""
PROBE_UNAVAILABLE: Final = 5
"""No probe can prove capture for this pod's configuration: it captures traffic (and --trust-annotation is
not given), or --require-probe was given."""
TIMEOUT: Final = 124
"""Capture not confirmed within --timeout (the same code as coreutils `timeout`)."""
INTERRUPTED: Final = 130
"""SIGINT."""

TABLE: Final = (
    (CAPTURED, "traffic capture confirmed"),
    (INTERNAL, "unexpected internal error"),
    (USAGE, "invalid flags or flag/environment values"),
    (BAD_FILE, "annotations file unreadable or not parseable"),
    (BAD_ANNOTATION, "a pod annotation holds an invalid value"),
    (
        PROBE_UNAVAILABLE,
        "no probe can prove capture for this pod (without --trust-annotation, or with --require-probe)",
    ),
    (TIMEOUT, "capture not confirmed before --timeout"),
    (INTERRUPTED, "interrupted"),
)


def describe() -> str:
    """One line per code, for --help."""
    return "\n".join(f"{code:>4}  {text}" for code, text in TABLE)
