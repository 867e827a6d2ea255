"""`--log-level`: one option for every subcommand, also before the subcommand (the 2018 root flag).

The 2018 controller took logrus levels (trace ... panic) from `--log-level` or the LOG_LEVEL variable its
chart set; they map onto Python's levels here. Import-light: the waiter's start-up path loads this module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Final

import click

LEVELS: Final = {
    "trace": "debug",
    "debug": "debug",
    "info": "info",
    "warn": "warning",
    "warning": "warning",
    "error": "error",
    "fatal": "error",
    "panic": "error",
}
"""Accepted spelling (case-insensitive) -> Python logging level name."""
CHOICE: Final = click.Choice(list(LEVELS), case_sensitive=False)
META_KEY: Final = "istio_pod_network_controller.log_level"
"""Where a --log-level given before the subcommand is kept (click's ctx.meta is shared by the chain)."""


def normalize(level: str) -> str:
    return LEVELS[level.lower()]


def remember(ctx: click.Context, _: click.Parameter, value: str | None) -> str | None:
    """Callback of the root option: keep the level for the subcommand."""
    if value is not None:
        ctx.meta[META_KEY] = normalize(value)
    return value


def for_root(
    subcommands: Iterable[str],
) -> Callable[[click.Context, click.Parameter, str | None], str | None]:
    """Root option callback: remember the level; `debug` also means --verbose where a subcommand has it.

    A subcommand's context takes its defaults from the parent's default map under its own name.
    """

    def callback(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        remember(ctx, param, value)
        if value is not None and normalize(value) == "debug":
            ctx.default_map = {**(ctx.default_map or {}), **{name: {"verbose": True} for name in subcommands}}
        return value

    return callback


def effective(ctx: click.Context, own: str | None, default: str = "info") -> str:
    """The subcommand's own --log-level, else the one given before it, else `default`."""
    if own is not None:
        return normalize(own)
    return str(ctx.meta.get(META_KEY, default))


def _persistent(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """For subcommands without a level of their own: remember it; `debug` turns on a `--verbose` they have."""
    if value is None:
        return
    remember(ctx, param, value)
    command = ctx.command
    if normalize(value) == "debug" and any(p.name == "verbose" for p in command.params):
        # Parameters not given on the command line are processed after those given, reading the default map.
        ctx.default_map = {**(ctx.default_map or {}), "verbose": True}


def add_to(command: click.Command) -> click.Command:
    """Give `command` a --log-level if it has none (the waiter's `wait`/`init`, `rules`, ...)."""
    if not any(p.name == "log_level" for p in command.params):
        command.params.append(
            click.Option(
                ["--log-level"],
                type=CHOICE,
                default=None,
                expose_value=False,
                callback=_persistent,
                help="Log level (also accepted before the subcommand); debug = --verbose where there is one.",
            )
        )
    return command
