"""The `istio-pod-network-controller` command.

Subcommands are imported lazily: the waiter (`wait`/`init`) runs in every mesh pod's start-up path and must
not pay for importing the controller or the rule renderers, and `--help`/`--version` list the subcommands from
the table below without importing any of them (tests/test_cli_top.py keeps the table equal to the commands).
"""

from __future__ import annotations

import importlib
import sys
from typing import NoReturn

import click

from . import loglevel

#: subcommand name -> ("module:attribute" of its click command relative to this package, short help).
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "check": (".check:check", "Preflight: capabilities, host /proc, rule tools and API access for `run`."),
    "init": (".wait:init",
             "2018 name of `wait` (same flags and meanings; --delay defaults to 10 s as it did then)."),
    "inject": (".inject:inject",
               "Replace Istio's privileged istio-init with the unprivileged waiter in Istio-injected YAML."),
    "rules": (".rules:rules", "Render, apply, verify or remove the capture rules of one network namespace."),
    "run": (".run:run",
            "Initialize every eligible pod on this node: capture rules in its network namespace, "
            "then mark it."),
    "status": (".status:status",
               "Explain one pod: selected and why, its spec, mark, its node's controller, Events, "
               "what next."),
    "wait": (".wait:wait",
             "Exit 0 once this pod's traffic is really captured (loopback probe), "
             "else time out with advice."),
    "webhook": (".webhook:webhook",
                "Serve the mutating admission webhook that replaces istio-init with the waiter in new pods."),
}  # fmt: skip


class LazyGroup(click.Group):
    """A click group that imports a subcommand's module only when that subcommand runs."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = SUBCOMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target[0].split(":")
        module = importlib.import_module(module_name, __name__)
        command: click.Command = getattr(module, attr)
        return loglevel.add_to(command)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(len(name) for name in names)
        # A bare Command shortens the text exactly as click shortens a real subcommand's help.
        rows = [
            (name, click.Command(name, help=SUBCOMMANDS[name][1]).get_short_help_str(limit)) for name in names
        ]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="istio-pod-network-controller", message="%(prog)s %(version)s")
@click.option(
    "--log-level",
    type=loglevel.CHOICE,
    default=None,
    expose_value=False,
    callback=loglevel.for_root(SUBCOMMANDS),
    help="Log level for the subcommand (2018 root flag; the subcommand's own --log-level wins).",
)
def cli() -> None:
    """Install Istio's traffic capture into mesh pods from the node, so mesh pods need no NET_ADMIN."""


def main(argv: list[str] | None = None) -> NoReturn:
    """Run the command; a usage error is one line (click's own form takes four) with click's exit code."""
    try:
        code = cli.main(
            args=argv if argv is not None else sys.argv[1:],
            prog_name="istio-pod-network-controller",
            standalone_mode=False,
        )
    except click.exceptions.NoArgsIsHelpError as exc:
        exc.show()  # a group run without a subcommand: its help, as click prints it
        raise SystemExit(exc.exit_code) from None
    except click.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        click.echo(f"error: {exc.format_message()}{hint}", err=True)
        raise SystemExit(exc.exit_code) from None
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        raise SystemExit(exc.exit_code) from None
    except click.Abort:
        click.echo("aborted", err=True)
        raise SystemExit(1) from None
    raise SystemExit(code if isinstance(code, int) else 0)
