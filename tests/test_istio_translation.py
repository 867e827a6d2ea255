"""settings.istio: a pod as Istio's injector shapes it -> the spec Istio would capture it with.

Fixtures are pods in the injector's shapes (tests/fixtures/istio-pods, tests/waiter/fixtures): sidecar mode
with istio-init's arguments and env, CNI mode with istio-validation, istio-proxy as a native sidecar, the
OpenShift namespace-range uid.
"""

from __future__ import annotations

import copy
import ipaddress
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from istio_pod_network_controller.controller.cache import slim_pod
from istio_pod_network_controller.errors import SpecError
from istio_pod_network_controller.rules import iptables, nftables, plan
from istio_pod_network_controller.settings import annotations as ann
from istio_pod_network_controller.settings.istio import (
    DUAL_STACK_ENV,
    ENV_DEFAULTS,
    ENV_ONLY,
    ISTIO_IPTABLES_FLAGS,
    READ_ENV,
    cidr_notices,
    from_istio_init,
    given_cidr_notices,
    go_bool,
    istio_values,
    parse_istio_iptables_args,
    pod_spec,
)
from istio_pod_network_controller.settings.spec import WILDCARD, Given, InterceptionMode, build_spec

HERE = Path(__file__).parent
OPENSHIFT_ID = 1000629999
"""The top of `openshift.io/sa.scc.uid-range: 1000620000/10000`: the injector's proxy uid (GetProxyIDs)."""


def load(path: Path) -> dict[str, Any]:
    return dict(yaml.safe_load(path.read_text()))


SIDECAR = load(HERE / "fixtures" / "istio-pods" / "sidecar-openshift.yaml")
NATIVE = load(HERE / "fixtures" / "istio-pods" / "cni-native-sidecar-openshift.yaml")
CNI = load(HERE / "waiter" / "fixtures" / "istio-cni-mode-pod.yaml")


def container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    spec = pod["spec"]
    return next(c for c in [*spec.get("initContainers", []), *spec["containers"]] if c["name"] == name)


def with_env(pod: dict[str, Any], name: str, env: list[dict[str, Any]]) -> dict[str, Any]:
    pod = copy.deepcopy(pod)
    container(pod, name)["env"] = env
    return pod


def test_cni_mode_defaults_are_istios() -> None:
    spec = pod_spec(CNI)
    assert (spec.proxy_uid, spec.proxy_gid) == (1337, 1337)
    assert not spec.capture_dns and spec.inbound_always_excluded == (15020, 15021, 15090)
    assert spec.outbound_owner_groups == WILDCARD and not spec.drop_invalid


def test_cni_mode_native_sidecar_on_openshift() -> None:
    """istio-proxy as an init container is found; its uid/gid are exempt; its env turns DNS capture on to
    every server, as Istio's CNI plugin captures it."""
    spec = pod_spec(NATIVE)
    assert (spec.proxy_uid, spec.proxy_gid) == (OPENSHIFT_ID, OPENSHIFT_ID)
    assert spec.capture_dns and spec.capture_all_dns
    values = istio_values(NATIVE)
    assert values["proxy_uid"].source == "container istio-proxy securityContext.runAsUser"
    assert values["capture_dns"].source == "container istio-proxy env ISTIO_META_DNS_CAPTURE"


def test_the_last_istio_proxy_wins_as_in_istios_plugin() -> None:
    pod = copy.deepcopy(NATIVE)
    late = copy.deepcopy(container(pod, "istio-proxy"))
    late["securityContext"] = {"runAsUser": 2000, "runAsGroup": 2001}
    late.pop("restartPolicy")
    pod["spec"]["containers"].append(late)
    assert (pod_spec(pod).proxy_uid, pod_spec(pod).proxy_gid) == (2000, 2001)


@pytest.mark.parametrize("context", [{}, {"runAsUser": 0, "runAsGroup": 0}, None])
def test_proxy_id_unset_or_zero_is_1337(context: dict[str, int] | None) -> None:
    """Istio runs istio-proxy as root in TPROXY mode; its CNI plugin then exempts 1337."""
    pod = copy.deepcopy(CNI)
    proxy = container(pod, "istio-proxy")
    proxy.pop("securityContext")
    if context is not None:
        proxy["securityContext"] = context
    assert (pod_spec(pod).proxy_uid, pod_spec(pod).proxy_gid) == (1337, 1337)


def test_cni_plugin_gid_is_1337_when_only_the_uid_is_set() -> None:
    pod = copy.deepcopy(CNI)
    container(pod, "istio-proxy")["securityContext"] = {"runAsUser": 2000}
    assert (pod_spec(pod).proxy_uid, pod_spec(pod).proxy_gid) == (2000, 1337)


def test_sidecar_mode_reads_istio_init_args_and_env() -> None:
    spec = pod_spec(SIDECAR)
    assert (spec.proxy_uid, spec.proxy_gid) == (OPENSHIFT_ID, OPENSHIFT_ID)  # -u without -g: gid = uid
    assert spec.capture_dns and not spec.capture_all_dns  # istio-iptables: the pod's nameservers only
    assert spec.drop_invalid
    assert istio_values(SIDECAR)["proxy_gid"].source == (
        "istio-init argument --proxy-uid (the gid defaults to the uid)"
    )


def test_istio_init_ignores_istio_proxy_when_present() -> None:
    """In sidecar mode istio-iptables alone decides: istio-proxy's runAsUser is not read."""
    pod = copy.deepcopy(SIDECAR)
    container(pod, "istio-proxy")["securityContext"]["runAsUser"] = 4242
    assert pod_spec(pod).proxy_uid == OPENSHIFT_ID


@pytest.mark.parametrize(
    ("args", "env", "dns"),
    [
        ([], [{"name": "ISTIO_META_DNS_CAPTURE", "value": "true"}], True),
        (["--redirect-dns=false"], [{"name": "ISTIO_META_DNS_CAPTURE", "value": "true"}], False),
        (
            [],
            [{"name": "ISTIO_META_DNS_CAPTURE", "value": "true"}, {"name": "REDIRECT_DNS", "value": "0"}],
            False,
        ),
        (["--redirect-dns"], [{"name": "REDIRECT_DNS", "value": "false"}], True),
        ([], [{"name": "REDIRECT_DNS", "value": "T"}], True),
    ],
)
def test_flag_beats_its_env_spelling_beats_proxy_metadata(args: list[str], env: list[Any], dns: bool) -> None:
    init = {"name": "istio-init", "args": ["istio-iptables", *args], "env": env}
    values = from_istio_init(init)
    assert build_spec({}, values).capture_dns is dns


@pytest.mark.parametrize("flag", [f for f in ISTIO_IPTABLES_FLAGS if f.setting and not f.boolean], ids=str)
def test_every_flag_has_its_env_spelling(flag: Any) -> None:
    value = {
        "outbound_port": "15101",
        "inbound_port": "15106",
        "proxy_uid": "2000",
        "proxy_gid": "2001",
        "interception_mode": "TPROXY",
        "include_inbound_ports": "8080",
        "exclude_inbound_ports": "9090",
        "exclude_interfaces": "eth1",
        "include_outbound_ip_ranges": "10.0.0.0/8",
        "exclude_outbound_ip_ranges": "10.96.0.0/12",
        "include_outbound_ports": "3306",
        "exclude_outbound_ports": "5432",
        "reroute_virtual_interfaces": "vnet0",
    }[flag.setting]
    by_env = build_spec(
        {}, from_istio_init({"name": "istio-init", "env": [{"name": flag.env, "value": value}]})
    )
    by_flag = build_spec({}, from_istio_init({"name": "istio-init", "args": [f"--{flag.long}", value]}))
    assert by_env == by_flag != build_spec({})
    if flag.short:
        attached = from_istio_init({"name": "istio-init", "args": [f"-{flag.short}{value}"]})
        assert build_spec({}, attached) == by_flag


def test_owner_groups_come_from_istio_init_env() -> None:
    env = [
        {"name": "ISTIO_OUTBOUND_OWNER_GROUPS", "value": "1000,2000"},
        {"name": "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "value": "3000"},
    ]
    spec = build_spec({}, from_istio_init({"name": "istio-init", "env": env}))
    assert (spec.outbound_owner_groups, spec.outbound_owner_groups_exclude) == ((1000, 2000), (3000,))


def test_status_port_moves_the_inbound_exclusion_outside_cni_mode() -> None:
    moved = copy.deepcopy(SIDECAR)
    moved["metadata"]["annotations"][ann.STATUS_PORT] = "16000"
    assert pod_spec(moved).inbound_always_excluded == (16000, 15021, 15090)  # 15020 is captured, as Istio's
    moved["metadata"]["annotations"][ann.STATUS_PORT] = "0"
    assert pod_spec(moved).inbound_always_excluded == (15021, 15090)
    cni = copy.deepcopy(CNI)
    cni["metadata"]["annotations"][ann.STATUS_PORT] = "16000"
    assert pod_spec(cni).inbound_always_excluded == (15020, 15021, 15090)  # the CNI plugin's fixed list


def test_annotations_beat_what_istio_reads_from_the_pod() -> None:
    pod = copy.deepcopy(NATIVE)
    pod["metadata"]["annotations"][ann.ENVOY_USERID] = "3000"
    pod["metadata"]["annotations"][ann.CAPTURE_DNS] = "false"
    spec = pod_spec(pod)
    assert (spec.proxy_uid, spec.proxy_gid, spec.capture_dns) == (3000, OPENSHIFT_ID, False)


def test_pod_values_beat_controller_defaults() -> None:
    spec = pod_spec(NATIVE, {"proxy_uid": "2000", "exclude_outbound_ports": "5432"})
    assert (spec.proxy_uid, spec.exclude_outbound_ports) == (OPENSHIFT_ID, (5432,))


@pytest.mark.parametrize("raw", ["1", "t", "T", "TRUE", "true", "True"])
def test_go_booleans(raw: str) -> None:
    assert go_bool(raw, "x") == "true"
    assert go_bool(raw.replace("1", "0").lower().replace("t", "f").replace("rue", "alse"), "x") == "false"


@pytest.mark.parametrize(
    ("pod", "env", "named"),
    [
        (
            NATIVE,
            [{"name": "ISTIO_META_DNS_CAPTURE", "value": "yes please"}],
            "istio-proxy env ISTIO_META_DNS_CAPTURE",
        ),
        (
            NATIVE,
            [{"name": "INVALID_DROP", "value": "true\n-A OUTPUT -j ACCEPT"}],
            "istio-proxy env INVALID_DROP",
        ),
        (NATIVE, [{"name": "ISTIO_DUAL_STACK", "value": "maybe"}], "istio-proxy env ISTIO_DUAL_STACK"),
        (SIDECAR, [{"name": "ISTIO_INCLUDE_OUTBOUND_PORTS", "value": "80 -j ACCEPT"}], "istio-init env"),
        (SIDECAR, [{"name": "ISTIO_OUTBOUND_OWNER_GROUPS", "value": "wheel"}], "ISTIO_OUTBOUND_OWNER_GROUPS"),
        (
            SIDECAR,
            [{"name": "ISTIO_META_DNS_CAPTURE", "valueFrom": {"configMapKeyRef": {"name": "m", "key": "k"}}}],
            "istio-init env ISTIO_META_DNS_CAPTURE",
        ),
    ],
)
def test_hostile_env_is_refused_naming_container_and_variable(
    pod: dict[str, Any], env: list[Any], named: str
) -> None:
    name = "istio-init" if pod is SIDECAR else "istio-proxy"
    with pytest.raises(SpecError) as refused:
        pod_spec(with_env(pod, name, env))
    assert named in refused.value.source
    assert "\n" not in str(refused.value)


def test_istio_proxy_value_from_reads_as_istios_plugin_reads_it() -> None:
    """The plugin takes env[].value: a valueFrom entry is empty there, so the setting stays off."""
    env = [{"name": "ISTIO_META_DNS_CAPTURE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    assert not pod_spec(with_env(NATIVE, "istio-proxy", env)).capture_dns


@pytest.mark.parametrize(
    "security_context", [{"runAsUser": "1337"}, {"runAsUser": True}, {"runAsUser": 2**32}, "root"]
)
def test_hostile_proxy_identity_is_refused(security_context: Any) -> None:
    pod = copy.deepcopy(NATIVE)
    container(pod, "istio-proxy")["securityContext"] = security_context
    with pytest.raises(SpecError) as refused:
        pod_spec(pod)
    assert "container istio-proxy securityContext" in refused.value.source


def test_fixed_flags_accept_only_our_value() -> None:
    assert parse_istio_iptables_args(["-e", "15008", "-t", "1337", "-r", "133"]) == {}
    with pytest.raises(SpecError, match="only 15008 is supported"):
        parse_istio_iptables_args(["--inbound-tunnel-port=15009"])


def test_unknown_flags_are_skipped_and_a_bool_flag_takes_no_value() -> None:
    values = parse_istio_iptables_args(["--log_output_level=default:info", "--run-validation", "-p", "15101"])
    assert values == {"outbound_port": Given("15101", "istio-init argument --envoy-port")}


def test_cidr_host_bits_are_masked_and_said() -> None:
    notes = {ann.EXCLUDE_OUTBOUND_IP_RANGES: "10.96.0.2/24,10.0.0.0/8", ann.INCLUDE_OUTBOUND_IP_RANGES: "*"}
    assert cidr_notices(notes) == (
        f"annotation {ann.EXCLUDE_OUTBOUND_IP_RANGES}: 10.96.0.2/24 has host bits set, read as 10.96.0.0/24",
    )
    values = parse_istio_iptables_args(["-i", "10.0.0.1/8"])
    assert given_cidr_notices(values) == (
        "istio-init argument --istio-service-cidr: 10.0.0.1/8 has host bits set, read as 10.0.0.0/8",
    )
    assert build_spec({}, values).include_outbound_ip_ranges == (ipaddress.ip_network("10.0.0.0/8"),)
    assert given_cidr_notices({"exclude_outbound_ip_ranges": "fd00::1/8"}, lambda n: "--flag") == (
        "--flag: fd00::1/8 has host bits set, read as fd00::/8",
    )


def test_mode_comes_from_istio_init() -> None:
    pod = copy.deepcopy(SIDECAR)
    args = container(pod, "istio-init")["args"]
    args[args.index("-m") + 1] = "TPROXY"
    assert pod_spec(pod).mode is InterceptionMode.TPROXY


def test_an_env_spelling_the_flag_overrides_is_never_read() -> None:
    """As viper: istio-init always passes -i, so ISTIO_SERVICE_CIDR is not istio-iptables' input."""
    env = [{"name": "ISTIO_SERVICE_CIDR", "value": "10.0.0.0/8 -j ACCEPT"}]
    assert pod_spec(with_env(SIDECAR, "istio-init", env)).include_outbound_ip_ranges == WILDCARD


@pytest.mark.parametrize("pod", [SIDECAR, NATIVE, CNI], ids=["sidecar", "native", "cni"])
def test_the_controllers_slim_cache_keeps_what_the_translation_reads(pod: dict[str, Any]) -> None:
    slim = slim_pod(pod)
    assert pod_spec(slim) == pod_spec(pod)
    assert istio_values(slim) == istio_values(pod)
    proxy = container(slim, "istio-proxy")
    assert {e["name"] for e in proxy.get("env", [])} <= READ_ENV
    assert "ports" not in proxy and "image" not in proxy


def test_cni_mode_keeps_istios_outbound_15020_exclusion_below_flags_and_annotations() -> None:
    assert pod_spec(CNI).exclude_outbound_ports == (15020,)
    assert pod_spec(SIDECAR).exclude_outbound_ports == ()
    assert pod_spec(CNI, {"exclude_outbound_ports": "5432"}).exclude_outbound_ports == (5432,)
    annotated = copy.deepcopy(CNI)
    annotated["metadata"]["annotations"][ann.EXCLUDE_OUTBOUND_PORTS] = ""
    assert pod_spec(annotated).exclude_outbound_ports == ()


def test_the_parity_table_names_every_flag_and_variable() -> None:
    text = (HERE.parent / "docs" / "rules.md").read_text()
    table = text[text.index("## Parity with Istio's configuration surface") :]
    for flag in ISTIO_IPTABLES_FLAGS:
        assert f"--{flag.long}`" in table and f"`{flag.env}`" in table, flag.long
        assert not flag.short or f"`-{flag.short}`" in table, flag.short
    for variable in [*ENV_ONLY, *ENV_DEFAULTS, *DUAL_STACK_ENV]:
        assert f"`{variable}`" in table, variable


def test_a_moved_status_port_moves_the_inbound_return_in_the_rules() -> None:
    """Istio's injector passes `-d 15090,15021,16000` for status port 16000: 15020 is then captured."""
    moved = copy.deepcopy(SIDECAR)
    moved["metadata"]["annotations"][ann.STATUS_PORT] = "16000"
    args = container(moved, "istio-init")["args"]
    args[args.index("-d") + 1] = "15090,15021,16000"

    def inbound_returns(pod: dict[str, Any]) -> list[str]:
        (v4,) = plan.build(pod_spec(pod).with_ipv6(False)).families[:1]
        text = iptables.render(v4).splitlines()
        return [
            line.split("--dport ")[1].split()[0]
            for line in text
            if line.startswith("-A ISTIO_INBOUND ") and "RETURN" in line and "--dport" in line
        ]

    assert inbound_returns(SIDECAR) == ["15008", "15020", "15021", "15090"]
    assert inbound_returns(moved) == ["15008", "16000", "15021", "15090"]


@settings(max_examples=300, deadline=None)
@given(
    variable=st.sampled_from(sorted(READ_ENV)),
    value=st.one_of(
        st.text(max_size=60), st.sampled_from(["true", "0", "10.0.0.1/8", "80,443", "*", "1000"])
    ),
    where=st.sampled_from(["istio-init", "istio-proxy"]),
)
def test_any_env_value_is_refused_by_name_or_renders(variable: str, value: str, where: str) -> None:
    """Env is tenant input: a value is refused naming the container and the variable, or it plans rules
    every renderer can write."""
    pod = with_env(SIDECAR if where == "istio-init" else NATIVE, where, [{"name": variable, "value": value}])
    refused: SpecError | None = None
    try:
        spec = pod_spec(pod)
    except SpecError as exc:
        refused = exc
    if refused is not None:
        assert f"container {where} env {variable}" in refused.source
        assert refused.value.strip() in value
        return
    ruleset = plan.build(spec.with_ipv6(True))
    nftables.render(ruleset)
    for family in ruleset.families:
        iptables.render(family)


@pytest.mark.parametrize("containers", ["istio-proxy", ["istio-proxy", 7], None, {"name": "istio-proxy"}])
def test_the_slim_cache_survives_malformed_container_lists(containers: Any) -> None:
    pod = copy.deepcopy(CNI)
    pod["spec"]["containers"] = containers
    pod["spec"]["initContainers"] = containers
    slim = slim_pod(pod)
    assert slim["spec"]["containers"] == [] and slim["spec"]["initContainers"] == []
