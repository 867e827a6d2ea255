"""Stock Istio in CNI mode, with no template of ours: such pods are selected, their annotations are honoured,
and Istio's own validation semantics succeed through our rules (real netns, real rules, uid 1337).

The fixture is a pod as Istio's injector writes it with pilot.cni.enabled / istio_cni.enabled (see
fixtures/istio-cni-mode-pod.yaml); istio_validation.py checks what `istio-iptables --run-validation` checks.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from waiter_helpers import PROXY, apply_rules

from ipnc_lab.sim.runtime import SYSTEM_PYTHON
from istio_pod_network_controller.controller import selection as sel
from istio_pod_network_controller.settings import annotations as ann
from istio_pod_network_controller.settings.spec import SPEC_ANNOTATIONS, InterceptionMode, build_spec

HERE = Path(__file__).parent
VALIDATOR = HERE / "istio_validation.py"
ISTIO_CNI_ANNOTATIONS = (
    ann.INTERCEPTION_MODE,
    ann.INCLUDE_OUTBOUND_IP_RANGES,
    ann.EXCLUDE_OUTBOUND_IP_RANGES,
    ann.INCLUDE_INBOUND_PORTS,
    ann.EXCLUDE_INBOUND_PORTS,
    ann.INCLUDE_OUTBOUND_PORTS,
    ann.EXCLUDE_OUTBOUND_PORTS,
    ann.KUBEVIRT_INTERFACES,
    ann.REROUTE_VIRTUAL_INTERFACES,
    ann.EXCLUDE_INTERFACES,
)
"""Every capture annotation Istio's injection template writes in CNI mode (its `pilot.cni.enabled` block)."""


def cni_pod(mode: str = "REDIRECT", **annotations: str) -> dict[str, Any]:
    pod = yaml.safe_load((HERE / "fixtures" / "istio-cni-mode-pod.yaml").read_text())
    pod = copy.deepcopy(pod)
    pod["metadata"]["annotations"][ann.INTERCEPTION_MODE] = mode
    pod["metadata"]["annotations"].update(annotations)
    args = pod["spec"]["initContainers"][0]["args"]
    args[args.index("-m") + 1] = mode
    return pod


def test_cni_mode_pods_are_selected() -> None:
    options = sel.SelectionOptions()
    assert sel.select(cni_pod(), None, options) == sel.Decision(True, sel.ISTIO_CNI_MODE)
    assert not sel.select(cni_pod(), None, sel.SelectionOptions(istio_cni_mode=False)).selected
    assert not sel.select(cni_pod(), None, sel.SelectionOptions(injected=False)).selected
    none = cni_pod("NONE")
    none["spec"]["initContainers"] = []  # Istio adds no validation container in mode NONE
    assert sel.select(none, None, options) == sel.Decision(False, sel.INTERCEPTION_NONE)
    with_init = cni_pod()
    with_init["spec"]["initContainers"].append({"name": ann.ISTIO_INIT_CONTAINER})
    assert sel.select(with_init, None, options) == sel.Decision(False, sel.ISTIO_INIT_PRESENT)
    opted_out = cni_pod()
    opted_out["metadata"]["labels"][ann.SIDECAR_INJECT] = "false"
    assert sel.select(opted_out, None, options) == sel.Decision(False, sel.INJECT_DISABLED)


def test_every_annotation_istio_writes_in_cni_mode_is_honoured() -> None:
    assert set(ISTIO_CNI_ANNOTATIONS) <= SPEC_ANNOTATIONS
    pod = cni_pod(
        "TPROXY",
        **{
            ann.INCLUDE_OUTBOUND_IP_RANGES: "10.96.0.0/12",
            ann.EXCLUDE_OUTBOUND_IP_RANGES: "10.96.0.10/32",
            ann.INCLUDE_INBOUND_PORTS: "8080,9090",
            ann.EXCLUDE_INBOUND_PORTS: "15020,9090",
            ann.INCLUDE_OUTBOUND_PORTS: "3306",
            ann.EXCLUDE_OUTBOUND_PORTS: "5432",
            ann.KUBEVIRT_INTERFACES: "vnet0",
            ann.EXCLUDE_INTERFACES: "eth1",
        },
    )
    spec = build_spec(pod["metadata"]["annotations"])
    assert spec.mode is InterceptionMode.TPROXY
    assert [str(n) for n in spec.include_outbound_ip_ranges] == ["10.96.0.0/12"]  # type: ignore[union-attr]
    assert [str(n) for n in spec.exclude_outbound_ip_ranges] == ["10.96.0.10/32"]
    assert (spec.include_inbound_ports, spec.exclude_inbound_ports) == ((8080, 9090), (15020, 9090))
    assert (spec.include_outbound_ports, spec.exclude_outbound_ports) == ((3306,), (5432,))
    assert (spec.reroute_virtual_interfaces, spec.exclude_interfaces) == (("vnet0",), ("eth1",))
    # The newer name wins when Istio writes both.
    both = {ann.KUBEVIRT_INTERFACES: "vnet0", ann.REROUTE_VIRTUAL_INTERFACES: "vnet1"}
    assert build_spec(both).reroute_virtual_interfaces == ("vnet1",)
    # The fixture's own values are the defaults Istio's sidecar mode has.
    default = build_spec(cni_pod()["metadata"]["annotations"])
    assert default == build_spec({ann.EXCLUDE_INBOUND_PORTS: "15020"})


def validate(ns: str, validator: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    argv = [
        "ip", "netns", "exec", ns,
        "setpriv", f"--reuid={PROXY}", f"--regid={PROXY}", "--clear-groups",
        "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs",
        SYSTEM_PYTHON, str(validator), str(timeout),
    ]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 30, check=False)


@pytest.fixture
def readable_validator(workdir: Path) -> Path:
    """A copy uid 1337 can read (the clone itself may not be)."""
    copy_path = workdir / VALIDATOR.name
    shutil.copyfile(VALIDATOR, copy_path)
    copy_path.chmod(0o644)
    return copy_path


@pytest.mark.root
@pytest.mark.parametrize("backend", ["legacy", "nft", "nftables"])
@pytest.mark.parametrize("mode", ["REDIRECT", "TPROXY"])
def test_istio_validation_passes_through_our_rules(
    netns_name: str, readable_validator: Path, backend: str, mode: str
) -> None:
    pod = cni_pod(mode)
    assert sel.select(pod, None, sel.SelectionOptions()).selected
    before = validate(netns_name, readable_validator, 1.0)
    assert before.returncode == 126, before  # the validator can fail: no rules, no redirect
    assert "validation attempt failed" in before.stdout
    apply_rules(netns_name, pod["metadata"]["annotations"], backend)
    after = validate(netns_name, readable_validator, 5.0)
    assert after.returncode == 0, after
    assert "SO_ORIGINAL_DST port 15002 seen" in after.stdout
