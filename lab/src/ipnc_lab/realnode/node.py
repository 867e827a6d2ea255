"""One real Kubernetes node on this machine: etcd, kube-apiserver, kube-controller-manager, containerd and a
kubelet, all private to one run (own ports, directories, bridge, subnets, cgroup root, node name).

`RealNode` is a context manager; leaving it (also on an exception or Ctrl-C) removes everything it made:
its processes by PID, the containers' processes (by this run's cgroup root), the mounts under its work
directory, the network namespaces its containerd made, the bridge, the cgroups, the CNI cache entries and the
kernel settings the kubelet changed. `leftovers()` says what, if anything, survived.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import yaml

from ..sim.cluster import unique_name
from . import network
from .binaries import Binaries, locate
from .kubeapi import KubeAPI, wait_for
from .pki import PKI
from .processes import Managed, kill_pids, pids_with_argument
from .workloads import netns_rules

CGROUP_BASE = Path("/sys/fs/cgroup")
CNI_CACHE = Path("/var/lib/cni/results")
#: what the kubelet sets when protectKernelDefaults is false; put back as they were
KERNEL_SETTINGS = ("vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops")
_T = TypeVar("_T")
#: what containerd's CRI plugin logs last as it starts serving
CRI_READY = 'msg="Start streaming server"'
KUBE_CONTROLLERS = "daemonset,serviceaccount,root-ca-cert-publisher,namespace,garbagecollector,podgc"


class RealNode:
    def __init__(self, workdir: Path | None = None) -> None:
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="ipnc-realnode-"))
        self.name = unique_name("rn")
        self.bridge = unique_name("rnbr")
        self.cgroup_root = unique_name("ipnc-rn")
        self.network_name = self.name
        self.subnets = network.choose_subnets()
        self.ports = {n: network.free_port() for n in ("etcd", "peer", "api", "kcm", "kubelet", "healthz")}
        self.socket = self.workdir / "containerd" / "containerd.sock"
        self.logs = self.workdir / "logs"
        self._procs: dict[str, Managed] = {}
        self._relay: network.ServiceRelay | None = None
        self._kernel: dict[str, str] = {}
        self._netns: set[str] = set()
        self._bridge_made = False
        self._previous_sigterm: signal._HANDLER = None
        self._binaries: Binaries | None = None
        self._pki: PKI | None = None
        self._api: KubeAPI | None = None

    @property
    def binaries(self) -> Binaries:
        return _started(self._binaries)

    @property
    def pki(self) -> PKI:
        return _started(self._pki)

    @property
    def api(self) -> KubeAPI:
        """The admin's client."""
        return _started(self._api)

    # -- lifecycle ----------------------------------------------------------------------------------------

    def __enter__(self) -> RealNode:
        if threading.current_thread() is threading.main_thread():
            # SIGTERM (a CI timeout, `timeout`) unwinds like Ctrl-C, so `close` still runs
            self._previous_sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def start(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        self._binaries = locate(self.workdir)
        self._write_pki()
        self._start_control_plane()
        self._configure_node()
        network.add_bridge(self.bridge, self.subnets)
        self._bridge_made = True
        self._relay = network.ServiceRelay(self.subnets.api_service_ip, 443, self.ports["api"])
        self._make_cgroup_root()
        self._kernel = {k: (Path("/proc/sys") / k).read_text().strip() for k in KERNEL_SETTINGS}
        self.start_containerd()
        self.ctr("images", "import", str(self.binaries.pause_archive))
        self.start_kubelet()
        wait_for(f"node {self.name} Ready", self.node_ready, timeout=90)

    def close(self) -> None:
        """Remove everything this node made; safe to call twice and after a partial start."""
        if self._api is not None and self._procs.get("kubelet") and self._procs["kubelet"].running():
            self._drain()
        for name in ("kubelet",):
            self._stop(name)
        self._stop_runtime()
        if self._relay is not None:
            self._relay.close()
            self._relay = None
        for name in ("kcm", "apiserver", "etcd"):
            self._stop(name)
        self._unmount_all()
        self._delete_netns()
        if self._bridge_made:
            network.delete_bridge(self.bridge)
            self._bridge_made = False
        self._remove_cgroups()
        for entry in CNI_CACHE.glob(f"{self.network_name}-*") if CNI_CACHE.is_dir() else []:
            entry.unlink(missing_ok=True)
        for key, value in self._kernel.items():
            (Path("/proc/sys") / key).write_text(value)
        self._kernel = {}
        shutil.rmtree(self.workdir, ignore_errors=True)
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None

    def leftovers(self) -> list[str]:
        """What of this node still exists on the machine (empty after a clean `close`)."""
        found = []
        if pids_with_argument(str(self.socket)):
            found.append(f"processes using {self.socket}")
        if Path(f"/sys/class/net/{self.bridge}").exists():
            found.append(f"bridge {self.bridge}")
        found += [str(p) for p in CGROUP_BASE.glob(f"*/{self.cgroup_root}")]
        found += [n for n in self._netns if Path(n).exists()]
        if self.workdir.exists():
            found.append(str(self.workdir))
        with open("/proc/mounts") as mounts:
            found += [line.split()[1] for line in mounts if f" {self.workdir}/" in line]
        return found

    # -- control plane ------------------------------------------------------------------------------------

    def _write_pki(self) -> None:
        pki = self._pki = PKI(self.workdir / "pki")
        gateway, service = self.subnets.gateway, self.subnets.api_service_ip
        api_names = ("127.0.0.1", service, "localhost", "kubernetes", "kubernetes.default",
                     "kubernetes.default.svc", "kubernetes.default.svc.cluster.local")  # fmt: skip
        pki.issue("apiserver", "kube-apiserver", server_names=api_names)
        pki.issue("admin", "ipnc-realnode-admin", organization="system:masters")
        pki.issue("apiserver-kubelet-client", "kube-apiserver-kubelet-client", organization="system:masters")
        pki.issue("kubelet-client", f"system:node:{self.name}", organization="system:nodes")
        pki.issue("kubelet-server", self.name, server_names=(gateway, self.name))
        self._api = KubeAPI(
            self.ports["api"], pki.ca, pki.directory / "admin.crt", pki.directory / "admin.key"
        )
        for user, cert in (("admin", "admin"), ("kubelet", "kubelet-client")):
            self._kubeconfig(self.workdir / f"{user}.kubeconfig", cert)

    def _kubeconfig(self, path: Path, cert: str) -> None:
        d = self.pki.directory
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "rn", "cluster": {"server": f"https://127.0.0.1:{self.ports['api']}",
                                                    "certificate-authority": str(self.pki.ca)}}],
            "users": [{"name": cert, "user": {"client-certificate": str(d / f"{cert}.crt"),
                                              "client-key": str(d / f"{cert}.key")}}],
            "contexts": [{"name": "rn", "context": {"cluster": "rn", "user": cert}}],
            "current-context": "rn",
        }  # fmt: skip
        path.write_text(yaml.safe_dump(config))

    def _launch(self, name: str, argv: list[str]) -> Managed:
        proc = self._procs[name] = Managed(name, argv, self.logs / f"{name}.log")
        proc.start()
        return proc

    def _stop(self, name: str) -> None:
        proc = self._procs.pop(name, None)
        if proc is not None:
            proc.stop()

    def _start_control_plane(self) -> None:
        b, d, p = self.binaries, self.pki.directory, self.ports
        etcd = self._launch("etcd", [str(b["etcd"]), "--data-dir", str(self.workdir / "etcd"),
                                     "--client-url", f"http://127.0.0.1:{p['etcd']}",
                                     "--peer-url", f"http://127.0.0.1:{p['peer']}"])  # fmt: skip
        wait_for("etcd ready", lambda: self._alive(etcd) and "etcd ready" in etcd.tail(200), timeout=30)
        apiserver = self._launch("apiserver", [
            str(b["kube-apiserver"]), f"--etcd-servers=http://127.0.0.1:{p['etcd']}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={p['api']}",
            f"--tls-cert-file={d / 'apiserver.crt'}", f"--tls-private-key-file={d / 'apiserver.key'}",
            f"--client-ca-file={self.pki.ca}", "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={self.pki.sa_pub}",
            f"--service-account-signing-key-file={self.pki.sa_key}",
            "--api-audiences=https://kubernetes.default.svc",
            "--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction",
            "--allow-privileged=true", f"--service-cluster-ip-range={self.subnets.services}",
            f"--kubelet-client-certificate={d / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={d / 'apiserver-kubelet-client.key'}",
            f"--kubelet-certificate-authority={self.pki.ca}",
            "--kubelet-preferred-address-types=InternalIP,Hostname", "--profiling=false",
        ])  # fmt: skip
        wait_for("kube-apiserver ready", lambda: self._alive(apiserver) and self.api.ready(), 90)
        self._launch("kcm", [
            str(b["kube-controller-manager"]), f"--kubeconfig={self.workdir / 'admin.kubeconfig'}",
            "--bind-address=127.0.0.1", f"--secure-port={p['kcm']}", "--leader-elect=false",
            f"--controllers={KUBE_CONTROLLERS}", f"--service-account-private-key-file={self.pki.sa_key}",
            f"--root-ca-file={self.pki.ca}", "--use-service-account-credentials=false",
        ])  # fmt: skip

    @staticmethod
    def _alive(proc: Managed) -> bool:
        if not proc.running():
            raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")
        return True

    # -- the node -----------------------------------------------------------------------------------------

    def _configure_node(self) -> None:
        w, d = self.workdir, self.pki.directory
        for sub in ("containerd/root", "containerd/state", "cni/net.d", "cni/ipam", "kubelet/root", "podlogs",
                    "volume-plugins"):  # fmt: skip
            (w / sub).mkdir(parents=True, exist_ok=True)
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        (w / "containerd" / "config.toml").write_text(f"""version = 2
root = "{w}/containerd/root"
state = "{w}/containerd/state"
disabled_plugins = ["io.containerd.internal.v1.tracing"]
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[{cri}]
  sandbox_image = "{self.binaries.pause_image}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  restrict_oom_score_adj = true
  [{cri}.containerd]
    snapshotter = "overlayfs"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        SystemdCgroup = false
  [{cri}.cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{w}/cni/net.d"
""")
        ipam = {
            "type": "host-local",
            "dataDir": str(w / "cni" / "ipam"),
            "ranges": [[{"subnet": str(self.subnets.pods)}]],
            "routes": [{"dst": str(self.subnets.services), "gw": self.subnets.gateway}],
        }
        bridge = {"type": "bridge", "bridge": self.bridge, "isGateway": False, "isDefaultGateway": False,
                  "ipMasq": False, "hairpinMode": True, "ipam": ipam}  # fmt: skip
        conflist = {"cniVersion": "0.4.0", "name": self.network_name, "plugins": [bridge]}
        (w / "cni" / "net.d" / "10-ipnc-realnode.conflist").write_text(json.dumps(conflist))
        kubelet = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": self.subnets.gateway,
            "port": self.ports["kubelet"],
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": self.ports["healthz"],
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(self.pki.ca)}},
            "authorization": {"mode": "Webhook"},
            "tlsCertFile": str(d / "kubelet-server.crt"),
            "tlsPrivateKeyFile": str(d / "kubelet-server.key"),
            "cgroupDriver": "cgroupfs",
            "failCgroupV1": False,
            "failSwapOn": False,
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "enforceNodeAllocatable": [],
            "cgroupsPerQOS": True,
            "cgroupRoot": f"/{self.cgroup_root}",
            "registerNode": True,
            "serializeImagePulls": False,
            "imageGCHighThresholdPercent": 100,
            "evictionHard": {},
            "evictionPressureTransitionPeriod": "0s",
            "localStorageCapacityIsolation": False,
            "makeIPTablesUtilChains": False,
            "volumePluginDir": str(w / "volume-plugins"),
            "podLogsDir": str(w / "podlogs"),
        }  # fmt: skip
        (w / "kubelet" / "config.yaml").write_text(yaml.safe_dump(kubelet))

    def _make_cgroup_root(self) -> None:
        for hierarchy in CGROUP_BASE.iterdir():
            if not (hierarchy / "cgroup.procs").exists():
                continue
            own = hierarchy / self.cgroup_root
            own.mkdir(exist_ok=True)
            if (hierarchy / "cpuset.cpus").exists():
                (own / "cpuset.cpus").write_text((hierarchy / "cpuset.cpus").read_text())
                (own / "cpuset.mems").write_text((hierarchy / "cpuset.mems").read_text())

    def start_containerd(self) -> None:
        """containerd, returning once its CRI serves: the socket is there before the CRI plugin has recovered
        its state, and a kubelet started in between exits at once."""
        log = self.logs / "containerd.log"
        before = log.read_text(errors="replace").count(CRI_READY) if log.exists() else 0
        config = str(self.workdir / "containerd" / "config.toml")
        containerd = self._launch("containerd", ["containerd", "--config", config])

        def serving() -> bool:
            return self._alive(containerd) and log.read_text(errors="replace").count(CRI_READY) > before

        wait_for("containerd's CRI", serving, 60)

    def start_kubelet(self) -> None:
        w = self.workdir
        self._launch("kubelet", [
            str(self.binaries["kubelet"]), f"--config={w / 'kubelet' / 'config.yaml'}",
            f"--kubeconfig={w / 'kubelet.kubeconfig'}", f"--hostname-override={self.name}",
            f"--node-ip={self.subnets.gateway}", f"--root-dir={w / 'kubelet' / 'root'}",
            f"--cert-dir={w / 'kubelet' / 'pki'}", "-v=2",
        ])  # fmt: skip

    def stop_kubelet(self) -> None:
        self._stop("kubelet")

    def reboot(self) -> None:
        """What a node reboot does to pods: kubelet and containerd stop, every container dies; both start
        again."""
        self.stop_kubelet()
        self._stop_runtime()
        self.start_containerd()
        self.start_kubelet()

    def kubelet_healthy(self) -> bool:
        """The kubelet answers its healthz (a node's Ready condition lags a dead kubelet by ~40 s); a kubelet
        that exited raises, with its log's tail."""
        kubelet = self._procs.get("kubelet")
        if kubelet is None or not self._alive(kubelet):
            return False
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.ports['healthz']}/healthz", timeout=2
            ) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False

    def node_ready(self) -> bool:
        try:
            node = self.api.get(f"/api/v1/nodes/{self.name}")
        except Exception:
            return False
        conditions = node.get("status", {}).get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    def host_rules(self) -> str:
        """The node's own netfilter rules, read (never written) through the namespace of this run's etcd: a
        process known to be the node's, never restarted by any scenario."""
        return netns_rules(self._procs["etcd"].pid)

    def ctr(self, *args: str) -> str:
        done = subprocess.run(["ctr", "--address", str(self.socket), "-n", "k8s.io", *args],
                              capture_output=True, text=True, timeout=300, check=True)  # fmt: skip
        return done.stdout

    def import_image(self, archive: Path) -> None:
        self.ctr("images", "import", str(archive))

    # -- teardown -----------------------------------------------------------------------------------------

    def _drain(self) -> None:
        """Delete every pod through the API so that the kubelet tears the sandboxes down the normal way."""
        try:
            for ns in self.api.get("/api/v1/namespaces")["items"]:
                name = ns["metadata"]["name"]
                self.api.request("DELETE", f"/apis/apps/v1/namespaces/{name}/daemonsets", timeout=10)
                for pod in self.api.pods(name):
                    self.api.delete(f"/api/v1/namespaces/{name}/pods/{pod['metadata']['name']}", grace=0)
            wait_for(
                "the kubelet to remove every sandbox", lambda: not self._sandboxes(), timeout=60, interval=0.5
            )
        except Exception:
            return

    def _sandboxes(self) -> list[str]:
        """Network namespace paths of this containerd's pod sandboxes."""
        paths = []
        for cid in self.ctr("containers", "ls", "-q").split():
            try:
                info = json.loads(self.ctr("containers", "info", cid))
            except subprocess.CalledProcessError:
                continue
            for namespace in info.get("Spec", {}).get("linux", {}).get("namespaces", []):
                if namespace.get("type") == "network" and namespace.get("path"):
                    paths.append(namespace["path"])
        return paths

    def _stop_runtime(self) -> None:
        """Kill every container of this node, then containerd and its shims (by this run's socket path)."""
        containerd = self._procs.get("containerd")
        if containerd is not None and containerd.running():
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self._netns.update(
                    p for p in self._sandboxes() if p.startswith(("/var/run/netns/", "/run/netns/"))
                )
        kill_pids(self._cgroup_pids())
        self._stop("containerd")
        kill_pids(pids_with_argument(str(self.socket)))
        deadline = time.monotonic() + 10
        while (self._cgroup_pids() or pids_with_argument(str(self.socket))) and time.monotonic() < deadline:
            time.sleep(0.1)

    def _cgroup_pids(self) -> list[int]:
        pids: set[int] = set()
        for procs in (
            p for own in CGROUP_BASE.glob(f"*/{self.cgroup_root}") for p in own.rglob("cgroup.procs")
        ):
            try:
                pids.update(int(p) for p in procs.read_text().split())
            except OSError:
                continue
        return sorted(pids)

    def _unmount_all(self) -> None:
        with open("/proc/mounts") as mounts:
            points = [line.split()[1] for line in mounts if line.split()[1].startswith(f"{self.workdir}/")]
        for point in sorted(points, key=len, reverse=True):
            if subprocess.run(["umount", point], capture_output=True, check=False).returncode:
                subprocess.run(["umount", "-l", point], capture_output=True, check=False)

    def _delete_netns(self) -> None:
        for path in sorted(self._netns):
            if Path(path).exists():
                subprocess.run(["umount", path], capture_output=True, check=False)
                Path(path).unlink(missing_ok=True)

    def _remove_cgroups(self) -> None:
        for own in CGROUP_BASE.glob(f"*/{self.cgroup_root}"):
            children = sorted(
                (p for p in own.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
            )
            for directory in [*children, own]:
                try:
                    directory.rmdir()
                except OSError:
                    continue  # still busy: leftovers() reports it


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _started(value: _T | None) -> _T:
    if value is None:
        raise RuntimeError("the real node is not started")
    return value
