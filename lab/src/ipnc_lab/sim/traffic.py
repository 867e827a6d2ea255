"""Recording listeners and token clients: prove where a real connection landed and what it was addressed to.

Listeners are created inside a namespace from a thread that entered it, then served from one ordinary thread
(a socket keeps its namespace). Every TCP connection / UDP datagram is answered with one JSON line: the
listener's label, the token the client sent, the original destination (SO_ORIGINAL_DST /
IP6T_SO_ORIGINAL_DST) and getsockname(), which for a TPROXY (IP_TRANSPARENT) listener is the original
destination. Clients run in-process (root) or, given a uid/gid, as a `python -I -S -c` subprocess started from
a thread inside the namespace, so the owner match sees exactly that uid/gid.
"""

from __future__ import annotations

import json
import os
import secrets
import selectors
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .netns import NamedNetns

PYTHON = os.path.realpath(sys.executable)  # the system interpreter; -I -S needs nothing from the venv
CLIENT_TIMEOUT = 2.0
CLIENT_ATTEMPTS = 2  # a retry only after a timeout; refusals are answers
SO_ORIGINAL_DST = 80  # SOL_IP; IP6T_SO_ORIGINAL_DST on SOL_IPV6 has the same number
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)

# One probe implementation for the in-process client, the uid/gid subprocess client and any relaying
# script (a test's fake DNS agent) that asks a listener itself: `probe(args)` -> {"ok", "reply"|"error", ...}.
PROBE_SRC = r"""
import errno, json, socket, sys

def probe(a):
    fam = socket.AF_INET6 if ":" in a["dst"] else socket.AF_INET
    tcp = a["proto"] == "tcp"
    s = socket.socket(fam, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM)
    try:
        s.settimeout(a["timeout"])
        if a.get("src"):
            s.bind((a["src"], 0))
        # getaddrinfo keeps a link-local destination's `%scope` (a plain 2-tuple would drop it)
        s.connect(socket.getaddrinfo(a["dst"], a["port"], fam, s.type)[0][4])
        s.sendall(a["token"].encode() + b"\n")
        data = b""
        if tcp:
            while not data.endswith(b"\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        else:
            data = s.recv(65535)
        if not data:
            return {"ok": False, "error": "EOF"}
        return {"ok": True, "reply": json.loads(data), "client": list(s.getsockname()[:2])}
    except socket.timeout:
        return {"ok": False, "error": "timeout"}
    except OSError as exc:
        return {"ok": False, "error": errno.errorcode.get(exc.errno or 0, str(exc))}
    finally:
        s.close()
"""
CLIENT_SRC = (
    PROBE_SRC
    + r"""
if __name__ == "__main__":
    print(json.dumps(probe(json.loads(sys.argv[1]))))
"""
)
_CLIENT_NS: dict[str, Any] = {"__name__": "traffic_client"}
exec(compile(CLIENT_SRC, "<traffic client>", "exec"), _CLIENT_NS)  # noqa: S102 - our own constant source
_probe: Callable[[dict[str, Any]], dict[str, Any]] = _CLIENT_NS["probe"]


def _addr(value: list[Any] | None) -> tuple[str, int] | None:
    return (str(value[0]), int(value[1])) if value else None


@dataclass(frozen=True)
class Reply:
    """What a client saw: who answered (label) and the addresses the listener reported, or an error."""

    ok: bool
    error: str | None = None
    label: str | None = None
    orig: tuple[str, int] | None = None
    local: tuple[str, int] | None = None
    client: tuple[str, int] | None = None
    token_ok: bool = False
    upstream: str | None = None
    """A relaying listener's (DNS agent, proxy) account of its own upstream leg: who answered it."""

    @classmethod
    def parse(cls, raw: dict[str, Any], token: str) -> Reply:
        if not raw.get("ok"):
            return cls(False, error=str(raw.get("error")))
        body = raw["reply"]
        return cls(
            True,
            label=body.get("label"),
            orig=_addr(body.get("orig")),
            local=_addr(body.get("local")),
            client=_addr(raw.get("client")),
            token_ok=body.get("token") == token,
            upstream=body.get("upstream"),
        )

    def __str__(self) -> str:
        if not self.ok:
            return f"<error {self.error}>"
        via = f" upstream={self.upstream}" if self.upstream else ""
        return f"<{self.label} orig={self.orig} local={self.local} from={self.client}{via}>"


def _unpack_original_dst(sock: socket.socket) -> tuple[str, int] | None:
    """SO_ORIGINAL_DST (IPv4, sockaddr_in) or IP6T_SO_ORIGINAL_DST (IPv6, sockaddr_in6); None if unknown."""
    try:
        if sock.family == socket.AF_INET:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            port, packed = struct.unpack_from("!2xH4s", raw)
            return socket.inet_ntop(socket.AF_INET, packed), port
        raw = sock.getsockopt(SOL_IPV6, SO_ORIGINAL_DST, 28)
        port, packed = struct.unpack_from("!2xH4x16s", raw)
        return socket.inet_ntop(socket.AF_INET6, packed), port
    except OSError:
        return None  # ENOENT: no conntrack entry in this namespace (nothing was NATed)


@dataclass
class Received:
    label: str
    proto: str
    token: str
    source: tuple[str, int]
    orig: tuple[str, int] | None
    local: tuple[str, int]


@dataclass
class _Listen:
    sock: socket.socket
    label: str
    proto: str


class Server:
    """One thread serving every listening socket of a topology; records what each listener received."""

    def __init__(self, on_receive: Callable[[Received], None] | None = None) -> None:
        self._on_receive = on_receive
        self.selector = selectors.DefaultSelector()
        self.received: list[Received] = []
        self._listens: list[_Listen] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(
        self,
        ns: NamedNetns | None,
        label: str,
        port: int,
        proto: str = "tcp",
        *,
        bind4: str | None = "0.0.0.0",  # noqa: S104 - inside a namespace the simulation owns
        bind6: str | None = "::",
        transparent: bool = False,
    ) -> None:
        """Listen on port in ns (IPv4 and/or IPv6 sockets, created on a thread inside ns)."""

        def make(family: socket.AddressFamily, host: str) -> socket.socket:
            sock = socket.socket(family, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                if transparent:
                    if family == socket.AF_INET:
                        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
                    else:
                        sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
                sock.bind((host, port))
                if proto == "tcp":
                    sock.listen(16)
                sock.setblocking(False)
            except BaseException:
                sock.close()
                raise
            return sock

        for family, host in ((socket.AF_INET, bind4), (socket.AF_INET6, bind6)):
            if host is None:
                continue
            sock = make(family, host) if ns is None else ns.run(lambda f=family, h=host: make(f, h))  # type: ignore[misc]
            listen = _Listen(sock, label, proto)
            self._listens.append(listen)
            self.selector.register(sock, selectors.EVENT_READ, listen)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="traffic-server", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            for key, _ in self.selector.select(timeout=0.05):
                listen: _Listen = key.data
                try:
                    if listen.proto == "tcp":
                        self._serve_tcp(listen)
                    else:
                        self._serve_udp(listen)
                except OSError:
                    continue  # a client that went away; it reports its own error

    def _answer(self, listen: _Listen, token: str, source: Any, orig: Any, local: Any) -> bytes:
        entry = Received(listen.label, listen.proto, token, tuple(source[:2]), orig, tuple(local[:2]))
        self.received.append(entry)
        if self._on_receive is not None:
            self._on_receive(entry)
        body = {"label": listen.label, "token": token, "orig": orig, "local": list(local[:2])}
        return json.dumps(body).encode() + b"\n"

    def _serve_tcp(self, listen: _Listen) -> None:
        try:
            conn, source = listen.sock.accept()
        except BlockingIOError:
            return
        with conn:
            conn.settimeout(1.0)
            data = b""
            while not data.endswith(b"\n") and len(data) < 4096:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            orig = _unpack_original_dst(conn)
            conn.sendall(self._answer(listen, data.decode().strip(), source, orig, conn.getsockname()))

    def _serve_udp(self, listen: _Listen) -> None:
        try:
            data, source = listen.sock.recvfrom(65535)
        except BlockingIOError:
            return
        answer = self._answer(listen, data.decode().strip(), source, None, listen.sock.getsockname())
        listen.sock.sendto(answer, source)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for listen in self._listens:
            self.selector.unregister(listen.sock)
            listen.sock.close()
        self._listens.clear()
        self.selector.close()


def connect(
    ns: NamedNetns,
    dst: str,
    port: int,
    proto: str = "tcp",
    *,
    uid: int | None = None,
    gid: int | None = None,
    src: str | None = None,
    timeout: float = CLIENT_TIMEOUT,
) -> Reply:
    """Send a random token from inside ns (as uid/gid when given) and return who answered."""
    token = secrets.token_hex(8)
    args = {"dst": dst, "port": port, "proto": proto, "token": token, "src": src, "timeout": timeout}
    raw: dict[str, Any] = {"ok": False, "error": "not run"}
    for _ in range(CLIENT_ATTEMPTS):
        raw = ns.run(lambda: _client(args, uid, gid))
        if raw.get("ok") or raw.get("error") != "timeout":
            break
    return Reply.parse(raw, token)


def _client(args: dict[str, Any], uid: int | None, gid: int | None) -> dict[str, Any]:
    if uid is None and gid is None:
        return _probe(args)
    done = subprocess.run(
        [PYTHON, "-I", "-S", "-c", CLIENT_SRC, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=float(args["timeout"]) + 3,
        check=False,
        cwd="/",
        user=uid if uid is not None else 0,
        group=gid if gid is not None else (uid if uid is not None else 0),
        extra_groups=[],
        env={"PATH": "/usr/bin:/bin"},
    )
    if done.returncode != 0 or not done.stdout.strip():
        return {"ok": False, "error": f"client exit {done.returncode}: {done.stderr.strip()[-300:]}"}
    return dict(json.loads(done.stdout))
