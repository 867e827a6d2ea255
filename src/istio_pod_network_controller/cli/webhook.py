"""`istio-pod-network-controller webhook`: the optional mutating admission webhook (see docs/install.md)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
from typing import Any

import click

from ..install.webhook.listener import MAX_CONNECTIONS
from . import exitcodes
from .failures import fail
from .inject_options import ENV, inject_options_from, injection_options


@click.command()
@click.option(
    "--listen-address",
    default="0.0.0.0:9443",
    show_default=True,
    envvar=ENV + "LISTEN_ADDRESS",
    show_envvar=True,
    help="HTTPS address for /mutate, /healthz and /readyz.",
)
@click.option(
    "--tls-cert-file",
    default="/etc/webhook/certs/tls.crt",
    show_default=True,
    envvar=ENV + "TLS_CERT_FILE",
    show_envvar=True,
    help="Serving certificate (PEM, chain allowed), e.g. from a mounted kubernetes.io/tls Secret.",
)
@click.option(
    "--tls-key-file",
    default="/etc/webhook/certs/tls.key",
    show_default=True,
    envvar=ENV + "TLS_KEY_FILE",
    show_envvar=True,
)
@click.option(
    "--cert-reload-interval",
    type=click.FloatRange(min=1),
    default=30.0,
    show_default=True,
    envvar=ENV + "CERT_RELOAD_INTERVAL",
    help="Seconds between checks for a rotated certificate.",
)
@click.option(
    "--max-connections",
    type=click.IntRange(min=1),
    default=MAX_CONNECTIONS,
    show_default=True,
    envvar=ENV + "MAX_CONNECTIONS",
    show_envvar=True,
    help="Open connections per replica (TLS handshakes included); at the cap the oldest idle one is closed.",
)
@injection_options(environment=True)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="info",
    show_default=True,
    envvar=[ENV + "LOG_LEVEL", "LOG_LEVEL"],
)
def webhook(
    listen_address: str,
    tls_cert_file: str,
    tls_key_file: str,
    cert_reload_interval: float,
    max_connections: int,
    log_level: str,
    **params: Any,
) -> None:
    """Serve the mutating admission webhook that replaces istio-init with the waiter in new pods."""
    from ..controller.config import ConfigError, parse_listen
    from ..install.webhook.listener import Limits
    from ..install.webhook.server import serve_forever

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        host, port = parse_listen(listen_address)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    options = inject_options_from(params)
    _check_certificate(tls_cert_file, tls_key_file)

    limits = Limits(max_connections)

    async def main() -> None:
        task = asyncio.ensure_future(
            serve_forever(options, host, port, tls_cert_file, tls_key_file, cert_reload_interval, limits)
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            logging.getLogger(__name__).info("webhook stopped")

    try:
        asyncio.run(main())
    except OSError as exc:
        fail(
            f"--listen-address {listen_address}: {os.strerror(exc.errno) if exc.errno else exc}",
            exitcodes.USAGE,
        )


def _check_certificate(cert_file: str, key_file: str) -> None:
    """Name the flag and the file before serving: ssl's own errors name neither ("PEM lib")."""
    for flag, path in (("--tls-cert-file", cert_file), ("--tls-key-file", key_file)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            code = {FileNotFoundError: exitcodes.NOT_FOUND, PermissionError: exitcodes.PERMISSION}
            fail(f"{flag} {path}: {exc.strerror} (mount the serving certificate's Secret there)",
                 code.get(type(exc), exitcodes.USAGE))  # fmt: skip
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:
        why = f" ({exc.reason})" if exc.reason and exc.reason != "PEM lib" else ""
        fail(f"--tls-cert-file {cert_file} / --tls-key-file {key_file}: not a PEM certificate chain and "
             f"its matching private key{why}", exitcodes.USAGE)  # fmt: skip
