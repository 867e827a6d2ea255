"""`istio-pod-network-controller run`: the per-node DaemonSet process (see docs/controller.md).

Every option can also be set from the environment as IPNC_<OPTION> (upper snake case); --node-name also
reads NODE_NAME, the variable the DaemonSet fills from the downward API.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import click

from ..controller.config import LEGACY_SPEC_FLAGS, legacy_param
from ..dataplane.apply import BACKEND_CHOICES
from ..settings.spec import SETTINGS, Given
from .spec_options import env_name, flag_name, spec_options

F = TypeVar("F", bound=Callable[..., Any])
IGNORED_OPTIONS: dict[str, str] = {
    "--container-runtime": "container_runtime",
    "--crio-socket": "crio_socket",
    "--runc-root": "runc_root",
}


def _spec_options(func: F) -> F:
    """The spec flags `rules` has (same names, same parsers), plus the 2018 spellings."""
    for flag in reversed(LEGACY_SPEC_FLAGS):
        func = click.option(
            flag, legacy_param(flag), default=None, metavar="VALUE", help="2018 spelling of the setting"
        )(func)
    func = spec_options("default for every pod: ")(func)
    for flag, param in IGNORED_OPTIONS.items():
        func = click.option(flag, param, default=None, hidden=True)(func)
    return func


@click.command(context_settings={"auto_envvar_prefix": "IPNC", "show_default": True})
@click.option("--kubeconfig", default=None, help="kubeconfig file (default: in-cluster service account)")
@click.option(
    "--node-name",
    envvar=["IPNC_NODE_NAME", "NODE_NAME"],
    default=None,
    help="this node's name (env NODE_NAME); required",
)
@click.option("--proc-root", default="/proc", help="the node's /proc (/host/proc in the DaemonSet)")
@click.option(
    "--backend",
    type=click.Choice(BACKEND_CHOICES),
    default="auto",
    help="auto keeps what a pod already uses, else follows the node",
)
@click.option("--listen-address", default="0.0.0.0:9102", help="serves /metrics, /healthz, /readyz")
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=None,
    help="pods reconciled at once [default: 2 x cores, min 2]",
)
@click.option(
    "--repair-interval",
    type=click.FloatRange(min=0),
    default=60.0,
    help="seconds between drift checks of initialized pods; 0 disables",
)
@click.option(
    "--netns-deadline",
    type=click.FloatRange(min=0),
    default=120.0,
    help="seconds to keep retrying a pod whose network namespace is not there yet",
)
@click.option("--excluded-namespaces", default="kube-system", help="comma-separated; never touched")
@click.option(
    "--select-legacy-annotation/--no-select-legacy-annotation",
    default=True,
    help="select pods by the 2018 annotation (pod or namespace)",
)
@click.option(
    "--select-injected/--no-select-injected",
    default=True,
    help="select pods with an injected sidecar and our waiter init container",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "warn", "error"], case_sensitive=False),
    default="info",
)
@click.option("--log-format", type=click.Choice(["json", "text"]), default="json")
@click.option(
    "--watch-timeout",
    type=click.FloatRange(min=1),
    default=300.0,
    help="server-side watch timeout in seconds (jittered by 20%)",
)
@click.option(
    "--watch-inactivity",
    type=click.FloatRange(min=1),
    default=120.0,
    help="restart a watch stream silent (no event, no bookmark) for this many seconds",
)
@click.option(
    "--relist-jitter",
    type=click.FloatRange(min=0),
    default=2.0,
    help="relist after 410 Gone within a random delay up to this many seconds",
)
@click.option(
    "--shutdown-grace",
    type=click.FloatRange(min=0),
    default=25.0,
    help="on SIGTERM, seconds to let in-flight pods finish",
)
@_spec_options
def run(**options: Any) -> None:
    """Initialize every eligible pod on this node: capture rules in its network namespace, then mark it."""
    from ..controller import config as cfg
    from ..controller import logs
    from ..controller.main import run as run_controller
    from ..controller.selection import SelectionOptions
    from ..errors import SpecError

    level = "warning" if options["log_level"].lower() == "warn" else options["log_level"].lower()
    logs.setup(level, options["log_format"])
    log = logging.getLogger("istio_pod_network_controller.run")
    ignored = [flag for flag, param in IGNORED_OPTIONS.items() if options[param] is not None]
    if ignored:
        log.warning(
            "%s ignored: network namespaces are found from /proc, whatever the runtime", ", ".join(ignored)
        )
    node = (options["node_name"] or "").strip()
    if not node:
        raise click.UsageError("--node-name (or NODE_NAME) is required: the controller only serves its node")
    try:
        defaults = cfg.spec_defaults(
            {s.name: _given(s.name, options[s.name]) for s in SETTINGS},
            {flag: options[legacy_param(flag)] for flag in LEGACY_SPEC_FLAGS},
        )
        cfg.check_spec_defaults(defaults)
        host, port = cfg.parse_listen(options["listen_address"])
    except (SpecError, cfg.ConfigError) as exc:
        raise click.UsageError(str(exc)) from None
    excluded = frozenset(n.strip() for n in options["excluded_namespaces"].split(",") if n.strip())
    config = cfg.ControllerConfig(
        node_name=node,
        kubeconfig=options["kubeconfig"],
        proc_root=options["proc_root"],
        backend=options["backend"],
        listen_host=host,
        listen_port=port,
        concurrency=options["concurrency"] or cfg.default_concurrency(),
        repair_interval=options["repair_interval"],
        netns_deadline=options["netns_deadline"],
        selection=SelectionOptions(options["select_legacy_annotation"], options["select_injected"], excluded),
        spec_defaults=defaults,
        log_level=level,
        log_format=options["log_format"],
        shutdown_grace=options["shutdown_grace"],
        watch=cfg.WatchTuning(
            timeout=options["watch_timeout"],
            inactivity=options["watch_inactivity"],
            relist_jitter=options["relist_jitter"],
        ),
    )
    raise SystemExit(asyncio.run(run_controller(config)))


def _given(setting: str, value: str | None) -> Given | None:
    """The value with its source: the variable when click read it from the environment, else the flag."""
    if value is None:
        return None
    from_env = (
        click.get_current_context().get_parameter_source(setting) is click.core.ParameterSource.ENVIRONMENT
    )
    return Given(value, env_name(setting) if from_env else flag_name(setting))
