"""The one pod rewrite shared by `inject` and `webhook`: Istio's privileged istio-init out, our waiter in.

Pure functions over plain dicts (the shape of Kubernetes JSON/YAML); nothing here touches the network, a file
or the clock. What a rewrite does to an Istio-injected pod:

1. `istio-init` (NET_ADMIN + NET_RAW, runs istio-iptables) is removed, and the waiter
   (`istio-pod-network-wait`) is put FIRST among the init containers: uid/gid of the proxy, no capabilities
   (drop ALL), no privilege escalation, read-only root, RuntimeDefault seccomp. Being first, every app init
   container runs with capture already in place, exactly like Istio CNI's `istio-validation` container.
2. The `podinfo` downward-API volume (pod annotations -> /etc/podinfo/pod_annotations) is added for it.
3. What istio-iptables in istio-init would have read (its arguments and env: settings/istio.py, the one
   translation; Istio's injector computes them from mesh-wide values such as global.proxy.includeIPRanges
   and proxyMetadata) becomes the pod annotations the node controller reads, wherever the controller (which
   also reads istio-proxy's ids and env) or the waiter (annotations only) would otherwise see another value,
   unless the pod already has that annotation; so the controller installs the same rules istio-init would
   have, and the waiter runs as istio-init's proxy uid/gid (on OpenShift, the namespace range's). Values are
   written back in canonical form (CIDRs masked, with a warning), and the rewritten pod is parsed as the
   controller will parse it, so a pod the controller would refuse is refused here, naming the annotation,
   argument or variable.
4. In REDIRECT mode NET_ADMIN/NET_RAW are also removed from the `istio-proxy` sidecar's added capabilities
   (a container, or an init container as a native sidecar; Envoy needs neither there). In TPROXY mode
   Envoy itself needs NET_ADMIN (IP_TRANSPARENT), so it stays, with a warning. The application's own
   containers are never changed: a pod that was not Pod Security `restricted` because of them stays so
   (the rewrite is not a silent policy fixer).
5. `sidecar.istio.io/status` is updated (istio-init -> the waiter, + the volume) so Istio's tooling that
   reads it (uninject, `istioctl x check-inject`) still sees a consistent picture.

A pod without `istio-init`, or with the opt-out annotation, is left untouched: the rewrite is idempotent.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

from ..errors import RefusedInput, SpecError
from ..settings import annotations as ann
from ..settings.istio import ISTIO_INIT_SETTINGS, from_istio_init, given_cidr_notices, pod_spec
from ..settings.spec import SETTINGS_BY_NAME, SPEC_ANNOTATIONS, InterceptionMode, InterceptSpec

JSON = dict[str, Any]

IMAGE_REPOSITORY: Final = "ghcr.io/istio-pod-network-controller/istio-pod-network-controller"
IMAGE_TAG: Final = "0.1.0"
"""Same as the chart's appVersion / image.tag (tests/install check they agree)."""
DEFAULT_IMAGE: Final = f"{IMAGE_REPOSITORY}:{IMAGE_TAG}"
PODINFO_VOLUME: Final = "podinfo"
PODINFO_FALLBACK_VOLUME: Final = "istio-pod-network-podinfo"
PODINFO_MOUNT: Final = "/etc/podinfo"
PODINFO_FILE: Final = "pod_annotations"
ISTIO_PROXY_CONTAINER: Final = ann.ISTIO_PROXY_CONTAINER
OPT_OUT_ANNOTATION: Final = "pod-network-controller.istio.io/inject"
"""`"false"` on a pod (template) keeps Istio's own istio-init: inject and webhook leave it alone."""
REMOVED_CAPABILITIES: Final = frozenset({"NET_ADMIN", "NET_RAW"})

#: kind -> path from the object to its pod template (metadata + spec); () means the object is the pod.
WORKLOAD_TEMPLATE_PATHS: Final[dict[str, tuple[str, ...]]] = {
    "Pod": (),
    "PodTemplate": ("template",),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
    "DeploymentConfig": ("spec", "template"),
}

#: settings a pod annotation carries (the setting's first annotation key); the controller reads those.
ANNOTATED_SETTINGS: Final[dict[str, str]] = {
    name: SETTINGS_BY_NAME[name].annotations[0]
    for name in ISTIO_INIT_SETTINGS
    if SETTINGS_BY_NAME[name].annotations
}
#: settings no pod annotation carries: passed to the waiter as flags (start the controller with them too).
FLAG_SETTINGS: Final[tuple[str, ...]] = tuple(n for n in ISTIO_INIT_SETTINGS if n not in ANNOTATED_SETTINGS)


class InjectionError(RefusedInput):
    """The object cannot be rewritten (malformed where a rewrite needs it to be well-formed)."""


@dataclass(frozen=True, slots=True)
class InjectOptions:
    """How the waiter container is built."""

    image: str = DEFAULT_IMAGE
    image_pull_policy: str = "IfNotPresent"
    timeout: float = 300.0
    requests: Mapping[str, str] = field(default_factory=lambda: {"cpu": "10m", "memory": "32Mi"})
    limits: Mapping[str, str] = field(default_factory=lambda: {"cpu": "200m", "memory": "64Mi"})
    translate_istio_init_args: bool = True
    controller_namespace: str = ""
    """Passed to the waiter (--controller-namespace) so its timeout advice names the real namespace."""
    extra_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if any(arg.partition("=")[0] == "--trust-annotation" for arg in self.extra_args):
            raise InjectionError(
                "--trust-annotation is never injected: the status annotation alone must not open a pod"
            )


@dataclass(slots=True)
class PodRewrite:
    changed: bool
    metadata: JSON
    spec: JSON
    warnings: list[str] = field(default_factory=list)


# --- reading ------------------------------------------------------------------------------------------------


def _containers(spec: Mapping[str, Any], key: str) -> list[Any]:
    value = spec.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise InjectionError(f"spec.{key} must be a list, not {type(value).__name__}")
    return value


def _name(container: Any) -> str | None:
    name = container.get("name") if isinstance(container, dict) else None
    return name if isinstance(name, str) else None


def _require_map(value: Any, where: str) -> None:
    if value is not None and not isinstance(value, dict):
        raise InjectionError(f"{where} must be a map, not {type(value).__name__}")


def _require_shape(spec: Mapping[str, Any]) -> None:
    """Refuse, with our own error, the malformed shapes that a rewrite reads or edits.

    The API server would reject such a pod anyway; refusing here keeps `inject` and the webhook from
    failing with a bare TypeError on hostile or broken input.
    """
    for key in ("initContainers", "containers", "volumes"):
        for index, item in enumerate(_containers(spec, key)):
            where = f"spec.{key}[{index}]"
            if not isinstance(item, dict):
                raise InjectionError(f"{where} must be a map, not {type(item).__name__}")
            if not isinstance(item.get("name"), str):
                raise InjectionError(f"{where}.name must be a string")
            _require_map(item.get("securityContext"), f"{where}.securityContext")
            capabilities = (item.get("securityContext") or {}).get("capabilities")
            _require_map(capabilities, f"{where}.securityContext.capabilities")
            _require_map(item.get("downwardAPI"), f"{where}.downwardAPI")
            items = (item.get("downwardAPI") or {}).get("items")
            if items is not None and not isinstance(items, list):
                raise InjectionError(f"{where}.downwardAPI.items must be a list")
            for inner in items or []:
                if not isinstance(inner, dict):
                    raise InjectionError(f"{where}.downwardAPI.items[] must be maps")
                _require_map(inner.get("fieldRef"), f"{where}.downwardAPI.items[].fieldRef")


def needs_rewrite(pod_spec: Mapping[str, Any], annotations: Mapping[str, Any] | None = None) -> bool:
    """True when the pod still has Istio's istio-init and has not opted out."""
    if annotations and str(annotations.get(OPT_OUT_ANNOTATION, "")).lower() == "false":
        return False
    return any(_name(c) == ann.ISTIO_INIT_CONTAINER for c in _containers(pod_spec, "initContainers"))


def _string_annotations(annotations: Mapping[str, Any]) -> None:
    own = {k: v for k, v in annotations.items() if k in SPEC_ANNOTATIONS or k == ann.STATUS_PORT}
    if not all(isinstance(v, str) for v in own.values()):
        raise InjectionError("metadata.annotations values must be strings")


def _spec(pod: Mapping[str, Any], what: str) -> InterceptSpec:
    try:
        spec = pod_spec(pod)
    except SpecError as exc:
        raise InjectionError(f"{exc}; {what}") from None
    implied = spec.inbound_always_excluded
    own = tuple(p for p in spec.exclude_inbound_ports if p not in implied)
    return replace(spec, exclude_inbound_ports=own)


def _differs(setting: str, want: InterceptSpec, have: InterceptSpec) -> bool:
    return any(getattr(want, t) != getattr(have, t) for t in SETTINGS_BY_NAME[setting].targets)


def _canonical(setting: str, spec: InterceptSpec) -> str:
    """The setting's value as the spec writes it (annotation syntax), e.g. `10.0.0.0/8,fd00::/8` or `8080`."""
    return spec.describe()[SETTINGS_BY_NAME[setting].targets[0]]


# --- building -----------------------------------------------------------------------------------------------


def waiter_container(
    options: InjectOptions, volume_name: str, proxy_uid: int, proxy_gid: int, port_args: list[str]
) -> JSON:
    """The waiter init container: the only thing of ours that runs inside a mesh pod."""
    timeout = f"{options.timeout:g}"
    return {
        "name": ann.WAITER_CONTAINER,
        "image": options.image,
        "imagePullPolicy": options.image_pull_policy,
        "args": [
            "wait",
            "--file",
            f"{PODINFO_MOUNT}/{PODINFO_FILE}",
            "--timeout",
            timeout,
            *(
                ["--controller-namespace", options.controller_namespace]
                if options.controller_namespace
                else []
            ),
            *port_args,
            *options.extra_args,
        ],
        "resources": {"requests": dict(options.requests), "limits": dict(options.limits)},
        "securityContext": {
            "runAsUser": proxy_uid,
            "runAsGroup": proxy_gid,
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [{"name": volume_name, "mountPath": PODINFO_MOUNT, "readOnly": True}],
    }


def podinfo_volume(name: str = PODINFO_VOLUME) -> JSON:
    return {
        "name": name,
        "downwardAPI": {
            "items": [{"path": PODINFO_FILE, "fieldRef": {"fieldPath": "metadata.annotations"}}],
        },
    }


def _is_our_podinfo(volume: Mapping[str, Any]) -> bool:
    items = (volume.get("downwardAPI") or {}).get("items") or []
    return any(
        isinstance(item, dict)
        and item.get("path") == PODINFO_FILE
        and (item.get("fieldRef") or {}).get("fieldPath") == "metadata.annotations"
        for item in items
    )


def _place_volume(volumes: list[Any]) -> str:
    """Add the podinfo volume unless an equivalent one is there; returns the volume name to mount."""
    by_name = {v.get("name"): v for v in volumes if isinstance(v, dict)}
    for name in (PODINFO_VOLUME, PODINFO_FALLBACK_VOLUME):
        existing = by_name.get(name)
        if existing is None:
            volumes.append(podinfo_volume(name))
            return name
        if _is_our_podinfo(existing):
            return name
    raise InjectionError(f"volumes {PODINFO_VOLUME!r} and {PODINFO_FALLBACK_VOLUME!r} are both taken")


def _strip_capabilities(container: JSON) -> bool:
    caps = (container.get("securityContext") or {}).get("capabilities") or {}
    add = caps.get("add")
    if not isinstance(add, list):
        return False
    kept = [c for c in add if str(c).upper().removeprefix("CAP_") not in REMOVED_CAPABILITIES]
    if len(kept) == len(add):
        return False
    if kept:
        caps["add"] = kept
    else:
        del caps["add"]
    return True


def _update_status(annotations: JSON, volume_name: str) -> None:
    raw = annotations.get(ann.SIDECAR_STATUS)
    if not isinstance(raw, str):
        return
    try:
        status = json.loads(raw)
    except ValueError:
        return
    if not isinstance(status, dict):
        return
    inits = status.get("initContainers")
    if isinstance(inits, list):
        status["initContainers"] = [
            ann.WAITER_CONTAINER if i == ann.ISTIO_INIT_CONTAINER else i for i in inits
        ]
    volumes = status.get("volumes")
    if isinstance(volumes, list) and volume_name not in volumes:
        status["volumes"] = [*volumes, volume_name]
    annotations[ann.SIDECAR_STATUS] = json.dumps(status, separators=(",", ":"))


def rewrite_pod(
    metadata: Mapping[str, Any] | None, pod_spec: Mapping[str, Any], options: InjectOptions
) -> PodRewrite:
    """Rewrite one pod (or pod template): returns new metadata/spec; the inputs are never modified."""
    _require_map(metadata, "metadata")
    meta: JSON = copy.deepcopy(dict(metadata or {}))
    spec: JSON = copy.deepcopy(dict(pod_spec))
    annotations_in = meta.get("annotations")
    if annotations_in is None:
        annotations_in = {}
    if not isinstance(annotations_in, dict):
        raise InjectionError("metadata.annotations must be a map")
    if not needs_rewrite(spec, annotations_in):
        return PodRewrite(False, meta, spec)
    _require_shape(spec)

    warnings: list[str] = []
    _string_annotations(annotations_in)
    inits = _containers(spec, "initContainers")
    kept_inits = [c for c in inits if _name(c) not in {ann.ISTIO_INIT_CONTAINER, ann.WAITER_CONTAINER}]
    after: JSON = {
        "metadata": {"annotations": annotations_in},
        "spec": {**spec, "initContainers": kept_inits},
    }
    have = _spec(after, "the controller would refuse this pod")
    want = have
    if options.translate_istio_init_args:
        want = _spec({"metadata": {"annotations": annotations_in}, "spec": spec}, "istio-init's settings")
        istio_init = next(c for c in inits if _name(c) == ann.ISTIO_INIT_CONTAINER)
        warnings += given_cidr_notices(from_istio_init(istio_init))

    # Carried as an annotation when the controller (which also reads istio-proxy) or the waiter (which
    # reads annotations only) would see another value than istio-init's.
    waiter_view = _spec({"metadata": {"annotations": annotations_in}}, "the waiter would refuse this pod")
    annotations: JSON = dict(annotations_in)
    for setting, key in ANNOTATED_SETTINGS.items():
        if key not in annotations and (_differs(setting, want, have) or _differs(setting, want, waiter_view)):
            annotations[key] = _canonical(setting, want)
    after["metadata"]["annotations"] = annotations
    effective = _spec(after, "the controller would refuse this pod")
    if effective.mode is InterceptionMode.NONE:
        warnings.append("interception mode NONE: the waiter will only wait for the controller's status mark")

    port_args: list[str] = []
    for setting in FLAG_SETTINGS:
        if _differs(setting, want, effective):
            flag, value = "--" + setting.replace("_", "-"), _canonical(setting, want)
            port_args += [flag, value]
            warnings.append(
                f"istio-init used {flag.removeprefix('--')} {value}: start the controller with "
                f"{flag} {value} too (no pod annotation carries it)"
            )

    volumes = spec.get("volumes")
    if volumes is None:
        volumes = spec["volumes"] = []
    if not isinstance(volumes, list):
        raise InjectionError("spec.volumes must be a list")
    volume_name = _place_volume(volumes)

    waiter = waiter_container(options, volume_name, effective.proxy_uid, effective.proxy_gid, port_args)
    spec["initContainers"] = [waiter, *kept_inits]

    for container in [*_containers(spec, "initContainers"), *_containers(spec, "containers")]:
        if _name(container) != ISTIO_PROXY_CONTAINER or not isinstance(container, dict):
            continue
        if effective.mode is InterceptionMode.TPROXY:
            warnings.append("TPROXY mode: istio-proxy keeps NET_ADMIN (Envoy needs IP_TRANSPARENT)")
        else:
            _strip_capabilities(container)

    _update_status(annotations, volume_name)
    meta["annotations"] = annotations
    return PodRewrite(True, meta, spec, warnings)


# --- whole objects ------------------------------------------------------------------------------------------


def _template(obj: JSON, path: tuple[str, ...]) -> JSON | None:
    node: Any = obj
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else None


def iter_pod_templates(obj: Any) -> Iterator[JSON]:
    """The pod (templates) inside a workload object, or inside each item of a `kind: List`."""
    if not isinstance(obj, dict):
        return
    kind = obj.get("kind")
    if kind == "List" or (isinstance(kind, str) and kind.endswith("List") and "items" in obj):
        for item in obj.get("items") or []:
            yield from iter_pod_templates(item)
        return
    if not isinstance(kind, str) or kind not in WORKLOAD_TEMPLATE_PATHS:
        return
    template = _template(obj, WORKLOAD_TEMPLATE_PATHS[kind])
    if template is not None and isinstance(template.get("spec"), dict):
        yield template


def rewrite_object(obj: Any, options: InjectOptions) -> tuple[bool, list[str]]:
    """Rewrite every pod template of a Kubernetes object in place; returns (changed, warnings)."""
    changed = False
    warnings: list[str] = []
    for template in iter_pod_templates(obj):
        result = rewrite_pod(template.get("metadata"), template["spec"], options)
        if result.changed:
            template["metadata"] = result.metadata
            template["spec"] = result.spec
            changed = True
            warnings += result.warnings
    return changed, warnings
