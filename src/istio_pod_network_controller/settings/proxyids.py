"""The proxy identity a pod may still name under `--ignore-pod-overrides`.

The exempt uid/gid is the one bypass a tenant gets by writing its own pod: istio-proxy's runAsUser (or
istio-init's `-u`, or our envoy-userid annotation) set to the app's uid exempts the app's traffic. Under the
gate a pod's proxy id counts only when it is one the admin, not the tenant, chose: the id Istio's injector
itself picks for the pod's namespace (pkg/kube/inject GetProxyIDs: the top of the namespace's
`openshift.io/sa.scc.uid-range`, the top of the first block of `openshift.io/sa.scc.supplemental-groups`,
which falls back to the uid range when absent; else 1337), or the controller-wide proxy uid/gid.

Namespace annotations are the cluster's (OpenShift allocates them), but are parsed as hostile input: a block
is `START/SIZE` or `START-END` in digits only, bounded; anything else is no range (Istio's fallback, 1337).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from . import annotations as ann
from .spec import PROXY_ID, Given

UID_RANGE: Final = "openshift.io/sa.scc.uid-range"
SUPPLEMENTAL_GROUPS: Final = "openshift.io/sa.scc.supplemental-groups"
PROXY_ID_SETTINGS: Final = ("proxy_uid", "proxy_gid")
MAX_ANNOTATION_LENGTH: Final = 256
MAX_BLOCKS: Final = 16
MAX_ID: Final = 2**32 - 2
"""The largest id the spec takes (2**32 - 1 is the kernel's "no id")."""
_BLOCK = re.compile(r"([0-9]{1,10})([/-])([0-9]{1,10})")
_ID = re.compile(r"[0-9]{1,10}")


def parse_block(text: str) -> tuple[int, int] | None:
    """An OpenShift id block, `1000620000/10000` (start/size) or `1000620000-1000629999` (start-end), as
    (first, last); None for anything else (an empty block, a bound past 32 bits, last before first)."""
    found = _BLOCK.fullmatch(text)
    if found is None:
        return None
    start, sep, other = int(found[1]), found[2], int(found[3])
    last = start + other - 1 if sep == "/" else other
    if last < start or last > 2**32 - 1:
        return None
    return start, last


def _top(annotations: Mapping[str, str], key: str, blocks: int) -> int | None:
    """The last id of the first block of the annotation; None when absent or not every block parses."""
    raw = annotations.get(key)
    if not isinstance(raw, str) or not raw or len(raw) > MAX_ANNOTATION_LENGTH:
        return None
    items = raw.split(",")
    if len(items) > blocks:
        return None
    parsed = [parse_block(item) for item in items]
    if parsed[0] is None or any(block is None for block in parsed):
        return None
    last = parsed[0][1]
    return last if 0 < last <= MAX_ID else None


def injector_ids(namespace_annotations: Mapping[str, str] | None) -> tuple[int, int]:
    """(uid, gid) Istio's injector runs the proxy as in a namespace with these annotations (GetProxyIDs)."""
    notes = namespace_annotations or {}
    uid = _top(notes, UID_RANGE, 1)
    groups = SUPPLEMENTAL_GROUPS if SUPPLEMENTAL_GROUPS in notes else UID_RANGE
    gid = _top(notes, groups, MAX_BLOCKS)
    return (uid or PROXY_ID, gid or PROXY_ID)


def parse_proxy_id(raw: str) -> int | None:
    """A proxy id as the spec reads it (surrounding blanks allowed), or None."""
    text = raw.strip()
    if not _ID.fullmatch(text) or not 0 < int(text) <= MAX_ID:
        return None
    return int(text)


def _configured(defaults: Mapping[str, str | Given], setting: str) -> int:
    given = defaults.get(setting)
    raw = given.value if isinstance(given, Given) else given
    return (parse_proxy_id(raw) if raw is not None else None) or PROXY_ID


@dataclass(frozen=True, slots=True)
class ProxyIdGate:
    """The proxy uids and gids a pod's own word may name while the gate is on; other values are ignored."""

    uids: frozenset[int]
    gids: frozenset[int]

    def admits(self, setting: str, raw: str) -> bool:
        """Whether a pod-given value of proxy_uid/proxy_gid counts (every other setting: not this gate's)."""
        if setting not in PROXY_ID_SETTINGS:
            return True
        value = parse_proxy_id(raw)
        return value in (self.uids if setting == "proxy_uid" else self.gids)


def controller_gate(
    namespace_annotations: Mapping[str, str] | None, defaults: Mapping[str, str | Given]
) -> ProxyIdGate:
    """The controller's gate for a pod: Istio's injector's ids for its namespace, or the controller's."""
    uid, gid = injector_ids(namespace_annotations)
    return ProxyIdGate(
        frozenset({uid, _configured(defaults, "proxy_uid")}),
        frozenset({gid, _configured(defaults, "proxy_gid")}),
    )


def waiter_gate(euid: int, egid: int, defaults: Mapping[str, str | Given]) -> ProxyIdGate:
    """The waiter's gate: it cannot read the namespace, but injection runs it as the proxy's uid/gid (on
    OpenShift the namespace's, which the gated controller admits). A pod that names another id than the
    controller admits only holds itself: the waiter proves capture with real packets, never by this gate."""
    return ProxyIdGate(
        frozenset({euid, _configured(defaults, "proxy_uid")}),
        frozenset({egid, _configured(defaults, "proxy_gid")}),
    )


_ANNOTATED_IDS: Final = {ann.ENVOY_USERID: "proxy_uid", ann.ENVOY_GROUPID: "proxy_gid"}


def gate_annotations(
    annotations: Mapping[str, str], gate: ProxyIdGate
) -> tuple[dict[str, str], tuple[str, ...]]:
    """(the annotations a gated reader honours, the keys it ignored): every annotations.GATEABLE_OVERRIDES
    key is dropped, except a proxy id the gate admits."""
    kept: dict[str, str] = {}
    ignored: list[str] = []
    for key, value in annotations.items():
        setting = _ANNOTATED_IDS.get(key)
        if key in ann.GATEABLE_OVERRIDES and (setting is None or not gate.admits(setting, value)):
            ignored.append(key)
        else:
            kept[key] = value
    return kept, tuple(ignored)
