"""The waiter-building options shared by `inject` and `webhook`: one decorator, one InjectOptions builder.

`webhook` also reads each from an IPNC_* environment variable (the chart sets them); `inject` runs on a
workstation and takes flags only. Neither ever adds --trust-annotation to the waiter: a pod's status
annotation must not be enough to open it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import click

if TYPE_CHECKING:
    from ..install.injection import InjectOptions

F = TypeVar("F", bound=Callable[..., Any])
ENV = "IPNC_"
DEFAULT_CONTROLLER_NAMESPACE = "istio-system"
"""Where the docs install the chart; the chart's webhook passes its own release namespace instead."""


def injection_options(*, environment: bool) -> Callable[[F], F]:
    def env(name: str) -> dict[str, Any]:
        return {"envvar": ENV + name, "show_envvar": True} if environment else {}

    options = [
        click.option(
            "--image",
            default=None,
            help="Waiter image (default: this release's image).",
            **env("WAITER_IMAGE"),
        ),
        click.option(
            "--image-pull-policy",
            type=click.Choice(["Always", "IfNotPresent", "Never"]),
            default="IfNotPresent",
            show_default=True,
            **env("WAITER_IMAGE_PULL_POLICY"),
        ),
        click.option(
            "--timeout",
            type=click.FloatRange(min=1),
            default=300.0,
            show_default=True,
            help="Seconds the waiter waits for capture before failing the pod's start.",
            **env("WAITER_TIMEOUT"),
        ),
        click.option(
            "--translate-istio-init-args/--no-translate-istio-init-args",
            default=True,
            show_default=True,
            help="Turn istio-init's istio-iptables arguments into the pod annotations the controller reads.",
            **env("TRANSLATE_ISTIO_INIT_ARGS"),
        ),
        click.option(
            "--controller-namespace",
            default=DEFAULT_CONTROLLER_NAMESPACE,
            show_default=True,
            help="Namespace the controller runs in (the chart's release namespace): the waiter names it in "
            "its timeout advice.",
            **env("CONTROLLER_NAMESPACE"),
        ),
        click.option(
            "--waiter-arg",
            "waiter_args",
            multiple=True,
            help="Extra argument for the injected waiter, e.g. --waiter-arg=--outbound-port=15011 "
            "(repeatable; never --trust-annotation).",
        ),
    ]

    def decorate(func: F) -> F:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def inject_options_from(params: Mapping[str, Any]) -> InjectOptions:
    """InjectOptions from the decorator's parameters (imported here so `--help` stays light)."""
    from ..install.injection import DEFAULT_IMAGE, InjectionError, InjectOptions

    try:
        return InjectOptions(
            image=params["image"] or DEFAULT_IMAGE,
            image_pull_policy=params["image_pull_policy"],
            timeout=params["timeout"],
            translate_istio_init_args=params["translate_istio_init_args"],
            controller_namespace=params["controller_namespace"],
            extra_args=tuple(params["waiter_args"]),
        )
    except InjectionError as exc:
        raise click.BadParameter(str(exc), param_hint="--waiter-arg") from None
