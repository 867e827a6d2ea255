"""Landlock (Linux 5.13+): an unprivileged allowlist a process applies to itself, for good.

One source for the system calls, the rights and what each ABI version handles. A domain is built as a
`Ruleset` (every filesystem right the kernel knows is handled, so anything not granted beneath an allowed
path is denied; TCP ports and scopes too where the ABI has them), then `restrict_self` applies it to the
calling thread and every process and thread it creates later. Landlock also denies mount changes and
ptrace (so /proc/PID/ns, /proc/PID/root and /proc/PID/mem) towards any process outside the domain.
"""

from __future__ import annotations

import ctypes
import os
from typing import Final

from ..errors import DataplaneError

_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION: Final = 1
_RULE_PATH_BENEATH, _RULE_NET_PORT = 1, 2
_PR_SET_NO_NEW_PRIVS: Final = 38

EXECUTE: Final = 1 << 0
WRITE_FILE: Final = 1 << 1
READ_FILE: Final = 1 << 2
READ_DIR: Final = 1 << 3
READ: Final = READ_FILE | READ_DIR
READ_EXECUTE: Final = READ | EXECUTE
FILE_RIGHTS: Final = EXECUTE | WRITE_FILE | READ_FILE | (1 << 14) | (1 << 15)
"""The rights a rule on a regular file may carry (execute, write, read, truncate, ioctl_dev)."""
HANDLED_FS_BY_ABI: Final = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 5: (1 << 16) - 1}
"""Every filesystem right each Landlock ABI knows (REFER from 2, TRUNCATE from 3, IOCTL_DEV from 5)."""
BIND_TCP, CONNECT_TCP = 1 << 0, 1 << 1
NET_ABI: Final = 4
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1
SCOPE_ABI: Final = 6


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _NetPortAttr(ctypes.Structure):
    _fields_ = [("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_prctl = _libc.prctl
_prctl.restype = ctypes.c_int


def abi() -> int:
    """The kernel's Landlock ABI version, 0 when it has none (not built in, or not in the LSM list)."""
    version = _syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0), _CREATE_RULESET_VERSION)
    return max(int(version), 0)


def handled_fs(version: int) -> int:
    return HANDLED_FS_BY_ABI[max(v for v in HANDLED_FS_BY_ABI if v <= version)]


class Ruleset:
    """An open Landlock ruleset: every filesystem right handled; TCP and scopes only when asked."""

    def __init__(self, version: int, *, net: bool = False, scoped: bool = False) -> None:
        if version < 1:
            raise DataplaneError("this kernel has no Landlock")
        self.fs = handled_fs(version)
        net_mask = BIND_TCP | CONNECT_TCP if net and version >= NET_ABI else 0
        scope_mask = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if scoped and version >= SCOPE_ABI else 0
        self.handles_net = bool(net_mask)
        self.scoped = bool(scope_mask)
        attr = _RulesetAttr(self.fs, net_mask, scope_mask)
        size = ctypes.c_size_t(ctypes.sizeof(attr))  # zero fields beyond an older kernel's are accepted
        fd = int(_syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), size, 0))
        if fd < 0:
            raise DataplaneError(f"landlock_create_ruleset: {os.strerror(ctypes.get_errno())}")
        os.set_inheritable(fd, False)
        self.fd = fd

    def allow_path(self, path: str, rights: int) -> None:
        """Grant `rights` beneath `path` (on a file: only the file rights among them)."""
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        try:
            if not os.path.isdir(path):
                rights &= FILE_RIGHTS
            rule = _PathBeneathAttr(rights & self.fs, fd)
            if (
                _syscall(_SYS_ADD_RULE, ctypes.c_long(self.fd), _RULE_PATH_BENEATH, ctypes.byref(rule), 0)
                != 0
            ):
                raise DataplaneError(f"landlock_add_rule {path}: {os.strerror(ctypes.get_errno())}")
        finally:
            os.close(fd)

    def allow_port(self, port: int, rights: int) -> None:
        """Grant TCP `rights` (BIND_TCP, CONNECT_TCP) on `port`; a no-op when TCP is not handled."""
        if not self.handles_net:
            return
        rule = _NetPortAttr(rights, port)
        if _syscall(_SYS_ADD_RULE, ctypes.c_long(self.fd), _RULE_NET_PORT, ctypes.byref(rule), 0) != 0:
            raise DataplaneError(f"landlock_add_rule port {port}: {os.strerror(ctypes.get_errno())}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def restrictor(self) -> RestrictSelf:
        """The two system calls that apply this ruleset to the calling thread (kept open for reuse)."""
        return RestrictSelf(self.fd)


class RestrictSelf:
    """no_new_privs then landlock_restrict_self, on the calling thread; both are per task and permanent."""

    def __init__(self, fd: int) -> None:
        self._fd = ctypes.c_long(fd)

    def __call__(self) -> None:
        set_no_new_privs()
        if _syscall(_SYS_RESTRICT_SELF, self._fd, 0) != 0:
            raise OSError(ctypes.get_errno(), "landlock_restrict_self")


def set_no_new_privs() -> None:
    """execve never grants privileges again: not setuid, not file capabilities, not root's full set."""
    one, zero = ctypes.c_ulong(1), ctypes.c_ulong(0)
    if _prctl(_PR_SET_NO_NEW_PRIVS, one, zero, zero, zero) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
