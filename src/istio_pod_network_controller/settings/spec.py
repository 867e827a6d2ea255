"""InterceptSpec: what to capture in one pod, parsed strictly from annotations, controller and Istio defaults.

Precedence, highest first: the pod's annotations, the controller-wide defaults (flags/env, given here as raw
strings so they are validated by the very same parsers), then built-in defaults equal to Istio sidecar mode.
Every refusal is a SpecError naming the annotation (or flag) and the bad value.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from enum import StrEnum
from typing import Final, Literal, TypeAlias

from ..errors import SpecError, shown
from . import annotations as ann

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
Wildcard: TypeAlias = Literal["*"]
WILDCARD: Final[Wildcard] = "*"

OUTBOUND_CAPTURE_PORT: Final = 15001
INBOUND_CAPTURE_PORT: Final = 15006
PROBE_PORT: Final = 15002
HBONE_PORT: Final = 15008
DNS_CAPTURE_PORT: Final = 15053
PROXY_ID: Final = 1337
TPROXY_MARK: Final = 1337
TPROXY_ROUTE_TABLE: Final = 133
STATUS_PORT: Final = 15020
"""The agent's status port (merged metrics), Istio's `status.sidecar.istio.io/port` default."""
ALWAYS_EXCLUDED_INBOUND: Final = (15021, 15090)
"""Health and Envoy's Prometheus port: with the status port, never captured when inbound capture is `*`."""

MAX_VALUE_LENGTH: Final = 4096
MAX_LIST_ITEMS: Final = 256
_IFNAME = re.compile(r"[A-Za-z0-9_.@][A-Za-z0-9_.@-]{0,14}")
_CIDR_TEXT = re.compile(r"[0-9A-Fa-f:.]{2,45}(/[0-9]{1,3})?")
_BLANKS: Final = " \t\r\n"
_DIGITS = re.compile(r"[0-9]{1,10}")
MAX_OWNER_GROUPS_INCLUDE: Final = 49
"""Listed owner groups are one rule of `-m owner ! --gid-owner G` matches, five words each; iptables-restore
parses at most 254 words a rule, so 49 is the most that loads (Istio checks 64, but its own iptables-restore
refuses more than 49 the same way)."""


class InterceptionMode(StrEnum):
    REDIRECT = "REDIRECT"
    TPROXY = "TPROXY"
    NONE = "NONE"


class IPv6Policy(StrEnum):
    """What to do with the pod's IPv6 traffic.

    AUTO captures IPv6 when the pod has a global IPv6 address and otherwise blocks new IPv6 TCP/UDP both
    ways (except on lo), so IPv6 is never a silent way around the mesh; CAPTURE and BLOCK force either.
    """

    AUTO = "auto"
    CAPTURE = "capture"
    BLOCK = "block"


@dataclass(frozen=True, slots=True)
class InterceptSpec:
    """Everything the rule renderers need for one pod; immutable and hashable."""

    mode: InterceptionMode = InterceptionMode.REDIRECT
    outbound_port: int = OUTBOUND_CAPTURE_PORT
    inbound_port: int = INBOUND_CAPTURE_PORT
    proxy_uid: int = PROXY_ID
    proxy_gid: int = PROXY_ID
    include_inbound_ports: Wildcard | tuple[int, ...] = WILDCARD
    exclude_inbound_ports: tuple[int, ...] = ()
    include_outbound_ip_ranges: Wildcard | tuple[IPNetwork, ...] = WILDCARD
    exclude_outbound_ip_ranges: tuple[IPNetwork, ...] = ()
    include_outbound_ports: tuple[int, ...] = ()
    exclude_outbound_ports: tuple[int, ...] = ()
    exclude_interfaces: tuple[str, ...] = ()
    reroute_virtual_interfaces: tuple[str, ...] = ()
    capture_dns: bool = False
    capture_all_dns: bool = False
    ipv6: IPv6Policy = IPv6Policy.AUTO
    drop_invalid: bool = False
    outbound_owner_groups: Wildcard | tuple[int, ...] = WILDCARD
    """Groups whose outbound traffic is captured ("*": every group), Istio's ISTIO_OUTBOUND_OWNER_GROUPS."""
    outbound_owner_groups_exclude: tuple[int, ...] = ()
    """With `*` only (as in Istio): groups whose outbound traffic is never captured."""
    status_port: int = STATUS_PORT
    """Excluded from inbound capture with ALWAYS_EXCLUDED_INBOUND; 0: none (Istio's status port is off)."""
    dns_servers: tuple[IPAddress, ...] | None = None
    """The pod's resolv.conf nameservers, found at apply time (not a setting); None: not known (yet)."""

    @property
    def intercepts(self) -> bool:
        return self.mode is not InterceptionMode.NONE

    @property
    def inbound_always_excluded(self) -> tuple[int, ...]:
        """The proxy's own ports returned before a `*` inbound capture: status port, health, Prometheus."""
        return (*((self.status_port,) if self.status_port else ()), *ALWAYS_EXCLUDED_INBOUND)

    @property
    def captures_inbound(self) -> bool:
        return self.include_inbound_ports != ()

    @property
    def captures_outbound(self) -> bool:
        return self.include_outbound_ip_ranges != () or bool(self.include_outbound_ports)

    def with_ipv6(self, capture: bool) -> InterceptSpec:
        """Resolve AUTO once the pod's addresses are known."""
        return replace(self, ipv6=IPv6Policy.CAPTURE if capture else IPv6Policy.BLOCK)

    @property
    def dns_capture_everywhere(self) -> bool:
        """Capture DNS to every server: asked for, or the pod's nameservers are not known (yet)."""
        return self.capture_dns and (self.capture_all_dns or self.dns_servers is None)

    def with_dns_servers(self, servers: tuple[IPAddress, ...] | None) -> InterceptSpec:
        """The pod's resolv.conf nameservers, which Istio's sidecar capture is limited to."""
        return replace(self, dns_servers=servers)

    def fingerprint(self) -> str:
        """A short stable digest, recorded on the pod so a changed spec can be told from an unchanged one.

        The nameservers are a fact of the pod found at apply time, not configuration: left out.
        """
        text = ";".join(
            f"{f.name}={_canonical(getattr(self, f.name))}" for f in fields(self) if f.name != "dns_servers"
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def describe(self) -> dict[str, str]:
        """Field -> value in annotation syntax, for logs, Events and `rules render --explain`."""
        return {f.name: _canonical(getattr(self, f.name)) for f in fields(self)}


def _canonical(value: object) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# --- parsers: (raw text, source name) -> typed value -------------------------------------------------------


def _checked_length(raw: str, source: str) -> str:
    """Bound the value and refuse every non-printable character except surrounding blanks (YAML's `|\\n`)."""
    if len(raw) > MAX_VALUE_LENGTH:
        raise SpecError(source, raw, f"longer than {MAX_VALUE_LENGTH} characters")
    text = raw.strip(_BLANKS)
    if not all(char.isprintable() for char in text):
        raise SpecError(source, raw, "contains a control character, line or paragraph separator")
    return text


def _items(raw: str, source: str) -> list[str]:
    text = _checked_length(raw, source)
    if not text:
        return []
    items = [item.strip(" ") for item in text.split(",")]
    if any(not item for item in items):
        raise SpecError(source, raw, "empty item in comma-separated list")
    if len(items) > MAX_LIST_ITEMS:
        raise SpecError(source, raw, f"more than {MAX_LIST_ITEMS} items")
    return list(dict.fromkeys(items))


def _port(item: str, source: str, raw: str) -> int:
    if not _DIGITS.fullmatch(item) or not 1 <= int(item) <= 65535:
        raise SpecError(source, raw, f"port {shown(item)} is not a number from 1 to 65535")
    return int(item)


def parse_port(raw: str, source: str) -> int:
    text = _checked_length(raw, source)
    if not _DIGITS.fullmatch(text) or not 1 <= int(text) <= 65535:
        raise SpecError(source, raw, "a port must be a number from 1 to 65535")
    return int(text)


def parse_ports(raw: str, source: str) -> tuple[int, ...]:
    return tuple(dict.fromkeys(_port(item, source, raw) for item in _items(raw, source)))


def parse_ports_or_wildcard(raw: str, source: str) -> Wildcard | tuple[int, ...]:
    if raw.strip(_BLANKS) == WILDCARD:
        return WILDCARD
    return parse_ports(raw, source)


def parse_id(raw: str, source: str) -> int:
    text = _checked_length(raw, source)
    if not _DIGITS.fullmatch(text) or int(text) > 2**32 - 2:
        raise SpecError(source, raw, "an id must be a number from 1 to 4294967294")
    if int(text) == 0:
        raise SpecError(source, raw, "id 0 would exempt all root-owned traffic from capture")
    return int(text)


def _gid(item: str, source: str, raw: str) -> int:
    if not _DIGITS.fullmatch(item) or int(item) > 2**32 - 2:
        raise SpecError(
            source,
            raw,
            f"group {shown(item)} is not a numeric gid from 0 to 4294967294 (a group name cannot be "
            "resolved from outside the pod)",
        )
    return int(item)


def parse_groups(raw: str, source: str) -> tuple[int, ...]:
    """Numeric gids only: Istio also takes names, but they resolve in whichever /etc/group the tool reads
    (the proxy image's, or the node's in CNI mode), never reliably the app's; refusing is failing closed."""
    return tuple(dict.fromkeys(_gid(item, source, raw) for item in _items(raw, source)))


def parse_groups_or_wildcard(raw: str, source: str) -> Wildcard | tuple[int, ...]:
    """`*` or a list of at most 49 gids (what one iptables rule holds); empty is `*`, as Istio reads an empty
    variable."""
    if _checked_length(raw, source) in {WILDCARD, ""}:
        return WILDCARD
    groups = parse_groups(raw, source)
    if len(groups) > MAX_OWNER_GROUPS_INCLUDE:
        raise SpecError(
            source, raw, f"more than {MAX_OWNER_GROUPS_INCLUDE} groups: one iptables rule cannot match more"
        )
    return groups


def _cidr(item: str, source: str, raw: str) -> IPNetwork:
    """One CIDR in its canonical typed form: no IPv6 scope (`%...`), no netmask notation; host bits are
    masked as Istio masks them (`10.96.0.2/24` is `10.96.0.0/24`; masked_cidrs() tells which were)."""
    if "%" in item:
        raise SpecError(source, raw, f"{shown(item)}: an IPv6 scope (%zone) is not allowed in a CIDR range")
    if not _CIDR_TEXT.fullmatch(item):
        raise SpecError(source, raw, f"{shown(item)} is not a CIDR range (address[/prefix length])")
    try:
        network = ipaddress.ip_network(item, strict=False)
    except ValueError as exc:
        raise SpecError(source, raw, f"{shown(item)} is not a CIDR range: {exc}") from None
    if isinstance(network, ipaddress.IPv6Network) and network.network_address.scope_id is not None:
        raise SpecError(source, raw, f"{shown(item)}: an IPv6 scope is not allowed in a CIDR range")
    return network


def parse_cidrs(raw: str, source: str) -> tuple[IPNetwork, ...]:
    return tuple(dict.fromkeys(_cidr(item, source, raw) for item in _items(raw, source)))


def masked_cidrs(raw: str, source: str) -> tuple[tuple[str, IPNetwork], ...]:
    """(item as written, network it means) for each CIDR of the list whose host bits were masked."""
    if raw.strip(_BLANKS) == WILDCARD:
        return ()
    masked = []
    for item in _items(raw, source):
        network = _cidr(item, source, raw)
        if ipaddress.ip_interface(item).ip != network.network_address:
            masked.append((item, network))
    return tuple(masked)


def parse_cidrs_or_wildcard(raw: str, source: str) -> Wildcard | tuple[IPNetwork, ...]:
    if raw.strip(_BLANKS) == WILDCARD:
        return WILDCARD
    return parse_cidrs(raw, source)


def parse_status_port(raw: str, source: str) -> int:
    """A port, or 0: Istio's status port turned off (nothing of its own excluded from inbound capture)."""
    text = _checked_length(raw, source)
    if text == "0":
        return 0
    return parse_port(raw, source)


def parse_interfaces(raw: str, source: str) -> tuple[str, ...]:
    """Interface names as the kernel allows them (dev_valid_name: 1-15 bytes, no `/`, `:` or whitespace, not
    `.`/`..`), narrowed to the ASCII letters, digits and `_ . @ -` that real CNI interfaces use, never led by
    `-` (a tool would read it as an option)."""
    names = _items(raw, source)
    for name in names:
        if not _IFNAME.fullmatch(name) or name in {".", ".."}:
            raise SpecError(
                source,
                raw,
                f"{shown(name)} is not a Linux interface name (1-15 of A-Z a-z 0-9 _ . @ -, not led by -)",
            )
    return tuple(names)


def parse_mode(raw: str, source: str) -> InterceptionMode:
    text = _checked_length(raw, source)
    try:
        return InterceptionMode(text)
    except ValueError:
        raise SpecError(source, raw, "must be one of REDIRECT, TPROXY, NONE") from None


def parse_bool(raw: str, source: str) -> bool:
    text = _checked_length(raw, source)
    if text not in {"true", "false"}:
        raise SpecError(source, raw, 'must be "true" or "false"')
    return text == "true"


def parse_ipv6(raw: str, source: str) -> IPv6Policy:
    text = _checked_length(raw, source)
    try:
        return IPv6Policy(text)
    except ValueError:
        raise SpecError(source, raw, "must be one of auto, capture, block") from None


@dataclass(frozen=True, slots=True)
class Setting:
    """One configurable knob: the spec fields it sets, the pod annotations that carry it, its parser."""

    name: str
    targets: tuple[str, ...]
    annotations: tuple[str, ...]
    parse: Callable[[str, str], object]
    help: str


SETTINGS: Final[tuple[Setting, ...]] = (
    Setting("interception_mode", ("mode",), (ann.INTERCEPTION_MODE,), parse_mode, "REDIRECT | TPROXY | NONE"),
    Setting("envoy_port", ("outbound_port", "inbound_port"), (ann.ENVOY_PORT,), parse_port,
            "2018: one capture port for inbound and outbound"),
    Setting("outbound_port", ("outbound_port",), (), parse_port, "outbound capture port (15001)"),
    Setting("inbound_port", ("inbound_port",), (), parse_port, "inbound capture port (15006)"),
    Setting("proxy_uid", ("proxy_uid",), (ann.ENVOY_USERID,), parse_id, "uid of the proxy (1337)"),
    Setting("proxy_gid", ("proxy_gid",), (ann.ENVOY_GROUPID,), parse_id, "gid of the proxy (1337)"),
    Setting("include_inbound_ports", ("include_inbound_ports",), (ann.INCLUDE_INBOUND_PORTS,),
            parse_ports_or_wildcard, "inbound ports to capture: * | list | empty for none"),
    Setting("exclude_inbound_ports", ("exclude_inbound_ports",), (ann.EXCLUDE_INBOUND_PORTS,), parse_ports,
            "inbound ports never captured"),
    Setting("include_outbound_ip_ranges", ("include_outbound_ip_ranges",), (ann.INCLUDE_OUTBOUND_IP_RANGES,),
            parse_cidrs_or_wildcard, "outbound CIDRs to capture: * | list | empty for none"),
    Setting("exclude_outbound_ip_ranges", ("exclude_outbound_ip_ranges",), (ann.EXCLUDE_OUTBOUND_IP_RANGES,),
            parse_cidrs, "outbound CIDRs never captured"),
    Setting("include_outbound_ports", ("include_outbound_ports",), (ann.INCLUDE_OUTBOUND_PORTS,), parse_ports,
            "outbound ports captured whatever the destination"),
    Setting("exclude_outbound_ports", ("exclude_outbound_ports",), (ann.EXCLUDE_OUTBOUND_PORTS,), parse_ports,
            "outbound ports never captured"),
    Setting("exclude_interfaces", ("exclude_interfaces",), (ann.EXCLUDE_INTERFACES,), parse_interfaces,
            "interfaces whose traffic is never captured"),
    Setting("reroute_virtual_interfaces", ("reroute_virtual_interfaces",),
            (ann.REROUTE_VIRTUAL_INTERFACES, ann.KUBEVIRT_INTERFACES), parse_interfaces,
            "virtual interfaces whose inbound traffic is treated as outbound (KubeVirt)"),
    Setting("capture_dns", ("capture_dns",), (ann.CAPTURE_DNS,), parse_bool,
            "capture DNS to port 15053 (to the pod's resolv.conf nameservers, as Istio's sidecar)"),
    Setting("capture_all_dns", ("capture_all_dns",), (), parse_bool,
            "DNS capture to every server, not only resolv.conf's (Istio --capture-all-dns)"),
    Setting("ipv6", ("ipv6",), (ann.IPV6,), parse_ipv6, "auto | capture | block"),
    Setting("drop_invalid", ("drop_invalid",), (ann.DROP_INVALID,), parse_bool,
            "drop inbound packets conntrack finds INVALID (Istio --drop-invalid / INVALID_DROP)"),
    Setting("outbound_owner_groups", ("outbound_owner_groups",), (ann.OUTBOUND_OWNER_GROUPS,),
            parse_groups_or_wildcard,
            "gids whose outbound traffic is captured: * | list (Istio ISTIO_OUTBOUND_OWNER_GROUPS)"),
    Setting("outbound_owner_groups_exclude", ("outbound_owner_groups_exclude",),
            (ann.OUTBOUND_OWNER_GROUPS_EXCLUDE,), parse_groups,
            "gids whose outbound traffic is never captured, with * (ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE)"),
    Setting("status_port", ("status_port",), (), parse_status_port,
            "Istio's status port, excluded from inbound capture (15020; 0: none)"),
)  # fmt: skip
SETTINGS_BY_NAME: Final = {s.name: s for s in SETTINGS}
SPEC_ANNOTATIONS: Final = frozenset(key for s in SETTINGS for key in s.annotations)


@dataclass(frozen=True, slots=True)
class Given:
    """A controller-default value as it was given, with where it came from (a flag, its 2018 spelling or a
    variable), so a refusal names the exact input the operator wrote."""

    value: str
    source: str


def build_spec(
    annotations: Mapping[str, str],
    defaults: Mapping[str, str | Given] | None = None,
    default_source: Callable[[str], str] = lambda name: "--" + name.replace("_", "-"),
) -> InterceptSpec:
    """Parse the pod's annotations over controller defaults (keyed by Setting.name).

    A default is a Given (it names its own source) or a raw string named by `default_source`. A setting
    given both as a 2018 combined value (envoy_port) and a modern one takes the more specific modern value
    from the same layer; a pod annotation always beats any controller default.
    """
    defaults = defaults or {}
    unknown = set(defaults) - set(SETTINGS_BY_NAME)
    if unknown:
        raise ValueError(f"unknown default settings: {sorted(unknown)}")
    values: dict[str, object] = {}
    for layer in ("defaults", "annotations"):
        for setting in SETTINGS:
            raw, source = _lookup(setting, layer, annotations, defaults, default_source)
            if raw is None:
                continue
            parsed = setting.parse(raw, source)
            for target in setting.targets:
                values[target] = parsed
    return InterceptSpec(**values)  # type: ignore[arg-type]


def _lookup(
    setting: Setting,
    layer: str,
    annotations: Mapping[str, str],
    defaults: Mapping[str, str | Given],
    default_source: Callable[[str], str],
) -> tuple[str | None, str]:
    if layer == "defaults":
        given = defaults.get(setting.name)
        if isinstance(given, Given):
            return given.value, given.source
        return given, default_source(setting.name)
    for key in setting.annotations:
        if key in annotations:
            return annotations[key], f"annotation {key}"
    return None, ""
