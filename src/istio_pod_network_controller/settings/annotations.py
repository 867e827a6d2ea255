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
GATEABLE_OVERRIDES: Final = (ENVOY_USERID, ENVOY_GROUPID, IPV6)
"""Per-pod overrides outside Istio's `traffic.sidecar.istio.io/*` prefix that switch capture off for the app
(its own uid or gid as the proxy's, IPv6 blocked instead of captured); `run --ignore-pod-overrides` drops
them."""
SPEC_DIGEST: Final = "pod-network-controller.istio.io/spec-digest"
"""Written with STATUS: InterceptSpec.fingerprint() of the rules applied, so a changed spec is noticed."""

WAITER_CONTAINER: Final = "istio-pod-network-wait"
"""The one name of our waiter init container, shared by selection and every injection path."""
ISTIO_INIT_CONTAINER: Final = "istio-init"
"""Istio's own privileged init container: a pod that still has it is left to it."""
ISTIO_VALIDATION_CONTAINER: Final = "istio-validation"
"""What Istio's injector puts instead of istio-init in CNI mode: it only checks that capture is in place."""
OPENSHIFT_DEPLOYER_LABEL: Final = "openshift.io/deployer-pod-for.name"
OPENSHIFT_BUILD_ANNOTATION: Final = "openshift.io/build.name"
