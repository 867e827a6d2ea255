"""`istio-pod-network-controller rules render|apply|verify|clean|find-netns`: the data plane by hand."""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import click

from ..controller import preflight
from ..dataplane import apply as dataplane
from ..dataplane.discovery import PodNetns, find_pod_netns, prove_not_node
from ..dataplane.netns import PinnedNetns
from ..diagnose import DEFAULT_CONTROLLER_NAMESPACE
from ..errors import ControllerError
from ..rules import iptables, nftables, plan
from ..settings.downward import read_annotations
from ..settings.spec import InterceptionMode, InterceptSpec, IPv6Policy, build_spec
from . import exitcodes
from .failures import fail, fail_with
from .spec_options import source_name, spec_options

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")
Obj = Mapping[str, Any]
NETNS_CAPABILITIES = ("SYS_ADMIN", "NET_ADMIN", "NET_RAW")
"""setns() into the namespace, then the rule tools (netlink and iptables' raw sockets)."""
DOWNWARD_FILE = "/var/lib/kubelet/pods/UID/volumes/kubernetes.io~downward-api/podinfo/pod_annotations"


def pod_spec_options(func: F) -> F:
    """The spec options plus --annotations, a pod's own annotations layered on top."""
    func = spec_options()(func)
    return click.option(
        "--annotations",
        "annotations_file",
        type=click.Path(dir_okay=False),
        help='Pod annotations layered on top: a downward-API file (key="value" lines) or a JSON object.',
    )(func)


@dataclass(frozen=True, slots=True)
class Target:
    """The namespace options of apply/verify/clean, and the one way they act on it."""

    netns_path: str | None
    pid: int | None
    backend: str
    proc_root: str
    allow_host_netns: bool

    def run(self, action: Callable[..., T], *args: object, pod: Obj | None = None) -> tuple[str, T]:
        """Open the namespace (or find the pod's) and run a dataplane action; errors end the command."""
        given = (self.netns_path is not None) + (self.pid is not None)
        if given > 1 or (given == 0 and pod is None):
            raise click.UsageError("give exactly one of --netns PATH or --pid PID")
        needed = (*NETNS_CAPABILITIES, "SYS_PTRACE") if self.netns_path is None else NETNS_CAPABILITIES
        problem = preflight.missing_privileges(needed, preflight.probe_capeff())
        if problem is not None:
            fail(problem, exitcodes.PERMISSION)
        try:
            with self._open(pod) as handle:
                options = {"allow_host": self.allow_host_netns, "proc_root": self.proc_root}
                return handle.description, action(handle, *args, _backend(self.backend), **options)
        except ControllerError as exc:
            fail_with(exc)
        except OSError as exc:
            fail_with(ControllerError(f"{exc.filename or 'network namespace'}: {exc.strerror or exc}"))

    @contextlib.contextmanager
    def _open(self, pod: Obj | None) -> Iterator[PinnedNetns]:
        if self.netns_path is not None:
            handle = PinnedNetns.open_path(self.netns_path)
        elif self.pid is not None:
            handle = PinnedNetns.open_pid(self.pid, self.proc_root)
        else:
            handle = _discover(dict(pod or {}), self.proc_root).netns
        with handle:
            if self.pid is not None and pod is not None:
                from ..controller.cache import host_ips

                prove_not_node(handle, host_ips(dict(pod)))  # the pod's host IP: not the node's namespace
            yield handle


def _discover(pod: dict[str, Any], proc_root: str) -> PodNetns:
    """The pod's namespace from the node's /proc, as the controller finds it (uid, container ids, IPs)."""
    from ..controller.cache import host_ips, pod_ips, slim_pod

    _check_proc_root(proc_root)
    slim = slim_pod(pod)
    return find_pod_netns(
        slim["metadata"]["uid"],
        slim["status"].get("containerIDs") or (),
        pod_ips(slim),
        host_ips=host_ips(slim),
        proc_root=proc_root,
    )


def _check_proc_root(proc_root: str) -> None:
    problem = preflight.proc_root_problem(proc_root)
    if problem is not None:
        fail(f"--proc-root {proc_root}: {problem} (on a node: /proc; in the controller's pod: /host/proc)",
             exitcodes.NOT_FOUND)  # fmt: skip


def target_options(func: Callable[..., None]) -> Callable[..., None]:
    """The namespace options, handed to the command as one `target: Target`."""

    @functools.wraps(func)
    def command(
        *,
        netns_path: str | None,
        pid: int | None,
        backend: str,
        proc_root: str,
        allow_host_netns: bool,
        **kwargs: Any,
    ) -> None:
        func(target=Target(netns_path, pid, backend, proc_root, allow_host_netns), **kwargs)

    options = [
        click.option("--netns", "netns_path", metavar="PATH", help="/run/netns/NAME or /proc/PID/ns/net"),
        click.option("--pid", type=int, help="a process inside the target network namespace"),
        click.option(
            "--backend",
            type=click.Choice(dataplane.BACKEND_CHOICES),
            default="auto",
            show_default=True,
            help="auto keeps what the namespace already uses, else follows the node (legacy if it has "
            "legacy tables, else nft)",
        ),
        click.option("--proc-root", default="/proc", show_default=True, help="the host's /proc"),
        click.option(
            "--allow-host-netns",
            is_flag=True,
            help="permit changing the node's own network namespace (dangerous)",
        ),
    ]
    for option in options:
        command = option(command)
    return command


def _spec(annotations_file: str | None, settings: dict[str, str | None]) -> InterceptSpec:
    annotations = read_annotations(annotations_file) if annotations_file else {}
    defaults = {name: value for name, value in settings.items() if value is not None}
    return build_spec(annotations, defaults, default_source=source_name)


def _parsed_spec(annotations_file: str | None, settings: dict[str, str | None]) -> InterceptSpec:
    try:
        return _spec(annotations_file, settings)
    except ControllerError as exc:
        fail_with(exc)


@click.group()
def rules() -> None:
    """Render, apply, verify or remove the capture rules of one network namespace."""


@rules.command()
@pod_spec_options
@click.option(
    "--format",
    "output",
    type=click.Choice(["iptables", "nftables", "json"]),
    default="iptables",
    show_default=True,
)
def render(annotations_file: str | None, output: str, **settings: str | None) -> None:
    """Print the rules a pod with these settings gets (IPv6 `auto` renders as `block` without addresses)."""
    spec = _parsed_spec(annotations_file, settings)
    if spec.ipv6 is IPv6Policy.AUTO:
        spec = spec.with_ipv6(False)
    ruleset = plan.build(spec)
    if output == "json":
        click.echo(json.dumps({"spec": spec.describe(), "fingerprint": spec.fingerprint()}, indent=2))
    elif output == "nftables":
        click.echo(nftables.render(ruleset), nl=False)
    else:
        for family in ruleset.families:
            click.echo(f"# IPv{family.family}: {'ip' if family.family == 4 else 'ip6'}tables-restore input")
            click.echo(iptables.render(family), nl=False)
        for route in ruleset.routes:
            click.echo(
                f"# ip -{route.family} rule add fwmark {route.mark} lookup {route.table}; "
                f"ip -{route.family} route add local default dev lo table {route.table}"
            )


def _backend(name: str) -> dataplane.BackendChoice:
    for choice in dataplane.BACKEND_CHOICES:
        if choice == name:
            return choice
    raise click.BadParameter(f"unknown backend {name!r}")


@rules.command()
@pod_spec_options
@target_options
def apply(target: Target, annotations_file: str | None, **settings: str | None) -> None:
    """Install the rules (idempotent; replaces ours, leaves foreign rules alone)."""
    spec = _parsed_spec(annotations_file, settings)
    where, result = target.run(dataplane.apply, spec)
    ipv6 = "captured" if result.ipv6_captured else "blocked"
    click.echo(
        f"applied to {where} ({result.netns}) with {result.backend} "
        f"in {result.seconds * 1000:.1f} ms; IPv6 {ipv6}; spec {result.fingerprint}"
    )


@rules.command(epilog="\b\nExit codes:\n" + exitcodes.describe())
@pod_spec_options
@target_options
@click.option(
    "--pod",
    "pod_ref",
    metavar="NS/NAME",
    help="read the pod's own annotations from the API (and find its namespace when no --netns/--pid)",
)
@click.option(
    "--kubeconfig", default=None, help="for --pod [default: KUBECONFIG, in-cluster, ~/.kube/config]"
)
@click.option(
    "--controller-namespace",
    default=DEFAULT_CONTROLLER_NAMESPACE,
    show_default=True,
    help="for --pod: the controller on the pod's node gives the defaults its flags set",
)
@click.option(
    "--flags-only",
    is_flag=True,
    help="compare with the flags alone (a namespace that is no pod's); else --annotations or --pod is needed",
)
def verify(
    target: Target,
    annotations_file: str | None,
    pod_ref: str | None,
    kubeconfig: str | None,
    controller_namespace: str,
    flags_only: bool,
    **settings: str | None,
) -> None:
    """Compare live rules with the pod's spec: exit 0 in place, 1 drift (with a diff), 8 not installed.

    The spec is the pod's own: its annotations (--pod from the API, or --annotations, the downward-API file)
    over the defaults (with --pod: those of the controller pod on its node, then the flags given here).
    Comparing a pod's rules with the defaults alone reports false drift, so it is refused.
    """
    if sum((annotations_file is not None, pod_ref is not None, flags_only)) != 1:
        raise click.UsageError(
            "give the pod's annotations, --pod NS/NAME (from the API) or --annotations FILE (the "
            f"downward-API file, on a node {DOWNWARD_FILE}), or --flags-only to compare with the flags alone"
        )
    pod: dict[str, Any] | None = None
    if pod_ref is not None:
        pod, controller_defaults = _fetch_pod(pod_ref, kubeconfig, controller_namespace)
        annotations = {str(k): str(v) for k, v in (pod["metadata"].get("annotations") or {}).items()}
        given = {name: value for name, value in settings.items() if value is not None}
        spec = _spec_from(annotations, {**controller_defaults, **given})
    else:
        spec = _parsed_spec(annotations_file, settings)
    where, drift = target.run(dataplane.verify, spec, pod=pod)
    if drift.in_place:
        click.echo(f"{where}: {drift.backend}: in place")
        raise SystemExit(exitcodes.OK)
    _, nothing = target.run(dataplane.verify, InterceptSpec(mode=InterceptionMode.NONE), pod=pod)
    if nothing.in_place:
        click.echo(f"{where}: not installed: no rules of ours in this network namespace")
        raise SystemExit(exitcodes.NOT_INSTALLED)
    click.echo(f"{where}: {drift.backend}: drift\n{drift.report}")
    raise SystemExit(exitcodes.DRIFT)


def _spec_from(annotations: Mapping[str, str], settings: Mapping[str, str | None]) -> InterceptSpec:
    defaults = {name: value for name, value in settings.items() if value is not None}
    try:
        return build_spec(annotations, defaults, default_source=source_name)
    except ControllerError as exc:
        fail_with(exc)


def _fetch_pod(
    ref: str, kubeconfig: str | None, controller_namespace: str
) -> tuple[dict[str, Any], dict[str, str]]:
    """The pod, and the spec defaults of the controller pod on its node (none found: no defaults)."""
    from ..controller.kubeconfig import KubeconfigError, find
    from ..diagnose.cluster import Cluster, ClusterError
    from ..diagnose.explain import controller_settings
    from .spec_options import env_name, flag_name
    from .status import KIND_CODES

    namespace, sep, name = ref.partition("/")
    if not sep or not namespace or not name:
        raise click.UsageError(f"--pod {ref!r}: expected NAMESPACE/NAME")
    try:
        loaded = find(kubeconfig)
    except KubeconfigError as exc:
        fail(str(exc), exitcodes.CONFIG)
    try:
        with Cluster(loaded) as cluster:
            pod = cluster.pod(namespace, name)
            node = str((pod.get("spec") or {}).get("nodeName") or "")
            controllers = cluster.controller_pods(controller_namespace, node) if node else []
    except ClusterError as exc:
        fail(str(exc), KIND_CODES.get(exc.kind, exitcodes.UNREACHABLE))
    if not controllers:
        return pod, {}
    return pod, controller_settings(controllers[0], flag_name, env_name).defaults


@rules.command()
@target_options
def clean(target: Target) -> None:
    """Remove every rule and route of ours, and nothing else."""
    where, cleaned = target.run(dataplane.clean)
    click.echo(f"cleaned {where}: {', '.join(cleaned) or 'no rule tables present'}")


@rules.command("find-netns")
@click.option("--pod-uid", required=True, help="metadata.uid of the pod")
@click.option(
    "--pod-ip", "pod_ips", multiple=True, help="the pod's IP: its namespace holds it (repeatable; required)"
)
@click.option(
    "--host-ip",
    "host_ips",
    multiple=True,
    help="the node's IP: a namespace holding it is the node's (repeatable)",
)
@click.option("--container-id", "container_ids", multiple=True, help="prefer this container's processes")
@click.option("--proc-root", default="/proc", show_default=True, help="the host's /proc")
def find_netns(
    pod_uid: str,
    pod_ips: tuple[str, ...],
    host_ips: tuple[str, ...],
    container_ids: tuple[str, ...],
    proc_root: str,
) -> None:
    """Print the network namespace that discovery finds for a pod (the one holding its IP)."""
    _check_proc_root(proc_root)
    try:
        with find_pod_netns(pod_uid, container_ids, pod_ips, host_ips=host_ips, proc_root=proc_root) as found:
            click.echo(
                f"pod {found.pod_uid}: {found.netns.id} via pid {found.pid} "
                f"(container {found.container_id or 'unknown'}; "
                f"matched IPs: {', '.join(found.matched_ips)})"
            )
    except (ControllerError, ValueError) as exc:
        hint = ""
        if preflight.missing_capabilities(preflight.probe_capeff() or 0, ["SYS_PTRACE"]):
            hint = " (without CAP_SYS_PTRACE other users' processes are invisible: run as root on the node)"
        fail_with(exc, hint)
    except OSError as exc:
        fail_with(ControllerError(f"{exc.filename or proc_root}: {exc.strerror or exc}"))
