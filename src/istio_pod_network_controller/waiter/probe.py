"""The loopback capture probe: proves from inside the pod, without leaving it, that the capture rules work.

As the proxy uid, dial the probe target (127.0.0.6 / ::6, port 15002 unless excluded) from 127.0.0.1 / ::1.
Nothing listens there; only the capture rules' `ISTIO_OUTPUT ... --uid-owner <proxy> -j ISTIO_IN_REDIRECT`
can turn that connection into one to our own listener on the inbound capture port. The listener accepts only
a connection whose SO_ORIGINAL_DST is the probe target and that carries this attempt's random token, and
answers with a second random token the dialer checks: no other socket, in or out of the pod, can answer.
Single-threaded and non-blocking; every attempt is bounded by `io_timeout`.
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import time
from dataclasses import dataclass
from typing import Final

from .routing import tproxy_routing_missing

SO_ORIGINAL_DST: Final = 80
"""netfilter's getsockopt for the pre-NAT destination (IPv4 SOL_IP; IP6T_SO_ORIGINAL_DST is also 80)."""
TOKEN_BYTES: Final = 16
LOOPBACK: Final = {4: "127.0.0.1", 6: "::1"}
TARGET: Final = {4: "127.0.0.6", 6: "::6"}
_AF: Final = {4: socket.AF_INET, 6: socket.AF_INET6}
_PASSTHROUGH_V6_HEX: Final = "00000000000000000000000000000006"


@dataclass(frozen=True, slots=True)
class Outcome:
    """One attempt: `state` is a short category (a change of it is logged), `detail` the full story."""

    ok: bool
    state: str
    detail: str


def fmt(family: int, addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if family == 6 else f"{addr}:{port}"


def read_if_inet6(path: str = "/proc/self/net/if_inet6") -> list[list[str]]:
    try:
        with open(path) as handle:
            return [line.split() for line in handle if line.strip()]
    except OSError:
        return []


def has_global_ipv6(rows: list[list[str]] | None = None) -> bool:
    """A global-scope IPv6 address outside lo: the controller's test for capturing IPv6 under `auto`."""
    rows = read_if_inet6() if rows is None else rows
    return any(len(f) == 6 and f[3] == "00" and f[5] != "lo" for f in rows)


def has_passthrough_v6(rows: list[list[str]] | None = None) -> bool:
    """::6 on lo, which the controller adds when it captures IPv6 (and without which we never dial ::6)."""
    rows = read_if_inet6() if rows is None else rows
    return any(len(f) == 6 and f[0] == _PASSTHROUGH_V6_HEX and f[5] == "lo" for f in rows)


def original_dst(conn: socket.socket, family: int) -> tuple[str, int] | None:
    """The destination the connection had before NAT, or None when netfilter has no record of it."""
    try:
        if family == 4:
            raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            return socket.inet_ntop(socket.AF_INET, raw[4:8]), int.from_bytes(raw[2:4], "big")
        raw = conn.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), int.from_bytes(raw[2:4], "big")
    except OSError:
        return None


def _errno_text(code: int) -> str:
    name = errno.errorcode.get(code, str(code))
    return f"{name} ({os.strerror(code)})"


@dataclass
class _Accepted:
    conn: socket.socket
    listen_port: int
    orig: tuple[str, int] | None
    buf: bytes = b""


class FamilyProbe:
    """The probe for one address family; keeps its listeners open between attempts."""

    def __init__(
        self,
        family: int,
        inbound_port: int,
        outbound_port: int,
        target_port: int,
        io_timeout: float = 0.25,
        *,
        tproxy: bool = False,
    ) -> None:
        self.family = family
        self.af = _AF[family]
        self.loopback = LOOPBACK[family]
        self.target = TARGET[family]
        self.inbound_port = inbound_port
        self.outbound_port = outbound_port
        self.target_port = target_port
        self.io_timeout = io_timeout
        self.tproxy = tproxy
        self.listeners: dict[int, socket.socket] = {}
        self.label = f"IPv{family}"

    def describe(self) -> str:
        ports = sorted({self.inbound_port, self.outbound_port})
        where = ", ".join(fmt(self.family, self.loopback, p) for p in ports)
        extra = " (TPROXY: plus its policy rule and route)" if self.tproxy else ""
        return (
            f"{self.label}: dial {fmt(self.family, self.target, self.target_port)} from {self.loopback} "
            f"as uid {os.geteuid()}, expect it at {where}{extra}"
        )

    def _listen(self, port: int) -> socket.socket:
        sock = socket.socket(self.af, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.family == 6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((self.loopback, port))
            sock.listen(16)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    def ensure_listeners(self) -> Outcome | None:
        """Open missing listeners; the inbound one is required, the outbound one (if distinct) best-effort."""
        for port in dict.fromkeys((self.inbound_port, self.outbound_port)):
            if port in self.listeners:
                continue
            try:
                self.listeners[port] = self._listen(port)
            except OSError as exc:
                if port != self.inbound_port:
                    continue
                code = exc.errno or 0
                hint = {
                    errno.EADDRINUSE: "another socket in this pod already holds the inbound capture port",
                    errno.EACCES: "ports below net.ipv4.ip_unprivileged_port_start need privileges",
                    errno.EADDRNOTAVAIL: f"{self.loopback} is not configured (lo down or IPv6 disabled?)",
                    errno.EAFNOSUPPORT: "the address family is not supported here",
                }.get(code, "")
                where = fmt(self.family, self.loopback, port)
                return Outcome(
                    False,
                    f"{self.label} listen failed: {errno.errorcode.get(code, code)}",
                    f"{self.label}: cannot listen on {where}: {_errno_text(code)}"
                    + (f"; {hint}" if hint else ""),
                )
        return None

    def close(self) -> None:
        for sock in self.listeners.values():
            sock.close()
        self.listeners.clear()

    def attempt(self) -> Outcome:
        failed = self.ensure_listeners()
        if failed is not None:
            return failed
        if self.family == 6 and not has_passthrough_v6():
            return Outcome(
                False,
                "IPv6 ::6 absent",
                "IPv6: ::6 is not on lo yet (the controller adds it when it captures IPv6); not dialing",
            )
        token, reply = os.urandom(TOKEN_BYTES), os.urandom(TOKEN_BYTES)
        dialer = socket.socket(self.af, socket.SOCK_STREAM)
        sel = selectors.DefaultSelector()
        accepted: list[_Accepted] = []
        try:
            outcome = self._exchange(dialer, sel, accepted, token, reply)
            if outcome.ok and self.tproxy:
                missing = tproxy_routing_missing(self.family)
                if missing:
                    return Outcome(
                        False,
                        f"{self.label} TPROXY routing incomplete",
                        f"{self.label}: the capture rules redirect the probe, but TPROXY's {missing}",
                    )
            return outcome
        except OSError as exc:
            code = exc.errno or 0
            return Outcome(False, f"{self.label} error {errno.errorcode.get(code, code)}",
                           f"{self.label}: probe failed: {_errno_text(code)}")  # fmt: skip
        finally:
            sel.close()
            dialer.close()
            for item in accepted:
                item.conn.close()

    def _exchange(
        self,
        dialer: socket.socket,
        sel: selectors.BaseSelector,
        accepted: list[_Accepted],
        token: bytes,
        reply: bytes,
    ) -> Outcome:
        target = fmt(self.family, self.target, self.target_port)
        dialer.setblocking(False)
        dialer.bind((self.loopback, 0))
        code = dialer.connect_ex((self.target, self.target_port))
        if code not in (0, errno.EINPROGRESS):
            return self._dial_failed(code, target)
        sel.register(dialer, selectors.EVENT_WRITE, "dialer")
        for port, listener in self.listeners.items():
            sel.register(listener, selectors.EVENT_READ, port)
        connected, got = False, b""
        note = ""
        deadline = time.monotonic() + self.io_timeout
        while (remaining := deadline - time.monotonic()) > 0:
            for key, _ in sel.select(remaining):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)  # noqa: S101 - registered objects are sockets
                if key.data == "dialer":
                    if not connected:
                        err = dialer.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        if err:
                            return self._dial_failed(err, target)
                        connected = True
                        dialer.send(token)
                        sel.modify(dialer, selectors.EVENT_READ, "dialer")
                        continue
                    data = dialer.recv(64)
                    if not data:
                        return Outcome(
                            False,
                            f"{self.label} foreign peer",
                            f"{self.label}: {target} accepted and closed without our token: a socket other "
                            f"than this waiter's listener answered (no capture rule redirected it)"
                            + (f"; {note}" if note else ""),
                        )
                    got += data
                    if len(got) >= TOKEN_BYTES:
                        if got[:TOKEN_BYTES] == reply:
                            return Outcome(True, f"{self.label} captured", f"{self.label}: {note}")
                        return Outcome(
                            False,
                            f"{self.label} foreign peer",
                            f"{self.label}: {target} answered with the wrong token: a foreign listener",
                        )
                elif isinstance(key.data, int):
                    try:
                        conn, _peer = sock.accept()
                    except BlockingIOError:
                        continue
                    conn.setblocking(False)
                    item = _Accepted(conn, key.data, original_dst(conn, self.family))
                    accepted.append(item)
                    sel.register(conn, selectors.EVENT_READ, item)
                else:
                    item = key.data
                    assert isinstance(item, _Accepted)  # noqa: S101
                    data = item.conn.recv(64)
                    item.buf += data
                    if data and len(item.buf) < TOKEN_BYTES:
                        continue
                    sel.unregister(item.conn)
                    if item.buf[:TOKEN_BYTES] != token:
                        continue  # a stale connection from an earlier attempt, or not ours
                    where = fmt(self.family, self.loopback, item.listen_port)
                    if item.orig != (self.target, self.target_port):
                        shown = "none" if item.orig is None else fmt(self.family, *item.orig)
                        note = f"our token reached {where} but SO_ORIGINAL_DST was {shown}, not {target}"
                        continue
                    item.conn.send(reply)
                    note = (
                        f"{self.loopback} -> {target} was redirected to {where} "
                        f"(SO_ORIGINAL_DST {target}, token round trip ok)"
                    )
        if note:
            return Outcome(False, f"{self.label} wrong destination", f"{self.label}: {note}")
        state = "connected, no answer" if connected else "no answer"
        return Outcome(
            False,
            f"{self.label} {state}",
            f"{self.label}: {target}: {state} within {self.io_timeout * 1000:.0f} ms",
        )

    def _dial_failed(self, code: int, target: str) -> Outcome:
        meaning = {
            errno.ECONNREFUSED: "nothing redirected it to our listener: capture rules not in place",
            errno.ENETUNREACH: "no route (lo down?)",
            errno.EADDRNOTAVAIL: f"{self.loopback} is not configured",
        }.get(code, "")
        return Outcome(
            False,
            f"{self.label} {errno.errorcode.get(code, code)}",
            f"{self.label}: dial {target}: {_errno_text(code)}" + (f": {meaning}" if meaning else ""),
        )
