"""Minimal RFC 6902 JSON Patch from a pod before and after the rewrite.

The rewrite only ever changes `metadata.annotations` and top-level fields of `spec`, so the patch is one
operation per changed annotation and one per changed spec field (whole lists are replaced: a list of
containers is replaced atomically rather than element by element, which cannot misapply).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

JSON = dict[str, Any]


def pointer_escape(key: str) -> str:
    """One JSON Pointer reference token (RFC 6901): `~` -> `~0`, `/` -> `~1`."""
    return key.replace("~", "~0").replace("/", "~1")


def _map(value: Any) -> Mapping[str, Any] | None:
    return value if isinstance(value, dict) else None


def _annotation_ops(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[JSON]:
    meta_before = _map(before.get("metadata"))
    meta_after = _map(after.get("metadata")) or {}
    ann_before = _map(meta_before.get("annotations")) if meta_before is not None else None
    ann_after = _map(meta_after.get("annotations"))
    if ann_after is None or ann_after == ann_before:
        return []
    if meta_before is None:
        return [{"op": "add", "path": "/metadata", "value": {"annotations": dict(ann_after)}}]
    if ann_before is None:
        return [{"op": "add", "path": "/metadata/annotations", "value": dict(ann_after)}]
    ops: list[JSON] = []
    for key, value in ann_after.items():
        if ann_before.get(key) != value or key not in ann_before:
            op = "replace" if key in ann_before else "add"
            ops.append({"op": op, "path": f"/metadata/annotations/{pointer_escape(key)}", "value": value})
    ops += [
        {"op": "remove", "path": f"/metadata/annotations/{pointer_escape(key)}"}
        for key in ann_before
        if key not in ann_after
    ]
    return ops


def _spec_ops(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[JSON]:
    spec_before = _map(before.get("spec")) or {}
    spec_after = _map(after.get("spec")) or {}
    ops: list[JSON] = []
    for key, value in spec_after.items():
        path = f"/spec/{pointer_escape(key)}"
        if key not in spec_before:
            ops.append({"op": "add", "path": path, "value": value})
        elif spec_before[key] != value:
            ops.append({"op": "replace", "path": path, "value": value})
    ops += [
        {"op": "remove", "path": f"/spec/{pointer_escape(key)}"}
        for key in spec_before
        if key not in spec_after
    ]
    return ops


def pod_patch(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[JSON]:
    """JSON Patch turning `before` into `after` where they differ in annotations or spec fields."""
    return _annotation_ops(before, after) + _spec_ops(before, after)
