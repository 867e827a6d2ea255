"""Parse the kubelet's downward-API annotations file (or a JSON object) into a dict.

The kubelet writes one `key="value"` line per annotation with the value quoted by Go's %q, so the
unquoting below follows Go's escape rules. Used by the waiter and by `rules --annotations`; it must stay
import-light (stdlib only) because the waiter imports it on its start-up path.
"""

from __future__ import annotations

import json
import re
from typing import Final

from ..errors import DownwardAPIError

_LINE: Final = re.compile(r'(?P<key>[^=\s"]+)="(?P<value>(?:[^"\\]|\\.)*)"')
_ESCAPE: Final = re.compile(r'\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|[0-7]{3}|[abfnrtv\\"\'])')
_SIMPLE: Final = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}
MAX_FILE_BYTES: Final = 1 << 20
"""The API server caps all annotations of an object at 256 KiB; anything far larger is not a pod's file."""


def _unescape(match: re.Match[str]) -> str:
    code = match.group(1)
    if code[0] in "xuU":
        return chr(int(code[1:], 16))
    if code[0].isdigit():
        return chr(int(code, 8))
    return _SIMPLE.get(code, code)


def _unquote(body: str, line_no: int) -> str:
    rest = _ESCAPE.sub("", body)
    if "\\" in rest:
        raise DownwardAPIError(f"line {line_no}: invalid escape sequence in value")
    text = _ESCAPE.sub(_unescape, body)
    # Go writes astral characters literally or as \U; JSON-style surrogate pairs (\ud83d\ude00) get joined.
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def parse_annotations(text: str) -> dict[str, str]:
    """`key="value"` lines (blank lines ignored) or a JSON object of strings."""
    if len(text) > MAX_FILE_BYTES:
        raise DownwardAPIError(f"file is larger than {MAX_FILE_BYTES} bytes")
    if text.lstrip().startswith("{"):
        return _parse_json(text)
    result: dict[str, str] = {}
    for line_no, line in enumerate(text.split("\n"), start=1):  # not splitlines(): U+0085 is no line end
        if not line.strip():
            continue
        match = _LINE.fullmatch(line.strip())
        if match is None:
            raise DownwardAPIError(f'line {line_no}: expected key="value", got {line[:80]!r}')
        result[match.group("key")] = _unquote(match.group("value"), line_no)
    return result


def _parse_json(text: str) -> dict[str, str]:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise DownwardAPIError(f"invalid JSON: {exc}") from None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        raise DownwardAPIError("JSON annotations must be an object of string values")
    return data


def read_annotations(path: str) -> dict[str, str]:
    """Read and parse the file; OSError and UnicodeDecodeError become DownwardAPIError."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
        return parse_annotations(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise DownwardAPIError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise DownwardAPIError(f"{path}: {exc.strerror or exc}") from None
