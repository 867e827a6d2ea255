"""The pod's resolv.conf is the tenant's file: read it the way an attacker would have us misread it.

A fake proc root holds `PID/root` (a symlink to a tenant root directory, as /proc/PID/root is a magic link
to the process's root) and `PID/ns/net` (a file whose identity stands for the namespace).
"""

from __future__ import annotations

import ipaddress
import os
import threading
from pathlib import Path

import pytest

from istio_pod_network_controller.dataplane import resolvconf
from istio_pod_network_controller.dataplane.netns import NetnsId

HOST_SECRET = b"nameserver 192.0.2.99\n"
"""A node file with a nameserver line: reading it through any tenant trick would leak it into the rules."""


def _pod(tmp_path: Path, pid: int = 42) -> tuple[Path, Path, NetnsId]:
    """(proc root, the tenant's root directory, the pod's namespace id)."""
    proc = tmp_path / "proc"
    rootfs = tmp_path / f"rootfs{pid}"
    (rootfs / "etc").mkdir(parents=True)
    (proc / str(pid) / "ns").mkdir(parents=True)
    (proc / str(pid) / "root").symlink_to(rootfs)
    net = proc / str(pid) / "ns" / "net"
    net.write_bytes(b"")
    info = net.stat()
    (tmp_path / "host-secret").write_bytes(HOST_SECRET)
    return proc, rootfs, NetnsId(info.st_dev, info.st_ino)


def test_reads_the_pods_nameservers(tmp_path: Path) -> None:
    proc, rootfs, netns = _pod(tmp_path)
    (rootfs / "etc" / "resolv.conf").write_text("search svc.cluster.local\nnameserver 10.96.0.10\n")
    found = resolvconf.pod_nameservers([42], netns, str(proc))
    assert found == (ipaddress.ip_address("10.96.0.10"),)


@pytest.mark.parametrize(
    "link",
    ["/host-secret", "../../host-secret", "../../../../../../host-secret", "/../host-secret"],
)
def test_a_tenant_symlink_cannot_name_a_node_file(tmp_path: Path, link: str) -> None:
    """Absolute and `..` symlinks resolve inside the pod's root (RESOLVE_IN_ROOT), never on the node."""
    proc, rootfs, netns = _pod(tmp_path)
    (rootfs / "etc" / "resolv.conf").symlink_to(link if link.startswith(".") else str(tmp_path) + link)
    assert resolvconf.pod_nameservers([42], netns, str(proc)) is None


def test_a_symlinked_etc_stays_inside_the_root(tmp_path: Path) -> None:
    proc, rootfs, netns = _pod(tmp_path)
    (rootfs / "etc").rmdir()
    (rootfs / "etc").symlink_to(tmp_path)  # etc -> the node directory holding host-secret
    (tmp_path / "resolv.conf").write_bytes(HOST_SECRET)
    assert resolvconf.pod_nameservers([42], netns, str(proc)) is None


def test_a_symlink_inside_the_root_is_followed_there(tmp_path: Path) -> None:
    proc, rootfs, netns = _pod(tmp_path)
    (rootfs / "run").mkdir()
    (rootfs / "run" / "resolv.conf").write_text("nameserver fd00::a\n")
    (rootfs / "etc" / "resolv.conf").symlink_to("/run/resolv.conf")
    assert resolvconf.pod_nameservers([42], netns, str(proc)) == (ipaddress.ip_address("fd00::a"),)


def test_a_fifo_or_directory_is_not_read_and_cannot_block(tmp_path: Path) -> None:
    proc, rootfs, netns = _pod(tmp_path)
    os.mkfifo(rootfs / "etc" / "resolv.conf")
    result: list[object] = []
    reader = threading.Thread(
        target=lambda: result.append(resolvconf.pod_nameservers([42], netns, str(proc)))
    )
    reader.start()
    reader.join(timeout=30)
    assert not reader.is_alive(), "a FIFO must not block the reader"
    assert result == [None]
    (rootfs / "etc" / "resolv.conf").unlink()
    (rootfs / "etc" / "resolv.conf").mkdir()
    assert resolvconf.pod_nameservers([42], netns, str(proc)) is None


def test_a_process_outside_the_pods_namespace_is_not_asked(tmp_path: Path) -> None:
    """A PID reused by a process of another namespace (here: another namespace id) gives nothing."""
    proc, rootfs, _ = _pod(tmp_path)
    (rootfs / "etc" / "resolv.conf").write_text("nameserver 10.96.0.10\n")
    assert resolvconf.pod_nameservers([42], NetnsId(0, 1), str(proc)) is None


def test_the_first_process_with_the_file_answers(tmp_path: Path) -> None:
    """The sandbox (pause) has no resolv.conf; the next process of the pod has."""
    proc, _, netns = _pod(tmp_path, 7)
    rootfs = tmp_path / "rootfs8"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc" / "resolv.conf").write_text("nameserver 10.96.0.10\n")
    (proc / "8" / "ns").mkdir(parents=True)
    (proc / "8" / "root").symlink_to(rootfs)
    os.link(proc / "7" / "ns" / "net", proc / "8" / "ns" / "net")  # the same namespace
    assert resolvconf.pod_nameservers([7, 8], netns, str(proc)) == (ipaddress.ip_address("10.96.0.10"),)
    assert resolvconf.pod_nameservers([7], netns, str(proc)) is None
    assert resolvconf.pod_nameservers([], netns, str(proc)) is None


HOSTILE_LINES = [
    "nameserver 10.0.0.1 -j ACCEPT",
    "nameserver fe80::1%eth0",
    "nameserver fe80::1%lo\n-A OUTPUT -j ACCEPT",
    'nameserver 10.0.0.2\x00; include "/etc/shadow"',
    "nameserver ;rm",
    "nameserver 999.1.1.1",
    "nameserver 010.1.1.1",
    "nameserver 10.0.0.0/8",
    "#nameserver 10.9.9.9",
    "; nameserver 10.9.9.8",
    "nameservers 10.9.9.7",
    "nameserver\u2028 10.9.9.6",
    "nameserver\u0085 10.9.9.5",
    "nameserver " + "1" * 5000,
    "nameserver",
    "\tnameserver\t10.0.0.3 ",
    "nameserver ::ffff:10.0.0.4",
    "nameserver 10.0.0.3",
]


def test_parse_keeps_only_plain_addresses() -> None:
    data = "\n".join(HOSTILE_LINES).encode("utf-8")
    assert resolvconf.parse_nameservers(data) == tuple(
        ipaddress.ip_address(a) for a in ("10.0.0.1", "10.0.0.3", "::ffff:10.0.0.4")
    )


def test_parse_is_bounded() -> None:
    data = "".join(f"nameserver 10.1.{i // 256}.{i % 256}\n" for i in range(1000)).encode()
    assert len(resolvconf.parse_nameservers(data)) == resolvconf.MAX_SERVERS
    assert resolvconf.parse_nameservers(b"\xff\xfe nameserver 10.0.0.1\n\x80") == ()


def test_reads_through_a_real_proc_root() -> None:
    """The real /proc/PID/root magic link of this very process, openat2 and all."""
    if not Path("/etc/resolv.conf").is_file():
        pytest.skip("this machine has no /etc/resolv.conf")
    info = os.stat(f"/proc/{os.getpid()}/ns/net")
    expected = resolvconf.parse_nameservers(Path("/etc/resolv.conf").read_bytes()[: resolvconf.MAX_BYTES])
    found = resolvconf.pod_nameservers([os.getpid()], NetnsId(info.st_dev, info.st_ino))
    assert found == expected
