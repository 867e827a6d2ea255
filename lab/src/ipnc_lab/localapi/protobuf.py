"""Just enough of the Kubernetes protobuf encoding to read the bodies kubectl only sends that way.

kubectl's typed clients (`auth can-i`, `create namespace`) POST `application/vnd.kubernetes.protobuf` and
accept a JSON answer. The envelope is the magic `k8s\\0` followed by a `runtime.Unknown` message: field 1 its
TypeMeta (apiVersion 1, kind 2), field 2 the encoded object. Only objects whose content is all metadata
(Namespace) or resource attributes (SelfSubjectAccessReview) are decoded; anything else stays 415.
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


def fields(data: bytes) -> dict[int, list[bytes]]:
    """Length-delimited fields of a message by number, in order; other wire types are skipped."""
    out: dict[int, list[bytes]] = {}
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
            out.setdefault(number, []).append(data[pos : pos + length])
            pos += length
        else:
            raise ValueError(f"unsupported wire type {wire}")
    if pos > len(data):
        raise ValueError("truncated message")
    return out


def _one(msg: dict[int, list[bytes]], number: int) -> bytes:
    values = msg.get(number)
    return values[-1] if values else b""


def _string_map(entries: list[bytes]) -> dict[str, str]:
    out = {}
    for entry in entries:
        kv = fields(entry)
        out[_one(kv, 1).decode()] = _one(kv, 2).decode()
    return out


def _metadata(data: bytes) -> dict[str, Any]:
    msg = fields(data)
    meta: dict[str, Any] = {}
    for number, name in ((1, "name"), (2, "generateName"), (3, "namespace")):
        if number in msg:
            meta[name] = _one(msg, number).decode()
    for number, name in ((11, "labels"), (12, "annotations")):
        if number in msg:
            meta[name] = _string_map(msg[number])
    return meta


def decode(body: bytes) -> dict[str, Any]:
    """Decode an enveloped Namespace or SelfSubjectAccessReview into its JSON form."""
    if not body.startswith(_MAGIC):
        raise ValueError("not a Kubernetes protobuf envelope")
    envelope = fields(body[len(_MAGIC) :])
    type_meta = fields(_one(envelope, 1))
    api_version, kind = _one(type_meta, 1).decode(), _one(type_meta, 2).decode()
    obj = fields(_one(envelope, 2))
    if kind == "Namespace":
        return {"apiVersion": api_version, "kind": kind, "metadata": _metadata(_one(obj, 1))}
    if kind == "SelfSubjectAccessReview":
        attrs = fields(_one(fields(_one(obj, 2)), 1))
        resource_attributes = {
            name: _one(attrs, num).decode() for num, name in _RESOURCE_ATTRIBUTES.items() if num in attrs
        }
        return {
            "apiVersion": api_version,
            "kind": kind,
            "metadata": {},
            "spec": {"resourceAttributes": resource_attributes},
        }
    raise ValueError(f"protobuf bodies of kind {kind!r} are not supported, send JSON")
