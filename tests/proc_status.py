"""What the kernel says a process runs as, read from the host's /proc (the waiter and image tests)."""

from __future__ import annotations

from pathlib import Path


def process_status(pid: int) -> dict[str, str]:
    """Uid, Gid, Groups, NoNewPrivs and every Cap* line of /proc/<pid>/status."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.startswith("Cap") or key in {"Uid", "Gid", "Groups", "NoNewPrivs"}:
            fields[key] = value.strip()
    return fields
