"""The Makefile's image steps with a stand-in podman: import the base when it must, rebuild nothing that is
current, and take the Debian mirror from the host's apt sources (tools/debian_mirror.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FAKE_PODMAN = """#!/bin/sh
echo "$*" >> "{log}"
case "$1 $2" in
  "image exists") [ -e "{present}" ] ;;
  "save -q") while [ "$1" != "-o" ]; do shift; done; : > "$2" ;;
esac
"""


def fake_podman(tmp_path: Path) -> tuple[Path, Path, Path]:
    log, present, script = tmp_path / "podman.log", tmp_path / "image-present", tmp_path / "podman"
    script.write_text(FAKE_PODMAN.format(log=log, present=present))
    script.chmod(0o755)
    log.touch()
    return script, log, present


def make(target: str, build: Path, podman: Path) -> subprocess.CompletedProcess[str]:
    argv = [
        "make",
        "--no-print-directory",
        "-C",
        str(ROOT),
        target,
        f"IMAGE_BUILD={build}",
        f"PODMAN={podman}",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def calls(log: Path, verb: str) -> int:
    return sum(line.split()[0] == verb for line in log.read_text().splitlines())


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


@pytest.mark.root  # the tool-deps step may install packages
def test_the_base_is_imported_when_the_marker_is_missing_or_older(tmp_path: Path) -> None:
    podman, log, present = fake_podman(tmp_path)
    build = tmp_path / "build"
    build.mkdir()
    (build / "base-bookworm.tar").write_bytes(b"")
    present.touch()  # an older image of that name exists; no marker: a fresh base must still be imported
    make("image-base", build, podman)
    assert calls(log, "import") == 1 and (build / ".base-imported").exists()
    make("image-base", build, podman)
    assert calls(log, "import") == 1  # marker newer than the tar: nothing to do
    age(build / ".base-imported", 60)
    make("image-base", build, podman)
    assert calls(log, "import") == 2  # a newer tar is imported
    present.unlink()
    make("image-base", build, podman)
    assert calls(log, "import") == 3  # the image is gone


@pytest.mark.root
def test_the_archive_is_a_file_target(tmp_path: Path) -> None:
    podman, log, present = fake_podman(tmp_path)
    build = tmp_path / "build"
    (build / "wheels").mkdir(parents=True)
    (build / "base-bookworm.tar").write_bytes(b"")
    (build / "wheels" / ".done").touch()  # newer than pyproject.toml: no wheel download here
    make("image-archive", build, podman)
    assert calls(log, "build") == 1 and calls(log, "save") == 1
    present.touch()
    make("image-archive", build, podman)
    assert (calls(log, "build"), calls(log, "save")) == (1, 1)  # nothing changed: nothing rebuilt
    present.unlink()
    make("image-archive", build, podman)
    assert (calls(log, "build"), calls(log, "save")) == (2, 2)  # the image is gone: built and saved again


MIRROR = [sys.executable, str(ROOT / "tools" / "debian_mirror.py")]


def mirror(etc: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MIRROR, "--etc-apt", str(etc), *args], capture_output=True, text=True, timeout=30, check=False
    )


def test_debian_mirror_from_one_line_and_deb822_sources(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(
        "# deb http://commented.example/debian bookworm main\n"
        "deb-src http://src.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian/ trixie main\n"
    )
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://off.example/debian\nSuites: bookworm\nEnabled: no\n\n"
        "Types: deb deb-src\n# a comment\nURIs: http://deb822.example/debian\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n"
    )
    (tmp_path / "sources.list.d" / "other.list.disabled").write_text(
        "deb http://x.example/debian bookworm main\n"
    )
    assert mirror(tmp_path).stdout == "http://deb822.example/debian\n"
    assert mirror(tmp_path, "--suite", "trixie").stdout == "http://mirror.example/debian\n"
    assert mirror(tmp_path, "--suite", "sid").stdout == "http://mirror.example/debian\n"  # a Debian archive


def test_no_debian_mirror_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "sources.list").write_text("deb http://archive.example/ubuntu noble main\n")
    done = mirror(tmp_path)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == (
        f"error: no Debian mirror for bookworm in {tmp_path}/sources.list or sources.list.d/; "
        "give make DEBIAN_MIRROR=URL\n"
    )
