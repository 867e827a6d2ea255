"""The namespace broker: the one process of the controller that may look into other processes.

A confined controller (controller/confinement.py) cannot open `/proc/PID/ns/net` or read through
`/proc/PID/root` of any process outside its Landlock domain, and has no CAP_SYS_PTRACE. Before confining
itself it forks this broker, which keeps CAP_SYS_PTRACE and nothing else, and answers four kinds
of question about a PID under the node's /proc, over a socketpair:

- `F pid index`: the file procfs.FILES[index] of the PID (cgroup, stat, its namespace's addresses);
- `N pid`: an fd of the PID's network namespace (sent with SCM_RIGHTS), refused (EPERM) for the node's own
  namespaces (netns.node_netns, read when the broker starts): the host guard is a process boundary;
- `S pid`: that namespace's (device, inode);
- `R pid dev ino`: the nameservers of the PID's resolv.conf (read as resolvconf.py does, in the PID's root),
  answered as IP addresses only, when the PID is in that namespace.

A request is a fixed-size struct of integers, so nothing the controller sends names a path; environ, maps,
cmdline, mem and root are never opened for it. The broker
cannot be ptraced or read through /proc by the confined controller (Landlock scopes ptrace to its domain),
dies with it (PDEATHSIG) and exits when the socket closes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import socket
import struct
import threading
from collections.abc import Iterable
from typing import Final

from ..errors import DataplaneError
from ..settings.spec import IPAddress
from . import capabilities, landlock, procfs, resolvconf, seccomp
from .netns import NetnsId, node_netns

_REQUEST: Final = struct.Struct("!cIQQ")
_ID: Final = struct.Struct("!QQ")
_ERRNO: Final = struct.Struct("!H")
_MAX_ANSWER: Final = procfs.MAX_BYTES + 1
TIMEOUT_SECONDS: Final = 10.0
_PR_SET_PDEATHSIG, _PR_SET_NAME = 1, 15
KEPT: Final = ("SYS_PTRACE",)


class NsBroker:
    """The controller's end: the `procfs.ProcSource` of `proc_root` (one request at a time)."""

    def __init__(self, sock: socket.socket, pid: int, proc_root: str) -> None:
        self._sock = sock
        self.pid = pid
        self.proc_root = proc_root
        self._lock = threading.Lock()
        self._exited = False
        self._reaping = threading.Lock()  # not the request lock: /healthz must not wait for an answer

    @classmethod
    def start(cls, proc_root: str) -> NsBroker:
        """Fork the broker; call while the process has one thread (fork copies only the caller)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for end in (ours, theirs):  # one answer is one message: room for the largest
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2 * _MAX_ANSWER)
            end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2 * _MAX_ANSWER)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child never returns (covered through its answers)
            ours.close()
            status = 1
            try:
                _serve(theirs, proc_root)
                status = 0
            finally:
                os._exit(status)
        theirs.close()
        ours.settimeout(TIMEOUT_SECONDS)
        return cls(ours, pid, proc_root)

    def open_netns(self, pid: int) -> int:
        answer, fds = self._ask(b"N", pid)
        if answer[:1] == b"K" and len(fds) == 1:
            return fds[0]
        for fd in fds:
            os.close(fd)
        raise _error(answer, pid)

    def netns_id(self, pid: int) -> NetnsId:
        answer, _ = self._ask(b"S", pid)
        if answer[:1] == b"K" and len(answer) == 1 + _ID.size:
            return NetnsId(*_ID.unpack(answer[1:]))
        raise _error(answer, pid)

    def read(self, pid: int, name: str) -> bytes:
        answer, _ = self._ask(b"F", pid, procfs.FILES.index(name))
        if answer[:1] == b"K":
            return answer[1:]
        raise _error(answer, pid)

    def nameservers(self, pids: Iterable[int], netns: NetnsId) -> tuple[IPAddress, ...] | None:
        for pid in pids:
            answer, _ = self._ask(b"R", pid, netns.dev, netns.ino)
            if answer[:1] == b"K":
                lines = b"".join(b"nameserver " + word + b"\n" for word in answer[1:].split())
                return resolvconf.parse_nameservers(lines)
        return None

    def _ask(self, op: bytes, pid: int, dev: int = 0, ino: int = 0) -> tuple[bytes, list[int]]:
        if not 0 <= pid < 1 << 32:
            return b"E" + _ERRNO.pack(errno.ESRCH), []
        with self._lock:
            try:
                self._sock.send(_REQUEST.pack(op, pid, dev, ino))
                answer, fds, _, _ = socket.recv_fds(self._sock, _MAX_ANSWER, 1)
            except OSError as exc:
                # A late answer would be read as the next request's: end the channel (the broker exits on
                # it, /healthz fails and the controller is restarted with a fresh one).
                self._sock.close()
                raise DataplaneError(f"the namespace broker does not answer: {exc}") from None
        if not answer:
            raise DataplaneError("the namespace broker exited")
        return answer, fds

    def alive(self) -> bool:
        """False once the broker has exited (reaped here)."""
        with self._reaping:
            if not self._exited:
                try:
                    self._exited = os.waitpid(self.pid, os.WNOHANG) != (0, 0)
                except ChildProcessError:
                    self._exited = True
            return not self._exited

    def close(self) -> None:
        """Close the socket (the broker exits on it) and reap the broker."""
        self._sock.close()
        with self._reaping, contextlib.suppress(ChildProcessError):
            if not self._exited:
                os.waitpid(self.pid, 0)
                self._exited = True


def _error(answer: bytes, pid: int) -> OSError:
    code = _ERRNO.unpack(answer[1:3])[0] if answer[:1] == b"E" and len(answer) == 3 else errno.EIO
    return OSError(code, os.strerror(code), f"PID {pid}")


def _serve(sock: socket.socket, proc_root: str) -> None:
    """The broker's loop: keep only CAP_SYS_PTRACE, then answer until the controller closes the socket."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    libc.prctl(_PR_SET_NAME, b"ipnc-nsbroker", 0, 0, 0)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    capabilities.keep_only(KEPT)
    landlock.set_no_new_privs()
    if seccomp.supported():
        seccomp.install()
    keep = sock.fileno()
    os.closerange(3, keep)
    os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX") if os.sysconf("SC_OPEN_MAX") > 0 else 65536)
    sock.settimeout(None)
    host = node_netns(proc_root).ids
    while True:
        request = sock.recv(_REQUEST.size + 1)
        if len(request) != _REQUEST.size:
            return
        op, pid, dev, ino = _REQUEST.unpack(request)
        _answer(sock, proc_root, host, op, pid, NetnsId(dev, ino))


def _answer(
    sock: socket.socket, proc_root: str, host: frozenset[NetnsId], op: bytes, pid: int, netns: NetnsId
) -> None:
    path = os.path.join(proc_root, str(pid), "ns", "net")
    try:
        if op == b"F" and netns.dev < len(procfs.FILES):
            sock.send(b"K" + procfs.read_direct(proc_root, pid, procfs.FILES[netns.dev]))
        elif op == b"N":
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                info = os.fstat(fd)
                if NetnsId(info.st_dev, info.st_ino) in host:
                    raise OSError(errno.EPERM, "the node's own network namespace")
                socket.send_fds(sock, [b"K"], [fd])
            finally:
                os.close(fd)
        elif op == b"S":
            info = os.stat(path)
            sock.send(b"K" + _ID.pack(info.st_dev, info.st_ino))
        elif op == b"R":
            servers = resolvconf.read_nameservers([pid], netns, proc_root)
            sock.send(b"-" if servers is None else b"K" + " ".join(map(str, servers)).encode())
        else:
            sock.send(b"E" + _ERRNO.pack(errno.EINVAL))
    except OSError as exc:
        sock.send(b"E" + _ERRNO.pack((exc.errno or errno.EIO) & 0xFFFF))
