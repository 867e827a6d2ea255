"""Named network namespaces (`ip netns add`) that the simulation creates and always deletes."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from typing import TypeVar

from istio_pod_network_controller.dataplane.netns import PinnedNetns, run_in
from istio_pod_network_controller.rules import nftables
from istio_pod_network_controller.rules.model import OUR_CHAINS

T = TypeVar("T")


def ip(*args: str) -> str:
    """Run `ip ARGS` in the caller's namespace; raise with ip's own message on failure."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def ip_batch(commands: list[str], netns: str | None = None) -> None:
    """Several `ip` commands in one process (`ip [-n NETNS] -batch -`); raise on the first failure."""
    argv = ["ip", *(["-n", netns] if netns else []), "-batch", "-"]
    done = subprocess.run(
        argv, input="\n".join(commands) + "\n", capture_output=True, text=True, timeout=20, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")


class NamedNetns:
    """A named namespace (`ip netns add`), pinned by fd for run_in; delete() removes it."""

    def __init__(self, name: str) -> None:
        self.name = name
        ip("netns", "add", name)
        try:
            self.pinned = PinnedNetns.open_path(f"/run/netns/{name}")
        except BaseException:
            ip("netns", "del", name)
            raise

    def run(self, work: Callable[[], T]) -> T:
        return run_in(self.pinned, work)

    def exec(self, argv: list[str], stdin: str | None = None, timeout: float = 10) -> str:
        """Run a tool inside the namespace (spawned from a thread that entered it); stdout, or raise."""

        def work() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                argv, input=stdin, capture_output=True, text=True, timeout=timeout, check=False
            )

        done = self.run(work)
        if done.returncode != 0:
            raise RuntimeError(f"{argv} in {self.name}: {(done.stderr or done.stdout).strip()}")
        return done.stdout

    def sysctl(self, key: str, value: str) -> None:
        def work() -> None:
            with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
                f.write(value)

        self.run(work)

    def delete(self) -> None:
        self.pinned.close()
        ip("netns", "del", self.name)


SAVE_TOOLS = ("iptables-legacy-save", "ip6tables-legacy-save", "iptables-nft-save", "ip6tables-nft-save")


def holds_capture_rules(netns: NamedNetns) -> bool:
    """Whether any rule system in the namespace holds a chain or table of ours (read with the tools).

    Ours by the rule model's own names: a chain declared in a save (`:NAME ...`) that is one of OUR_CHAINS,
    or the nftables table of ours in `nft list tables`.
    """
    for tool in SAVE_TOOLS:
        for line in netns.exec([tool]).splitlines():
            if line.startswith(":") and line[1:].split(" ", 1)[0] in OUR_CHAINS:
                return True
    return f"table inet {nftables.TABLE}" in netns.exec(["nft", "list", "tables"]).splitlines()
