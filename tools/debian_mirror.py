"""Print the Debian mirror this host's apt already uses, for debootstrap (`make image-base`).

Reads /etc/apt/sources.list, sources.list.d/*.list (one-line form) and sources.list.d/*.sources (deb822),
in apt's order, and prints the first `deb` URI that serves SUITE (default bookworm); else the first that
looks like a Debian archive (a path ending in /debian). Runs with the system python3 alone: make calls it
before the venv exists. Exit 1 with one line when the host names no Debian mirror (give DEBIAN_MIRROR=URL).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NamedTuple


class Source(NamedTuple):
    uri: str
    suites: tuple[str, ...]


def one_line(text: str) -> list[Source]:
    """`deb [options] URI SUITE [COMPONENT...]` lines; deb-src and comments skipped."""
    found = []
    for raw in text.splitlines():
        words = raw.split("#", 1)[0].split()
        if not words or words[0] != "deb":
            continue
        words = words[1:]
        if words and words[0].startswith("["):
            while words and not words[0].endswith("]"):
                words = words[1:]
            words = words[1:]
        if len(words) >= 2:
            found.append(Source(words[0].rstrip("/"), (words[1],)))
    return found


def deb822(text: str) -> list[Source]:
    """Stanzas of Types/URIs/Suites (`Enabled: no` skipped); comment lines and continuations handled."""
    found = []
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = ""
        for line in stanza.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0].isspace() and key:
                fields[key] += " " + line.strip()
                continue
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
            continue
        suites = tuple(fields.get("suites", "").split())
        found += [Source(uri.rstrip("/"), suites) for uri in fields.get("uris", "").split()]
    return found


def sources(etc_apt: Path) -> list[Source]:
    found = one_line(_read(etc_apt / "sources.list"))
    parts = etc_apt / "sources.list.d"
    for path in sorted(parts.iterdir()) if parts.is_dir() else ():
        if path.suffix == ".list":
            found += one_line(_read(path))
        elif path.suffix == ".sources":
            found += deb822(_read(path))
    return [s for s in found if s.uri.split(":", 1)[0] in {"http", "https", "ftp", "file"}]


def mirror(found: list[Source], suite: str) -> str | None:
    for source in found:
        if suite in source.suites:
            return source.uri
    return next((s.uri for s in found if s.uri.endswith("/debian")), None)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="bookworm")
    parser.add_argument("--etc-apt", type=Path, default=Path("/etc/apt"))
    args = parser.parse_args(argv)
    found = mirror(sources(args.etc_apt), args.suite)
    if found is None:
        print(
            f"error: no Debian mirror for {args.suite} in {args.etc_apt}/sources.list or sources.list.d/; "
            "give make DEBIAN_MIRROR=URL",
            file=sys.stderr,
        )
        return 1
    print(found)
    return 0


if __name__ == "__main__":
    sys.exit(main())
