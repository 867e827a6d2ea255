"""settings/proxyids.py: which proxy uid/gid a pod may name under --ignore-pod-overrides (pure)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from istio_pod_network_controller.diagnose import explain as ex
from istio_pod_network_controller.install.injection import InjectOptions, rewrite_pod
from istio_pod_network_controller.settings import annotations as ann
from istio_pod_network_controller.settings.istio import ignored_overrides, pod_spec
from istio_pod_network_controller.settings.proxyids import (
    SUPPLEMENTAL_GROUPS,
    UID_RANGE,
    controller_gate,
    gate_annotations,
    injector_ids,
    parse_block,
    waiter_gate,
)
from istio_pod_network_controller.settings.spec import Given
from istio_pod_network_controller.waiter.wait import Config, resolve_spec

FIXTURES = Path(__file__).parent / "fixtures" / "istio-pods"
OPENSHIFT = {UID_RANGE: "1000620000/10000", SUPPLEMENTAL_GROUPS: "1000620000/10000"}
TOP = 1000629999


@pytest.mark.parametrize(
    ("text", "block"),
    [
        ("1000620000/10000", (1000620000, 1000629999)),
        ("1000620000-1000629999", (1000620000, 1000629999)),
        ("5/1", (5, 5)),
        ("7-7", (7, 7)),
        ("4294967295/1", (4294967295, 4294967295)),
    ],
)
def test_blocks_in_both_openshift_formats(text: str, block: tuple[int, int]) -> None:
    assert parse_block(text) == block


@pytest.mark.parametrize(
    "text",
    ["", "1000620000", "1000620000/0", "9-8", "4294967295/2", "4294967296-4294967296", " 1/10", "1/10 ",
     "+1/10", "-1/10", "1/-10", "1//10", "1/10/2", "0x10/10", "1_000/10", "1e3/10", "١/10", "12345678901/1"],
)  # fmt: skip
def test_malformed_blocks_are_no_range(text: str) -> None:
    assert parse_block(text) is None


def test_injector_ids_are_the_top_of_the_namespace_ranges() -> None:
    assert injector_ids(OPENSHIFT) == (TOP, TOP)
    assert injector_ids(None) == injector_ids({}) == (1337, 1337)
    other = {UID_RANGE: "2000/100", SUPPLEMENTAL_GROUPS: "5000/10,7000/10"}
    assert injector_ids(other) == (2099, 5009)  # the first block of the groups
    assert injector_ids({UID_RANGE: "2000-2099"}) == (2099, 2099)  # groups fall back to the uid range
    assert injector_ids({UID_RANGE: "2000/100", SUPPLEMENTAL_GROUPS: ""}) == (2099, 1337)  # no fallback


@pytest.mark.parametrize(
    "notes",
    [
        {UID_RANGE: "junk", SUPPLEMENTAL_GROUPS: "junk"},
        {
            UID_RANGE: "2000/100,3000/100",
            SUPPLEMENTAL_GROUPS: "5000/10,junk",
        },  # one uid block; all must parse
        {UID_RANGE: "1/" + "0" * 300, SUPPLEMENTAL_GROUPS: ",".join(["5000/10"] * 17)},  # bounded
        {UID_RANGE: "4294967295/1", SUPPLEMENTAL_GROUPS: "0-0"},  # not a proxy id (the kernel's "none", root)
        {UID_RANGE: 2000, SUPPLEMENTAL_GROUPS: None},  # not text at all
    ],
)
def test_malformed_namespace_annotations_give_istios_default(notes: dict[str, Any]) -> None:
    assert injector_ids(notes) == (1337, 1337)


def test_gate_admits_the_injectors_ids_and_the_controllers() -> None:
    gate = controller_gate(OPENSHIFT, {"proxy_uid": Given("2000", "--proxy-uid")})
    assert gate.uids == {TOP, 2000} and gate.gids == {TOP, 1337}
    assert gate.admits("proxy_uid", f" {TOP}\n") and gate.admits("proxy_gid", "1337")
    assert not gate.admits("proxy_uid", "1000620000") and not gate.admits("proxy_uid", "1337")
    assert not gate.admits("proxy_gid", "2000") and not gate.admits("proxy_uid", "junk")
    assert gate.admits("inbound_port", "anything")  # not this gate's setting
    assert controller_gate(None, {}).uids == {1337}


def test_gate_annotations_keeps_admitted_ids_and_drops_every_other_override() -> None:
    gate = controller_gate(OPENSHIFT, {})
    notes = {
        ann.ENVOY_USERID: str(TOP),
        ann.ENVOY_GROUPID: "1000620000",
        ann.IPV6: "block",
        ann.OUTBOUND_OWNER_GROUPS_EXCLUDE: "1000620000",
        ann.EXCLUDE_INBOUND_PORTS: "9000",
    }
    kept, ignored = gate_annotations(notes, gate)
    assert kept == {ann.ENVOY_USERID: str(TOP), ann.EXCLUDE_INBOUND_PORTS: "9000"}
    assert set(ignored) == {ann.ENVOY_GROUPID, ann.IPV6, ann.OUTBOUND_OWNER_GROUPS_EXCLUDE}


def pod(path: Path, namespace: str = "bookinfo") -> dict[str, Any]:
    loaded = dict(yaml.safe_load(path.read_text()))
    loaded["metadata"]["namespace"] = namespace
    return loaded


def set_proxy(pod: dict[str, Any], uid: int, gid: int) -> dict[str, Any]:
    for item in [*pod["spec"].get("initContainers", []), *pod["spec"].get("containers", [])]:
        if item["name"] == "istio-proxy":
            item["securityContext"].update(runAsUser=uid, runAsGroup=gid)
    return pod


def test_precedence_under_the_gate() -> None:
    """Annotation over istio-proxy over the controller's default, each layer only when admitted."""
    native = pod(FIXTURES / "cni-native-sidecar-openshift.yaml")
    gate = controller_gate(OPENSHIFT, {})
    spec = pod_spec(native, gate=gate)
    assert (spec.proxy_uid, spec.proxy_gid) == (TOP, TOP) and ignored_overrides(native, gate) == ()
    assert (pod_spec(native, gate=controller_gate({}, {})).proxy_uid) == 1337  # namespace without a range

    posing = set_proxy(pod(FIXTURES / "cni-native-sidecar-openshift.yaml"), 1000620000, 1000620000)
    spec = pod_spec(posing, {"proxy_uid": Given("4000", "--proxy-uid")}, gate=gate)
    assert (spec.proxy_uid, spec.proxy_gid) == (4000, 1337)  # the controller's defaults apply
    assert pod_spec(posing).proxy_uid == 1000620000  # ungated, the pod's word
    assert ignored_overrides(posing, gate) == (
        "container istio-proxy securityContext.runAsUser",
        "container istio-proxy securityContext.runAsGroup",
    )
    posing["metadata"]["annotations"][ann.ENVOY_USERID] = str(TOP)  # an admitted annotation still wins
    assert pod_spec(posing, gate=gate).proxy_uid == TOP
    posing["metadata"]["annotations"][ann.ENVOY_USERID] = "1000620001"
    assert pod_spec(posing, gate=gate).proxy_uid == 1337
    assert ignored_overrides(posing, gate)[0] == f"annotation {ann.ENVOY_USERID}"


def test_istio_init_ids_are_gated_too() -> None:
    sidecar = pod(FIXTURES / "sidecar-openshift.yaml")
    gate = controller_gate(OPENSHIFT, {})
    assert pod_spec(sidecar, gate=gate).proxy_uid == TOP
    foreign = controller_gate({}, {})
    assert pod_spec(sidecar, gate=foreign).proxy_uid == 1337
    assert "istio-init argument --proxy-uid" in ignored_overrides(sidecar, foreign)


def test_gated_controller_and_injected_waiter_agree_on_openshift_pods() -> None:
    """inject runs the waiter as istio-init's -u/-g and writes them as annotations; the gated waiter, which
    cannot read the namespace, admits its own ids, so it expects what the gated controller applies."""
    shaped = pod(FIXTURES / "sidecar-openshift.yaml")
    result = rewrite_pod(shaped["metadata"], shaped["spec"], InjectOptions())
    injected = {"metadata": result.metadata, "spec": result.spec}
    (waiter,) = [c for c in result.spec["initContainers"] if c["name"] == ann.WAITER_CONTAINER]
    euid, egid = waiter["securityContext"]["runAsUser"], waiter["securityContext"]["runAsGroup"]
    controller = pod_spec(injected, gate=controller_gate(OPENSHIFT, {}))
    waiter_spec = resolve_spec(Config(ignore_pod_overrides=True), result.metadata["annotations"], euid, egid)
    assert (controller.proxy_uid, controller.proxy_gid) == (TOP, TOP)
    assert (waiter_spec.proxy_uid, waiter_spec.proxy_gid) == (controller.proxy_uid, controller.proxy_gid)
    # A tenant's own id in the annotations is not the waiter's: it reads the controller-wide value.
    forged = {**result.metadata["annotations"], ann.ENVOY_USERID: "1000620000"}
    assert resolve_spec(Config(ignore_pod_overrides=True), forged, euid, egid).proxy_uid == 1337
    assert waiter_gate(euid, egid, {}).uids == {TOP, 1337}


def test_status_reads_the_proxy_ids_as_the_gated_controller() -> None:
    ctl = ex.ControllerSettings(ignore_pod_overrides=True)
    namespace = {"metadata": {"name": "bookinfo", "annotations": OPENSHIFT}}
    gate = ctl.gate(namespace)
    assert gate is not None and gate.uids == {TOP, 1337}
    assert ex.ControllerSettings().gate(namespace) is None
