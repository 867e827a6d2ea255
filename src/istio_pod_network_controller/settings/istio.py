"""The one translation from "what Istio would do for this pod" to our settings.

Whoever installs Istio's rules for a pod reads it in one of two ways, and so do we:

- sidecar mode, the pod still has `istio-init`: istio-iptables reads its arguments, and for each flag not
  given its environment spelling (viper: the flag name upper-cased, `-` → `_`), then the env defaults
  ISTIO_META_DNS_CAPTURE (--redirect-dns) and INVALID_DROP (--drop-invalid); the owner groups are env only.
  The proxy gid defaults to the proxy uid (`-u 1234` without `-g` exempts gid 1234). `inject` and the
  webhook read this before they remove istio-init.
- otherwise (Istio CNI mode, or a pod our rewrite already changed), Istio's CNI plugin reads the
  `istio-proxy` container wherever it sits (init containers, as a native sidecar, then containers; the last
  one wins): its runAsUser/runAsGroup are the exempt uid/gid (unset or 0: Istio's 1337, which is ours too),
  and its env ISTIO_META_DNS_CAPTURE and INVALID_DROP. In CNI mode (istio-validation) DNS capture covers
  every server, as the plugin's does (elsewhere it stays limited to the pod's nameservers, as
  istio-iptables'), and outbound port 15020 is not captured unless excludeOutboundPorts says otherwise (the
  plugin's default for that annotation).

The injector puts the status port (`status.sidecar.istio.io/port`) into istio-init's exclusions, so outside
CNI mode that annotation moves our exclusion too; Istio's CNI plugin always excludes 15020.

Precedence, highest first: the pod's annotations (Istio's and ours, the 2018 `envoy-*` included: they are
the pod's explicit word), then what this module reads from the pod, then the controller's defaults, then
Istio's defaults (istio_defaults, then build_spec's). Env values are hostile input like annotations: each
goes through its setting's strict parser (booleans accept Go's spellings, as Istio's ParseBool), and a
refusal names the container and the variable. Only literal `value:` entries can be read: istio-proxy's
`valueFrom` is what Istio's plugin reads too (an empty value: the setting stays off), while istio-init's
`valueFrom` for a setting we translate is refused (istio-iptables would see a value we cannot).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from ..errors import SpecError, shown
from . import annotations as ann
from .proxyids import ProxyIdGate, gate_annotations
from .spec import (
    HBONE_PORT,
    SETTINGS_BY_NAME,
    STATUS_PORT,
    TPROXY_MARK,
    TPROXY_ROUTE_TABLE,
    Given,
    InterceptSpec,
    build_spec,
    masked_cidrs,
)

Obj = Mapping[str, Any]
ISTIO_PROXY: Final = ann.ISTIO_PROXY_CONTAINER


@dataclass(frozen=True, slots=True)
class Flag:
    """One istio-iptables flag: its spellings, and what it is to us."""

    long: str
    short: str
    setting: str | None
    """Our setting it sets; None: no effect on the rules we install (see `fixed`)."""
    boolean: bool = False
    fixed: int | None = None
    """A value we capture with and cannot change: any other is refused."""

    @property
    def env(self) -> str:
        return self.long.upper().replace("-", "_")


ISTIO_IPTABLES_FLAGS: Final[tuple[Flag, ...]] = (
    Flag("envoy-port", "p", "outbound_port"),
    Flag("inbound-capture-port", "z", "inbound_port"),
    Flag("inbound-tunnel-port", "e", None, fixed=HBONE_PORT),
    Flag("proxy-uid", "u", "proxy_uid"),
    Flag("proxy-gid", "g", "proxy_gid"),
    Flag("istio-inbound-interception-mode", "m", "interception_mode"),
    Flag("istio-inbound-ports", "b", "include_inbound_ports"),
    Flag("istio-local-exclude-ports", "d", "exclude_inbound_ports"),
    Flag("exclude-interfaces", "c", "exclude_interfaces"),
    Flag("istio-service-cidr", "i", "include_outbound_ip_ranges"),
    Flag("istio-service-exclude-cidr", "x", "exclude_outbound_ip_ranges"),
    Flag("istio-include-outbound-ports", "q", "include_outbound_ports"),
    Flag("istio-local-outbound-ports-exclude", "o", "exclude_outbound_ports"),
    Flag("kube-virt-interfaces", "k", "reroute_virtual_interfaces"),
    Flag("istio-inbound-tproxy-mark", "t", None, fixed=TPROXY_MARK),
    Flag("istio-inbound-tproxy-route-table", "r", None, fixed=TPROXY_ROUTE_TABLE),
    Flag("redirect-dns", "", "capture_dns", boolean=True),
    Flag("capture-all-dns", "", "capture_all_dns", boolean=True),
    Flag("drop-invalid", "", "drop_invalid", boolean=True),
    Flag("dual-stack", "", None, boolean=True),
    Flag("dry-run", "n", None, boolean=True),
    Flag("trace-logging", "", None, boolean=True),
    Flag("restore-format", "f", None, boolean=True),
    Flag("iptables-probe-port", "", None),
    Flag("probe-timeout", "", None),
    Flag("skip-rule-apply", "", None, boolean=True),
    Flag("run-validation", "", None, boolean=True),
    Flag("network-namespace", "", None),
    Flag("cni-mode", "", None, boolean=True),
    Flag("host-nsenter-exec", "", None, boolean=True),
)
"""Every flag istio-iptables has (tools/istio-iptables/pkg/cmd/root.go); docs/rules.md tabulates them."""

ENV_ONLY: Final[dict[str, str]] = {
    "ISTIO_OUTBOUND_OWNER_GROUPS": "outbound_owner_groups",
    "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE": "outbound_owner_groups_exclude",
}
"""istio-iptables settings that have no flag, only a variable."""
ENV_DEFAULTS: Final[dict[str, str]] = {
    "ISTIO_META_DNS_CAPTURE": "capture_dns",
    "INVALID_DROP": "drop_invalid",
}
"""Variables (Istio's proxy metadata) that give a flag its default; the flag and its own spelling win."""
DUAL_STACK_ENV: Final = ("ISTIO_DUAL_STACK", "ISTIO_AGENT_DUAL_STACK")
"""Read and checked, no setting: ipv6=auto already captures IPv6 whenever the pod has a global address."""

ISTIO_INIT_SETTINGS: Final = tuple(
    dict.fromkeys(
        [
            *(flag.setting for flag in ISTIO_IPTABLES_FLAGS if flag.setting is not None),
            *ENV_ONLY.values(),
            *ENV_DEFAULTS.values(),
        ]
    )
)
"""Every setting istio-init's arguments and env can carry."""

READ_ENV: Final = frozenset(
    {
        *(flag.env for flag in ISTIO_IPTABLES_FLAGS if flag.setting is not None or flag.fixed is not None),
        *ENV_ONLY,
        *ENV_DEFAULTS,
        *DUAL_STACK_ENV,
    }
)
"""Every variable this module reads."""
READ_CONTAINERS: Final = (ann.ISTIO_INIT_CONTAINER, ann.ISTIO_PROXY_CONTAINER)

_BY_SPELLING: Final = {
    spelling: flag
    for flag in ISTIO_IPTABLES_FLAGS
    for spelling in ("--" + flag.long, *(("-" + flag.short,) if flag.short else ()))
}
_GO_TRUE: Final = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_GO_FALSE: Final = frozenset({"0", "f", "F", "FALSE", "false", "False"})
CIDR_SETTINGS: Final = ("include_outbound_ip_ranges", "exclude_outbound_ip_ranges")
_CIDR_ANNOTATIONS: Final = tuple(a for name in CIDR_SETTINGS for a in SETTINGS_BY_NAME[name].annotations)


def go_bool(raw: str, source: str) -> str:
    """A boolean as Go's strconv.ParseBool reads it, in the spec's spelling ("true"/"false")."""
    text = raw.strip()
    if text in _GO_TRUE:
        return "true"
    if text in _GO_FALSE:
        return "false"
    raise SpecError(source, raw, 'must be a boolean ("true" or "false"; Go\'s 1/0/t/f also work)')


# --- the pod's containers -----------------------------------------------------------------------------------


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise SpecError(where, type(value).__name__, "must be a list")
    return value


def _containers(pod: Obj) -> list[Obj]:
    """Init containers then containers, as Istio's CNI plugin walks them."""
    spec = pod.get("spec") or {}
    if not isinstance(spec, Mapping):
        raise SpecError("spec", type(spec).__name__, "must be a map")
    found = []
    for key in ("initContainers", "containers"):
        for item in _list(spec.get(key), f"spec.{key}"):
            if not isinstance(item, Mapping):
                raise SpecError(f"spec.{key}[]", type(item).__name__, "must be a map")
            found.append(item)
    return found


def _named(pod: Obj, name: str) -> Obj | None:
    """The last container of that name (Istio's plugin keeps the last istio-proxy it sees)."""
    matches = [c for c in _containers(pod) if c.get("name") == name]
    return matches[-1] if matches else None


def container_env(container: Obj, name: str) -> dict[str, str | None]:
    """variable -> its literal value, or None for a `valueFrom` entry (its value exists only at run time)."""
    env: dict[str, str | None] = {}
    for item in _list(container.get("env"), f"container {name} env"):
        if not isinstance(item, Mapping) or not isinstance(item.get("name"), str):
            raise SpecError(f"container {name} env", "", "every entry must be a map with a name")
        value = item.get("value")
        if value is None:
            env[item["name"]] = None if "valueFrom" in item else ""
        elif isinstance(value, str):
            env[item["name"]] = value
        else:
            raise SpecError(f"container {name} env {shown(item['name'])}", str(value), "must be a string")
    return env


def slim_container(container: Obj) -> Obj:
    """What this module reads of a container (for caches that keep pods small): the name, and for Istio's
    istio-init and istio-proxy their arguments, the variables read here and the security context's ids."""
    name = container.get("name", "")
    if name not in READ_CONTAINERS:
        return {"name": name}
    slim: dict[str, Any] = {"name": name}
    for key in ("command", "args"):
        if key in container:
            slim[key] = container[key]
    env = container.get("env")
    if isinstance(env, list):
        slim["env"] = [e for e in env if not isinstance(e, Mapping) or e.get("name") in READ_ENV]
    context = container.get("securityContext")
    if isinstance(context, Mapping):
        slim["securityContext"] = {k: context[k] for k in ("runAsUser", "runAsGroup") if k in context}
    elif context is not None:
        slim["securityContext"] = context
    return slim


# --- sidecar mode: istio-init ------------------------------------------------------------------------------


def parse_istio_iptables_args(args: Sequence[Any], source: str = "istio-init argument") -> dict[str, Given]:
    """istio-iptables' arguments -> {setting: Given}; flags we do not know change no rule and are skipped."""
    settings: dict[str, Given] = {}
    items = [str(a) for a in args]
    index = 0
    while index < len(items):
        item = items[index]
        index += 1
        spelling, sep, inline = item.partition("=")
        flag = _BY_SPELLING.get(spelling)
        if flag is None and len(spelling) > 2 and spelling[1] != "-" and spelling[:2] in _BY_SPELLING:
            flag, sep, inline = _BY_SPELLING[spelling[:2]], "=", item[2:]  # -p15001
        if flag is None:
            continue
        where = f"{source} --{flag.long}"
        if flag.boolean:
            value = go_bool(inline, where) if sep else "true"
        elif sep:
            value = inline
        elif index < len(items):
            value = items[index]
            index += 1
        else:
            raise SpecError(where, "", "needs a value")
        _take(settings, flag, value, where)
    return settings


def _take(settings: dict[str, Given], flag: Flag, value: str, where: str) -> None:
    if flag.fixed is not None and value.strip() and value.strip() != str(flag.fixed):
        raise SpecError(where, value, f"only {flag.fixed} is supported (our rules use it)")
    if flag.setting is not None:
        settings[flag.setting] = Given(value, where)
    elif flag.boolean and flag.long == "dual-stack":
        go_bool(value, where)


def _istio_init_env(container: Obj) -> dict[str, Given]:
    """istio-init's env: each flag's own spelling, the env-only settings, then the env defaults (lowest)."""
    env = container_env(container, ann.ISTIO_INIT_CONTAINER)
    settings: dict[str, Given] = {}

    def literal(name: str) -> str | None:
        value = env.get(name, "")
        if value is None:
            raise SpecError(
                f"container {ann.ISTIO_INIT_CONTAINER} env {name}",
                "valueFrom",
                "only a literal value can be read before the pod runs",
            )
        return value or None

    for variable, setting in ENV_DEFAULTS.items():
        value = literal(variable)
        if value is not None:
            where = f"container {ann.ISTIO_INIT_CONTAINER} env {variable}"
            settings[setting] = Given(go_bool(value, where), where)
    for variable, setting in ENV_ONLY.items():
        value = literal(variable)
        if value is not None:
            settings[setting] = Given(value, f"container {ann.ISTIO_INIT_CONTAINER} env {variable}")
    for flag in ISTIO_IPTABLES_FLAGS:
        if flag.setting is None and flag.fixed is None:
            continue
        value = literal(flag.env)
        if value is not None:
            where = f"container {ann.ISTIO_INIT_CONTAINER} env {flag.env}"
            _take(settings, flag, go_bool(value, where) if flag.boolean else value, where)
    return settings


def from_istio_init(container: Obj) -> dict[str, Given]:
    command = _list(container.get("command"), "istio-init command")
    args = _list(container.get("args"), "istio-init args")
    values = {**_istio_init_env(container), **parse_istio_iptables_args([*command, *args])}
    if "proxy_uid" in values and "proxy_gid" not in values:
        uid = values["proxy_uid"]
        values["proxy_gid"] = Given(uid.value, f"{uid.source} (the gid defaults to the uid)")
    return values


# --- CNI mode (and pods we rewrote): istio-proxy ------------------------------------------------------------


def _proxy_id(container: Obj, field: str) -> Given | None:
    context = container.get("securityContext") or {}
    if not isinstance(context, Mapping):
        raise SpecError(f"container {ISTIO_PROXY} securityContext", "", "must be a map")
    value = context.get(field)
    where = f"container {ISTIO_PROXY} securityContext.{field}"
    if value is None or value == 0:
        return None  # Istio: 1337
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(where, str(value), "must be a number")
    return Given(str(value), where)


def _from_istio_proxy(container: Obj, cni_mode: bool) -> dict[str, Given]:
    values: dict[str, Given] = {}
    for field, setting in (("runAsUser", "proxy_uid"), ("runAsGroup", "proxy_gid")):
        given = _proxy_id(container, field)
        if given is not None:
            values[setting] = given
    env = container_env(container, ISTIO_PROXY)
    for variable, setting in ENV_DEFAULTS.items():
        value = env.get(variable)
        if value:  # None (valueFrom) and "" read as Istio's plugin reads them: off
            where = f"container {ISTIO_PROXY} env {variable}"
            values[setting] = Given(go_bool(value, where), where)
    for variable in DUAL_STACK_ENV:
        if env.get(variable):
            go_bool(env[variable] or "", f"container {ISTIO_PROXY} env {variable}")
    dns = values.get("capture_dns")
    if cni_mode and dns is not None:
        values["capture_all_dns"] = Given(dns.value, f"{dns.source} (Istio CNI captures DNS to every server)")
    return values


def cni_mode(pod: Obj) -> bool:
    """Istio CNI mode: istio-validation instead of istio-init (the CNI plugin, here us, installs capture)."""
    return (
        _named(pod, ann.ISTIO_INIT_CONTAINER) is None
        and _named(pod, ann.ISTIO_VALIDATION_CONTAINER) is not None
    )


def istio_values(pod: Obj, gate: ProxyIdGate | None = None) -> dict[str, Given]:
    """{setting: Given}: what Istio's own tools would read from this pod outside its annotations; with a
    gate (--ignore-pod-overrides), without the proxy ids it does not admit."""
    istio_init = _named(pod, ann.ISTIO_INIT_CONTAINER)
    proxy = _named(pod, ISTIO_PROXY)
    if istio_init is not None:
        values = from_istio_init(istio_init)
    else:
        values = _from_istio_proxy(proxy, cni_mode(pod)) if proxy is not None else {}
    notes = annotations_of(pod)
    if ann.STATUS_PORT in notes and not cni_mode(pod):
        values["status_port"] = Given(notes[ann.STATUS_PORT], f"annotation {ann.STATUS_PORT}")
    if gate is not None:
        values = {name: given for name, given in values.items() if gate.admits(name, given.value)}
    return values


def istio_defaults(pod: Obj) -> dict[str, Given]:
    """Istio's own defaults that differ from ours for this pod; below the controller's defaults."""
    if not cni_mode(pod):
        return {}
    return {"exclude_outbound_ports": Given(str(STATUS_PORT), "Istio CNI's default excludeOutboundPorts")}


def annotations_of(pod: Obj) -> dict[str, str]:
    meta = pod.get("metadata") or {}
    notes = meta.get("annotations") if isinstance(meta, Mapping) else None
    return {str(k): str(v) for k, v in (notes or {}).items()} if isinstance(notes, Mapping) else {}


def honoured_annotations(pod: Obj, gate: ProxyIdGate | None) -> dict[str, str]:
    """The pod's annotations a reader with this gate counts (all of them without one)."""
    notes = annotations_of(pod)
    return notes if gate is None else gate_annotations(notes, gate)[0]


def ignored_overrides(pod: Obj, gate: ProxyIdGate | None) -> tuple[str, ...]:
    """What the gate made a reader ignore, in our words (the annotation key, the container field, the
    istio-init flag), never the pod's values. A pod Istio's reading refuses names only annotations here: it
    is refused as a whole anyway."""
    if gate is None:
        return ()
    ignored = [f"annotation {key}" for key in gate_annotations(annotations_of(pod), gate)[1]]
    try:
        read = istio_values(pod)
    except SpecError:
        read = {}
    ignored += [given.source for name, given in read.items() if not gate.admits(name, given.value)]
    return tuple(ignored)


def pod_spec(
    pod: Obj,
    defaults: Mapping[str, str | Given] | None = None,
    default_source: Callable[[str], str] | None = None,
    gate: ProxyIdGate | None = None,
) -> InterceptSpec:
    """The pod's spec: its annotations over what Istio reads from it, over the controller's defaults; a
    gate (--ignore-pod-overrides) drops what the pod says that it does not admit, so the defaults apply."""
    layered: dict[str, str | Given] = {**istio_defaults(pod), **(defaults or {}), **istio_values(pod, gate)}
    notes = honoured_annotations(pod, gate)
    if default_source is None:
        return build_spec(notes, layered)
    return build_spec(notes, layered, default_source)


def cidr_notices(annotations: Mapping[str, str]) -> tuple[str, ...]:
    """One sentence per CIDR annotation item whose host bits Istio (and we) mask."""
    notices = []
    for key in _CIDR_ANNOTATIONS:
        if key in annotations:
            for item, network in masked_cidrs(annotations[key], f"annotation {key}"):
                notices.append(f"annotation {key}: {item} has host bits set, read as {network}")
    return tuple(notices)


def given_cidr_notices(
    values: Mapping[str, str | Given], name_of: Callable[[str], str] = lambda name: name
) -> tuple[str, ...]:
    """The same for settings given as flags, env or istio-init arguments (for a log line or a warning)."""
    notices = []
    for setting in CIDR_SETTINGS:
        given = values.get(setting)
        if given is None:
            continue
        raw, source = (given.value, given.source) if isinstance(given, Given) else (given, name_of(setting))
        for item, network in masked_cidrs(raw, source):
            notices.append(f"{source}: {item} has host bits set, read as {network}")
    return tuple(notices)
