"""The project's own exceptions, one hierarchy under ControllerError, each with two faces.

- `exc.public`: one sentence of our own words, safe for a tenant-readable Event or API response. It never
  holds tool output, file contents, host PIDs or netns inodes, and a tenant's value only escaped and cut
  (`shown`).
- `exc.detail` (and `str(exc)`): the operator's log line, which may add tool output, paths and PIDs, but
  also with control characters escaped and its length bounded, so a hostile value cannot forge log lines.

A raiser that passes only a message gets the class's fixed `PUBLIC` sentence as its public face: the safe
default is the one that needs no thought.
"""

from __future__ import annotations

from typing import ClassVar, Final

SHOWN_LENGTH: Final = 80
"""Escaped characters of a tenant value that a refusal shows."""
DETAIL_LENGTH: Final = 2000
"""Escaped characters of tool output or other detail that a log line keeps."""


def shown(value: str, limit: int = SHOWN_LENGTH) -> str:
    """`value` quoted like repr(), every non-printable character escaped, cut to about `limit` characters.

    repr() already escapes control characters, NUL, U+0085, U+2028/9 and the bidi controls (all are not
    `isprintable()`); the cut counts escaped characters so a value of escapes cannot grow the output, and
    its note stands outside the quotes so it cannot read as part of the value.
    """
    body, rest = _escape(value, limit, quotes=True)
    return f"'{body}'" + (f" (cut, {rest} more characters)" if rest else "")


def escaped(text: str, limit: int = DETAIL_LENGTH, *, quotes: bool = False) -> str:
    """`text` with every non-printable character (newlines included) escaped, cut to `limit` characters.

    `quotes`: also escape `'` and backslashes, for text shown between single quotes.
    """
    body, rest = _escape(text, limit, quotes=quotes)
    return body + (f"...[{rest} more characters]" if rest else "")


def _escape(text: str, limit: int, *, quotes: bool) -> tuple[str, int]:
    """The escaped text up to `limit` characters, and how many characters of `text` did not fit."""
    pieces: list[str] = []
    size = 0
    for index, char in enumerate(text):
        if not char.isprintable():
            piece = repr(char)[1:-1]
        elif quotes and char in "'\\":
            piece = "\\" + char
        else:
            piece = char
        if size + len(piece) > limit:
            return "".join(pieces), len(text) - index
        pieces.append(piece)
        size += len(piece)
    return "".join(pieces), 0


class ControllerError(Exception):
    """Base of every error this package raises on purpose."""

    PUBLIC: ClassVar[str] = "the controller could not complete this operation; details are in its log"

    def __init__(self, detail: str, *, public: str | None = None) -> None:
        self.detail = escaped(detail)
        self.public = public if public is not None else self.PUBLIC
        super().__init__(self.detail)


def public_message(exc: BaseException) -> str:
    """The Event-safe sentence for any exception: ours for ControllerError, a fixed one for the rest."""
    if isinstance(exc, ControllerError):
        return exc.public
    return f"the controller hit an unexpected {type(exc).__name__}; details are in its log"


class SpecError(ControllerError, ValueError):
    """A setting (annotation, flag or environment variable) holds a value we refuse.

    Its public face names the setting and shows the value escaped and cut; `value` keeps the raw text for
    callers that compare it, and is never formatted anywhere as it is.
    """

    def __init__(self, source: str, value: str, reason: str) -> None:
        self.source = source
        self.value = value
        self.reason = reason
        message = f"{escaped(source, SHOWN_LENGTH)}: invalid value {shown(value)}: {escaped(reason, 400)}"
        super().__init__(message, public=message)


class RefusedInput(ControllerError, ValueError):
    """A malformed object refused in our own words: the message names only structure (paths, types, our
    own names), never a tenant's value, so it is its own public sentence (escaped and cut all the same)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, public=escaped(message, 400))


class DownwardAPIError(ControllerError, ValueError):
    """The downward-API annotations file cannot be parsed."""

    PUBLIC = "the pod's downward-API annotations file cannot be parsed"


class DataplaneError(ControllerError):
    """Reading or changing a network namespace failed."""

    PUBLIC = "the capture rules could not be read or changed; details are in the controller's log"


class ToolError(DataplaneError):
    """A rule tool (iptables-*, nft, ip) failed; its output stays in `detail`, never in `public`."""

    def __init__(self, tool: str, detail: str, *, public: str | None = None) -> None:
        self.tool = tool
        super().__init__(
            f"{tool}: {detail}",
            public=public or f"{tool} refused the change; the tool's output is in the controller's log",
        )


class UnsafeRuleText(DataplaneError):
    """Rule text about to reach a tool holds a construct the renderers never produce (an include, say)."""

    PUBLIC = "the controller refused to run rule text it did not produce; details are in its log"


class RenderInvariantError(ControllerError, AssertionError):
    """A renderer produced a token outside its grammar: a bug in the renderer, never loaded as a rule."""

    PUBLIC = "the controller's rule renderer refused its own output (a bug); details are in its log"


class HostNetnsRefused(DataplaneError):
    """The target is the node's own network namespace, which we never rewrite without an override."""

    PUBLIC = "refused: the target is the node's own network namespace"
