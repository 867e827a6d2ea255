"""Pinned network namespaces, entered per call on a short-lived thread.

Another process's namespace file is opened directly (`/proc/PID/ns/net`) unless the controller confined
itself: it may not open other processes' namespace files then, and the broker of procfs.py opens them.

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
from . import procfs

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


def pid_netns_id(proc_root: str, pid: int) -> NetnsId:
    """The identity of PID's network namespace; raises OSError."""
    source = procfs.active_source(proc_root)
    if source is not None:
        return source.netns_id(pid)
    info = os.stat(os.path.join(proc_root, str(pid), "ns", "net"))
    return NetnsId(info.st_dev, info.st_ino)


class PinnedNetns:
    """An open fd to a network namespace; the namespace stays alive and identical while this is open."""

    def __init__(self, fd: int, description: str) -> None:
        info = os.fstat(fd)
        self.fd = fd
        self.id = NetnsId(info.st_dev, info.st_ino)
        self.description = description

    @classmethod
    def open_path(cls, path: str) -> PinnedNetns:
        return cls._opened(lambda: os.open(path, os.O_RDONLY | os.O_CLOEXEC), path)

    @classmethod
    def open_pid(cls, pid: int, proc_root: str = "/proc") -> PinnedNetns:
        path = os.path.join(proc_root, str(pid), "ns", "net")
        source = procfs.active_source(proc_root)
        if source is None:
            return cls.open_path(path)
        return cls._opened(lambda: source.open_netns(pid), path)

    @classmethod
    def _opened(cls, opener: Callable[[], int], path: str) -> PinnedNetns:
        try:
            fd = opener()
        except OSError as exc:
            raise DataplaneError(f"cannot open network namespace {path}: {exc.strerror}") from None
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode) or not _is_netns(fd):
            os.close(fd)
            raise DataplaneError(f"{path} is not a network namespace")
        return cls(fd, path)

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


def host_netns_ids(proc_root: str = "/proc") -> set[NetnsId]:
    """The namespaces that are the node's own: PID 1's (when readable) and this process's.

    In a DaemonSet with hostPID, proc_root/1 is the node's init; our own namespace counts too because a
    controller with hostNetwork runs in the node's namespace even where PID 1's cannot be read.
    """
    own = os.stat("/proc/self/ns/net")
    ids = {NetnsId(own.st_dev, own.st_ino)}
    for root in {proc_root, "/proc"}:
        try:
            ids.add(pid_netns_id(root, 1))
        except OSError:
            continue
    return ids


def refuse_host(netns: PinnedNetns, proc_root: str = "/proc", *, allow_host: bool = False) -> None:
    """Raise HostNetnsRefused when `netns` is the node's own namespace, unless explicitly allowed."""
    if not allow_host and netns.id in host_netns_ids(proc_root):
        raise HostNetnsRefused(
            f"{netns.description} ({netns.id}) is the host's network namespace; refusing to change the "
            "node's own firewall (override: --allow-host-netns)"
        )


def raise_open_files_limit() -> int:
    """Lift the soft RLIMIT_NOFILE to the hard one: the controller keeps one fd per initialized pod."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard
