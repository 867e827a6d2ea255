"""The node's per-process /proc files the controller reads, reached directly or through a broker.

Discovery needs five files of other processes (`FILES`) and their network namespace. A confined controller
(controller/confinement.py) may list the node's /proc but read no file there, so none of the rest
(environ, maps, cmdline, root, mem, fd) is within its reach: it installs the namespace broker as the
`ProcSource` of that proc root, and every read below goes through it. Unconfined (the `rules` commands run
by hand, tests), files are read directly.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final, Protocol

if TYPE_CHECKING:
    from ..settings.spec import IPAddress
    from .netns import NetnsId

FILES: Final = ("cgroup", "stat", "net/fib_trie", "net/if_inet6", "net/ip_tables_names")
"""The only per-process files read: pod membership, start time, local addresses, the node's backend."""
MAX_BYTES: Final = 128 * 1024
"""A read stops here (a pod's fib_trie is a few KiB)."""
SELF: Final = 0
"""The PID that stands for `self` (the reader's own process, in the controller's network namespace)."""
VANISHED: Final = (errno.ENOENT, errno.ESRCH)
_CHUNK: Final = 65536


class ProcSource(Protocol):
    """Answers for the processes under one proc root, on behalf of a controller that may not look."""

    proc_root: str

    def open_netns(self, pid: int) -> int:
        """An O_RDONLY fd of PID's network namespace; raises OSError as open(2) would."""

    def netns_id(self, pid: int) -> NetnsId:
        """The identity of PID's network namespace; raises OSError as stat(2) would."""

    def read(self, pid: int, name: str) -> bytes:
        """The file `name` (one of FILES) of PID, at most MAX_BYTES; raises OSError."""

    def nameservers(self, pids: Iterable[int], netns: NetnsId) -> tuple[IPAddress, ...] | None:
        """resolvconf.pod_nameservers for these PIDs (the source may read the pods' files)."""

    def alive(self) -> bool:
        """Whether the source can still answer (a broker that died cannot: the controller is unhealthy)."""


_SOURCES: dict[str, ProcSource] = {}
"""proc root (absolute) -> the source serving it; at most one entry."""


def use_source(source: ProcSource | None) -> None:
    """Route every later read under `source.proc_root` through `source` (None: read directly again)."""
    _SOURCES.clear()
    if source is not None:
        _SOURCES[os.path.abspath(source.proc_root)] = source


def active_source(proc_root: str) -> ProcSource | None:
    """The source serving `proc_root`, or None when files there are read directly."""
    return _SOURCES.get(os.path.abspath(proc_root))


def sources_alive() -> bool:
    return all(source.alive() for source in _SOURCES.values())


def read(proc_root: str, pid: int, name: str) -> bytes | None:
    """File `name` (one of FILES) of `pid` (SELF: this process), or None when the process is gone."""
    source = active_source(proc_root)
    try:
        return source.read(pid, name) if source is not None else read_direct(proc_root, pid, name)
    except OSError as exc:
        if exc.errno in VANISHED:
            return None
        raise


def read_direct(proc_root: str, pid: int, name: str) -> bytes:
    """The file itself, at most MAX_BYTES; raises OSError."""
    if name not in FILES or pid < 0:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), name)
    path = os.path.join(proc_root, "self" if pid == SELF else str(pid), name)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = [os.read(fd, _CHUNK)]
        while len(chunks[-1]) == _CHUNK and len(chunks) * _CHUNK < MAX_BYTES:
            chunks.append(os.read(fd, _CHUNK))
    finally:
        os.close(fd)
    return b"".join(chunks)[:MAX_BYTES]


def read_thread_self(name: str) -> bytes:
    """File `name` (one of FILES) of the calling thread (its network namespace), at most MAX_BYTES."""
    if name not in FILES:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), name)
    with open(os.path.join("/proc/thread-self", name), "rb") as file:
        return file.read(MAX_BYTES)
