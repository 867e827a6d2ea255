"""`istio-pod-network-controller status POD [-n NS]`: explain one pod from a workstation (kubeconfig).

One screen, like `istioctl x describe pod`: selected and why, the spec and where each setting came from, the
mark and its digest, the controller on the pod's node, the pod's recent Events, what to do next.
"""

from __future__ import annotations

import dataclasses
import json
from typing import NoReturn

import click

from ..diagnose import DEFAULT_CONTROLLER_NAMESPACE
from . import exitcodes
from .failures import fail
from .spec_options import env_name, flag_name

KIND_CODES = {
    "unreachable": exitcodes.UNREACHABLE,
    "denied": exitcodes.DENIED,
    "not-found": exitcodes.NOT_FOUND,
    "failed": exitcodes.UNREACHABLE,
}


def _cluster_failure(exc: Exception, kind: str) -> NoReturn:
    fail(str(exc), KIND_CODES.get(kind, exitcodes.UNREACHABLE))


@click.command()
@click.argument("pod")
@click.option(
    "-n", "--namespace", default=None, help="the pod's namespace [default: the context's, else default]"
)
@click.option(
    "--kubeconfig", default=None, help="kubeconfig [default: KUBECONFIG, in-cluster, ~/.kube/config]"
)
@click.option(
    "--controller-namespace",
    default=DEFAULT_CONTROLLER_NAMESPACE,
    show_default=True,
    help="where the controller's DaemonSet runs",
)
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text", show_default=True)
def status(
    pod: str, namespace: str | None, kubeconfig: str | None, controller_namespace: str, output: str
) -> None:
    """Explain one pod: selected and why, its spec, mark, its node's controller, Events, what next."""
    from ..controller.kubeconfig import KubeconfigError, find
    from ..diagnose.cluster import Cluster, ClusterError
    from ..diagnose.explain import explain

    namespace, pod = _pod_argument(pod, namespace)
    try:
        loaded = find(kubeconfig)
    except KubeconfigError as exc:
        fail(str(exc), exitcodes.CONFIG)
    namespace = namespace or str(getattr(loaded.config.context, "namespace", None) or "default")
    try:
        with Cluster(loaded) as cluster:
            obj = cluster.pod(namespace, pod)
            ns = cluster.namespace(namespace)
            node = str((obj.get("spec") or {}).get("nodeName") or "")
            controllers = cluster.controller_pods(controller_namespace, node) if node else []
            events_note = ""
            try:
                events = cluster.events(namespace, str(obj["metadata"].get("uid", "")))
            except ClusterError as exc:
                if exc.kind != "denied":
                    raise
                events, events_note = [], f"not shown: this user may not list events in namespace {namespace}"
    except ClusterError as exc:
        _cluster_failure(exc, exc.kind)
    result = explain(obj, ns, controllers, events, controller_namespace, flag_name, env_name)
    if output == "json":
        data = dataclasses.asdict(result)
        data["events_note"] = events_note or None
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(render(result, events_note))


def _pod_argument(pod: str, namespace: str | None) -> tuple[str | None, str]:
    """POD or NS/POD, checked against -n: a mistake is named, never looked up as a pod called "/"."""
    given_ns, slash, name = pod.rpartition("/")
    if not pod.strip():
        raise click.UsageError("POD: empty pod name; give POD -n NS or NS/POD")
    if slash and (not given_ns or not name or "/" in given_ns):
        raise click.UsageError(f"POD {pod!r}: expected POD or NS/POD")
    if slash and namespace is not None and namespace != given_ns:
        raise click.UsageError(f"POD {pod} names namespace {given_ns!r} but -n says {namespace!r}: give one")
    return (given_ns if slash else namespace), name


def render(e: object, events_note: str = "") -> str:
    """The one-screen text form of an Explanation, in the names a user sets (annotations, flags)."""
    from ..diagnose.explain import Explanation
    from ..settings import annotations as ann

    assert isinstance(e, Explanation)  # noqa: S101 - the caller passes explain()'s result
    lines = [
        f"Pod:        {e.pod}  (node {e.node}, phase {e.phase})",
        f"Selected:   {'yes' if e.selected else 'no'}: {e.why} [{e.reason}]",
    ]
    if e.marked:
        digest = {True: ": matches the spec below", False: ": differs from the spec below", None: ""}[
            e.digest_matches
        ]
        lines.append(f"Mark:       initialized, digest {e.digest or '(none recorded)'}{digest}")
    else:
        lines.append("Mark:       not initialized")
    if not e.selected and not e.marked:
        lines.append("Spec:       not computed: the pod is not selected")
    elif e.spec_error is not None:
        lines.append(f"Spec:       INVALID: {e.spec_error}")
    elif e.settings:
        lines.append("Spec:       setting (annotation, else controller flag), value, set by")
        width = max(len(s.label) for s in e.settings)
        for setting in e.settings:
            lines.append(f"  {setting.label:<{width}}  {setting.value or '(empty)':<16}  {setting.source}")
        which = "one per IPv6 outcome: ipv6 auto decides per pod" if len(e.expected_digests) > 1 else ""
        lines.append(
            f"Digest:     {' or '.join(e.expected_digests)}: a hash of this spec; the controller records it "
            f"in {ann.SPEC_DIGEST} when it installs the rules{f' ({which})' if which else ''}"
        )
    if e.controllers:
        for c in e.controllers:
            state = "Ready" if c.ready else "NOT ready"
            lines.append(f"Controller: {c.name} on {c.node}: {state} ({c.phase}, {c.restarts} restarts)")
    else:
        lines.append(f"Controller: none found in namespace {e.controller_namespace} on node {e.node}")
    lines.append("Events:" + (f"     {events_note}" if events_note else "" if e.events else "     none"))
    for event in e.events:
        count = f" (x{event.count})" if event.count > 1 else ""
        lines.append(f"  {event.type:<8} {event.reason}{count}: {event.message}")
    lines.append(f"Verdict:    {e.verdict}")
    if e.next_steps:
        lines.append("Next:")
        lines.extend(f"  - {step}" for step in e.next_steps)
    return "\n".join(lines)
