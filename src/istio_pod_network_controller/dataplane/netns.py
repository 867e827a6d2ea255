"""Pinned network namespaces, entered per call on a short-lived thread.

A namespace is held as an open fd (plus its device/inode identity), never as a path or PID that could be
reused by another pod. Work inside it runs on a fresh thread that calls setns(2) and then exits, so the
controller's own threads never change namespace, and the tools it spawns from that thread (iptables-restore,
nft, ip) start directly inside the pod's namespace without `ip netns exec` or `nsenter`.
"""

from __future__ import annotations

import ctypes
import os
import resource
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from ..errors import DataplaneError, HostNetnsRefused

CLONE_NEWNET = 0x40000000
T = TypeVar("T")
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True, slots=True)
class NetnsId:
    """Identity of a network namespace: the (device, inode) of its nsfs file."""

    dev: int
    ino: int

    def __str__(self) -> str:
        return f"net:[{self.ino}]"


class PinnedNetns:
    """An open fd to a network namespace; the namespace stays alive and identical while this is open."""

    def __init__(self, fd: int, description: str) -> None:
        info = os.fstat(fd)
        self.fd = fd
        self.id = NetnsId(info.st_dev, info.st_ino)
        self.description = description
        self.not_node = False
        """Set by discovery once it proved this is not the node's namespace (it lacks the node's IP)."""
        self.via_pid = False
        """Opened through a process (which may live in the node's namespace), not a namespace file."""

    @classmethod
    def open_path(cls, path: str) -> PinnedNetns:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise DataplaneError(f"cannot open network namespace {path}: {exc.strerror}") from None
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode) or not _is_netns(fd):
            os.close(fd)
            raise DataplaneError(f"{path} is not a network namespace")
        return cls(fd, path)

    @classmethod
    def open_pid(cls, pid: int, proc_root: str = "/proc") -> PinnedNetns:
        pinned = cls.open_path(os.path.join(proc_root, str(pid), "ns", "net"))
        pinned.via_pid = True
        return pinned

    def intact(self) -> bool:
        """Whether the fd is open and still refers to the namespace it was opened on (same inode)."""
        if self.fd < 0:
            return False
        try:
            info = os.fstat(self.fd)
        except OSError:
            return False
        return NetnsId(info.st_dev, info.st_ino) == self.id

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> PinnedNetns:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PinnedNetns({self.description}, {self.id})"


def _is_netns(fd: int) -> bool:
    """NS_GET_NSTYPE would be exact; a setns probe on a throwaway thread is portable and just as strict."""
    try:
        _on_thread(lambda: _setns(fd), lambda: None)
    except DataplaneError:
        return False
    return True


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise DataplaneError(f"setns: {os.strerror(err)}")


def _unshare() -> None:
    if _libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise DataplaneError(f"unshare(CLONE_NEWNET): {os.strerror(err)}")


def _on_thread(enter: Callable[[], None], work: Callable[[], T]) -> T:
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            enter()
            result.append(work())
        except BaseException as exc:  # re-raised in the caller's thread below
            error.append(exc)

    thread = threading.Thread(target=body, name="netns-worker", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def run_in(netns: PinnedNetns, work: Callable[[], T]) -> T:
    """Run `work` on a thread inside `netns`; the thread exits afterwards, so nothing leaks out."""
    if not netns.intact():
        raise DataplaneError(f"{netns.description}: namespace handle is closed or no longer {netns.id}")
    return _on_thread(lambda: _setns(netns.fd), work)


def run_in_scratch(work: Callable[[], T]) -> T:
    """Run `work` inside a brand-new empty network namespace that vanishes when the thread exits."""
    return _on_thread(_unshare, work)


@dataclass(frozen=True, slots=True)
class NodeNetns:
    """What is known of the node's own network namespace without asking any pod.

    `ids`: PID 1's namespace under the proc root (and the host's /proc/1), and this process's (never a
    pod's), each when readable. When PID 1's cannot be read (EACCES happens on real nodes even for root
    with CAP_SYS_PTRACE) the node's namespace is not identified by this alone: a namespace reached through
    a process is then written only when discovery proved it is not the node's (it lacks the node's IP).
    """

    ids: frozenset[NetnsId]
    pid1_known: bool
    """PID 1's namespace under the proc root could be read (the proc root is the seam tests use)."""


def _stat_id(path: str) -> NetnsId | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return NetnsId(info.st_dev, info.st_ino)


def node_netns(proc_root: str = "/proc") -> NodeNetns:
    """The node's namespace as far as PID 1 and this process can tell (see NodeNetns)."""
    pid1 = _stat_id(os.path.join(proc_root, "1", "ns", "net"))
    ids = {pid1, _stat_id("/proc/1/ns/net"), _stat_id("/proc/self/ns/net")} - {None}
    return NodeNetns(frozenset(i for i in ids if i is not None), pid1 is not None)


def refuse_host(netns: PinnedNetns, proc_root: str = "/proc", *, allow_host: bool = False) -> None:
    """Raise HostNetnsRefused when `netns` is, or cannot be told apart from, the node's own namespace.

    Never PID 1's nor ours. A namespace reached through a process (`--pid`, discovery) while PID 1's is
    unreadable is refused unless discovery proved it lacks the node's IP (`netns.not_node`): cannot tell
    means refuse. A namespace file named explicitly (`--netns PATH`) is the caller's choice.
    """
    if allow_host:
        return
    node = node_netns(proc_root)
    if netns.id in node.ids:
        raise HostNetnsRefused(
            f"{netns.description} ({netns.id}) is the host's network namespace; refusing to change the "
            "node's own firewall (override: --allow-host-netns)"
        )
    if not node.pid1_known and netns.via_pid and not netns.not_node:
        raise HostNetnsRefused(
            f"{netns.description} ({netns.id}): {os.path.join(proc_root, '1', 'ns', 'net')} cannot be read, "
            "so it cannot be told apart from the node's own network namespace; refusing (fail closed)"
        )


def raise_open_files_limit() -> int:
    """Lift the soft RLIMIT_NOFILE to the hard one: the controller keeps one fd per initialized pod."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard
