"""Confine the controller right after start: it keeps the power to change pods' network rules, nothing more.

What a compromised controller (an RCE, a poisoned dependency) could otherwise do with root and its four
capabilities: read every container's files and write the node's through `/host/proc/PID/root`, read other
processes' memory and environment, mount. `confine` takes that away, for good, before any thread starts:

1. it forks the namespace broker (dataplane/nsbroker.py), which keeps CAP_SYS_PTRACE only and hands back
   pods' namespace fds, resolv.conf nameservers and the five /proc files discovery reads (procfs.py);
2. it drops CAP_SYS_PTRACE and sets no_new_privs, so no execve brings it back: other processes' /proc/PID
   files guarded by the ptrace check (mem, environ, maps, root, ns) stay closed;
3. it applies a Landlock domain to itself: read and execute beneath the image's own trees; read beneath the
   container's own /proc and the API credentials; list, but read no file in, the node's /proc; read and
   write the xtables lock and /dev/null only; no other write anywhere, no mount, no ptrace or signal
   outside the domain; TCP only to the API server's port and from the metrics port. Landlock checks a file
   reached through a magic link at its real location, so every other container's files and every host
   path stay out of reach;
4. it adds a seccomp filter of its own (dataplane/seccomp.py): no bpf, perf_event_open, keyctl, ptrace
   and the like, which the runtime's default profile grants a holder of CAP_SYS_ADMIN.

`--no-confine` skips all four, loudly (the log says what a compromise then reaches at every start).
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from ..dataplane import capabilities, landlock, procfs, seccomp
from ..dataplane.nsbroker import NsBroker
from ..errors import ControllerError

log = logging.getLogger(__name__)

IMAGE_TREES = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/opt", "/etc")
"""The image's own files: programs, libraries, Python, the rule tools' configuration (read, execute)."""
XTABLES_LOCK = "/run/xtables.lock"
DEV_FILES = ("/dev/null", "/dev/urandom")
DROPPED = ("SYS_PTRACE",)


class ConfinementError(ControllerError):
    """The controller cannot confine itself (no Landlock, or a step refused)."""


def python_trees() -> tuple[str, ...]:
    trees = [sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable))]
    trees += [entry for entry in sys.path if entry and os.path.isdir(entry)]
    return tuple(dict.fromkeys(os.path.realpath(tree) for tree in trees))


@dataclass(frozen=True, slots=True)
class Policy:
    """What the confined controller may reach besides the image's own trees."""

    proc_root: str
    read: tuple[str, ...] = ()
    """Credentials and configuration (kubeconfig, service account directory): read beneath."""
    connect_ports: tuple[int, ...] = ()
    bind_ports: tuple[int, ...] = ()
    code: tuple[str, ...] = field(default_factory=python_trees)
    """Python's own trees (interpreter, standard library, the product's venv): read and execute."""


def api_port(server: str) -> int:
    """The TCP port of the API server's URL (443 or 80 when it names none)."""
    parts = urlsplit(server)
    return parts.port or (80 if parts.scheme == "http" else 443)


PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def api_ports(server: str, env: Mapping[str, str]) -> tuple[int, ...]:
    """The TCP ports the API client connects to: the server's, and a proxy's from the environment (the
    client honours them)."""
    ports = [api_port(server)]
    for name in PROXY_VARIABLES:
        value = env.get(name, "")
        try:
            ports += [api_port(value if "://" in value else f"http://{value}")] if value else []
        except ValueError:
            continue
    return tuple(dict.fromkeys(ports))


def confine(policy: Policy) -> NsBroker:
    """Fork the broker, drop CAP_SYS_PTRACE, apply the Landlock domain; returns the installed broker."""
    version = landlock.abi()
    if version < 1:
        raise ConfinementError(
            "Landlock is unavailable (it needs Linux 5.13+ with landlock in the LSM list, and a seccomp "
            "profile that allows its system calls): the controller cannot confine itself; --no-confine "
            "runs it unconfined"
        )
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:
        raise ConfinementError(f"confinement needs a single-threaded process, this one has {threads} threads")
    _ensure_lock()
    ruleset = _ruleset(version, policy)
    broker = NsBroker.start(policy.proc_root)
    try:
        capabilities.drop(DROPPED)
        ruleset.restrictor()()
        filtered = seccomp.supported()
        if filtered:
            seccomp.install()
    except OSError as exc:
        broker.close()
        raise ConfinementError(f"cannot confine the controller: {exc}") from None
    finally:
        ruleset.close()
    procfs.use_source(broker)
    log.info(
        "confined: Landlock ABI %d (no write outside the xtables lock, no mount, no other container's "
        "files), CAP_SYS_PTRACE dropped, namespace broker PID %d, seccomp filter %s",
        version,
        broker.pid,
        "on" if filtered else f"unavailable on {platform.machine()} (the runtime's profile only)",
    )
    return broker


def warn_unconfined() -> None:
    log.warning(
        "CONFINEMENT OFF (--no-confine): a compromise of this controller can read every container's files "
        "and write the node's root filesystem through the node's /proc. Remove --no-confine."
    )


def _ensure_lock() -> None:
    """iptables-legacy creates the lock when missing, which the confined controller may not: create it now
    (where it can: on a read-only root without the chart's mount, iptables-legacy could not either)."""
    if not os.path.exists(XTABLES_LOCK):
        with contextlib.suppress(OSError):
            os.close(os.open(XTABLES_LOCK, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))


def _ruleset(version: int, policy: Policy) -> landlock.Ruleset:
    ruleset = landlock.Ruleset(version, net=True, scoped=True)
    try:
        _allow(ruleset, (*IMAGE_TREES, *policy.code), landlock.READ_EXECUTE)
        _allow(ruleset, policy.read, landlock.READ)
        # The node's /proc: list it, read no file in it (the broker reads the five discovery needs). The
        # container's own /proc (its processes only) stays readable for the tools; where both are one
        # procfs (hostPID, or the lab's node) that means the node's, a weaker domain docs/security.md names.
        _allow(ruleset, [policy.proc_root], landlock.READ_DIR)
        _allow(ruleset, ["/proc"], landlock.READ)
        _allow(ruleset, (XTABLES_LOCK, *DEV_FILES), landlock.READ_FILE | landlock.WRITE_FILE)
        for port in policy.connect_ports:
            ruleset.allow_port(port, landlock.CONNECT_TCP)
        for port in policy.bind_ports:
            ruleset.allow_port(port, landlock.BIND_TCP)
    except BaseException:
        ruleset.close()
        raise
    return ruleset


def _allow(ruleset: landlock.Ruleset, paths: Iterable[str], rights: int) -> None:
    for path in dict.fromkeys(paths):
        if os.path.exists(path):
            ruleset.allow_path(path, rights)
