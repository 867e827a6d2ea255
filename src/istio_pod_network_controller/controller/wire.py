"""The shapes the informer accepts from the API server: a list body, a watch line, an object's metadata.

API bodies are hostile input (a broken proxy, a hostile or buggy server). Anything that is not the
Kubernetes shape is refused whole with a BadResponse naming what was wrong, so the informer can log, count
and retry it, and the caches never see a half-checked object. Values are quoted with `ascii()`, cut short,
so no byte from the body reaches a log line raw.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ..errors import ControllerError

Obj = dict[str, Any]
WATCH_TYPES = frozenset({"ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR"})
_SHOWN = 60


class BadResponse(ControllerError):
    """A response body that is not the shape the Kubernetes API defines."""


def show(value: Any) -> str:
    """A short, escaped rendering of a hostile value for a log line."""
    text = ascii(value)
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "..."


def _decode(raw: bytes | str, what: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise BadResponse(f"{what} is not JSON ({exc.__class__.__name__}): {show(raw)}") from None


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
    body = _decode(raw, "list body")
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


def parse_event(line: str, required: Sequence[str] = ("name", "uid", "resourceVersion")) -> tuple[str, Obj]:
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
