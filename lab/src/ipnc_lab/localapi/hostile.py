"""A hostile or broken API server: what the emulator sends instead of the protocol when told to.

Each field is one misbehaviour seen from real proxies and servers (or written the way an adversary would),
applied to list and watch requests of `resources`; `write_body` alone answers writes (pod patches,
Event creation, SelfSubjectAccessReviews) of `write_resources`. Set it with
`faults.set_hostile(Hostile(...))` or `{"action": "hostile", ...}` over HTTP; `Hostile()` is a correct server.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

INSTANT_CLOSE = ("BOOKMARK", "MODIFIED")
WRITE_RESOURCES = frozenset({"pods", "events", "selfsubjectaccessreviews"})


@dataclass(frozen=True, slots=True)
class Hostile:
    """- list_body: raw bytes served as every list's 200 body (`[]`, `{"items": [1]}`, `null`, ...);
    - watch_lines: raw lines a watch stream sends (after the 200), then it ends;
    - instant_close: each watch sends one BOOKMARK (current RV) or one MODIFIED (a matching object again)
      and ends at once;
    - stall: a watch stream sends one BOOKMARK and then nothing, holding the connection open;
    - ignore_selectors: label and field selectors are ignored on lists and watches (all objects sent);
    - huge_line: a watch stream sends one line of this many bytes (`{"type":"ADDED","object":{"x":"aaa...`,
      written a MiB at a time, never held whole), then ends;
    - write_body: raw bytes served with a 2xx status (201 for creates, else 200) as the answer to every
      write of `write_resources` (names as in the URL, e.g. `pods`, `events`, `selfsubjectaccessreviews`),
      with `write_type` as its Content-Type (`{}`, an HTML error page from a proxy, ...); the write itself
      is not done.
    """

    resources: frozenset[str] = frozenset({"pods"})
    list_body: bytes | None = None
    watch_lines: tuple[bytes, ...] | None = None
    instant_close: str | None = None
    stall: bool = False
    ignore_selectors: bool = False
    huge_line: int | None = None
    write_body: bytes | None = None
    write_resources: frozenset[str] = WRITE_RESOURCES
    write_type: str = "application/json"

    def __post_init__(self) -> None:
        if self.instant_close not in (None, *INSTANT_CLOSE):
            raise ValueError(f"instant_close must be one of {INSTANT_CLOSE}")

    def applies(self, resource: str) -> bool:
        return resource in self.resources

    def answers_write(self, resource: str) -> bool:
        return self.write_body is not None and resource in self.write_resources

    def huge_chunks(self) -> Iterator[bytes]:
        """The huge line, a MiB at a time (the newline included)."""
        size = self.huge_line or 0
        head = b'{"type":"ADDED","object":{"x":"'
        yield head
        left = max(0, size - len(head) - 1)
        block = b"a" * (1 << 20)
        while left > 0:
            yield block[: min(left, len(block))]
            left -= len(block)
        yield b"\n"

    @classmethod
    def from_command(cls, command: dict[str, Any]) -> Hostile:
        """The HTTP form; raw bodies and lines travel base64-encoded (`list_body_b64`, `watch_lines_b64`)."""
        lines = command.get("watch_lines_b64")
        write = command.get("write_body_b64")
        body = command.get("list_body_b64")
        return cls(
            resources=frozenset(command.get("resources") or ("pods",)),
            list_body=base64.b64decode(body) if body is not None else None,
            watch_lines=tuple(base64.b64decode(line) for line in lines) if lines is not None else None,
            instant_close=command.get("instant_close"),
            stall=bool(command.get("stall")),
            ignore_selectors=bool(command.get("ignore_selectors")),
            huge_line=int(command["huge_line"]) if command.get("huge_line") is not None else None,
            write_body=base64.b64decode(write) if write is not None else None,
            write_resources=frozenset(command.get("write_resources") or WRITE_RESOURCES),
            write_type=str(command.get("write_type") or "application/json"),
        )

    def describe(self) -> dict[str, Any]:
        return {
            "resources": sorted(self.resources),
            "list_body": self.list_body is not None,
            "watch_lines": len(self.watch_lines) if self.watch_lines is not None else None,
            "instant_close": self.instant_close,
            "stall": self.stall,
            "ignore_selectors": self.ignore_selectors,
            "huge_line": self.huge_line,
            "write_body": self.write_body is not None,
            "write_resources": sorted(self.write_resources),
        }
