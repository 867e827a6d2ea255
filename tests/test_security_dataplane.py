"""Security properties of the data plane's inputs: no annotation becomes a path, a command or a bypass, and
odd entries in the proc root cannot steer the controller into the wrong network namespace."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from istio_pod_network_controller.dataplane import apply as dp
from istio_pod_network_controller.dataplane.discovery import PodNetnsNotFound, find_pod_netns
from istio_pod_network_controller.dataplane.netns import PinnedNetns
from istio_pod_network_controller.errors import DataplaneError, DownwardAPIError, SpecError
from istio_pod_network_controller.settings.downward import parse_annotations
from istio_pod_network_controller.settings.spec import SPEC_ANNOTATIONS, build_spec

UID = "7e57ab1e-0000-4000-8000-00000000cafe"
CGROUP = f"0::/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice/cri-containerd-{'cd' * 32}.scope\n"
PATHS = st.sampled_from(
    [
        "/proc/1/ns/net",
        "../../proc/1/ns/net",
        "/run/netns/x",
        "$(reboot)",
        "`id`",
        "a;b",
        "x\ny",
        "lo/../eth0",
    ]
)


@given(st.dictionaries(st.sampled_from(sorted(SPEC_ANNOTATIONS)), PATHS, min_size=1, max_size=3))
def test_path_or_shell_text_in_any_annotation_is_refused(annotations: dict[str, str]) -> None:
    """No setting accepts a path or shell syntax: every value is a number, CIDR, mode or interface name."""
    with pytest.raises(SpecError):
        build_spec(annotations)


@given(st.text(max_size=300))
def test_downward_file_parser_never_raises_anything_else(text: str) -> None:
    try:
        parsed = parse_annotations(text)
    except DownwardAPIError:
        return
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in parsed.items())


@given(st.dictionaries(st.from_regex(r"[a-z0-9./-]{1,40}", fullmatch=True), st.text(max_size=60), max_size=8))
def test_downward_file_round_trip(annotations: dict[str, str]) -> None:
    """Go-%q-like text (literal UTF-8 or \\u escapes, JSON surrogate pairs included) reads back unchanged."""
    import json

    for ascii_only in (True, False):
        text = "".join(
            f"{k}={json.dumps(v, ensure_ascii=ascii_only)}\n" for k, v in sorted(annotations.items())
        )
        assert parse_annotations(text) == annotations


def _fake_proc(root: Path, pid: int, cgroup: str, net: str) -> None:
    (root / str(pid) / "ns").mkdir(parents=True)
    (root / str(pid) / "cgroup").write_text(cgroup)
    (root / str(pid) / "ns" / "net").symlink_to(net)


@pytest.mark.root
def test_ns_link_to_a_regular_file_is_not_a_namespace(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus"
    bogus.write_text("not a namespace")
    _fake_proc(tmp_path / "proc", 4242, CGROUP, str(bogus))
    with pytest.raises(PodNetnsNotFound):
        find_pod_netns(UID, [], ["10.0.0.9"], host_ips=["10.0.0.254"], proc_root=str(tmp_path / "proc"))


@pytest.mark.root
def test_ns_link_to_the_host_namespace_is_never_returned(tmp_path: Path) -> None:
    _fake_proc(tmp_path / "proc", 4242, CGROUP, f"/proc/{os.getpid()}/ns/net")
    with pytest.raises(PodNetnsNotFound, match=r"in the node's: \[4242\]"):
        find_pod_netns(UID, [], ["10.0.0.9"], host_ips=["10.0.0.254"], proc_root=str(tmp_path / "proc"))


@pytest.mark.root
def test_a_process_claiming_two_pods_is_ignored(tmp_path: Path, netns_name: str) -> None:
    other = CGROUP.replace("0000cafe", "0000beef").replace("0::", "1:name=systemd:")
    _fake_proc(tmp_path / "proc", 4242, CGROUP + other, f"/run/netns/{netns_name}")
    with pytest.raises(PodNetnsNotFound):
        find_pod_netns(UID, [], ["10.0.0.9"], host_ips=["10.0.0.254"], proc_root=str(tmp_path / "proc"))


@pytest.mark.root
def test_the_host_namespace_is_refused_even_through_another_path(tmp_path: Path) -> None:
    """A bind-mount or symlink of the host's namespace file is still the host's namespace (same inode)."""
    link = tmp_path / "innocent-looking"
    link.symlink_to(f"/proc/{os.getpid()}/ns/net")
    with PinnedNetns.open_path(str(link)) as handle, pytest.raises(DataplaneError, match="host's network"):
        dp.apply(handle, build_spec({}))
