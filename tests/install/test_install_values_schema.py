"""values.schema.json is strict: a mistyped key or a value the CLI would refuse fails `helm template` at once.

Without it, `includeIPRanges=not-a-cidr` crashloops the controller on every node and `webhook.logLevel=warn`
(the webhook refuses `warn`) stops pod creation cluster-wide under failurePolicy Fail. The enums are read from
the CLI's own click options, so the schema cannot drift from what the commands accept.
"""

from __future__ import annotations

import json
from typing import Any

import click
import helm_python
import pytest
import yaml
from install_helpers import ROOT, by_kind, render
from test_install_chart import VALUE_SETS

from ipnc_lab.sim.cluster import SimCluster
from istio_pod_network_controller.cli.run import run
from istio_pod_network_controller.cli.webhook import webhook
from istio_pod_network_controller.dataplane import apply as dataplane
from istio_pod_network_controller.dataplane.apply import BACKEND_CHOICES
from istio_pod_network_controller.settings.istio import pod_spec

CHART = ROOT / "chart" / "istio-pod-network-controller"
SCHEMA = json.loads((CHART / "values.schema.json").read_text())


def choices(command: click.Command, name: str) -> list[str]:
    (param,) = [p for p in command.params if p.name == name]
    assert isinstance(param.type, click.Choice)
    return [str(c) for c in param.type.choices]


def nested(path: str, value: Any) -> dict[str, Any]:
    out: Any = value
    for key in reversed(path.split(".")):
        out = {key: out}
    return dict(out)


def refusal(values: dict[str, Any]) -> str:
    with pytest.raises(helm_python.HelmError) as info:
        render(values)
    return str(info.value)


BAD = [
    ("includeIPRanges", "not-a-cidr"),
    ("includeIPRanges", "10.0.0.0/8,,10.1.0.0/16"),
    ("includeIPRanges", "10.0.0.0/33"),
    ("excludeIPRanges", "*"),
    ("excludeIPRanges", "169.254.169.254/32 -j ACCEPT"),
    ("interception.excludeOutboundIPRanges", "fe80::%lo -j RETURN"),
    ("interception.includeOutboundIPRanges", "10.0.0.0/8\nCOMMIT"),
    ("excludeInboundPorts", "abc"),
    ("excludeInboundPorts", "80,http"),
    ("excludeInboundPorts", 0),
    ("interception.includeInboundPorts", "70000"),
    ("interception.excludeOutboundPorts", "*"),
    ("interception.outboundPort", "15001,15006"),
    ("interception.inboundPort", 65536),
    ("interception.proxyUID", 0),
    ("interception.proxyGID", "-1"),
    ("interception.excludeInterfaces", "eth0;reboot"),
    ("interception.excludeInterfaces", "a-name-longer-than-15"),
    ("interception.captureDNS", "yes"),
    ("interception.mode", "redirect"),
    ("interception.ipv6", "on"),
    ("interception.dropInvalid", "yes"),
    ("interception.outboundOwnerGroups", "java,202"),
    ("interception.outboundOwnerGroups", ",".join(str(g) for g in range(50))),
    ("interception.outboundOwnerGroupsExclude", "*"),
    ("interception.outboundOwnerGroupsExclude", -1),
    ("LogLevel", "verbose"),
    ("webhook.logLevel", "warn"),
    ("webhook.failurePolicy", "fail"),
    ("webhook.tls.mode", "self-signed"),
    ("controller.backend", "iptables"),
    ("controller.logFormat", "yaml"),
    ("controller.metricsPort", "9102"),
    ("controller.concurrency", 0),
    ("controller.repairInterval", "30s"),
    ("controller.hostPID", "true"),
    ("controller.excludedNamespaces", "kube-system, Not_A_Namespace"),
    ("image.pullPolicy", "always"),
    ("kubernetesDistribution", "Openshift"),
    ("nodeRestriction.enabled", "false"),
    ("waiter.timeout", "5m"),
]


@pytest.mark.parametrize(("path", "value"), BAD, ids=[f"{p}={v!r}" for p, v in BAD])
def test_a_bad_value_fails_helm_template_naming_the_key_and_value(path: str, value: Any) -> None:
    message = refusal(nested(path, value))
    assert "values don't meet the specifications of the schema" in message
    assert f"at '/{path.replace('.', '/')}'" in message, message
    # one line per mistake: the key, then the rule it broke (the allowed values, the bound, or the pattern)
    rules = ("value must be one of", "maximum:", "minimum:", "does not match pattern", "got ")
    assert any(rule in message for rule in rules), message


UNKNOWN = [
    "kubernetesDistrbution",
    "logLevel",
    "controller.bakend",
    "interception.excludeOutboundIpRanges",
    "webhook.tls.certManager.issuer",
    "image.digest",
    "resources.request",
    "nodeRestriction.enable",
]


@pytest.mark.parametrize("path", UNKNOWN)
def test_an_unknown_key_fails_helm_template_naming_it(path: str) -> None:
    message = refusal(nested(path, "x"))
    parent, _, key = path.rpartition(".")
    where = "/" + parent.replace(".", "/") if parent else ""
    assert f"at '{where}': additional properties '{key}' not allowed" in message, message


def test_every_object_level_of_the_schema_is_closed() -> None:
    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" and "additionalProperties" not in node:
                pytest.fail(f"{where} is an open object")
            if "properties" in node:
                assert node.get("additionalProperties") is False, where
            for key, child in node.items():
                walk(child, f"{where}/{key}")
        elif isinstance(node, list):
            for i, child in enumerate(node):
                walk(child, f"{where}[{i}]")

    # Kubernetes objects passed through verbatim (affinity terms, env valueFrom) are validated by the API
    # server; they are the only open objects, and the only `"type": "object"` without properties.
    open_ok = {"nodeAffinity", "podAffinity", "podAntiAffinity", "valueFrom"}

    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k not in open_ok}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    walk(strip(SCHEMA), "")


def test_the_defaults_and_every_documented_value_set_pass() -> None:
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    render(defaults)
    for values in VALUE_SETS.values():
        render(values)


GOOD = [
    ("includeIPRanges", "*"),
    ("includeIPRanges", "172.30.0.0/16,172.20.0.0/16"),
    ("includeIPRanges", "10.0.0.0/8, fd00::/8"),
    ("includeIPRanges", "10.1.2.3"),
    ("includeIPRanges", "10.0.0.1/8"),
    ("interception.excludeOutboundIPRanges", "10.96.0.2/24,fd00::1/8"),
    ("excludeIPRanges", "169.254.169.254/32"),
    ("excludeIPRanges", ""),
    ("interception.excludeOutboundIPRanges", "::1/128,fe80::/10"),
    ("excludeInboundPorts", "80,8080"),
    ("excludeInboundPorts", 15020),
    ("interception.includeInboundPorts", "*"),
    ("interception.includeInboundPorts", ""),
    ("interception.includeOutboundPorts", "443"),
    ("interception.envoyPort", 15001),
    ("interception.outboundPort", "15011"),
    ("interception.proxyUID", 1337),
    ("interception.proxyGID", "2000"),
    ("interception.excludeInterfaces", "eth1,net1@if3"),
    ("interception.rerouteVirtualInterfaces", "tap0"),
    ("interception.captureDNS", True),
    ("interception.captureDNS", "false"),
    ("interception.mode", "TPROXY"),
    ("interception.ipv6", "capture"),
    ("interception.dropInvalid", True),
    ("interception.outboundOwnerGroups", "*"),
    ("interception.outboundOwnerGroups", "202, 0"),
    ("interception.outboundOwnerGroups", ",".join(str(g) for g in range(49))),
    ("interception.outboundOwnerGroupsExclude", 888),
    ("controller.concurrency", "8"),
    ("controller.repairInterval", 0.5),
    ("controller.netnsDeadline", "20"),
    ("controller.excludedNamespaces", "kube-system,openshift-monitoring"),
    ("waiter.timeout", 30),
    ("webhook.tls.certManager.issuerKind", "ClusterIssuer"),
]


@pytest.mark.parametrize(("path", "value"), GOOD, ids=[f"{p}={v!r}" for p, v in GOOD])
def test_documented_good_values_pass(path: str, value: Any) -> None:
    render(nested(path, value))


def test_enums_are_exactly_what_the_commands_accept() -> None:
    for level in choices(run, "log_level"):
        for spelled in (level, level.upper()):
            render({"LogLevel": spelled})
    for level in choices(webhook, "log_level"):
        for spelled in (level, level.upper(), level.capitalize()):
            render({"webhook": {"logLevel": spelled}})
    assert "warn" not in choices(webhook, "log_level")  # why webhook.logLevel=warn must be refused
    controller = SCHEMA["properties"]["controller"]["properties"]
    assert controller["backend"]["enum"] == list(BACKEND_CHOICES) == choices(run, "backend")
    assert controller["logFormat"]["enum"] == choices(run, "log_format")
    pull = SCHEMA["properties"]["image"]["properties"]["pullPolicy"]["enum"]
    assert pull == choices(webhook, "image_pull_policy")


@pytest.mark.root
@pytest.mark.timeout(90)
def test_a_cidr_with_host_bits_renders_and_the_controller_starts_with_it() -> None:
    """Istio reads `10.0.0.1/8` as `10.0.0.0/8`: so does the chart, the controller (one log line), and the
    rules it installs."""
    (daemonset,) = by_kind(render({"includeIPRanges": "10.0.0.1/8"}), "DaemonSet")
    args = daemonset["spec"]["template"]["spec"]["containers"][0]["args"]
    spec_args = [a for a in args if a.startswith("--include-outbound-ip-ranges")]
    assert spec_args == ["--include-outbound-ip-ranges=10.0.0.1/8"]
    with SimCluster() as cluster:
        node = cluster.add_node("ipncv")
        pod = cluster.add_pod(node, "mesh")
        controller = cluster.start_controller(node, spec_args)
        controller.wait_ready()
        cluster.wait_initialized([pod], 30, controller.log)
        said = "--include-outbound-ip-ranges: 10.0.0.1/8 has host bits set, read as 10.0.0.0/8"
        assert controller.log().count(said) == 1
        assert pod.netns
        masked = pod_spec(cluster.pod_object(pod), {"include_outbound_ip_ranges": "10.0.0.0/8"})
        assert dataplane.verify(pod.netns.pinned, masked).in_place
