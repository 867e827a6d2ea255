"""InterceptSpec parsing: precedence, Istio's defaults, the 2018 annotations, and strict refusals."""

from __future__ import annotations

import ipaddress
import re

import pytest

from istio_pod_network_controller.errors import SpecError
from istio_pod_network_controller.settings import annotations as ann
from istio_pod_network_controller.settings.spec import (
    WILDCARD,
    InterceptionMode,
    InterceptSpec,
    IPv6Policy,
    build_spec,
    masked_cidrs,
)


def test_defaults_equal_istio_sidecar_mode() -> None:
    spec = build_spec({})
    assert spec == InterceptSpec()
    assert (spec.mode, spec.outbound_port, spec.inbound_port) == (InterceptionMode.REDIRECT, 15001, 15006)
    assert (spec.proxy_uid, spec.proxy_gid) == (1337, 1337)
    assert spec.include_inbound_ports == WILDCARD
    assert spec.include_outbound_ip_ranges == WILDCARD
    assert spec.captures_inbound and spec.captures_outbound and spec.intercepts
    assert not spec.capture_dns
    assert spec.ipv6 is IPv6Policy.AUTO


def test_annotations_beat_controller_defaults() -> None:
    spec = build_spec(
        {ann.EXCLUDE_OUTBOUND_PORTS: "5432", ann.INTERCEPTION_MODE: "TPROXY"},
        {"exclude_outbound_ports": "3306", "interception_mode": "REDIRECT", "proxy_uid": "2000"},
    )
    assert spec.exclude_outbound_ports == (5432,)
    assert spec.mode is InterceptionMode.TPROXY
    assert spec.proxy_uid == 2000


def test_legacy_2018_annotations() -> None:
    spec = build_spec({ann.ENVOY_PORT: "15100", ann.ENVOY_USERID: "1000", ann.ENVOY_GROUPID: "1001"})
    assert (spec.outbound_port, spec.inbound_port) == (15100, 15100)
    assert (spec.proxy_uid, spec.proxy_gid) == (1000, 1001)


def test_modern_port_default_beats_2018_combined_default_of_same_layer() -> None:
    spec = build_spec({}, {"envoy_port": "15100", "inbound_port": "15106"})
    assert (spec.outbound_port, spec.inbound_port) == (15100, 15106)


def test_pod_2018_port_annotation_beats_controller_modern_defaults() -> None:
    spec = build_spec({ann.ENVOY_PORT: "15200"}, {"outbound_port": "15100"})
    assert (spec.outbound_port, spec.inbound_port) == (15200, 15200)


def test_empty_values_disable_capture() -> None:
    spec = build_spec({ann.INCLUDE_INBOUND_PORTS: "", ann.INCLUDE_OUTBOUND_IP_RANGES: ""})
    assert not spec.captures_inbound
    assert not spec.captures_outbound
    spec = build_spec({ann.INCLUDE_OUTBOUND_IP_RANGES: "", ann.INCLUDE_OUTBOUND_PORTS: "443"})
    assert spec.captures_outbound


def test_lists_are_trimmed_deduplicated_and_typed() -> None:
    spec = build_spec(
        {
            ann.INCLUDE_INBOUND_PORTS: " 80, 8080 ,80",
            ann.EXCLUDE_OUTBOUND_IP_RANGES: "10.0.0.0/8, fd00::/8, 192.168.1.1",
            ann.EXCLUDE_INTERFACES: "eth1,net1",
        }
    )
    assert spec.include_inbound_ports == (80, 8080)
    assert spec.exclude_outbound_ip_ranges == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("fd00::/8"),
        ipaddress.ip_network("192.168.1.1/32"),
    )
    assert spec.exclude_interfaces == ("eth1", "net1")


def test_new_reroute_annotation_wins_over_deprecated_name() -> None:
    spec = build_spec({ann.REROUTE_VIRTUAL_INTERFACES: "tap0", ann.KUBEVIRT_INTERFACES: "tap9"})
    assert spec.reroute_virtual_interfaces == ("tap0",)
    assert build_spec({ann.KUBEVIRT_INTERFACES: "tap9"}).reroute_virtual_interfaces == ("tap9",)


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        (ann.INCLUDE_INBOUND_PORTS, "80,0", "port '0' is not a number from 1 to 65535"),
        (ann.INCLUDE_INBOUND_PORTS, "80,65536", "port '65536'"),
        (ann.EXCLUDE_INBOUND_PORTS, "http", "port 'http'"),
        (ann.EXCLUDE_OUTBOUND_PORTS, "-1", "port '-1'"),
        (ann.EXCLUDE_OUTBOUND_PORTS, "80,,81", "empty item"),
        (ann.ENVOY_PORT, "15001 ; rm -rf /", "a port must be a number"),
        (ann.ENVOY_USERID, "0", "id 0 would exempt all root-owned traffic"),
        (ann.ENVOY_GROUPID, "4294967295", "an id must be a number"),
        (ann.EXCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/33", "is not a CIDR range"),
        (ann.EXCLUDE_OUTBOUND_IP_RANGES, "$(reboot)", "is not a CIDR range"),
        (ann.INTERCEPTION_MODE, "redirect", "must be one of REDIRECT, TPROXY, NONE"),
        (ann.EXCLUDE_INTERFACES, "eth0;reboot", "is not a Linux interface name"),
        (ann.EXCLUDE_INTERFACES, "a-very-long-interface-name", "is not a Linux interface name"),
        (ann.REROUTE_VIRTUAL_INTERFACES, "..", "is not a Linux interface name"),
        (ann.CAPTURE_DNS, "yes", 'must be "true" or "false"'),
        (ann.IPV6, "on", "must be one of auto, capture, block"),
        (ann.EXCLUDE_INBOUND_PORTS, "1," * 3000 + "1", "longer than 4096 characters"),
        (ann.EXCLUDE_INBOUND_PORTS, ",".join(str(p) for p in range(1, 300)), "more than 256 items"),
    ],
)
def test_bad_values_name_the_annotation_and_the_value(key: str, value: str, reason: str) -> None:
    with pytest.raises(SpecError) as caught:
        build_spec({key: value})
    message = str(caught.value)
    assert message.startswith(f"annotation {key}: invalid value ")
    assert value[:20] in message
    assert reason in message
    assert caught.value.source == f"annotation {key}"
    assert caught.value.value == value


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        (ann.EXCLUDE_OUTBOUND_IP_RANGES, "fe80::%lo", "an IPv6 scope (%zone) is not allowed"),
        (ann.EXCLUDE_OUTBOUND_IP_RANGES, "fe80::%1/64", "an IPv6 scope"),
        (ann.INCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/8,fe80::%eth0 return", "an IPv6 scope"),
        (ann.EXCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/255.0.0.0", "is not a CIDR range (address[/prefix"),
        (ann.EXCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/8\n-A OUTPUT -j ACCEPT", "control character"),
        (ann.EXCLUDE_OUTBOUND_PORTS, "80\u2028443", "line or paragraph separator"),
        (ann.EXCLUDE_OUTBOUND_PORTS, "80\x85", "control character"),
        (ann.EXCLUDE_OUTBOUND_PORTS, "80\t,443", "control character"),
        (ann.ENVOY_USERID, "1337\x00", "control character"),
        (ann.EXCLUDE_INTERFACES, "eth0:1", "is not a Linux interface name"),
        (ann.EXCLUDE_INTERFACES, "eth0/1", "is not a Linux interface name"),
        (ann.EXCLUDE_INTERFACES, "eth%d", "is not a Linux interface name"),
        (ann.EXCLUDE_INTERFACES, 'eth0"', "is not a Linux interface name"),
        (ann.EXCLUDE_INTERFACES, "net1 -j ACCEPT", "is not a Linux interface name"),
        (ann.EXCLUDE_INTERFACES, "-jACCEPT", "not led by -"),
        (ann.EXCLUDE_INTERFACES, "abcdefghijklmnop", "1-15"),
    ],
)
def test_values_that_could_leave_their_token_are_refused(key: str, value: str, reason: str) -> None:
    with pytest.raises(SpecError, match=re.escape(reason)) as caught:
        build_spec({key: value})
    assert caught.value.source == f"annotation {key}"
    assert caught.value.public.isprintable()


def test_values_reduce_to_canonical_typed_data() -> None:
    spec = build_spec(
        {
            ann.EXCLUDE_OUTBOUND_IP_RANGES: "fd00:0:0::/16 , 10.1.0.0/16",
            ann.EXCLUDE_OUTBOUND_PORTS: "0080",
            ann.EXCLUDE_INTERFACES: "eth0,eth0,a-b_c.d@e",
            ann.ENVOY_USERID: "1000\n",  # YAML block scalars end with a newline
        }
    )
    assert spec.exclude_outbound_ip_ranges == (
        ipaddress.IPv6Network("fd00::/16"),
        ipaddress.IPv4Network("10.1.0.0/16"),
    )
    assert [str(n) for n in spec.exclude_outbound_ip_ranges] == ["fd00::/16", "10.1.0.0/16"]
    assert spec.exclude_outbound_ports == (80,)
    assert spec.exclude_interfaces == ("eth0", "a-b_c.d@e")
    assert spec.proxy_uid == 1000


def test_bad_default_names_the_flag() -> None:
    with pytest.raises(SpecError, match=r"^--exclude-outbound-ports: invalid value 'x'"):
        build_spec({}, {"exclude_outbound_ports": "x"})


def test_unknown_default_setting_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown default settings"):
        build_spec({}, {"no_such_setting": "1"})


def test_unrelated_annotations_are_ignored() -> None:
    assert build_spec({"app": "x", "sidecar.istio.io/status": "{}"}) == InterceptSpec()


def test_fingerprint_is_stable_and_tracks_every_field() -> None:
    base = build_spec({})
    assert base.fingerprint() == build_spec({}).fingerprint()
    changed = {
        build_spec({ann.EXCLUDE_INBOUND_PORTS: "22"}).fingerprint(),
        build_spec({ann.CAPTURE_DNS: "true"}).fingerprint(),
        build_spec({ann.ENVOY_USERID: "1000"}).fingerprint(),
        base.with_ipv6(True).fingerprint(),
        base.with_ipv6(False).fingerprint(),
    }
    assert base.fingerprint() not in changed
    assert len(changed) == 5


def test_none_mode_does_not_intercept() -> None:
    assert not build_spec({ann.INTERCEPTION_MODE: "NONE"}).intercepts


def test_cidrs_with_host_bits_are_masked_as_istio_masks_them() -> None:
    spec = build_spec({ann.EXCLUDE_OUTBOUND_IP_RANGES: "10.96.0.2/24,10.96.0.3/24,fd00::1/8,192.0.2.7"})
    assert [str(n) for n in spec.exclude_outbound_ip_ranges] == ["10.96.0.0/24", "fd00::/8", "192.0.2.7/32"]
    assert masked_cidrs("10.96.0.2/24, 10.0.0.0/8,fd00::1/8,192.0.2.7", "x") == (
        ("10.96.0.2/24", ipaddress.ip_network("10.96.0.0/24")),
        ("fd00::1/8", ipaddress.ip_network("fd00::/8")),
    )
    assert masked_cidrs("*", "x") == ()


def test_owner_groups_and_drop_invalid_default_to_istio() -> None:
    spec = build_spec({})
    assert not spec.drop_invalid
    assert spec.outbound_owner_groups == WILDCARD
    assert spec.outbound_owner_groups_exclude == ()


def test_owner_groups_parse_numeric_gids_like_istio() -> None:
    given = {"drop_invalid": "true", "outbound_owner_groups": " 202, 0,202 "}
    given["outbound_owner_groups_exclude"] = "8"
    spec = build_spec({}, given)
    assert spec.drop_invalid
    assert spec.outbound_owner_groups == (202, 0)
    assert spec.outbound_owner_groups_exclude == (8,)
    # Istio reads an empty ISTIO_OUTBOUND_OWNER_GROUPS as unset: every group.
    assert build_spec({}, {"outbound_owner_groups": ""}).outbound_owner_groups == WILDCARD
    assert build_spec({}, {"outbound_owner_groups": "*"}).outbound_owner_groups == WILDCARD
    most = ",".join(map(str, range(49)))
    assert len(build_spec({}, {"outbound_owner_groups": most}).outbound_owner_groups) == 49


@pytest.mark.parametrize(
    ("setting", "value", "reason"),
    [
        ("outbound_owner_groups", "java,202", "group 'java' is not a numeric gid"),
        ("outbound_owner_groups_exclude", "888,ftp", "group 'ftp' is not a numeric gid"),
        ("outbound_owner_groups_exclude", "*", "group '\\*' is not a numeric gid"),
        ("outbound_owner_groups", "-1", "group '-1' is not a numeric gid"),
        ("outbound_owner_groups", "4294967295", "is not a numeric gid from 0 to 4294967294"),
        ("outbound_owner_groups", ",".join(map(str, range(50))), "more than 49 groups"),
        ("drop_invalid", "yes", 'must be "true" or "false"'),
    ],
)
def test_bad_owner_groups_and_drop_invalid_name_the_flag(setting: str, value: str, reason: str) -> None:
    flag = "--" + setting.replace("_", "-")
    with pytest.raises(SpecError, match=rf"^{flag}: invalid value .*{reason}"):
        build_spec({}, {setting: value})


def test_fingerprint_tracks_owner_groups_and_drop_invalid() -> None:
    prints = {
        build_spec({}, given).fingerprint()
        for given in (
            {},
            {"drop_invalid": "true"},
            {"outbound_owner_groups": "1000"},
            {"outbound_owner_groups_exclude": "1000"},
        )
    }
    assert len(prints) == 4
