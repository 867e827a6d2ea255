"""`wait` and its 2018 name `init`: the mesh pod's first init container (see docs/waiter.md).

Import-light on purpose: click, the stdlib-only spec module and the waiter package, nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from ..settings import annotations as ann
from ..settings.spec import SETTINGS
from ..waiter import exitcodes
from ..waiter.wait import DEFAULT_FILE, HEARTBEAT, Config, run
from .spec_options import env_name, source_name, spec_options

F = TypeVar("F", bound=Callable[..., Any])


EPILOG = (
    "\b\nExit codes:\n"
    + exitcodes.describe()
    + "\n\nThe probe needs no capabilities. As the proxy uid (1337 unless --proxy-uid / envoy-userid say "
    "otherwise) it dials 127.0.0.6 over loopback; as another uid and gid it dials a TEST-NET address that "
    "only the outbound capture brings back. Settings: flag, then IPNC_<NAME> environment variable; the pod's "
    "annotations in --file override both, exactly as in the controller."
)


def _common(delay_default: float) -> Callable[[F], F]:
    def decorate(func: F) -> F:
        options = [
            click.option(
                "--file",
                default=DEFAULT_FILE,
                show_default=True,
                envvar=env_name("annotations_file"),
                show_envvar=True,
                help="The pod's downward-API annotations file; missing: none.",
            ),
            click.option(
                "--annotation-key",
                default=ann.STATUS,
                show_default=True,
                help="Status annotation written by the controller (secondary signal).",
            ),
            click.option(
                "--annotation-value",
                default=ann.STATUS_INITIALIZED,
                show_default=True,
                help="Value of --annotation-key that means initialized.",
            ),
            click.option(
                "--timeout",
                type=click.FloatRange(min=0),
                default=300.0,
                show_default=True,
                help="Seconds before giving up (exit 124).",
            ),
            click.option(
                "--delay",
                type=click.FloatRange(min=0),
                default=delay_default,
                show_default=True,
                help="Seconds between re-reads of the annotations file (the probe retries faster).",
            ),
            click.option(
                "--trust-annotation",
                is_flag=True,
                help="Accept the status annotation alone as proof (2018 behaviour; forgeable).",
            ),
            click.option(
                "--require-probe",
                is_flag=True,
                help="Fail (exit 5) also for a pod that captures nothing (mode NONE) instead of waiting for "
                "the annotation; capturing pods without a probe fail so anyway.",
            ),
            click.option(
                "--controller-namespace",
                default="",
                envvar=env_name("controller_namespace"),
                show_envvar=True,
                help="Namespace of the controller, named in the timeout advice (injection sets it).",
            ),
            click.option(
                "--heartbeat",
                type=click.FloatRange(min=0),
                default=HEARTBEAT,
                show_default=True,
                help="Seconds between 'still waiting' lines (0: none).",
            ),
            click.option(
                "--ignore-pod-overrides",
                is_flag=True,
                envvar=env_name("ignore_pod_overrides"),
                help="Ignore the pod's ipv6 and owner-group annotations, and its envoy-userid/envoy-groupid "
                "unless they are the waiter's own uid/gid or --proxy-uid/--proxy-gid, to agree with a "
                "controller run with the same flag.",
            ),
            click.option("-v", "--verbose", is_flag=True, help="Debug lines (first probe timestamp...)."),
        ]
        options.append(spec_options())
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def _run(ctx: click.Context, params: dict[str, Any]) -> None:
    defaults = {s.name: params[s.name] for s in SETTINGS if params.get(s.name) is not None}
    config = Config(
        file=params["file"],
        annotation_key=params["annotation_key"],
        annotation_value=params["annotation_value"],
        timeout=params["timeout"],
        delay=params["delay"],
        trust_annotation=params["trust_annotation"],
        require_probe=params["require_probe"],
        verbose=params["verbose"],
        controller_namespace=params["controller_namespace"],
        heartbeat=params["heartbeat"],
        defaults=defaults,
        ignore_pod_overrides=params["ignore_pod_overrides"],
        default_source=source_name,
    )
    ctx.exit(run(config))


@click.command(epilog=EPILOG)
@_common(delay_default=2.0)
@click.pass_context
def wait(ctx: click.Context, /, **params: Any) -> None:
    """Exit 0 once this pod's traffic is really captured (loopback probe), else time out with advice."""
    _run(ctx, params)


@click.command(epilog=EPILOG)
@_common(delay_default=10.0)
@click.pass_context
def init(ctx: click.Context, /, **params: Any) -> None:
    """2018 name of `wait` (same flags and meanings; --delay defaults to 10 s as it did then)."""
    _run(ctx, params)
