"""A hostile or broken API server: what the emulator sends instead of the protocol when told to.

Each field is one misbehaviour seen from real proxies and servers (or written the way an adversary would),
applied to list and watch requests of `resources` only, never to writes. Set it with
`faults.set_hostile(Hostile(...))` or `{"action": "hostile", ...}` over HTTP; `Hostile()` is a correct server.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

INSTANT_CLOSE = ("BOOKMARK", "MODIFIED")


@dataclass(frozen=True, slots=True)
class Hostile:
    """- list_body: raw bytes served as every list's 200 body (`[]`, `{"items": [1]}`, `null`, ...);
    - watch_lines: raw lines a watch stream sends (after the 200), then it ends;
    - instant_close: each watch sends one BOOKMARK (current RV) or one MODIFIED (a matching object again)
      and ends at once;
    - stall: a watch stream sends one BOOKMARK and then nothing, holding the connection open;
    - ignore_selectors: label and field selectors are ignored on lists and watches (all objects sent).
    """

    resources: frozenset[str] = frozenset({"pods"})
    list_body: bytes | None = None
    watch_lines: tuple[bytes, ...] | None = None
    instant_close: str | None = None
    stall: bool = False
    ignore_selectors: bool = False

    def __post_init__(self) -> None:
        if self.instant_close not in (None, *INSTANT_CLOSE):
            raise ValueError(f"instant_close must be one of {INSTANT_CLOSE}")

    def applies(self, resource: str) -> bool:
        return resource in self.resources

    @classmethod
    def from_command(cls, command: dict[str, Any]) -> Hostile:
        """The HTTP form; raw bodies and lines travel base64-encoded (`list_body_b64`, `watch_lines_b64`)."""
        lines = command.get("watch_lines_b64")
        body = command.get("list_body_b64")
        return cls(
            resources=frozenset(command.get("resources") or ("pods",)),
            list_body=base64.b64decode(body) if body is not None else None,
            watch_lines=tuple(base64.b64decode(line) for line in lines) if lines is not None else None,
            instant_close=command.get("instant_close"),
            stall=bool(command.get("stall")),
            ignore_selectors=bool(command.get("ignore_selectors")),
        )

    def describe(self) -> dict[str, Any]:
        return {
            "resources": sorted(self.resources),
            "list_body": self.list_body is not None,
            "watch_lines": len(self.watch_lines) if self.watch_lines is not None else None,
            "instant_close": self.instant_close,
            "stall": self.stall,
            "ignore_selectors": self.ignore_selectors,
        }
