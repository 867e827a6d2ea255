"""The webhook's TLS listener: connections counted from accept, a handshake deadline, oldest idle evicted.

asyncio's own TLS server hands a connection to the application only after its handshake, so connections
that never finish one are invisible to any cap the application keeps, and each holds asyncio's 256 KiB TLS
read buffer until the 60 s default handshake timeout: ~600 of them OOM-killed a replica at its 128Mi
limit. Here every accepted TCP connection counts from the moment it is accepted, TLS starts on it with a
short deadline, and at the cap the oldest connection that is not inside a request (handshaking, idle or
still sending headers) is closed to make room, so a flood of idle connections cannot lock the API server
out. A connection is "inside a request" from the moment its handler runs (headers complete, see
`request_started`) until it returns; the handler bounds that time itself.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, cast

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT: Final = 5.0
"""Seconds a client gets to finish the TLS handshake (the API server needs milliseconds)."""
MAX_CONNECTIONS: Final = 64
"""Default cap on open connections per replica: at ~300 KiB each (TLS buffers, parser) about 20 MiB."""


@dataclass(frozen=True, slots=True)
class Limits:
    max_connections: int = MAX_CONNECTIONS
    handshake_timeout: float = HANDSHAKE_TIMEOUT


DEFAULT_LIMITS: Final = Limits()


class Listener:
    """Protocol factory for `loop.create_server` (no ssl there: TLS is started here, per connection)."""

    def __init__(
        self,
        app_factory: Callable[[], asyncio.Protocol],
        context: ssl.SSLContext,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.app_factory = app_factory
        self.context = context
        self.limits = limits
        self._open: dict[Connection, None] = {}  # insertion order: oldest first
        self._by_transport: dict[asyncio.BaseTransport, Connection] = {}
        self.evicted = 0
        self.refused = 0

    def __call__(self) -> Connection:
        return Connection(self)

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def admit(self, connection: Connection) -> bool:
        """Count a new connection, evicting the oldest idle one at the cap; False: all are busy, refuse."""
        if len(self._open) >= self.limits.max_connections:
            victim = next((c for c in self._open if not c.busy), None)
            if victim is None:
                self.refused += 1
                if self.refused == 1 or self.refused % 1000 == 0:
                    log.warning("refusing connections: all %d are inside requests (%d refused so far)",
                                len(self._open), self.refused)  # fmt: skip
                return False
            self.evicted += 1
            if self.evicted == 1 or self.evicted % 1000 == 0:
                log.warning("at %d connections: closing the oldest idle one (%d closed so far)",
                            len(self._open), self.evicted)  # fmt: skip
            victim.close()
        self._open[connection] = None
        return True

    def release(self, connection: Connection) -> None:
        self._open.pop(connection, None)
        if connection.tls is not None:
            self._by_transport.pop(connection.tls, None)

    def established(self, connection: Connection) -> None:
        if connection.tls is not None:
            self._by_transport[connection.tls] = connection

    def request_started(self, transport: asyncio.BaseTransport | None) -> Connection | None:
        """The connection whose handler now runs (never evicted until `request_done`)."""
        connection = self._by_transport.get(transport) if transport is not None else None
        if connection is not None:
            connection.busy += 1
        return connection

    @staticmethod
    def request_done(connection: Connection | None) -> None:
        if connection is not None:
            connection.busy -= 1


class Connection(asyncio.Protocol):
    """One accepted connection: plain TCP until its handshake ends, then a relay to the HTTP handler."""

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.raw: asyncio.Transport | None = None
        self.tls: asyncio.Transport | None = None
        self.app: asyncio.Protocol | None = None
        self.busy = 0
        self._early: list[bytes] = []
        self._early_eof = False
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.raw = cast(asyncio.Transport, transport)
        self.raw.pause_reading()  # the ClientHello is for the TLS layer start_tls puts in between
        if not self.listener.admit(self):
            self._closed = True
            self.raw.abort()
            return
        self._task = asyncio.get_running_loop().create_task(self._handshake())

    async def _handshake(self) -> None:
        assert self.raw is not None  # noqa: S101 - set in connection_made
        limits = self.listener.limits
        try:
            tls = await asyncio.get_running_loop().start_tls(
                self.raw,
                self,
                self.listener.context,
                server_side=True,
                ssl_handshake_timeout=limits.handshake_timeout,
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError, asyncio.CancelledError) as exc:
            log.debug("TLS handshake failed: %s", type(exc).__name__)
            self.close()
            return
        if self._closed or tls is None:
            if tls is not None:
                tls.abort()
            return
        self.tls = tls
        self.listener.established(self)
        self.app = self.listener.app_factory()
        self.app.connection_made(tls)
        early, self._early = self._early, []
        for data in early:
            self.app.data_received(data)
        if self._early_eof:
            self.app.eof_received()

    def close(self) -> None:
        """Drop the connection now (evicted, failed handshake) and stop counting it."""
        if self._closed:
            return
        self._closed = True
        self.listener.release(self)
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self.tls is not None:
            self.tls.abort()
        elif self.raw is not None:
            self.raw.abort()

    # -- relay to the HTTP handler once TLS is up ------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        """Data can arrive in the same loop turn as the handshake's end, before start_tls returns."""
        if self.app is not None:
            self.app.data_received(data)
        else:
            self._early.append(data)

    def eof_received(self) -> bool | None:
        if self.app is None:
            self._early_eof = True
            return True
        return self.app.eof_received()

    def pause_writing(self) -> None:
        if self.app is not None:
            self.app.pause_writing()

    def resume_writing(self) -> None:
        if self.app is not None:
            self.app.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.listener.release(self)
        if self.app is not None:
            self.app.connection_lost(exc)
