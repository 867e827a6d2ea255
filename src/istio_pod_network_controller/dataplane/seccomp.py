"""A seccomp filter of our own, on top of the runtime's default profile: the system calls the runtime grants
to a holder of CAP_SYS_ADMIN that the controller never makes.

Measured in the image with the chart's capabilities under podman's default profile: bpf() and
perf_event_open() succeed (tracing programs read any process's memory), so does keyctl() (root's
keyrings). The filter answers EPERM to `DENIED` (plus, for good measure, the module,
kexec, mount and clock calls a default profile already refuses) and to every call of another ABI (i386 or
x32 on x86_64), and allows the rest. It is a denylist on purpose: an allowlist would have to follow every
system call of Python, iptables, nft and ip. Needs no_new_privs (set by the caller); permanent, inherited.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from typing import Final

DENIED: Final = (
    "bpf", "perf_event_open", "keyctl", "add_key", "request_key", "ptrace", "process_vm_readv",
    "process_vm_writev", "userfaultfd", "open_by_handle_at", "name_to_handle_at", "kexec_load",
    "kexec_file_load", "init_module", "finit_module", "delete_module", "syslog", "acct", "swapon", "swapoff",
    "reboot", "quotactl", "pivot_root", "mount", "umount2", "fsopen", "fsconfig", "fsmount", "fspick",
    "move_mount", "open_tree", "mount_setattr", "settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
)  # fmt: skip
_NUMBERS: Final = {
    # from asm/unistd_64.h
    "x86_64": (0xC000003E, 0x40000000, {
        "bpf": 321, "perf_event_open": 298, "keyctl": 250, "add_key": 248, "request_key": 249, "ptrace": 101,
        "process_vm_readv": 310, "process_vm_writev": 311, "userfaultfd": 323, "open_by_handle_at": 304,
        "name_to_handle_at": 303, "kexec_load": 246, "kexec_file_load": 320, "init_module": 175,
        "finit_module": 313, "delete_module": 176, "syslog": 103, "acct": 163, "swapon": 167, "swapoff": 168,
        "reboot": 169, "quotactl": 179, "pivot_root": 155, "mount": 165, "umount2": 166, "fsopen": 430,
        "fsconfig": 431, "fsmount": 432, "fspick": 433, "move_mount": 429, "open_tree": 428,
        "mount_setattr": 442, "settimeofday": 164, "clock_settime": 227, "clock_adjtime": 305,
        "adjtimex": 159,
    }),
    # from asm-generic/unistd.h
    "aarch64": (0xC00000B7, None, {
        "bpf": 280, "perf_event_open": 241, "keyctl": 219, "add_key": 217, "request_key": 218, "ptrace": 117,
        "process_vm_readv": 270, "process_vm_writev": 271, "userfaultfd": 282, "open_by_handle_at": 265,
        "name_to_handle_at": 264, "kexec_load": 104, "kexec_file_load": 294, "init_module": 105,
        "finit_module": 273, "delete_module": 106, "syslog": 116, "acct": 89, "swapon": 224, "swapoff": 225,
        "reboot": 142, "quotactl": 60, "pivot_root": 41, "mount": 40, "umount2": 39, "fsopen": 430,
        "fsconfig": 431, "fsmount": 432, "fspick": 433, "move_mount": 429, "open_tree": 428,
        "mount_setattr": 442, "settimeofday": 170, "clock_settime": 112, "clock_adjtime": 266,
        "adjtimex": 171,
    }),
}  # fmt: skip
_LD_W_ABS, _JEQ_K, _JGE_K, _RET_K = 0x20, 0x15, 0x35, 0x06
_OFFSET_NR, _OFFSET_ARCH = 0, 4
_RET_ALLOW: Final = 0x7FFF0000
_RET_EPERM: Final = 0x00050000 | errno.EPERM
_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 22, 2


class _Instruction(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_Instruction))]


def supported() -> bool:
    """Whether this machine's system call numbers are known here."""
    return platform.machine() in _NUMBERS


def syscall_number(name: str, machine: str | None = None) -> int:
    """The number of system call `name` on `machine` (this one by default)."""
    return _NUMBERS[machine or platform.machine()][2][name]


def program(machine: str) -> list[tuple[int, int, int, int]]:
    """The classic BPF filter for `machine`, as (code, jt, jf, k) instructions."""
    arch, foreign_bit, numbers = _NUMBERS[machine]
    code = [(_LD_W_ABS, 0, 0, _OFFSET_ARCH), (_JEQ_K, 1, 0, arch), (_RET_K, 0, 0, _RET_EPERM)]
    code.append((_LD_W_ABS, 0, 0, _OFFSET_NR))
    if foreign_bit is not None:
        code += [(_JGE_K, 0, 1, foreign_bit), (_RET_K, 0, 0, _RET_EPERM)]
    for name in DENIED:
        code += [(_JEQ_K, 0, 1, numbers[name]), (_RET_K, 0, 0, _RET_EPERM)]
    code.append((_RET_K, 0, 0, _RET_ALLOW))
    return code


def install() -> None:
    """Apply the filter to the calling thread (and everything it starts); raises OSError."""
    code = program(platform.machine())
    instructions = (_Instruction * len(code))(*(_Instruction(*i) for i in code))
    prog = _Program(len(code), instructions)
    libc = ctypes.CDLL(None, use_errno=True)
    zero = ctypes.c_ulong(0)
    if libc.prctl(_PR_SET_SECCOMP, ctypes.c_ulong(_SECCOMP_MODE_FILTER), ctypes.byref(prog), zero, zero) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp filter: {os.strerror(err)}")
