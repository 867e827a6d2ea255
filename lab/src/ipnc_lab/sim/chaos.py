"""The chaos soak: pods come and go on one simulated node while the API and the controller misbehave.

A seeded RNG drives a schedule of pod creations (mesh and ineligible kinds) and deletions, API faults
(watch drops, 410 after compaction, 429 with Retry-After, 500 bursts, added latency, API restarts), pods
deleted or their network namespace removed right after creation (mid-apply), rules flushed inside pods
(drift), sandboxes recreated as the kubelet does (new netns and IP, status updates in either order),
container restarts, and SIGKILLs of the controller followed by a restart. Then faults stop and `check()`
judges the end state: every eligible live pod initialized with exactly its rules, each of our jumps present
once, ineligible pods and the host namespace untouched, the controller's RSS bounded. Timing still varies
from run to run; the seed fixes every choice.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from istio_pod_network_controller.rules import nftables
from istio_pod_network_controller.rules.model import ChainName
from istio_pod_network_controller.settings import annotations as ann

from ..localapi import NODES
from .cluster import SimCluster, host_rules
from .controller import ControllerProcess, wait_for
from .netns import SAVE_TOOLS, NamedNetns, holds_capture_rules
from .node import SimNode, SimPod

FAULTS = (
    "drop_watches", "compact410", "throttle429", "error500", "latency", "api_restart",
    "delete_mid_apply", "netns_gone_mid_apply", "drift", "sandbox_recreated", "container_restart",
    "controller_kill",
)  # fmt: skip
INELIGIBLE = ("plain", "host_network", "opted_out", "invalid", "mode_none", "excluded_namespace")
CONTROLLER_FLAGS = [
    "--repair-interval", "2", "--netns-deadline", "5", "--relist-jitter", "0.5", "--watch-inactivity", "4",
    "--watch-timeout", "10", "--concurrency", "4",
]  # fmt: skip
RSS_CAP_MIB = 120.0
RSS_GROWTH_MIB = 25.0
BUILTIN = re.compile(
    r"^-A (PREROUTING|INPUT|FORWARD|OUTPUT|POSTROUTING) .*-j ("
    + "|".join(c.value for c in ChainName)
    + r")( |$)"
)


def our_jumps(netns: NamedNetns) -> dict[str, Counter[str]]:
    """Independent count of our jump rules per rule system, read with the tools themselves.

    iptables: `-A <built-in chain> ... -j ISTIO_*` lines of each save; nftables: `jump` lines in the base
    chains (those with a hook) of `table inet istio_pod_network`. A system that holds none is left out.
    """
    found: dict[str, Counter[str]] = {}
    for tool in SAVE_TOOLS:
        table = ""
        for line in netns.exec([tool]).splitlines():
            if line.startswith("*"):
                table = line[1:]
            elif BUILTIN.match(line):
                found.setdefault(tool.replace("6", ""), Counter())[f"{tool} {table} {line}"] += 1
    table = chain = ""
    hooked = False
    for raw in netns.exec(["nft", "list", "ruleset"]).splitlines():
        line = raw.strip()
        if line.startswith("table "):
            table, chain = line, ""
        elif line.startswith("chain "):
            chain, hooked = line, False
        elif line.startswith("type ") and " hook " in line:
            hooked = True
        elif nftables.TABLE in table and hooked and " jump " in f" {line}":
            found.setdefault("nftables", Counter())[f"{chain} {line}"] += 1
    return found


def _with_spec(spec: dict[str, Any]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda obj: {**obj, "spec": spec}


@dataclass
class Live:
    sim: SimPod
    kind: str  # "mesh" or one of INELIGIBLE

    @property
    def eligible(self) -> bool:
        return self.kind == "mesh"


@dataclass
class SoakReport:
    seed: int
    seconds: float
    faults: Counter[str] = field(default_factory=Counter)
    created: Counter[str] = field(default_factory=Counter)
    deleted: int = 0
    restarts: int = 0
    repairs: float = 0.0
    reconfigured: float = 0.0
    initialized: int = 0
    eligible_live: int = 0
    ineligible_checked: int = 0
    duplicates: int = 0
    rss: list[tuple[float, float]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def rss_first_last(self) -> tuple[float, float]:
        return (self.rss[0][1], self.rss[-1][1]) if self.rss else (float("nan"), float("nan"))

    def as_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed, "seconds": self.seconds, "faults": dict(self.faults),
            "created": dict(self.created), "deleted": self.deleted, "restarts": self.restarts,
            "repairs": self.repairs, "reconfigured": self.reconfigured, "initialized": self.initialized,
            "eligible_live": self.eligible_live, "ineligible_checked": self.ineligible_checked,
            "duplicates": self.duplicates, "rss_mib": [r for _, r in self.rss], "problems": self.problems,
        }  # fmt: skip


class ChaosSoak:
    """One soak run; `run()` returns the report (problems empty when every end-state check held)."""

    cluster: SimCluster
    node: SimNode
    controller: ControllerProcess

    def __init__(self, seed: int, seconds: float, say: Callable[[str], None] = lambda _: None) -> None:
        self.rng = random.Random(seed)  # noqa: S311 - a reproducible schedule, not a secret
        self.seconds = seconds
        self.say = say
        self.report = SoakReport(seed, seconds)
        self.live: list[Live] = []
        self.later: list[tuple[float, Callable[[], None]]] = []
        self.counter = 0
        self.kinds_due = list(INELIGIBLE)  # each ineligible kind at least once, early
        self.started = 0.0
        self._metrics_seen = {"repaired": 0.0, "reconfigured": 0.0}

    # -- the run ------------------------------------------------------------------------------------------

    def run(self) -> SoakReport:
        with SimCluster(history_size=256, bookmark_interval=1.0) as cluster:
            self.cluster = cluster
            self.node = cluster.add_node("ipncs")
            cluster.store.create(NODES, None, {"metadata": {"name": "churn"}})
            before = host_rules()
            self.controller = self._start()
            self.controller.wait_ready(30)
            self.started = time.monotonic()
            guaranteed = list(FAULTS)
            self.rng.shuffle(guaranteed)
            next_fault = self.started + 0.5
            next_sample = self.started
            while (now := time.monotonic()) - self.started < self.seconds:
                self._due(now)
                if now >= next_sample:
                    self.report.rss.append((now - self.started, self.controller.rss_mib()))
                    next_sample = now + 0.5
                if now >= next_fault:
                    self._fault(guaranteed.pop() if guaranteed else self.rng.choice(FAULTS))
                    next_fault = time.monotonic() + self.rng.uniform(0.2, 1.2)
                self._churn()
                time.sleep(self.rng.uniform(0.02, 0.12))
            self._quiesce()
            self._check(before)
        return self.report

    def _start(self) -> ControllerProcess:
        return self.cluster.start_controller(self.node, CONTROLLER_FLAGS)

    def _due(self, now: float) -> None:
        for entry in [e for e in self.later if e[0] <= now]:
            self.later.remove(entry)
            entry[1]()

    def _name(self, kind: str) -> str:
        self.counter += 1
        return f"{kind.replace('_', '-')}-{self.counter}"

    # -- pods ---------------------------------------------------------------------------------------------

    def _create(self, kind: str) -> Live:
        name = self._name(kind)
        namespace = "kube-system" if kind == "excluded_namespace" else "default"
        options: dict[str, Any] = {}
        if kind == "plain":
            options = {"mesh": False}
        elif kind == "host_network":  # every selection rule at once, and still never touched
            options = {"host_network": True, "annotations": {ann.LEGACY_INITIALIZE: "true"}}
        elif kind == "opted_out":
            options = {"labels": {ann.SIDECAR_INJECT: "false"}}
        elif kind == "invalid":
            options = {"annotations": {ann.EXCLUDE_INBOUND_PORTS: "80,http"}}
        elif kind == "mode_none":
            options = {"annotations": {ann.INTERCEPTION_MODE: "NONE"}}
        sim = self.cluster.add_pod(self.node, name, namespace, **options)
        live = Live(sim, kind)
        self.live.append(live)
        self.report.created[kind] += 1
        return live

    def _delete(self, live: Live) -> None:
        if live in self.live:
            self.live.remove(live)
        self.cluster.delete_pod(self.node, live.sim)
        self.report.deleted += 1

    def _churn(self) -> None:
        """Mostly mesh pods; a delete becomes likelier as the node fills up."""
        if self.live and self.rng.random() < len(self.live) / 60:
            self._delete(self.rng.choice(self.live))
        elif self.rng.random() < 0.8:
            self._create("mesh")
        else:
            self._create(self.kinds_due.pop() if self.kinds_due else self.rng.choice(INELIGIBLE))

    # -- faults -------------------------------------------------------------------------------------------

    def _fault(self, kind: str) -> None:
        faults = self.cluster.api.faults
        rng = self.rng
        self.report.faults[kind] += 1
        if kind == "drop_watches":
            faults.drop_watches()
        elif kind == "compact410":  # enough writes to push the controller's RV out of the history
            for i in range(300):
                self.cluster.store.mutate(NODES, None, "churn", _with_spec({"n": i}))
            faults.drop_watches()
        elif kind == "throttle429":
            faults.fail_next(rng.randint(2, 5), status=429, retry_after=1)
        elif kind == "error500":
            faults.fail_next(rng.randint(3, 10), status=500)
        elif kind == "latency":
            faults.set_latency(rng.uniform(0.05, 0.4))
            self.later.append((time.monotonic() + rng.uniform(1, 3), lambda: faults.set_latency(0)))
        elif kind == "api_restart":  # unavailable for a moment, then every watch ends and old RVs are gone
            faults.pause()
            time.sleep(rng.uniform(0.3, 1.5))
            faults.restart()
            faults.resume()
        elif kind == "delete_mid_apply":
            live = self._create("mesh")
            time.sleep(rng.uniform(0, 0.1))
            self._delete(live)
        elif kind == "netns_gone_mid_apply":  # sandbox dies; the API object goes a little later
            live = self._create("mesh")
            time.sleep(rng.uniform(0, 0.1))
            self.live.remove(live)
            self.node.remove_pod(live.sim)
            self.later.append((time.monotonic() + rng.uniform(0.5, 3), lambda: self._delete(live)))
        elif kind == "drift":
            marked = [p for p in self.live if p.eligible and self.cluster.initialized(p.sim)]
            if marked and (netns := rng.choice(marked).sim.netns) is not None:
                for argv in (["nft", "flush", "ruleset"], ["iptables-legacy", "-t", "nat", "-F"]):
                    netns.exec(argv)
        elif kind in ("sandbox_recreated", "container_restart"):
            marked = [p for p in self.live if p.eligible and self.cluster.initialized(p.sim)]
            if marked:
                sim = rng.choice(marked).sim
                if kind == "container_restart":
                    self.cluster.restart_container(self.node, sim)
                else:
                    self.cluster.recreate_sandbox(
                        self.node, sim, rng.choice(("ip-first", "containers-first"))
                    )
        elif kind == "controller_kill":
            self._harvest_metrics()
            self.controller.kill()
            time.sleep(rng.uniform(0, 1))
            self.controller = self._start()
            self.report.restarts += 1

    def _harvest_metrics(self) -> None:
        """Counters die with the process: add this incarnation's to the report before it goes."""
        for key in self._metrics_seen:
            value = self.controller.metric(f"istio_pod_network_controller_pods_{key}_total")
            total = getattr(self.report, "repairs" if key == "repaired" else key) + value
            setattr(self.report, "repairs" if key == "repaired" else key, total)

    # -- the end ------------------------------------------------------------------------------------------

    def _quiesce(self) -> None:
        self.cluster.api.faults.clear()
        for _, action in sorted(self.later, key=lambda e: e[0]):
            action()
        self.later.clear()
        if not self.controller.running():
            self.controller = self._start()
        self.controller.wait_ready(60)
        mesh = [p.sim for p in self.live if p.eligible]
        self.cluster.wait_initialized(mesh, 60, self.controller.log)
        time.sleep(3)  # one repair interval: drift injected just before the end is put back
        self._harvest_metrics()

    def _check(self, host_before: str) -> None:
        report = self.report
        problems = report.problems
        for live in self.live:
            sim = live.sim
            if live.eligible:
                report.eligible_live += 1
                report.initialized += self.cluster.initialized(sim)
                if not self._settles(sim):
                    problems.append(f"{sim.name}: {self.cluster.verify(sim).report}")
                self._count_jumps(sim)
            else:
                report.ineligible_checked += 1
                if self.cluster.initialized(sim):
                    problems.append(f"ineligible {live.kind} pod {sim.name} was marked")
                if sim.netns is not None and holds_capture_rules(sim.netns):
                    problems.append(f"ineligible {live.kind} pod {sim.name} holds capture rules")
                if live.kind == "host_network" and "HostNetworkSkipped" not in self.cluster.reasons(sim):
                    problems.append(f"{sim.name}: no HostNetworkSkipped warning")
        if report.initialized != report.eligible_live:
            problems.append(f"{report.eligible_live - report.initialized} eligible live pods not initialized")
        if host_rules() != host_before:
            problems.append("the host network namespace's rules changed")
        forbidden = [r for r in self.cluster.api.requests.records() if r.status == 403]
        if forbidden:
            problems.append(f"{len(forbidden)} requests refused by RBAC, e.g. {forbidden[0].path}")
        problems.extend(self._memory_problems())

    def _settles(self, sim: SimPod) -> bool:
        """Rules in place (within one more repair interval or two, should drift have come last)."""
        try:
            wait_for(lambda: self.cluster.verify(sim).in_place, 10, f"rules of {sim.name}", 0.2)
        except AssertionError:
            return False
        return True

    def _count_jumps(self, sim: SimPod) -> None:
        assert sim.netns is not None  # noqa: S101 - eligible pods have a namespace
        systems = our_jumps(sim.netns)
        if len(systems) != 1:
            self.report.problems.append(f"{sim.name}: our jumps in {sorted(systems) or 'no'} rule systems")
        for system, jumps in systems.items():
            for line, count in jumps.items():
                if count > 1:
                    self.report.duplicates += count - 1
                    self.report.problems.append(f"{sim.name}: {system} holds {count}x {line}")

    def _memory_problems(self) -> list[str]:
        """RSS never above the cap, and the last third's peak within a margin of the first third's."""
        samples = [(t, r) for t, r in self.report.rss if not math.isnan(r)]  # NaN: process gone
        if len(samples) < 6:
            return [f"only {len(samples)} RSS samples"]
        third = len(samples) // 3
        first = max(r for _, r in samples[:third])
        last = max(r for _, r in samples[-third:])
        problems = []
        if max(r for _, r in samples) > RSS_CAP_MIB:
            peak = max(r for _, r in samples)
            problems.append(f"controller RSS reached {peak:.1f} MiB (> {RSS_CAP_MIB})")
        if last > first + RSS_GROWTH_MIB:
            problems.append(f"controller RSS grew: first third peak {first:.1f} MiB, last {last:.1f} MiB")
        return problems

    def markdown(self) -> str:
        r = self.report
        first, last = r.rss_first_last
        faults = ", ".join(f"{k} {v}" for k, v in sorted(r.faults.items()))
        created = ", ".join(f"{k} {v}" for k, v in sorted(r.created.items()))
        rows = [
            ("seed / duration", f"{r.seed} / {r.seconds:.0f} s of chaos"),
            ("faults injected", f"{sum(r.faults.values())} ({faults})"),
            ("pods created", f"{sum(r.created.values())} ({created})"),
            ("pods deleted (incl. mid-apply)", str(r.deleted)),
            ("controller SIGKILLs + restarts", str(r.restarts)),
            ("eligible live pods at the end / initialized", f"{r.eligible_live} / {r.initialized}"),
            ("ineligible live pods checked untouched", str(r.ineligible_checked)),
            ("repairs (drift re-applied) / reconfigured", f"{r.repairs:.0f} / {r.reconfigured:.0f}"),
            ("duplicate jump rules found", str(r.duplicates)),
            ("controller RSS first / last sample", f"{first:.1f} / {last:.1f} MiB"),
            ("problems", "; ".join(r.problems) or "none"),
        ]  # fmt: skip
        return "| measure | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
