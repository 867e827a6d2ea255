"""Every body the controller reads from the API server: lists, watch lines, and the answers to pod
patches, Event creation and access reviews.

API bodies are hostile input (a broken proxy, a hostile or buggy server). Anything that is not the
Kubernetes shape is refused whole with a BadResponse naming what was wrong, so the caller can log, count
and retry it, and the caches never see a half-checked object. Sizes are bounded while reading, before
anything is parsed: a watch line over MAX_LINE_BYTES or a body over MAX_BODY_BYTES is a TooLarge as soon
as that many bytes arrived, and one whose JSON would cost too many Python objects is a TooLarge before it
is parsed. Values are quoted with `ascii()`, cut short, so no byte from the body reaches a log line raw.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from typing import Any, Final

from ..errors import ControllerError

Obj = dict[str, Any]
WATCH_TYPES = frozenset({"ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR"})
_SHOWN = 60
MAX_LINE_BYTES: Final = 4 << 20
"""One watch event is one object: kube-apiserver refuses request bodies over 3 MiB and etcd objects over
1.5 MiB, so a real event line stays far below 4 MiB; a longer one costs at most this much to refuse."""
MAX_BODY_BYTES: Final = 32 << 20
"""A list of one node's pods (kubelet's default cap is 110, large nodes run 250) or an API answer to a
write; 32 MiB is over 128 KiB per pod, beyond real pods (a few KiB to tens)."""
MAX_OBJECT_VALUES: Final = 250_000
"""Objects, arrays and strings in one object's JSON (a watch line, a write's answer), counted from the
bytes before parsing (an overcount: brackets and quotes inside strings count too). A pod has hundreds to
a few thousand; each costs Python up to ~80 bytes (an empty object), so a parse costs at most ~20 MiB
(measured: 18 MiB for 250,000 `{}`)."""
MAX_LIST_VALUES: Final = 1_000_000
"""The same for a whole list body (a node's pods): at most ~80 MiB (measured: 76 MiB for 1,000,000 `{}`)."""


class BadResponse(ControllerError):
    """A response body that is not the shape the Kubernetes API defines."""


class TooLarge(BadResponse):
    """A body or watch line longer than its limit (the rest is never read)."""


def show(value: Any) -> str:
    """A short, escaped rendering of a hostile value for a log line."""
    text = ascii(value)
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "..."


def _values(raw: bytes | str) -> int:
    if isinstance(raw, str):
        return raw.count("{") + raw.count("[") + raw.count('"') // 2
    return raw.count(b"{") + raw.count(b"[") + raw.count(b'"') // 2


def _decode(raw: bytes | str, what: str, max_values: int = MAX_OBJECT_VALUES) -> Any:
    if _values(raw) > max_values:
        raise TooLarge(f"{what} holds more than {max_values} JSON values")
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise BadResponse(f"{what} is not JSON ({exc.__class__.__name__}): {show(raw)}") from None
    except RecursionError:
        raise BadResponse(f"{what} is nested too deeply: {show(raw)}") from None


async def bounded_lines(chunks: AsyncIterator[bytes], limit: int = MAX_LINE_BYTES) -> AsyncIterator[bytes]:
    """The lines of a stream; one longer than `limit` bytes is a TooLarge as soon as that much arrived."""
    pending = bytearray()
    async for chunk in chunks:
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            if len(pending) + end - start > limit:
                raise TooLarge(f"a watch line is longer than {limit} bytes")
            pending += chunk[start:end]
            yield bytes(pending)
            pending.clear()
            start = end + 1
        if len(pending) + len(chunk) - start > limit:
            raise TooLarge(f"a watch line is longer than {limit} bytes")
        pending += chunk[start:]
    if pending:
        yield bytes(pending)


async def bounded_body(chunks: AsyncIterator[bytes], what: str, limit: int = MAX_BODY_BYTES) -> bytes:
    """A whole body; a longer one than `limit` bytes is a TooLarge as soon as that much arrived."""
    body = bytearray()
    async for chunk in chunks:
        if len(body) + len(chunk) > limit:
            raise TooLarge(f"{what} is longer than {limit} bytes")
        body += chunk
    return bytes(body)


def _string_map(value: Any) -> bool:
    return value is None or (
        isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
    )


def check_object(obj: Any, required: Sequence[str], what: str) -> Obj:
    """`obj` as a dict whose metadata holds non-empty strings for `required`, string maps for labels and
    annotations, and dicts (if present) for spec and status."""
    if not isinstance(obj, dict):
        raise BadResponse(f"{what} is not an object: {show(obj)}")
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        raise BadResponse(f"{what} has no metadata object: {show(meta)}")
    for key in required:
        value = meta.get(key)
        if not isinstance(value, str) or not value:
            raise BadResponse(f"{what} has no metadata.{key} string: {show(value)}")
    for key in ("labels", "annotations"):
        if not _string_map(meta.get(key)):
            raise BadResponse(f"{what} metadata.{key} is not a map of strings: {show(meta.get(key))}")
    for key in ("spec", "status"):
        if obj.get(key) is not None and not isinstance(obj[key], dict):
            raise BadResponse(f"{what} {key} is not an object: {show(obj[key])}")
    return obj


def parse_list(raw: bytes | str, required: Sequence[str] = ("name", "uid", "resourceVersion")) -> (
    tuple[list[Obj], str]
):  # fmt: skip
    """A list body: (items, the list's resourceVersion); one bad item refuses the whole list, since a
    partial list would look like deletions of everything left out."""
    body = _decode(raw, "list body", MAX_LIST_VALUES)
    if not isinstance(body, dict):
        raise BadResponse(f"list body is not an object: {show(body)}")
    meta = body.get("metadata")
    version = meta.get("resourceVersion") if isinstance(meta, dict) else None
    if not isinstance(version, str) or not version:
        raise BadResponse(f"list body has no metadata.resourceVersion string: {show(meta)}")
    items = body.get("items")
    if items is None:
        items = []
    if not isinstance(items, list):
        raise BadResponse(f"list items is not an array: {show(items)}")
    return [check_object(item, required, f"list item {i}") for i, item in enumerate(items)], version


def parse_event(
    line: bytes | str, required: Sequence[str] = ("name", "uid", "resourceVersion")
) -> tuple[str, Obj]:
    """One watch line: (type, object). BOOKMARK objects need only a resourceVersion; ERROR objects are a
    Status (checked where it is read)."""
    event = _decode(line, "watch line")
    if not isinstance(event, dict):
        raise BadResponse(f"watch event is not an object: {show(event)}")
    kind, obj = event.get("type"), event.get("object")
    if kind not in WATCH_TYPES:
        raise BadResponse(f"watch event has an unknown type: {show(kind)}")
    if not isinstance(obj, dict):
        raise BadResponse(f"{kind} event object is not an object: {show(obj)}")
    if kind == "BOOKMARK":
        return kind, check_object(obj, ("resourceVersion",), "BOOKMARK object")
    if kind == "ERROR":
        return kind, obj
    return kind, check_object(obj, required, f"{kind} object")


def parse_written(raw: bytes, what: str) -> str | None:
    """The answer to a patch or create: an object with metadata; its resourceVersion, if it has one."""
    obj = check_object(_decode(raw, what), (), what)
    version = obj["metadata"].get("resourceVersion")
    return version if isinstance(version, str) and version else None


def parse_access_review(raw: bytes) -> bool:
    """The answer to a SelfSubjectAccessReview: whether it is allowed (status.allowed, a boolean)."""
    what = "SelfSubjectAccessReview answer"
    body = _decode(raw, what)
    status = body.get("status") if isinstance(body, dict) else None
    allowed = status.get("allowed") if isinstance(status, dict) else None
    if not isinstance(allowed, bool):
        raise BadResponse(f"{what} has no status.allowed boolean: {show(body)}")
    return allowed
