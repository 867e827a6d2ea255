"""`istio-pod-network-controller run`: the per-node DaemonSet process (see docs/controller.md).

Every option can also be set from the environment as IPNC_<OPTION> (upper snake case). The names the 2018
controller read automatically (viper) work too, after IPNC_*: NODE_NAME, LOG_LEVEL, ENVOY_PORT,
ENABLE_INBOUND_IPV6, ISTIO_INBOUND_INTERCEPTION_MODE, ISTIO_INCLUDE_OUTBOUND_IP_RANGES,
ISTIO_EXCLUDE_OUTBOUND_IP_RANGES, ISTIO_EXCLUDE_INBOUND_PORTS, CONTAINER_RUNTIME, CRIO_SOCKET, RUNC_ROOT.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from ..controller.config import LEGACY_SPEC_FLAGS, legacy_param
from ..dataplane.apply import BACKEND_CHOICES
from ..settings.spec import SETTINGS, Given
from . import exitcodes, loglevel
from .failures import fail
from .spec_options import env_name, flag_name, spec_options

if TYPE_CHECKING:
    from ..controller.config import ControllerConfig
    from ..controller.kubeconfig import Loaded

F = TypeVar("F", bound=Callable[..., Any])
MORE_ENVVARS: dict[str, tuple[str, ...]] = {"envoy_port": ("ENVOY_PORT",)}
"""Setting -> the 2018 automatic variables `run` also reads, after IPNC_<NAME>."""
IGNORED_OPTIONS: dict[str, str] = {
    "--container-runtime": "container_runtime",
    "--crio-socket": "crio_socket",
    "--runc-root": "runc_root",
}


IPV6_2018 = {"true": "capture", "false": "block"}
"""--enable-inbound-ipv6 (2018) -> the ipv6 setting; the 2018 script rejected inbound IPv6 when false."""


def _env_2018(flag: str) -> list[str]:
    """IPNC_<NAME>, then the 2018 automatic name <NAME> (viper's AutomaticEnv with - replaced by _)."""
    name = flag.lstrip("-").replace("-", "_").upper()
    return [f"IPNC_{name}", name]


def _spec_options(func: F) -> F:
    """The spec flags `rules` has (same names, same parsers), plus the 2018 spellings and variables."""
    func = click.option(
        "--enable-inbound-ipv6",
        "enable_inbound_ipv6",
        default=None,
        metavar="true|false",
        envvar=_env_2018("--enable-inbound-ipv6"),
        help="2018: true = --ipv6 capture, false = --ipv6 block (--ipv6 wins)",
    )(func)
    for flag in reversed(LEGACY_SPEC_FLAGS):
        func = click.option(
            flag,
            legacy_param(flag),
            default=None,
            metavar="VALUE",
            envvar=_env_2018(flag),
            help="2018 spelling of the setting",
        )(func)
    func = spec_options("default for every pod: ", MORE_ENVVARS)(func)
    for flag, param in IGNORED_OPTIONS.items():
        func = click.option(flag, param, default=None, hidden=True, envvar=_env_2018(flag))(func)
    return func


@click.command(
    context_settings={"auto_envvar_prefix": "IPNC", "show_default": True},
    epilog="\b\nExit codes:\n" + exitcodes.describe(),
)
@click.option(
    "--kubeconfig",
    default=None,
    help="kubeconfig file [default: KUBECONFIG, else the in-cluster service account, else ~/.kube/config]",
)
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
    help="pods reconciled at once [default: 2 x the CPUs the container's CPU limit allows "
    "(else the node's), 2 to 4]",
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
    type=loglevel.CHOICE,
    default=None,
    envvar=["IPNC_LOG_LEVEL", "LOG_LEVEL"],
    help="[default: info; also before `run`; env LOG_LEVEL as the 2018 chart set it]",
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
@click.option(
    "--preflight-retry",
    type=click.FloatRange(min=0.1),
    default=30.0,
    help="seconds between preflight attempts while a check fails (not ready meanwhile)",
)
@click.option(
    "--ignore-pod-overrides/--no-ignore-pod-overrides",
    default=False,
    help="ignore the pods' ipv6 and owner-group annotations, and a proxy uid/gid from the pod (envoy-userid, "
    "envoy-groupid, istio-proxy's runAsUser/runAsGroup, istio-init's -u/-g) unless Istio's injector would "
    "pick it for the namespace or it is --proxy-uid/--proxy-gid (Warning Event PodOverrideIgnored); the "
    "controller-wide values apply",
)
@click.option(
    "--confine/--no-confine",
    default=True,
    help="confine the controller at start (Landlock, namespace broker, no CAP_SYS_PTRACE; "
    "docs/security.md); --no-confine leaves a compromise the node's files",
)
@_spec_options
@click.pass_context
def run(ctx: click.Context, /, **options: Any) -> None:
    """Initialize every eligible pod on this node: capture rules in its network namespace, then mark it."""
    from ..controller import config as cfg
    from ..controller import logs
    from ..controller.kubeconfig import KubeconfigError, find
    from ..controller.selection import SelectionOptions
    from ..errors import SpecError

    level = loglevel.effective(ctx, options["log_level"])
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
    modern = {s.name: _given(s.name, options[s.name]) for s in SETTINGS}
    legacy_v6 = options["enable_inbound_ipv6"]
    if legacy_v6 is not None and modern["ipv6"] is None:
        if legacy_v6.strip().lower() not in IPV6_2018:
            raise click.UsageError(
                f"--enable-inbound-ipv6: invalid value {legacy_v6!r}: must be true or false"
            )
        modern["ipv6"] = Given(IPV6_2018[legacy_v6.strip().lower()], "--enable-inbound-ipv6")
    try:
        defaults = cfg.spec_defaults(
            modern, {flag: options[legacy_param(flag)] for flag in LEGACY_SPEC_FLAGS}
        )
        cfg.check_spec_defaults(defaults)
        host, port = cfg.parse_listen(options["listen_address"])
    except (SpecError, cfg.ConfigError) as exc:
        raise click.UsageError(str(exc)) from None
    excluded = frozenset(n.strip() for n in options["excluded_namespaces"].split(",") if n.strip())
    if not options["confine"]:
        from ..controller.confinement import warn_unconfined

        warn_unconfined()
    try:
        loaded = find(options["kubeconfig"])
    except KubeconfigError as exc:
        fail(str(exc), exitcodes.CONFIG)
    log.info("API server %s (%s)", loaded.server, loaded.source.describe())
    config = cfg.ControllerConfig(
        node_name=node,
        kubeconfig=loaded.source.path,
        proc_root=options["proc_root"],
        backend=options["backend"],
        listen_host=host,
        listen_port=port,
        concurrency=options["concurrency"] or cfg.default_concurrency(),
        repair_interval=options["repair_interval"],
        netns_deadline=options["netns_deadline"],
        selection=SelectionOptions(options["select_legacy_annotation"], options["select_injected"], excluded),
        spec_defaults=defaults,
        ignore_pod_overrides=options["ignore_pod_overrides"],
        log_level=level,
        log_format=options["log_format"],
        shutdown_grace=options["shutdown_grace"],
        watch=cfg.WatchTuning(
            timeout=options["watch_timeout"],
            inactivity=options["watch_inactivity"],
            relist_jitter=options["relist_jitter"],
        ),
    )
    capeff = _confine(config, loaded) if options["confine"] else None
    try:
        code = asyncio.run(_serve(config, loaded, options["preflight_retry"], capeff))
    except cfg.ConfigError as exc:  # the status address is taken
        fail(str(exc), exitcodes.USAGE)
    raise SystemExit(code)


def _confine(config: ControllerConfig, loaded: Loaded) -> int | None:
    """Confine this process (before any thread starts); returns the capabilities it started with."""
    from ..controller import confinement, preflight

    capeff = preflight.probe_capeff()
    policy = confinement.Policy(
        proc_root=config.proc_root,
        read=loaded.files,
        connect_ports=confinement.api_ports(loaded.server, os.environ),
        bind_ports=(config.listen_port,),
    )
    try:
        confinement.confine(policy)
    except confinement.ConfinementError as exc:
        fail(str(exc), exitcodes.PERMISSION)
    return capeff


def _given(setting: str, value: str | None) -> Given | None:
    """The value with its source: the variable click read it from, else the flag."""
    if value is None:
        return None
    source = click.get_current_context().get_parameter_source(setting)
    if source is not click.core.ParameterSource.ENVIRONMENT:
        return Given(value, flag_name(setting))
    names = [env_name(setting), *MORE_ENVVARS.get(setting, ())]
    return Given(value, next((n for n in names if n in os.environ), names[0]))


async def _serve(config: ControllerConfig, loaded: Loaded, retry: float, capeff: int | None) -> int:
    """The controller behind its preflight: capabilities, /proc, tools, the API access of the ClusterRole."""
    from ..controller import preflight
    from ..controller.access import run_checks
    from ..controller.main import run as run_controller
    from ..install import rbac

    needed = preflight.required_access(rbac.CLUSTER_ROLE_RULES)

    async def check() -> preflight.Report:
        return await run_checks(
            config.proc_root, config.backend, loaded.config, loaded.server, needed, capeff
        )

    return await run_controller(config, check, retry)
