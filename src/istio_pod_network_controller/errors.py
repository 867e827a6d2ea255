"""The project's own exceptions: each says what was wrong in words an operator can act on."""

from __future__ import annotations


class ControllerError(Exception):
    """Base of every error this package raises on purpose."""


class SpecError(ControllerError, ValueError):
    """A setting (annotation, flag or environment variable) holds a value we refuse."""

    def __init__(self, source: str, value: str, reason: str) -> None:
        self.source = source
        self.value = value
        self.reason = reason
        shown = value if len(value) <= 80 else value[:77] + "..."
        super().__init__(f"{source}: invalid value {shown!r}: {reason}")


class DownwardAPIError(ControllerError, ValueError):
    """The downward-API annotations file cannot be parsed."""


class DataplaneError(ControllerError):
    """Reading or changing a network namespace failed."""


class HostNetnsRefused(DataplaneError):
    """The target is the node's own network namespace, which we never rewrite without an override."""
