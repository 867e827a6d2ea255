"""Explain one pod, purely: selected and why, which spec from where, its mark, its controller, what next.

Selection and spec come from the controller's own code (controller/selection.py, settings/spec.py,
decision.candidate_digests); the controller's defaults are read from its pod's arguments and environment, so
the verdict uses the settings that node's controller really has.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from ..controller import selection
from ..controller.config import LEGACY_SPEC_FLAGS
from ..controller.decision import candidate_digests
from ..errors import SpecError
from ..settings import annotations as ann
from ..settings.istio import honoured_annotations, istio_defaults, istio_values, pod_spec
from ..settings.proxyids import ProxyIdGate, controller_gate
from ..settings.spec import SETTINGS, Given, InterceptSpec
from . import DEFAULT_CONTROLLER_NAMESPACE

Obj = Mapping[str, Any]
_UNPRINTABLE = re.compile(r"[^\x20-\x7e\u00a0-\uffff]")

REASONS: dict[str, str] = {
    selection.HOST_NETWORK: "hostNetwork pod: the node's own network is never changed",
    selection.DELETING: "the pod is being deleted",
    selection.FINISHED: "the pod has finished (Succeeded or Failed)",
    selection.EXCLUDED_NAMESPACE: "its namespace is in the controller's --excluded-namespaces",
    selection.OPENSHIFT_DEPLOYER: "an OpenShift deployer pod",
    selection.OPENSHIFT_BUILD: "an OpenShift build pod",
    selection.INTERCEPTION_NONE: "sidecar.istio.io/interceptionMode is NONE",
    selection.LEGACY_ANNOTATION: f'the pod has {ann.LEGACY_INITIALIZE}: "true" (2018 selection)',
    selection.LEGACY_NAMESPACE: f'its namespace has {ann.LEGACY_INITIALIZE}: "true" (2018 selection)',
    selection.LEGACY_OPT_OUT: f'the pod sets {ann.LEGACY_INITIALIZE} to something other than "true"',
    selection.INJECTED: f"injected sidecar with the {ann.WAITER_CONTAINER} init container",
    selection.INJECT_DISABLED: f'{ann.SIDECAR_INJECT} is "false"',
    selection.ISTIO_INIT_PRESENT: "Istio's own istio-init is still in the pod: it installs capture itself",
    selection.NO_WAITER: f"an injected sidecar but no {ann.WAITER_CONTAINER} init container",
    selection.NOT_MESH: "neither an injected sidecar nor the 2018 initialize annotation",
}
SELECT_ADVICE: dict[str, str] = {
    selection.NOT_MESH: f"inject the sidecar with the waiter (docs/install.md), or annotate the pod or its "
    f'namespace {ann.LEGACY_INITIALIZE}="true"',
    selection.NO_WAITER: "re-inject: istioctl kube-inject ... | istio-pod-network-controller inject -f -, "
    "or enable the webhook (docs/install.md)",
    selection.ISTIO_INIT_PRESENT: "nothing to do if Istio's istio-init is wanted; otherwise re-inject with "
    "the waiter (docs/install.md)",
    selection.EXCLUDED_NAMESPACE: "move the pod, or change the controller's --excluded-namespaces",
    selection.LEGACY_OPT_OUT: f'set {ann.LEGACY_INITIALIZE}="true" or remove it',
}


def safe(text: object, limit: int = 300) -> str:
    """Tenant text for a terminal: control characters escaped, length bounded."""
    shown = _UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


# --- the controller's own configuration, from its pod ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ControllerSettings:
    """What a controller pod was started with, as far as its spec shows it."""

    defaults: dict[str, str] = field(default_factory=dict)
    """Spec setting name -> raw value."""
    sources: dict[str, str] = field(default_factory=dict)
    """Spec setting name -> "flag --x" / "env IPNC_X"."""
    selection: selection.SelectionOptions = field(default_factory=selection.SelectionOptions)
    ignore_pod_overrides: bool = False
    """`run --ignore-pod-overrides`: the pods' annotations.GATEABLE_OVERRIDES and proxy ids count only as
    settings.proxyids admits them."""

    def gate(self, namespace: Obj | None) -> ProxyIdGate | None:
        """The gate this controller reads a pod of that namespace with (None: it honours every override)."""
        if not self.ignore_pod_overrides:
            return None
        notes = ((namespace or {}).get("metadata") or {}).get("annotations")
        return controller_gate(notes if isinstance(notes, Mapping) else None, self.defaults)


def _args(container: Obj) -> dict[str, str | None]:
    """--flag=value and --flag value pairs (a bare --flag maps to None) of the container's command line."""
    tokens = [str(t) for t in (container.get("command") or ())] + [
        str(t) for t in (container.get("args") or ())
    ]
    found: dict[str, str | None] = {}
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if token.startswith("--"):
            name, sep, value = token.partition("=")
            if sep:
                found[name] = value
            elif index + 1 < len(tokens) and not tokens[index + 1].startswith("--"):
                found[name] = tokens[index + 1]
                index += 1
            else:
                found[name] = None
        index += 1
    return found


def controller_container(pod: Obj) -> Obj | None:
    containers = [c for c in (pod.get("spec") or {}).get("containers") or () if isinstance(c, Mapping)]
    for container in containers:
        if "run" in [str(a) for a in (container.get("args") or ())]:
            return container
    return containers[0] if containers else None


def controller_settings(
    pod: Obj, flag_of: Callable[[str], str], env_of: Callable[[str], str]
) -> ControllerSettings:
    """Flags beat environment variables (click's order); 2018 flags fill what modern ones leave unset."""
    container = controller_container(pod)
    if container is None:
        return ControllerSettings()
    args = _args(container)
    env = {
        str(e.get("name")): str(e["value"])
        for e in container.get("env") or ()
        if isinstance(e, Mapping) and "value" in e
    }
    defaults: dict[str, str] = {}
    sources: dict[str, str] = {}
    for legacy, target in LEGACY_SPEC_FLAGS.items():
        if args.get(legacy) is not None:
            defaults[target], sources[target] = str(args[legacy]), f"controller flag {legacy}"
    for setting in SETTINGS:
        flag, var = flag_of(setting.name), env_of(setting.name)
        if args.get(flag) is not None:
            defaults[setting.name], sources[setting.name] = str(args[flag]), f"controller flag {flag}"
        elif var in env:
            defaults[setting.name], sources[setting.name] = env[var], f"controller env {var}"

    def switch(name: str, default: bool) -> bool:
        if f"--no-{name}" in args:
            return False
        return True if f"--{name}" in args else default

    base = selection.SelectionOptions()
    excluded = args.get("--excluded-namespaces") or env.get("IPNC_EXCLUDED_NAMESPACES")
    options = selection.SelectionOptions(
        switch("select-legacy-annotation", base.legacy_annotation),
        switch("select-injected", base.injected),
        frozenset(n.strip() for n in excluded.split(",") if n.strip())
        if excluded is not None
        else base.excluded_namespaces,
    )
    ignore = switch("ignore-pod-overrides", env.get("IPNC_IGNORE_POD_OVERRIDES", "").lower() in {"1", "true"})
    return ControllerSettings(defaults, sources, options, ignore)


# --- the explanation ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SettingView:
    field: str
    label: str
    """What a user sets: the pod annotation, else the controller's flag."""
    value: str
    source: str


DNS_SERVERS = ("DNS servers", "(read at apply time)", "the pod's /etc/resolv.conf")
"""dns_servers has no annotation or flag: the controller reads the pod's nameservers when it applies."""


def setting_label(spec_field: str, flag_of: Callable[[str], str]) -> str:
    """The annotation a user sets for a spec field, else the controller flag (else a readable name)."""
    settings = [s for s in SETTINGS if spec_field in s.targets]
    settings.sort(key=lambda s: s.targets != (spec_field,))
    if not settings:
        return DNS_SERVERS[0] if spec_field == "dns_servers" else spec_field.replace("_", " ")
    own = settings[0]
    return own.annotations[0] if own.annotations else flag_of(own.name)


@dataclass(frozen=True, slots=True)
class ControllerView:
    name: str
    node: str
    ready: bool
    phase: str
    restarts: int


@dataclass(frozen=True, slots=True)
class EventView:
    type: str
    reason: str
    message: str
    count: int
    last: str
    source: str


@dataclass(frozen=True, slots=True)
class Explanation:
    pod: str
    uid: str
    node: str
    phase: str
    selected: bool
    reason: str
    why: str
    spec_error: str | None
    settings: tuple[SettingView, ...]
    marked: bool
    digest: str | None
    digest_matches: bool | None
    expected_digests: tuple[str, ...]
    controller_namespace: str
    controllers: tuple[ControllerView, ...]
    events: tuple[EventView, ...]
    verdict: str
    next_steps: tuple[str, ...]


def attribute(
    annotations: Mapping[str, str], sources: Mapping[str, str], from_pod: Mapping[str, Given] | None = None
) -> dict[str, str]:
    """InterceptSpec field -> where its value came from, by pod_spec's layers: annotations over what Istio
    reads from the pod (settings.istio) over the controller's defaults."""
    origin = {f.name: "built-in default" for f in fields(InterceptSpec)}
    layered = {**sources, **{name: given.source for name, given in (from_pod or {}).items()}}
    for setting in SETTINGS:
        if setting.name in layered:
            for target in setting.targets:
                origin[target] = layered[setting.name]
    for setting in SETTINGS:
        key = next((k for k in setting.annotations if k in annotations), None)
        if key is not None:
            for target in setting.targets:
                origin[target] = f"annotation {key}"
    return origin


def _ready(pod: Obj) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or ()
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _controller_view(pod: Obj) -> ControllerView:
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    restarts = sum(int(c.get("restartCount") or 0) for c in status.get("containerStatuses") or ())
    return ControllerView(
        f"{meta.get('namespace', '')}/{meta.get('name', '')}",
        str((pod.get("spec") or {}).get("nodeName") or ""),
        _ready(pod),
        str(status.get("phase") or "Unknown"),
        restarts,
    )


def _event_view(event: Obj) -> EventView:
    source = event.get("reportingComponent") or (event.get("source") or {}).get("component") or ""
    return EventView(
        safe(event.get("type", ""), 20),
        safe(event.get("reason", ""), 60),
        safe(event.get("message", "")),
        int(event.get("count") or 1),
        str(event.get("lastTimestamp") or event.get("eventTime") or ""),
        safe(source, 60),
    )


def explain(
    pod: Obj,
    namespace: Obj | None,
    controllers: Sequence[Obj],
    events: Sequence[Obj],
    controller_namespace: str,
    flag_of: Callable[[str], str],
    env_of: Callable[[str], str],
    max_events: int = 8,
) -> Explanation:
    meta = pod.get("metadata") or {}
    annotations: dict[str, str] = {str(k): str(v) for k, v in (meta.get("annotations") or {}).items()}
    name = f"{meta.get('namespace', '')}/{meta.get('name', '')}"
    node = str((pod.get("spec") or {}).get("nodeName") or "")
    ctl = controller_settings(controllers[0], flag_of, env_of) if controllers else ControllerSettings()
    decision = selection.select(pod, namespace, ctl.selection)
    spec_error: str | None = None
    settings: tuple[SettingView, ...] = ()
    expected: tuple[str, ...] = ()
    gate = ctl.gate(namespace)
    honoured = honoured_annotations(pod, gate)
    try:
        below_flags = {k: v for k, v in istio_defaults(pod).items() if k not in ctl.sources}
        from_pod = {**below_flags, **istio_values(pod, gate)}
        spec = pod_spec(pod, ctl.defaults, default_source=lambda n: ctl.sources.get(n, n), gate=gate)
    except SpecError as exc:
        spec_error = safe(exc)
    else:
        origin = attribute(honoured, ctl.sources, from_pod)
        settings = tuple(
            SettingView(k, *DNS_SERVERS)
            if k == "dns_servers" and v == "None"
            else SettingView(k, setting_label(k, flag_of), safe(v), origin[k])
            for k, v in spec.describe().items()
        )
        expected = tuple(sorted(candidate_digests(spec)))
    marked = annotations.get(ann.STATUS) == ann.STATUS_INITIALIZED
    digest = annotations.get(ann.SPEC_DIGEST)
    matches = None if not marked or not expected else digest in expected
    views = tuple(_controller_view(c) for c in controllers)
    recent = sorted(events, key=lambda e: str(e.get("lastTimestamp") or e.get("eventTime") or ""))[
        -max_events:
    ]
    verdict, steps = _advise(
        name, node, decision, spec_error, marked, matches, views, controller_namespace, bool(controllers)
    )
    return Explanation(
        pod=name,
        uid=str(meta.get("uid") or ""),
        node=node or "(not scheduled)",
        phase=str((pod.get("status") or {}).get("phase") or "Unknown"),
        selected=decision.selected,
        reason=decision.reason,
        why=REASONS.get(decision.reason, decision.reason),
        spec_error=spec_error,
        settings=settings,
        marked=marked,
        digest=safe(digest, 64) if digest is not None else None,
        digest_matches=matches,
        expected_digests=expected,
        controller_namespace=controller_namespace,
        controllers=views,
        events=tuple(_event_view(e) for e in recent),
        verdict=verdict,
        next_steps=steps,
    )


def _advise(
    pod: str,
    node: str,
    decision: selection.Decision,
    spec_error: str | None,
    marked: bool,
    matches: bool | None,
    controllers: tuple[ControllerView, ...],
    controller_namespace: str,
    have_controller: bool,
) -> tuple[str, tuple[str, ...]]:
    """(one-line verdict, what to do next), in the order an operator would check."""
    ctl = controllers[0].name.split("/", 1)[1] if controllers else "POD"
    exec_prefix = f"kubectl -n {controller_namespace} exec {ctl} --"
    verify = f"{exec_prefix} istio-pod-network-controller rules verify --pod {pod} --proc-root /host/proc"
    if controller_namespace != DEFAULT_CONTROLLER_NAMESPACE:
        verify += f" --controller-namespace {controller_namespace}"
    if not decision.selected:
        if marked:
            return (
                "capture kept: the pod is no longer selected, but its rules stay until it is deleted",
                ("recreate the pod to drop capture, or restore what selected it",),
            )
        advice = SELECT_ADVICE.get(decision.reason)
        return "not selected: no capture rules will be installed", ((advice,) if advice else ())
    if spec_error is not None:
        return (
            "invalid interception settings: the controller refuses the pod (fail closed)",
            (
                f"fix the value: {spec_error}",
                "the waiter exits 4 for the same reason: the pod will not start",
            ),
        )
    if not node:
        return "selected; not scheduled yet", ("wait for the scheduler (kubectl describe pod)",)
    if not have_controller:
        return (
            f"selected, but no controller pod runs on node {node}",
            (
                f"kubectl -n {controller_namespace} get daemonset -o wide   # do nodeSelector/tolerations "
                "exclude the node?",
                "wrong namespace? give --controller-namespace",
            ),
        )
    if not controllers[0].ready:
        return (
            f"selected, but the controller on {node} is not ready",
            (
                f"kubectl -n {controller_namespace} logs {ctl}   # /readyz says why (preflight, sync)",
                f"{exec_prefix} istio-pod-network-controller check",
            ),
        )
    if not marked:
        return (
            "selected; capture rules not installed yet",
            (
                "see the Events below (NetworkNamespaceNotFound, InterceptionFailed) and "
                f"kubectl -n {controller_namespace} logs {ctl}",
                verify,
            ),
        )
    if matches is False:
        return (
            "initialized, but with a different spec than the one above",
            (
                "annotations changed since: the controller re-applies on its next pass (Event Reconfigured)",
                verify,
            ),
        )
    return "initialized: capture rules installed for this spec", (f"check the live rules: {verify}",)
