"""A stand-in for `istio-iptables --run-validation --skip-rule-apply`, with Istio's semantics (stdlib only).

Run as uid 1337 in the pod's netns: listen on 127.0.0.1:15001 and 127.0.0.1:15006, dial 127.0.0.6:15002
from 127.0.0.1 and succeed when one of the listeners accepts a connection whose SO_ORIGINAL_DST port is
15002. Retry every second; give up after the timeout (Istio: 5 s) with exit 126, as Istio's does.
Nothing listens on 15002, so only capture rules can make the dial reach a listener.

Usage: python3 istio_validation.py [TIMEOUT_SECONDS]
"""

from __future__ import annotations

import select
import socket
import sys
import time

SO_ORIGINAL_DST = 80
LISTEN_PORTS = (15001, 15006)
TARGET = ("127.0.0.6", 15002)
INTERVAL = 1.0
EXIT_FAILED = 126


def original_port(conn: socket.socket) -> int:
    raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    return int.from_bytes(raw[2:4], "big")


def attempt(listeners: list[socket.socket]) -> str:
    """'' on success, else what went wrong."""
    with socket.socket() as dialer:
        dialer.settimeout(INTERVAL)
        dialer.bind(("127.0.0.1", 0))
        try:
            dialer.connect(TARGET)
        except OSError as exc:
            return f"dial {TARGET[0]}:{TARGET[1]}: {exc}"
        ready, _, _ = select.select(listeners, [], [], INTERVAL)
        for listener in ready:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                continue
            with conn:
                port = original_port(conn)
                if port == TARGET[1]:
                    return ""
                return f"accepted on {listener.getsockname()[1]} with SO_ORIGINAL_DST port {port}"
        return "connected, but not through a listener (no redirect)"


def main() -> int:
    timeout = float(sys.argv[1]) if len(sys.argv) > 1 else 5.0
    listeners = []
    for port in LISTEN_PORTS:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(8)
        sock.setblocking(False)
        listeners.append(sock)
    deadline = time.monotonic() + timeout
    while True:
        problem = attempt(listeners)
        if not problem:
            print("validation passed: SO_ORIGINAL_DST port 15002 seen", flush=True)
            return 0
        print(f"validation attempt failed: {problem}", flush=True)
        if time.monotonic() + INTERVAL > deadline:
            return EXIT_FAILED
        time.sleep(INTERVAL)


if __name__ == "__main__":
    sys.exit(main())
