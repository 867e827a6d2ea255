"""The capture probe: proves from inside the pod that the capture rules redirect the waiter's own connection.

Dial the plan's target (probeplan.py: 127.0.0.6:15002 from 127.0.0.1 as the proxy uid, or a TEST-NET
address as another uid). Nothing listens there; only a capture rule can turn that connection into one to our
listener on a capture port. The listener accepts only a connection whose SO_ORIGINAL_DST is the target and
that carries this attempt's random token, and answers with a second random token the dialer checks: no
other socket, in or out of the pod, can answer. Single-threaded and non-blocking; every attempt is bounded
by `io_timeout`; one attempt is the small state machine `Exchange`.
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import time
from dataclasses import dataclass
from enum import Enum, auto
from typing import Final

from ..settings.addresses import LOOPBACK, has_passthrough_v6
from .probeplan import Path, ProbeTarget
from .routing import tproxy_routing_missing

SO_ORIGINAL_DST: Final = 80
"""netfilter's getsockopt for the pre-NAT destination (IPv4 SOL_IP; IP6T_SO_ORIGINAL_DST is also 80)."""
TOKEN_BYTES: Final = 16
_AF: Final = {4: socket.AF_INET, 6: socket.AF_INET6}


@dataclass(frozen=True, slots=True)
class Outcome:
    """One attempt: `state` is a short category (a change of it is logged), `detail` the full story."""

    ok: bool
    state: str
    detail: str


def fmt(family: int, addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if family == 6 else f"{addr}:{port}"


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


class Phase(Enum):
    CONNECTING = auto()
    """connect() in progress; the dialer waits to become writable."""
    AWAITING_REPLY = auto()
    """Our token is sent; the dialer waits for the listener's reply token."""


class Exchange:
    """One attempt's token round trip as a state machine over socket events.

    Dialer: CONNECTING --writable, no error--> AWAITING_REPLY (token sent) --reply token--> captured.
    Accepted connections (each): read TOKEN_BYTES; ours and SO_ORIGINAL_DST == target -> send the reply.
    Every handler returns an Outcome when the attempt is decided, else None.
    """

    def __init__(self, probe: FamilyProbe, token: bytes, reply: bytes) -> None:
        self.probe = probe
        self.token = token
        self.reply = reply
        self.phase = Phase.CONNECTING
        self.received = b""
        self.note = ""

    def dialer_writable(self, dialer: socket.socket) -> Outcome | None:
        err = dialer.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            return self.probe.dial_failed(err)
        dialer.send(self.token)
        self.phase = Phase.AWAITING_REPLY
        return None

    def dialer_readable(self, data: bytes) -> Outcome | None:
        label, target = self.probe.label, self.probe.target_text
        if not data:
            return Outcome(
                False,
                f"{label} foreign peer",
                f"{label}: {target} accepted and closed without our token: a socket other than this "
                "waiter's listener answered (no capture rule redirected it)"
                + (f"; {self.note}" if self.note else ""),
            )
        self.received += data
        if len(self.received) < TOKEN_BYTES:
            return None
        if self.received[:TOKEN_BYTES] == self.reply:
            return Outcome(True, f"{label} captured", f"{label}: {self.note}")
        return Outcome(
            False,
            f"{label} foreign peer",
            f"{label}: {target} answered with the wrong token: a foreign listener",
        )

    def peer_complete(self, item: _Accepted) -> bool:
        """A connection to one of our listeners sent its first bytes; True when it proved the redirect."""
        if item.buf[:TOKEN_BYTES] != self.token:
            return False  # a stale connection from an earlier attempt, or not ours
        probe = self.probe
        where = fmt(probe.family, probe.loopback, item.listen_port)
        if (
            item.orig != (probe.target.address, probe.target.port)
            or item.listen_port != probe.target.listen_port
        ):
            shown = "none" if item.orig is None else fmt(probe.family, *item.orig)
            self.note = f"our token reached {where} but SO_ORIGINAL_DST was {shown}, not {probe.target_text}"
            if item.listen_port != probe.target.listen_port:
                self.note = (
                    f"our token reached {where}, not the expected capture port {probe.target.listen_port}"
                )
            return False
        self.note = (
            f"{probe.source_text} -> {probe.target_text} was redirected to {where} "
            f"(SO_ORIGINAL_DST {probe.target_text}, token round trip ok)"
        )
        return True

    def expired(self) -> Outcome:
        label = self.probe.label
        if self.note:
            return Outcome(False, f"{label} wrong destination", f"{label}: {self.note}")
        state = "connected, no answer" if self.phase is Phase.AWAITING_REPLY else "no answer"
        return Outcome(
            False,
            f"{label} {state}",
            f"{label}: {self.probe.target_text}: {state} within {self.probe.io_timeout * 1000:.0f} ms",
        )


class FamilyProbe:
    """The probe for one address family; keeps its listeners open between attempts."""

    def __init__(self, target: ProbeTarget, io_timeout: float = 0.25, *, tproxy: bool = False) -> None:
        self.target = target
        self.family = target.family
        self.af = _AF[target.family]
        self.loopback = LOOPBACK[target.family]
        self.io_timeout = io_timeout
        self.tproxy = tproxy
        self.listeners: dict[int, socket.socket] = {}
        self.label = f"IPv{target.family}"
        self.target_text = fmt(self.family, target.address, target.port)
        self.source_text = target.source or "this pod"

    def describe(self) -> str:
        ports = sorted({self.target.listen_port, self.target.other_port})
        where = ", ".join(fmt(self.family, self.loopback, p) for p in ports)
        expected = fmt(self.family, self.loopback, self.target.listen_port)
        extra = " (TPROXY: plus its policy rule and route)" if self.tproxy else ""
        if self.target.path is Path.LOOPBACK:
            how = f"from {self.target.source} as uid {os.geteuid()} (the proxy uid's loopback capture path)"
        else:
            how = (
                f"as uid {os.geteuid()} gid {os.getegid()} with hop limit {self.target.hop_limit} "
                "(the app's outbound capture path)"
            )
        return (
            f"{self.label}: dial {self.target_text} {how}, expect it at {expected} "
            f"(listening on {where}){extra}"
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
        """Open missing listeners; the expected one is required, the other capture port best-effort."""
        for port in dict.fromkeys((self.target.listen_port, self.target.other_port)):
            if port in self.listeners:
                continue
            try:
                self.listeners[port] = self._listen(port)
            except OSError as exc:
                if port != self.target.listen_port:
                    continue
                code = exc.errno or 0
                hint = {
                    errno.EADDRINUSE: "another socket in this pod already holds the capture port",
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
        if self.target.path is Path.LOOPBACK and self.family == 6 and not has_passthrough_v6():
            return Outcome(
                False,
                "IPv6 ::6 absent",
                "IPv6: ::6 is not on lo yet (the controller adds it when it captures IPv6); not dialing",
            )
        exchange = Exchange(self, os.urandom(TOKEN_BYTES), os.urandom(TOKEN_BYTES))
        dialer = socket.socket(self.af, socket.SOCK_STREAM)
        sel = selectors.DefaultSelector()
        accepted: list[_Accepted] = []
        try:
            outcome = self._run(exchange, dialer, sel, accepted)
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

    def _dial(self, dialer: socket.socket) -> int:
        dialer.setblocking(False)
        if self.target.hop_limit is not None:
            if self.family == 4:
                dialer.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, self.target.hop_limit)
            else:
                dialer.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, self.target.hop_limit)
        if self.target.source is not None:
            dialer.bind((self.target.source, 0))
        return dialer.connect_ex((self.target.address, self.target.port))

    def _run(
        self,
        exchange: Exchange,
        dialer: socket.socket,
        sel: selectors.BaseSelector,
        accepted: list[_Accepted],
    ) -> Outcome:
        """Feed socket events to the exchange until it decides or `io_timeout` passes."""
        code = self._dial(dialer)
        if code not in (0, errno.EINPROGRESS):
            return self.dial_failed(code)
        sel.register(dialer, selectors.EVENT_WRITE, "dialer")
        for port, listener in self.listeners.items():
            sel.register(listener, selectors.EVENT_READ, port)
        deadline = time.monotonic() + self.io_timeout
        while (remaining := deadline - time.monotonic()) > 0:
            for key, _ in sel.select(remaining):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)  # noqa: S101 - registered objects are sockets
                outcome: Outcome | None = None
                if key.data == "dialer" and exchange.phase is Phase.CONNECTING:
                    outcome = exchange.dialer_writable(dialer)
                    if outcome is None:
                        sel.modify(dialer, selectors.EVENT_READ, "dialer")
                elif key.data == "dialer":
                    outcome = exchange.dialer_readable(dialer.recv(64))
                elif isinstance(key.data, int):
                    self._accept(sock, key.data, sel, accepted)
                else:
                    item = key.data
                    assert isinstance(item, _Accepted)  # noqa: S101
                    data = item.conn.recv(64)
                    item.buf += data
                    if data and len(item.buf) < TOKEN_BYTES:
                        continue
                    sel.unregister(item.conn)
                    if exchange.peer_complete(item):
                        item.conn.send(exchange.reply)
                if outcome is not None:
                    return outcome
        return exchange.expired()

    def _accept(
        self, listener: socket.socket, port: int, sel: selectors.BaseSelector, accepted: list[_Accepted]
    ) -> None:
        try:
            conn, _peer = listener.accept()
        except BlockingIOError:
            return
        conn.setblocking(False)
        item = _Accepted(conn, port, original_dst(conn, self.family))
        accepted.append(item)
        sel.register(conn, selectors.EVENT_READ, item)

    def dial_failed(self, code: int) -> Outcome:
        loopback = self.target.path is Path.LOOPBACK
        meaning = {
            errno.ECONNREFUSED: "nothing redirected it to our listener: capture rules not in place",
            errno.ENETUNREACH: "no route (lo down?)" if loopback else "no route to it from this pod",
            errno.EADDRNOTAVAIL: f"{self.target.source} is not configured" if loopback else "",
        }.get(code, "")
        return Outcome(
            False,
            f"{self.label} {errno.errorcode.get(code, code)}",
            f"{self.label}: dial {self.target_text}: {_errno_text(code)}"
            + (f": {meaning}" if meaning else ""),
        )
