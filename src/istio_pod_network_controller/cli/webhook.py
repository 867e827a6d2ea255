"""`istio-pod-network-controller webhook`: the optional mutating admission webhook (see docs/install.md)."""

from __future__ import annotations

import asyncio
import logging
import signal

import click

ENV = "IPNC_"


def split_address(address: str) -> tuple[str, int]:
    """`HOST:PORT` or `[V6]:PORT` -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise click.BadParameter(f"expected HOST:PORT, got {address!r}", param_hint="--listen-address")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 (a webhook serves the API server)


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
@click.option("--image", envvar=ENV + "WAITER_IMAGE", show_envvar=True, help="Waiter image.")
@click.option(
    "--image-pull-policy",
    type=click.Choice(["Always", "IfNotPresent", "Never"]),
    default="IfNotPresent",
    show_default=True,
    envvar=ENV + "WAITER_IMAGE_PULL_POLICY",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=300.0,
    show_default=True,
    envvar=ENV + "WAITER_TIMEOUT",
    help="Seconds the waiter waits for capture.",
)
@click.option(
    "--translate-istio-init-args/--no-translate-istio-init-args",
    default=True,
    show_default=True,
    envvar=ENV + "TRANSLATE_ISTIO_INIT_ARGS",
)
@click.option(
    "--waiter-arg",
    "waiter_args",
    multiple=True,
    help="Extra argument for the injected waiter, e.g. --waiter-arg=--outbound-port=15011 (repeatable).",
)
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
    image: str | None,
    image_pull_policy: str,
    timeout: float,
    translate_istio_init_args: bool,
    waiter_args: tuple[str, ...],
    log_level: str,
) -> None:
    """Serve the mutating admission webhook that replaces istio-init with the waiter in new pods."""
    from ..install.injection import DEFAULT_IMAGE, InjectOptions
    from ..install.webhook.server import serve_forever

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host, port = split_address(listen_address)
    options = InjectOptions(
        image=image or DEFAULT_IMAGE,
        image_pull_policy=image_pull_policy,
        timeout=timeout,
        translate_istio_init_args=translate_istio_init_args,
        extra_args=waiter_args,
    )

    async def main() -> None:
        task = asyncio.ensure_future(
            serve_forever(options, host, port, tls_cert_file, tls_key_file, cert_reload_interval)
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
        raise click.ClickException(str(exc)) from None
