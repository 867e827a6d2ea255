"""A recording `Runner` for the backends: the exact sequence of tool commands, without root.

Like istio-iptables' recording `Dependencies` stub. Given canned outputs (keyed by the command line) it
stands in for the tools; given a delegate (the real runner) it records what really ran.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from istio_pod_network_controller.dataplane.tools import Runner, refuse_unsafe_input


@dataclass(frozen=True, slots=True)
class Call:
    argv: tuple[str, ...]
    stdin: str | None


@dataclass
class RecordingRunner:
    outputs: Mapping[str, str] = field(default_factory=dict)
    delegate: Runner | None = None
    calls: list[Call] = field(default_factory=list)

    def __call__(self, argv: Sequence[str], stdin: str | None = None, *, tolerate: str | None = None) -> str:
        refuse_unsafe_input(argv, stdin)  # the guard every real run passes
        self.calls.append(Call(tuple(argv), stdin))
        if self.delegate is not None:
            return self.delegate(argv, stdin, tolerate=tolerate)
        return self.outputs.get(shlex.join(argv), "")

    def commands(self) -> list[str]:
        return [shlex.join(call.argv) for call in self.calls]

    def transcript(self) -> str:
        """One `$ command` line per call, each followed by its stdin as `< ` lines."""
        lines = []
        for call in self.calls:
            lines.append(f"$ {shlex.join(call.argv)}")
            lines += [f"< {line}" for line in (call.stdin or "").splitlines()]
        return "\n".join(lines) + "\n"
