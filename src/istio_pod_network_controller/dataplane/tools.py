"""Run the rule tools (iptables-*, nft, ip) with argument lists, behind one small seam.

`Runner` is the seam (Istio's istio-iptables calls it `Dependencies`): the backends take one, so a
recording fake can capture the exact command sequence without root, while `SubprocessRunner` runs the
tools for real in the calling thread's network namespace.

Two guarantees hold for every real run, whatever a renderer does:
- nft never reads a file. Its input is refused outright if it mentions `include` (the only nft statement
  that opens a file; our renderers never write it), and nft itself runs under a Landlock domain that lets
  it execute and map exactly its binary, loader and libraries, and open nothing else, so even an include
  that slipped past every check resolves to EACCES. Landlock (Linux 5.13+) is an unprivileged allowlist
  applied to a thread of our own that then starts nft; a mount namespace would need a blocklist of every
  readable tree.
- Tool output never leaves as a public message: a failure is a ToolError whose `public` sentence is ours
  and whose `detail` (for the log) holds the tool's output, cut and with control characters escaped.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol

from ..errors import DETAIL_LENGTH, DataplaneError, ToolError, UnsafeRuleText, escaped
from . import landlock

log = logging.getLogger(__name__)

TIMEOUT_SECONDS = 30.0
_INCLUDE: Final = re.compile(r"include", re.IGNORECASE)
_QUOTED: Final = re.compile(r'"[^"\n]*"')
"""An nft string (an interface name of ours): `include` inside one is a name, not a statement."""


class Runner(Protocol):
    def __call__(self, argv: Sequence[str], stdin: str | None = None, *, tolerate: str | None = None) -> str:
        """Run one tool and return its stdout; raise ToolError when it fails.

        `tolerate`: a message fragment that means "nothing to do" (e.g. flushing a table that does not
        exist): the failure then returns "".
        """


def refuse_unsafe_input(argv: Sequence[str], stdin: str | None) -> None:
    """Refuse tool input no renderer of ours produces and a tool would act on beyond the rules.

    For nft: the word `include` anywhere outside a string (case-insensitive, stricter than nft itself),
    and reading rules from anything but stdin.
    """
    if os.path.basename(argv[0]) == "nft":
        if any(_INCLUDE.search(word) for word in argv) or (stdin and _INCLUDE.search(_QUOTED.sub("", stdin))):
            raise UnsafeRuleText(f"{argv[0]}: refusing input that contains 'include' (nft would read a file)")
        if "-f" in argv and argv[argv.index("-f") + 1 : argv.index("-f") + 2] != ["-"]:
            raise UnsafeRuleText(f"{argv[0]}: refusing to read rules from a file instead of stdin")
    if stdin is not None and "\0" in stdin:
        raise UnsafeRuleText(f"{argv[0]}: refusing input with a NUL byte")


class SubprocessRunner:
    """The real tools; nft confined by Landlock where the kernel has it."""

    def __call__(self, argv: Sequence[str], stdin: str | None = None, *, tolerate: str | None = None) -> str:
        refuse_unsafe_input(argv, stdin)
        confine = nft_confinement() if os.path.basename(argv[0]) == "nft" else None
        return _execute(list(argv), stdin, tolerate, confine)


def _execute(
    argv: list[str], stdin: str | None, tolerate: str | None, confine: Callable[[], None] | None
) -> str:
    tool = argv[0]
    try:
        done = _spawn(argv, stdin) if confine is None else _confined(confine, lambda: _spawn(argv, stdin))
    except FileNotFoundError:
        raise ToolError(tool, "not installed", public=f"{tool} is not installed on the node") from None
    except subprocess.TimeoutExpired:
        raise ToolError(
            tool,
            f"no answer within {TIMEOUT_SECONDS:.0f} s",
            public=f"{tool} did not answer within {TIMEOUT_SECONDS:.0f} s",
        ) from None
    except _ConfinementFailed as exc:  # nothing ran
        raise ToolError(tool, f"not started: {exc}", public=f"{tool} could not be started confined") from None
    if done.returncode != 0:
        if tolerate and tolerate in done.stderr:
            return ""
        output = (done.stderr or done.stdout).strip() or "no output"
        raise ToolError(
            tool,
            f"{' '.join(argv[1:4])}: exit status {done.returncode}: {escaped(output, DETAIL_LENGTH)}",
            public=f"{tool} refused the change (exit status {done.returncode}); its output is in the "
            "controller's log",
        )
    return done.stdout


def _spawn(argv: list[str], stdin: str | None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        input=stdin,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=TIMEOUT_SECONDS,
        check=False,
    )


class _ConfinementFailed(DataplaneError):
    """The Landlock hook refused in the confined thread (internal: becomes a ToolError)."""


def _confined(confine: Callable[[], None], spawn: Callable[[], subprocess.CompletedProcess[str]]) -> Any:
    """Run `spawn` in a thread of its own that is confined first: its child inherits the thread's Landlock
    domain, and the thread inherits the calling thread's namespaces (it is created by it).

    A thread, not a `preexec_fn`: a pre-exec hook makes Python fork the whole process instead of vfork-ing,
    which cost ~8 ms per nft call here; a thread costs well under one, and the restriction ends with it.
    """
    outcome: dict[str, Any] = {}

    def confined() -> None:
        try:
            confine()
        except OSError as exc:
            outcome["error"] = _ConfinementFailed(str(exc))
            return
        try:
            outcome["done"] = spawn()
        except BaseException as exc:  # re-raised in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=confined, name="nft-confined")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["done"]


run: Final[Runner] = SubprocessRunner()
"""The runner every backend uses unless given another."""


# --- Landlock for nft ----------------------------------------------------------------------------------


def _nft_files(nft: str) -> list[str]:
    """nft's binary, its ELF loader and every shared library the loader maps for it (from `ldd`)."""
    listing = subprocess.run(["ldd", nft], capture_output=True, text=True, timeout=10, check=True).stdout
    paths = [nft, *(word for line in listing.splitlines() for word in line.split() if word.startswith("/"))]
    return list(dict.fromkeys(os.path.realpath(path) for path in paths))


@functools.lru_cache(maxsize=1)
def nft_confinement() -> Callable[[], None] | None:
    """A hook that confines the calling thread (and so the nft it starts) to executing and reading nft's
    own files, or None. The ruleset is built once here; the hook makes two system calls, both of which
    affect only the calling thread (no_new_privs and the Landlock domain are per task)."""
    abi = landlock.abi()
    nft = shutil.which("nft")
    if abi < 1 or nft is None:
        log.warning("Landlock unavailable (ABI %d): nft runs unconfined, guarded by input checks only", abi)
        return None
    try:
        files = _nft_files(nft)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("cannot list nft's libraries (%s): nft runs unconfined, guarded by input checks", exc)
        return None
    ruleset = landlock.Ruleset(abi)
    for path in files:
        ruleset.allow_path(path, landlock.EXECUTE | landlock.READ_FILE)
    return ruleset.restrictor()
