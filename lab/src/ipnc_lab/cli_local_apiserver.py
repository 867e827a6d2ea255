"""`local-apiserver`: run the Kubernetes API emulator until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import click
import yaml

from istio_pod_network_controller.controller.config import ConfigError, parse_listen

from .localapi import LocalAPIServer, load_users


async def _serve(api: LocalAPIServer) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await api.start()
    try:
        click.echo(f"url: {api.url}")
        click.echo(f"kubeconfig: {api.kubeconfig_path}")
        click.echo(f"faults: {api.url}/_emulator/faults")
        await stop.wait()
    finally:
        await api.stop()


@click.command("local-apiserver")
@click.option("--listen", default="127.0.0.1:0", show_default=True, help="HOST:PORT to bind (port 0: any).")
@click.option(
    "--kubeconfig",
    "kubeconfig_out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write a kubeconfig for the admin user.",
)
@click.option("--tls", is_flag=True, help="Serve https with a fresh self-signed CA (put in the kubeconfig).")
@click.option("--user", default="admin", show_default=True, help="Name of the admin user.")
@click.option("--token", default=None, help="Bearer token of the admin user (random by default).")
@click.option(
    "--rbac",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="YAML file of extra users: {users: [{name, token, rules: [...]}]} (see docs/localapi.md).",
)
@click.option("--history-size", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--bookmark-interval", type=click.FloatRange(min=0.01), default=60.0, show_default=True)
@click.option(
    "--anonymous/--no-anonymous",
    default=None,
    help="Treat requests without credentials as the admin (default: only without --tls).",
)
@click.option(
    "--require-namespace/--no-require-namespace",
    default=True,
    show_default=True,
    help="Namespaced objects can only be created in existing namespaces.",
)
def local_apiserver(
    listen: str,
    kubeconfig_out: Path,
    tls: bool,
    user: str,
    token: str | None,
    rbac: Path | None,
    history_size: int,
    bookmark_interval: float,
    anonymous: bool | None,
    require_namespace: bool,
) -> None:
    """Run the Kubernetes API emulator (for tests and the demo) until SIGINT/SIGTERM."""
    try:
        host, port = parse_listen(listen, "--listen")
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        users = load_users(yaml.safe_load(rbac.read_text()) or {}) if rbac else []
    except (OSError, ValueError, AttributeError, TypeError, yaml.YAMLError) as exc:
        raise click.ClickException(f"cannot load --rbac {rbac}: {exc}") from None
    api = LocalAPIServer(
        host=host,
        port=port,
        tls=tls,
        history_size=history_size,
        bookmark_interval=bookmark_interval,
        require_namespace=require_namespace,
        admin_user=user,
        admin_token=token,
        anonymous=anonymous,
        users=users,
        kubeconfig_path=kubeconfig_out,
    )
    try:
        asyncio.run(_serve(api))
    except OSError as exc:
        raise click.ClickException(f"cannot serve on {listen}: {exc}") from None
