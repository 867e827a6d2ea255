"""Run the demo: API emulator, one simulated node, the real controller and the real waiters, real traffic.

Acting as "the rest of the cluster", the demo writes objects straight into the emulator's store (user and
kubelet), while the controller talks to it over HTTP as a user holding exactly the chart's ClusterRole.
Init containers gate the pod as the kubelet would: the app and the Envoy stand-in start only after the
waiter exited 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from istio_pod_network_controller.install import rbac
from istio_pod_network_controller.settings import annotations as ann

from ..localapi import LocalAPIServer
from ..localapi.rbac import pod_bound_extra, service_account_groups
from ..localapi.resources import CORE_EVENTS, NAMESPACES, PODS
from ..localapi.server import ThreadedServer
from ..sim import chart
from ..sim.cluster import CONTROLLER_USER, host_rules, kubelet_status, set_status
from ..sim.controller import ControllerProcess
from ..sim.netns import holds_capture_rules
from ..sim.node import SimNode, SimPod
from ..sim.runtime import SYSTEM_PYTHON, build_runtime, runtime_env
from ..sim.traffic import Reply, Server, connect
from .scenario import APP_PORT, APP_UID, REMOTE_PORT, DemoPod, cast
from .scenario import NAMESPACES as DEMO_NAMESPACES

T = TypeVar("T")
PROXY_UID = 1337
WAITER_TIMEOUT = 30.0
CONTROLLER_NAMESPACE = "istio-system"
STATUS_EXAMPLE = "injected"
"""The pod whose `istio-pod-network-controller status` the demo prints at the end."""


@dataclass
class PodOutcome:
    """What actually happened to one pod, as the table shows it."""

    pod: DemoPod
    ip: str | None = None
    created: float = 0.0
    marked_ms: float | None = None
    waiter_exit: int | None = None
    waiter_ms: float | None = None
    inbound: Reply | None = None
    outbound: Reply | None = None
    rules_present: bool | None = None
    events: list[str] = field(default_factory=list)

    @property
    def inbound_captured(self) -> bool | None:
        return None if self.inbound is None else self.inbound.label == "envoy-in"

    @property
    def outbound_captured(self) -> bool | None:
        return None if self.outbound is None else self.outbound.label == "envoy-out"


@dataclass
class DemoResult:
    outcomes: list[PodOutcome]
    host_rules_unchanged: bool
    controller_requests: dict[str, int]
    controller_exit: int | None
    status_command: str = ""
    status_output: str = ""


def _started(resource: T | None) -> T:
    if resource is None:
        raise RuntimeError("the demo has not been started")
    return resource


class Demo:
    """Owns every resource of one demo run; close() removes them all, also after Ctrl-C or a failure."""

    def __init__(self, pods: int, backend: str, progress: Callable[[str], None]) -> None:
        self.cast = cast(pods)
        self.backend = backend
        self.say = progress
        self.tag = f"d{os.getpid() % 100000}"
        self.workdir = Path(tempfile.mkdtemp(prefix="ipnc-demo-"))
        os.chmod(self.workdir, 0o711)  # noqa: S103 - waiters (uid 1337) reach their own file, list nothing
        self._runtime: Path | None = None
        self._api: ThreadedServer | None = None
        self._node: SimNode | None = None
        self.remote = Server()
        self.controller: ControllerProcess | None = None
        self.controller_log = self.workdir / "controller.log"
        self.outcomes = {p.name: PodOutcome(p) for p in self.cast}
        self.sim_pods: dict[str, SimPod] = {}
        self._threads: list[threading.Thread] = []

    @property
    def runtime(self) -> Path:
        return _started(self._runtime)

    @property
    def api(self) -> ThreadedServer:
        return _started(self._api)

    @property
    def node(self) -> SimNode:
        return _started(self._node)

    # --- setup ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        self.say("building a runtime the pods' uids can read")
        self._runtime = build_runtime()
        self.say("starting the Kubernetes API emulator")
        self._api = LocalAPIServer().start_in_thread()
        for name, marks in DEMO_NAMESPACES.items():
            self.api.store.create(NAMESPACES, None, {"metadata": {"name": name, "annotations": marks}})
        self.say("installing the chart's node-restriction admission policies")
        self.api.api.install_policies(chart.policies())
        self.say("creating the simulated node")
        self._node = SimNode(self.tag)
        user = self.api.api.add_user(
            CONTROLLER_USER,
            uuid.uuid4().hex,
            rbac.cluster_role_rules(),
            groups=service_account_groups(chart.NAMESPACE),
            extra=pod_bound_extra(self.node.name, f"istio-pod-network-controller-{self.node.name}"),
        )
        kubeconfig = self.api.api.write_kubeconfig(self.workdir / "controller.kubeconfig", user)
        self.remote.add(self.node.node, "remote", REMOTE_PORT)
        self.remote.start()
        self.say("starting the controller")
        self.controller = ControllerProcess.start(
            kubeconfig,
            self.node.name,
            self.controller_log,
            ["--backend", self.backend, "--repair-interval", "0"],
        )
        self._controller_pod()

    def _controller_pod(self) -> None:
        """The controller as the API sees a DaemonSet pod (the chart's labels), so `status` finds it."""
        name = f"istio-pod-network-controller-{self.tag}"
        args = ["run", "--node-name", self.node.name, "--backend", self.backend, "--repair-interval", "0"]
        labels = {
            "app.kubernetes.io/name": "istio-pod-network-controller",
            "app.kubernetes.io/component": "controller",
        }
        self.api.store.create(NAMESPACES, None, {"metadata": {"name": CONTROLLER_NAMESPACE}})
        body = {"metadata": {"name": name, "namespace": CONTROLLER_NAMESPACE, "labels": labels},
                "spec": {"nodeName": self.node.name, "containers": [{"name": "controller", "image": "ipnc",
                                                                     "args": args}]}}  # fmt: skip
        self.api.store.create(PODS, CONTROLLER_NAMESPACE, body)

    def report_controller_ready(self) -> None:
        """What the kubelet would write: the controller pod's Ready condition, from its real /readyz."""
        ready = self.controller is not None and self.controller.http("/readyz")[0] == 200
        status = {"phase": "Running", "conditions": [{"type": "Ready", "status": str(ready)}]}
        set_status(self.api.store, CONTROLLER_NAMESPACE, f"istio-pod-network-controller-{self.tag}", status)

    def status_example(self) -> tuple[str, str]:
        """`istio-pod-network-controller status` of one mesh pod, run as an operator would (as admin)."""
        pod = next(p for p in self.cast if p.name == STATUS_EXAMPLE)
        args = ["status", pod.name, "-n", pod.namespace, "--controller-namespace", CONTROLLER_NAMESPACE]
        argv = [sys.executable, "-m", "istio_pod_network_controller", *args,
                "--kubeconfig", str(self.api.kubeconfig_path)]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        return "istio-pod-network-controller " + " ".join(args), done.stdout or done.stderr

    def create_pods(self) -> None:
        for index, pod in enumerate(self.cast, start=1):
            self.say(f"creating pod {index}/{len(self.cast)}: {pod.namespace}/{pod.name}")
            outcome = self.outcomes[pod.name]
            outcome.created = time.monotonic()
            created = self.api.store.create(PODS, pod.namespace, pod.manifest(self.node.name))
            sim = self.node.add_pod(
                pod.name, pod.namespace, created["metadata"]["uid"], host_network=pod.host_network
            )
            self.sim_pods[pod.name] = sim
            outcome.ip = sim.ip
            self._kubelet_status(pod, sim)
            if pod.runs_waiter:
                self._start_init(pod, sim)
            elif not pod.host_network:
                self._start_containers(pod, sim)

    def _kubelet_status(self, pod: DemoPod, sim: SimPod) -> None:
        """Init containers still run: Pending, with the sandbox's address (the node's for hostNetwork)."""
        status = kubelet_status(sim.ip or sim.host_ip, "Pending", host_ip=sim.host_ip)
        set_status(self.api.store, pod.namespace, pod.name, status)

    def _start_init(self, pod: DemoPod, sim: SimPod) -> None:
        """The waiter as the pod's first init container: uid 1337, no capabilities, the downward-API file."""
        podinfo = self.workdir / pod.name
        podinfo.mkdir()
        # The kubelet writes key="value" with Go's %q quoting: printable text literal, \" and \\ escaped.
        lines = [
            f"{key}={json.dumps(value, ensure_ascii=False)}" for key, value in sorted(pod.annotations.items())
        ]
        (podinfo / "pod_annotations").write_text("\n".join(lines) + "\n")
        os.chmod(podinfo, 0o755)  # noqa: S103 - the waiter runs as uid 1337
        argv = [
            SYSTEM_PYTHON, "-m", "istio_pod_network_controller", "wait",
            "--file", str(podinfo / "pod_annotations"), "--timeout", str(WAITER_TIMEOUT),
        ]  # fmt: skip
        waiter = self.node.spawn(sim, argv, uid=PROXY_UID, gid=PROXY_UID, env=runtime_env(self.runtime))
        outcome = self.outcomes[pod.name]

        def gate() -> None:
            code = waiter.wait()
            outcome.waiter_exit = code
            outcome.waiter_ms = (time.monotonic() - outcome.created) * 1000
            (podinfo / "waiter.log").write_text(waiter.stderr.read() if waiter.stderr else "")
            if code == 0:
                self._start_containers(pod, sim)

        thread = threading.Thread(target=gate, name=f"init-{pod.name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _start_containers(self, pod: DemoPod, sim: SimPod) -> None:
        """The app (uid 1000) and, for mesh pods, the Envoy stand-in (uid 1337) recording original dst."""
        env = runtime_env(self.runtime)
        workload = [SYSTEM_PYTHON, "-m", "ipnc_lab.sim.workload"]
        started = [
            self.node.spawn(
                sim, [*workload, "--listen", f"app:{APP_PORT}"], uid=APP_UID, gid=APP_UID, env=env
            )
        ]
        if pod.mesh:
            listens = ["--listen", "envoy-out:15001", "--listen", "envoy-in:15006"]
            started.append(self.node.spawn(sim, [*workload, *listens], uid=PROXY_UID, gid=PROXY_UID, env=env))
        for process in started:
            if process.stdout is not None:
                process.stdout.readline()  # "ready"

    # --- observation ---------------------------------------------------------------------------------------

    def wait_until_settled(self, timeout: float = WAITER_TIMEOUT + 5) -> None:
        """Until every waiter has exited and every mesh pod is marked (or the time is up)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._poll_marks()
            pending = [o for o in self.outcomes.values() if o.pod.mesh and o.marked_ms is None]
            waiting = [t for t in self._threads if t.is_alive()]
            self.say(f"waiting for capture: {len(self.cast) - len(pending)}/{len(self.cast)} settled, "
                     f"{len(waiting)} waiter(s) running")  # fmt: skip
            if not pending and not waiting:
                break
            if self.controller is not None and not self.controller.running():
                raise RuntimeError(
                    f"the controller exited ({self.controller.proc.returncode}); see {self.controller_log}"
                )
            time.sleep(0.02)
        time.sleep(0.3)  # let late Events land before they are read

    def _poll_marks(self) -> None:
        now = time.monotonic()
        for obj in self.api.store.objects(PODS):
            meta = obj["metadata"]
            outcome = self.outcomes.get(meta["name"])
            marked = (meta.get("annotations") or {}).get(ann.STATUS) == ann.STATUS_INITIALIZED
            if outcome is not None and marked and outcome.marked_ms is None:
                outcome.marked_ms = (now - outcome.created) * 1000

    def send_traffic(self) -> None:
        for name, outcome in self.outcomes.items():
            sim = self.sim_pods[name]
            if sim.netns is None or sim.ip is None:
                continue
            self.say(f"sending traffic to and from {name}")
            outcome.inbound = connect(self.node.node, sim.ip, APP_PORT, timeout=1.0)
            outcome.outbound = connect(
                sim.netns, self.node.gateway, REMOTE_PORT, uid=APP_UID, gid=APP_UID, timeout=1.0
            )
            outcome.rules_present = holds_capture_rules(_started(sim.netns))

    def collect_events(self) -> None:
        for event in self.api.store.objects(CORE_EVENTS):
            target = (event.get("involvedObject") or {}).get("name")
            if target in self.outcomes:
                text = f"{event.get('type', '')} {event.get('reason', '')}: {event.get('message', '')}"
                self.outcomes[target].events.append(text)

    def controller_requests(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for record in self.api.requests.records():
            if record.user == CONTROLLER_USER:
                key = f"{record.verb} {record.resource or record.path.rsplit('/', 1)[-1]}"
                counts[key] = counts.get(key, 0) + 1
        return counts

    def explore_commands(self) -> list[str]:
        lines = []
        for name, sim in self.sim_pods.items():
            if sim.netns is not None:
                lines.append(f"ip netns exec {sim.netns.name} iptables-save    # {name} ({sim.ip})")
        if self._node is not None:
            lines.append(
                f"ip netns exec {self.node.node.name} ip addr    # node side, gateway {self.node.gateway}"
            )
        lines.append(f"cat {self.controller_log}")
        return lines

    # --- teardown ------------------------------------------------------------------------------------------

    def stop_controller(self) -> int | None:
        return None if self.controller is None else self.controller.stop(10)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stop_controller()
        with contextlib.suppress(Exception):
            self.remote.stop()
        if self._node is not None:
            self._node.close()
        if self._api is not None:
            with contextlib.suppress(Exception):
                self._api.stop()
        if self._runtime is not None:
            shutil.rmtree(self._runtime, ignore_errors=True)
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Ctrl-C and SIGTERM both unwind through the cleanup."""

    def raise_interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_demo(
    pods: int,
    backend: str,
    progress: Callable[[str], None],
    keep: Callable[[Demo], None] | None = None,
) -> DemoResult:
    """Run the whole demo and return what happened; `keep` is called before cleanup (e.g. to wait)."""
    before = host_rules()
    demo = Demo(pods, backend, progress)
    with sigterm_as_interrupt():
        try:
            demo.start()
            demo.create_pods()
            demo.wait_until_settled()
            demo.send_traffic()
            demo.collect_events()
            requests = demo.controller_requests()
            demo.report_controller_ready()
            command, output = demo.status_example()
            if keep is not None:
                keep(demo)
            code = demo.stop_controller()
            unchanged = host_rules() == before
            return DemoResult(list(demo.outcomes.values()), unchanged, requests, code, command, output)
        finally:
            progress("cleaning up")
            demo.close()
