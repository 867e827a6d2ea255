"""Annotation and label keys: Istio's own, and the 2018 controller's that keep working."""

from __future__ import annotations

from typing import Final

INTERCEPTION_MODE: Final = "sidecar.istio.io/interceptionMode"
INCLUDE_INBOUND_PORTS: Final = "traffic.sidecar.istio.io/includeInboundPorts"
EXCLUDE_INBOUND_PORTS: Final = "traffic.sidecar.istio.io/excludeInboundPorts"
INCLUDE_OUTBOUND_IP_RANGES: Final = "traffic.sidecar.istio.io/includeOutboundIPRanges"
EXCLUDE_OUTBOUND_IP_RANGES: Final = "traffic.sidecar.istio.io/excludeOutboundIPRanges"
INCLUDE_OUTBOUND_PORTS: Final = "traffic.sidecar.istio.io/includeOutboundPorts"
EXCLUDE_OUTBOUND_PORTS: Final = "traffic.sidecar.istio.io/excludeOutboundPorts"
EXCLUDE_INTERFACES: Final = "traffic.sidecar.istio.io/excludeInterfaces"
REROUTE_VIRTUAL_INTERFACES: Final = "istio.io/reroute-virtual-interfaces"
KUBEVIRT_INTERFACES: Final = "traffic.sidecar.istio.io/kubevirtInterfaces"
"""Deprecated name of REROUTE_VIRTUAL_INTERFACES; the new name wins when both are set."""

STATUS_PORT: Final = "status.sidecar.istio.io/port"
"""The agent's status port; Istio's injector excludes it from inbound capture (istio-init's -d)."""

SIDECAR_INJECT: Final = "sidecar.istio.io/inject"
SIDECAR_STATUS: Final = "sidecar.istio.io/status"

LEGACY_INITIALIZE: Final = "istio-pod-network-controller/initialize"
"""2018 selection annotation, on the pod or its namespace: "true" selects the pod."""
STATUS: Final = "pod-network-controller.istio.io/status"
STATUS_INITIALIZED: Final = "initialized"
ENVOY_PORT: Final = "pod-network-controller.istio.io/envoy-port"
"""2018: one port that receives both inbound and outbound captured traffic."""
ENVOY_USERID: Final = "pod-network-controller.istio.io/envoy-userid"
ENVOY_GROUPID: Final = "pod-network-controller.istio.io/envoy-groupid"
CAPTURE_DNS: Final = "pod-network-controller.istio.io/capture-dns"
"""Ours: "true"/"false" turns DNS capture on or off for one pod (Istio drives it from proxy metadata)."""
IPV6: Final = "pod-network-controller.istio.io/ipv6"
"""Ours: auto | capture | block, the pod's IPv6 policy."""
DROP_INVALID: Final = "pod-network-controller.istio.io/drop-invalid"
"""Ours: "true" drops conntrack-INVALID packets (Istio drives it from INVALID_DROP in proxy metadata)."""
OUTBOUND_OWNER_GROUPS: Final = "pod-network-controller.istio.io/outbound-owner-groups"
"""Ours: gids whose outbound traffic is captured (Istio: ISTIO_OUTBOUND_OWNER_GROUPS)."""
OUTBOUND_OWNER_GROUPS_EXCLUDE: Final = "pod-network-controller.istio.io/outbound-owner-groups-exclude"
"""Ours: gids whose outbound traffic is never captured (Istio: ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE)."""
GATEABLE_OVERRIDES: Final = (
    ENVOY_USERID,
    ENVOY_GROUPID,
    IPV6,
    OUTBOUND_OWNER_GROUPS,
    OUTBOUND_OWNER_GROUPS_EXCLUDE,
)
"""Per-pod overrides outside Istio's `traffic.sidecar.istio.io/*` prefix that switch capture off for the app
(its own uid or gid as the proxy's, IPv6 blocked instead of captured, its gid left out of the owner
groups); `run --ignore-pod-overrides` drops them, but for a proxy id settings.proxyids admits."""
SPEC_DIGEST: Final = "pod-network-controller.istio.io/spec-digest"
"""Written with STATUS: InterceptSpec.fingerprint() of the rules applied, so a changed spec is noticed."""

WAITER_CONTAINER: Final = "istio-pod-network-wait"
"""The one name of our waiter init container, shared by selection and every injection path."""
ISTIO_PROXY_CONTAINER: Final = "istio-proxy"
"""Istio's sidecar (a container, or an init container with restartPolicy Always): its uid is the proxy's."""
ISTIO_INIT_CONTAINER: Final = "istio-init"
"""Istio's own privileged init container: a pod that still has it is left to it."""
ISTIO_VALIDATION_CONTAINER: Final = "istio-validation"
"""What Istio's injector puts instead of istio-init in CNI mode: it only checks that capture is in place."""
OPENSHIFT_DEPLOYER_LABEL: Final = "openshift.io/deployer-pod-for.name"
OPENSHIFT_BUILD_ANNOTATION: Final = "openshift.io/build.name"
