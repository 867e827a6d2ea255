"""Just enough of the Kubernetes protobuf encoding to read the one body kubectl only sends that way.

`kubectl auth can-i` POSTs its SelfSubjectAccessReview as `application/vnd.kubernetes.protobuf` (and accepts a
JSON answer). The envelope is the magic `k8s\\0` followed by a `runtime.Unknown` message whose field 2 holds
the encoded object.
"""

from __future__ import annotations

from typing import Any

MEDIA_TYPE = "application/vnd.kubernetes.protobuf"
_MAGIC = b"k8s\x00"
#: SelfSubjectAccessReview.spec(2).resourceAttributes(1) field numbers -> JSON names.
_RESOURCE_ATTRIBUTES = {
    1: "namespace",
    2: "verb",
    3: "group",
    4: "version",
    5: "resource",
    6: "subresource",
    7: "name",
}


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def fields(data: bytes) -> dict[int, bytes]:
    """Length-delimited fields of a message by number (the last occurrence wins); other types skipped."""
    out: dict[int, bytes] = {}
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(data, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(data, pos)
            out[number] = data[pos : pos + length]
            pos += length
        else:
            raise ValueError(f"unsupported wire type {wire}")
    if pos > len(data):
        raise ValueError("truncated message")
    return out


def decode_access_review(body: bytes) -> dict[str, Any]:
    """A SelfSubjectAccessReview in protobuf -> its JSON form (resource attributes only)."""
    if not body.startswith(_MAGIC):
        raise ValueError("not a Kubernetes protobuf envelope")
    raw = fields(body[len(_MAGIC) :]).get(2, b"")
    spec = fields(raw).get(2, b"")
    attrs = fields(fields(spec).get(1, b""))
    resource_attributes = {
        name: attrs[num].decode() for num, name in _RESOURCE_ATTRIBUTES.items() if num in attrs
    }
    return {
        "kind": "SelfSubjectAccessReview",
        "apiVersion": "authorization.k8s.io/v1",
        "metadata": {},
        "spec": {"resourceAttributes": resource_attributes},
    }
