"""Drop Linux capabilities from the calling thread for good (capget/capset, no library).

Dropped from the effective, permitted and inheritable sets; with no_new_privs set as well, no later execve
(not even root's, which would otherwise get the whole bounding set back) can regain them.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable
from typing import Final

_VERSION_3: Final = 0x20080522
NUMBERS: Final = {"NET_ADMIN": 12, "NET_RAW": 13, "SYS_PTRACE": 19, "SYS_ADMIN": 21}


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


_libc = ctypes.CDLL(None, use_errno=True)


def _get() -> tuple[_Header, ctypes.Array[_Data]]:
    header, data = _Header(_VERSION_3, 0), (_Data * 2)()
    if _libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    return header, data


def effective() -> int:
    """The calling thread's effective set as one 64-bit mask."""
    _, data = _get()
    return int(data[0].effective) | int(data[1].effective) << 32


def drop(names: Iterable[str]) -> None:
    """Remove the named capabilities from all three sets of the calling thread."""
    _limit(~sum(1 << NUMBERS[name] for name in names))


def keep_only(names: Iterable[str]) -> None:
    """Drop every capability but the named ones."""
    _limit(sum(1 << NUMBERS[name] for name in names))


def _limit(kept: int) -> None:
    header, data = _get()
    for index in (0, 1):
        mask = (kept >> (32 * index)) & 0xFFFFFFFF
        data[index].effective &= mask
        data[index].permitted &= mask
        data[index].inheritable &= mask
    if _libc.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")
