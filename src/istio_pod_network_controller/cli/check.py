"""`istio-pod-network-controller check`: the preflight `run` does at start, on demand (like `linkerd check`).

Run it where the controller runs (`kubectl -n istio-system exec POD -- istio-pod-network-controller check`):
one line per check, each failure naming its fix; exit 0 when all pass.
"""

from __future__ import annotations

import asyncio

import click

from ..dataplane.apply import BACKEND_CHOICES
from . import exitcodes
from .failures import fail


@click.command()
@click.option(
    "--kubeconfig", default=None, help="kubeconfig [default: KUBECONFIG, in-cluster, ~/.kube/config]"
)
@click.option(
    "--proc-root", default="/proc", show_default=True, help="the node's /proc (/host/proc in the pod)"
)
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True)
@click.option("--no-api", is_flag=True, help="skip the API access check (node-local checks only)")
def check(kubeconfig: str | None, proc_root: str, backend: str, no_api: bool) -> None:
    """Preflight: capabilities, host /proc, rule tools and API access for `run`."""
    from ..controller import preflight
    from ..dataplane.apply import BackendChoice

    choice: BackendChoice = next(b for b in BACKEND_CHOICES if b == backend)
    checks = preflight.local_checks(proc_root, choice)
    if not no_api:
        from ..controller.access import api_check
        from ..controller.kubeconfig import KubeconfigError, find
        from ..install import rbac

        try:
            loaded = find(kubeconfig)
        except KubeconfigError as exc:
            fail(str(exc), exitcodes.CONFIG)
        needed = preflight.required_access(rbac.CLUSTER_ROLE_RULES)
        checks.append(asyncio.run(api_check(loaded.config, loaded.server, needed)))
    report = preflight.Report(tuple(checks))
    for item in report.checks:
        click.echo(item.line())
    raise SystemExit(exitcodes.OK if report.ok else exitcodes.PREFLIGHT)
