"""The InterceptSpec settings as command-line options: one flag and one IPNC_* variable per setting, the same
for `rules`, `run` and `wait`, so the waiter listens exactly where the controller's rules redirect."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import click

from ..settings.spec import SETTINGS

F = TypeVar("F", bound=Callable[..., Any])
ENV_PREFIX = "IPNC_"


def flag_name(setting: str) -> str:
    return "--" + setting.replace("_", "-")


def env_name(setting: str) -> str:
    return ENV_PREFIX + setting.upper()


def source_name(setting: str) -> str:
    """How an error names a bad setting value: its flag and its variable."""
    return f"{flag_name(setting)} (or {env_name(setting)})"


def spec_options(
    help_prefix: str = "", more_envvars: Mapping[str, tuple[str, ...]] | None = None
) -> Callable[[F], F]:
    """One string option per setting (validated later by the spec's own parsers), in SETTINGS order.

    `more_envvars`: setting name -> further variables read after IPNC_<NAME> (the 2018 names for `run`).
    """
    extra = more_envvars or {}

    def decorate(func: F) -> F:
        for setting in reversed(SETTINGS):
            func = click.option(
                flag_name(setting.name),
                setting.name,
                default=None,
                metavar="VALUE",
                envvar=[env_name(setting.name), *extra.get(setting.name, ())],
                show_envvar=True,
                help=help_prefix + setting.help,
            )(func)
        return func

    return decorate
