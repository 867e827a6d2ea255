"""The pod's resolv.conf nameservers, which Istio's sidecar DNS capture is limited to, read as hostile input.

The file is the tenant's: it is reached through a pod process's `/proc/PID/root` with openat2 and
RESOLVE_IN_ROOT, so every symlink (absolute or `..`) resolves inside that process's root and can never name a
file of the node; magic links are refused, only a regular file is read (a FIFO cannot block us), at most
64 KiB, and only `nameserver` values that parse as an IP address without a scope are kept. The process must
still be in the pod's network namespace after the open (a reused PID is not the pod's).

A controller that confined itself cannot open other processes' roots: `pod_nameservers` then asks the
proc root's source (the broker of dataplane/nsbroker.py), which runs `read_nameservers` for it and
answers with addresses only.

No pod process with the file yet (only the sandbox runs): the nameservers are unknown and DNS capture takes
Istio CNI's capture-all form until a later apply or verify finds them (see docs/rules.md).
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import stat
from collections.abc import Iterable
from typing import Final

from ..settings.spec import IPAddress
from . import procfs
from .netns import NetnsId

SYS_OPENAT2: Final = 437  # the same number on every architecture Linux has had since openat2 (5.6)
RESOLVE_NO_MAGICLINKS: Final = 0x02
RESOLVE_IN_ROOT: Final = 0x10
MAX_BYTES: Final = 64 * 1024
MAX_SERVERS: Final = 16
RESOLV_CONF: Final = "etc/resolv.conf"


class _OpenHow(ctypes.Structure):
    _fields_ = (("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64))


_libc = ctypes.CDLL(None, use_errno=True)


def open_in_root(root_fd: int, path: str) -> int:
    """openat2(root_fd, path, O_RDONLY|O_NONBLOCK, RESOLVE_IN_ROOT|RESOLVE_NO_MAGICLINKS); raises OSError."""
    how = _OpenHow(
        os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY, 0, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS
    )
    fd = _libc.syscall(
        ctypes.c_long(SYS_OPENAT2),
        ctypes.c_int(root_fd),
        ctypes.c_char_p(path.encode()),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(fd)


def read_in_root(root: str, path: str = RESOLV_CONF) -> bytes | None:
    """The regular file `path` under the directory `root` (symlinks kept inside it), or None."""
    try:
        root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fd = open_in_root(root_fd, path)
    except OSError:
        return None
    finally:
        os.close(root_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, MAX_BYTES)
    except OSError:
        return None
    finally:
        os.close(fd)


def parse_nameservers(data: bytes) -> tuple[IPAddress, ...]:
    """`nameserver ADDRESS` lines, in order, deduplicated; anything else, or a scoped address, is ignored."""
    servers: dict[IPAddress, None] = {}
    for raw in data.decode("ascii", errors="replace").splitlines():
        words = raw.split()
        if len(words) < 2 or words[0] != "nameserver" or "%" in words[1]:
            continue
        try:
            servers[ipaddress.ip_address(words[1])] = None
        except ValueError:
            continue
        if len(servers) == MAX_SERVERS:
            break
    return tuple(servers)


def _in_netns(proc_root: str, pid: int, netns: NetnsId) -> bool:
    try:
        info = os.stat(os.path.join(proc_root, str(pid), "ns", "net"))
    except OSError:
        return False
    return (info.st_dev, info.st_ino) == (netns.dev, netns.ino)


def pod_nameservers(
    pids: Iterable[int], netns: NetnsId, proc_root: str = "/proc"
) -> tuple[IPAddress, ...] | None:
    """The nameservers of the first of `pids` that has a resolv.conf and is in `netns`; None if none has."""
    source = procfs.active_source(proc_root)
    if source is not None:
        return source.nameservers(pids, netns)
    return read_nameservers(pids, netns, proc_root)


def read_nameservers(pids: Iterable[int], netns: NetnsId, proc_root: str) -> tuple[IPAddress, ...] | None:
    """`pod_nameservers` by reading the files directly (through each process's root)."""
    for pid in pids:
        data = read_in_root(os.path.join(proc_root, str(pid), "root"))
        if data is not None and _in_netns(proc_root, pid, netns):
            return parse_nameservers(data)
    return None
