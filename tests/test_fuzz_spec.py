"""Property tests: any annotation map is either refused with our own error naming the annotation, or it
renders rules that the real tools accept (iptables-restore --test for both variants and families, nft -c).

`make soak` runs >= 10,000 examples (HYPOTHESIS_PROFILE=soak); `make test` a smaller profile.
"""

from __future__ import annotations

import ipaddress
import subprocess

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from istio_pod_network_controller.dataplane import netns
from istio_pod_network_controller.errors import SpecError
from istio_pod_network_controller.rules import iptables, nftables, plan
from istio_pod_network_controller.settings import annotations as ann
from istio_pod_network_controller.settings.spec import SPEC_ANNOTATIONS, build_spec

VALID_PORT = st.integers(min_value=1, max_value=65535).map(str)
PORT = st.one_of(VALID_PORT, VALID_PORT, VALID_PORT, st.integers(min_value=-5, max_value=70000).map(str))
VALID_CIDR = st.one_of(
    st.builds(
        lambda a, p: str(ipaddress.ip_network(f"10.{a}.0.0/{p}", strict=False)),
        st.integers(0, 255),
        st.integers(8, 32),
    ),
    st.builds(
        lambda a, p: str(ipaddress.ip_network(f"fd00:{a:x}::/{p}", strict=False)),
        st.integers(0, 0xFFFF),
        st.integers(16, 128),
    ),
)
BAD_CIDR = st.builds(
    lambda a, b, p: f"10.{a}.{b}.0/{p}", st.integers(0, 300), st.integers(0, 255), st.integers(8, 33)
)
CIDR = st.one_of(VALID_CIDR, VALID_CIDR, VALID_CIDR, BAD_CIDR)
VALID_IFACE = st.from_regex(r"[a-z][a-z0-9_.-]{0,14}", fullmatch=True)
IFACE = st.one_of(
    VALID_IFACE, VALID_IFACE, st.text(alphabet="abcdefghijklmnop0123456789-_.@:;/ ", max_size=18)
)


def _list(item: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.lists(item, max_size=6).map(",".join)


VALUE_FOR = {
    ann.INTERCEPTION_MODE: st.sampled_from(
        ["REDIRECT", "TPROXY", "REDIRECT", "TPROXY", "NONE", "redirect", "MAGIC"]
    ),
    ann.ENVOY_PORT: PORT,
    ann.ENVOY_USERID: st.one_of(st.integers(1, 65535), st.integers(-1, 2**32)).map(str),
    ann.ENVOY_GROUPID: st.one_of(st.integers(1, 65535), st.integers(-1, 2**32)).map(str),
    ann.INCLUDE_INBOUND_PORTS: st.one_of(st.just("*"), _list(PORT)),
    ann.EXCLUDE_INBOUND_PORTS: _list(PORT),
    ann.INCLUDE_OUTBOUND_IP_RANGES: st.one_of(st.just("*"), _list(CIDR)),
    ann.EXCLUDE_OUTBOUND_IP_RANGES: _list(CIDR),
    ann.INCLUDE_OUTBOUND_PORTS: _list(PORT),
    ann.EXCLUDE_OUTBOUND_PORTS: _list(PORT),
    ann.EXCLUDE_INTERFACES: _list(IFACE),
    ann.REROUTE_VIRTUAL_INTERFACES: _list(IFACE),
    ann.KUBEVIRT_INTERFACES: _list(IFACE),
    ann.CAPTURE_DNS: st.sampled_from(["true", "false", "true", "false", "yes"]),
    ann.IPV6: st.sampled_from(["auto", "capture", "block", "capture", "on"]),
    ann.DROP_INVALID: st.sampled_from(["true", "false", "1"]),
    ann.OUTBOUND_OWNER_GROUPS: st.one_of(
        st.just("*"), _list(st.integers(0, 70000).map(str)), st.just("wheel")
    ),
    ann.OUTBOUND_OWNER_GROUPS_EXCLUDE: _list(st.integers(0, 70000).map(str)),
}
ANNOTATIONS = st.dictionaries(
    st.sampled_from(sorted(SPEC_ANNOTATIONS)),
    st.one_of(st.text(max_size=40), st.just("")),
    max_size=4,
) | st.fixed_dictionaries({}, optional={key: VALUE_FOR[key] for key in sorted(SPEC_ANNOTATIONS)})


def _check_with_tools(texts: dict[str, str]) -> list[str]:
    """Run every checker inside one scratch namespace; return the failures."""
    failures = []
    for argv, text in texts.items():
        done = subprocess.run(argv.split(), input=text, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            failures.append(f"{argv}: {done.stderr.strip()}\n{text}")
    return failures


@pytest.mark.root
@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(annotations=ANNOTATIONS, capture_v6=st.booleans())
def test_any_annotations_are_refused_clearly_or_render_valid_rules(
    annotations: dict[str, str], capture_v6: bool
) -> None:
    try:
        spec = build_spec(annotations)
    except SpecError as exc:
        refused: SpecError | None = exc
    else:
        refused = None
    event("refused" if refused else "accepted")
    if refused is not None:
        key = refused.source.removeprefix("annotation ")
        assert refused.source == f"annotation {key}"
        assert refused.value == annotations[key]
        return
    ruleset = plan.build(spec.with_ipv6(capture_v6))
    texts: dict[str, str] = {"nft -c -f -": nftables.render(ruleset) if ruleset.families else ""}
    for family in ruleset.families:
        tool = "iptables" if family.family == 4 else "ip6tables"
        for variant in ("legacy", "nft"):
            texts[f"{tool}-{variant}-restore --test"] = iptables.render(family)
    failures = netns.run_in_scratch(lambda: _check_with_tools(texts))
    assert not failures, "\n".join(failures)
