"""Helpers for the image tests: podman as CI runs it, and the chart's pod specs turned into podman flags.

Every container gets the flags the rendered chart (or the injection code) asks for, translated field by
field (user, capabilities, read-only root, privilege escalation, host PID, volumes), so a test runs each role
as a kubelet would, not as the test author thinks it should run.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ipnc_lab.sim.cluster import unique_name
from manifests_tool import render_tool

ROOT = Path(__file__).resolve().parents[2]
CONTAINERS_CONF = ROOT / "tools" / "containers.conf"
Obj = dict[str, Any]


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    """podman with the project's containers.conf (runc, low rlimits, no bridge network)."""
    env = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}
    return subprocess.run(
        ["podman", *args], env=env, capture_output=True, text=True, timeout=timeout, check=check
    )


def render_chart(values: Mapping[str, Any] | None = None) -> list[Obj]:
    """Every object the chart renders (Helm's own engine), like `helm template -n istio-system`."""
    tool = render_tool()
    rendered = tool.render_chart(dict(values or {}), namespace="istio-system", release="ipnc")
    return [yaml.safe_load(body) for _source, body in tool.split_rendered(rendered)]


def workload(objects: list[Obj], kind: str) -> Obj:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


def injection_template_waiter(objects: list[Obj]) -> Obj:
    """The waiter container of the chart's Istio injection template (ConfigMap data `ipnc.yaml`)."""
    configmap = next(o for o in objects if o["kind"] == "ConfigMap" and "ipnc.yaml" in o.get("data", {}))
    template = yaml.safe_load(configmap["data"]["ipnc.yaml"])
    return next(c for c in template["spec"]["initContainers"] if "image" in c)


def chart_image() -> str:
    """The image reference the chart's DaemonSet runs: what `make image` tags."""
    daemonset = workload(render_chart(), "DaemonSet")
    return str(daemonset["spec"]["template"]["spec"]["containers"][0]["image"])


def image_config(image: str) -> Obj:
    (inspected,) = json.loads(podman("image", "inspect", image).stdout)
    return dict(inspected["Config"])


def security_flags(pod_spec: Mapping[str, Any], container: Mapping[str, Any]) -> list[str]:
    """podman flags for a container's securityContext (with the pod's), refusing what cannot be mirrored."""
    pod_sc = pod_spec.get("securityContext") or {}
    sc = container.get("securityContext") or {}
    assert not sc.get("privileged"), "a privileged container is never translated"
    assert sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type", "RuntimeDefault") == (
        "RuntimeDefault"
    ), "only the runtime's default seccomp profile (podman's default) is mirrored"
    flags: list[str] = []
    uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
    gid = sc.get("runAsGroup", pod_sc.get("runAsGroup"))
    if uid is not None:
        flags += ["--user", f"{uid}:{gid}" if gid is not None else str(uid)]
    capabilities = sc.get("capabilities") or {}
    for cap in capabilities.get("drop") or []:
        flags += ["--cap-drop", str(cap)]
    for cap in capabilities.get("add") or []:
        flags += ["--cap-add", str(cap)]
    if sc.get("readOnlyRootFilesystem"):
        # Exactly read-only: podman would otherwise add writable tmpfs on /tmp, /run and /var/tmp.
        flags += ["--read-only", "--read-only-tmpfs=false"]
    if sc.get("allowPrivilegeEscalation") is False:
        flags += ["--security-opt", "no-new-privileges"]
    if pod_spec.get("hostPID"):
        flags += ["--pid", "host"]
    return flags


def volume_flags(
    pod_spec: Mapping[str, Any], container: Mapping[str, Any], sources: Mapping[str, Path] | None = None
) -> list[str]:
    """hostPath volumes as bind mounts, emptyDir as tmpfs, the others from `sources` (name -> host path)."""
    volumes = {v["name"]: v for v in pod_spec.get("volumes") or []}
    flags: list[str] = []
    for mount in container.get("volumeMounts") or []:
        volume = volumes[mount["name"]]
        mode = "ro" if mount.get("readOnly") else "rw"
        if "hostPath" in volume:
            path = Path(volume["hostPath"]["path"])
            if volume["hostPath"].get("type") == "FileOrCreate" and not path.exists():
                path.touch()
            flags += ["-v", f"{path}:{mount['mountPath']}:{mode}"]
        elif "emptyDir" in volume:
            size = volume["emptyDir"].get("sizeLimit", "16Mi").replace("Mi", "m")
            flags += ["--tmpfs", f"{mount['mountPath']}:rw,size={size},mode=1777"]
        else:
            flags += ["-v", f"{(sources or {})[mount['name']]}:{mount['mountPath']}:{mode}"]
    return flags


@dataclass
class Container:
    name: str

    def inspect(self) -> Obj:
        (state,) = json.loads(podman("container", "inspect", self.name).stdout)
        return dict(state)

    @property
    def pid(self) -> int:
        return int(self.inspect()["State"]["Pid"])

    def running(self) -> bool:
        return bool(self.inspect()["State"]["Running"])

    def logs(self) -> str:
        done = podman("logs", self.name, check=False)
        return done.stdout + done.stderr

    def wait(self, timeout: float) -> int:
        """The exit code once the container stops (AssertionError with its log after `timeout`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.inspect()["State"]
            if not state["Running"] and state.get("Status") in ("exited", "stopped"):
                return int(state["ExitCode"])
            time.sleep(0.1)
        raise AssertionError(f"{self.name} still running after {timeout}s\n{self.logs()}")

    def wait_for_log(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.logs():
                return
            time.sleep(0.1)
        raise AssertionError(f"{text!r} not logged by {self.name}\n{self.logs()}")


class Containers:
    """Starts detached containers with unique names; remove_all() deletes every one, running or not."""

    def __init__(self, image: str) -> None:
        self.image = image
        self.started: list[Container] = []

    def run(self, flags: list[str], args: list[str], *, entrypoint: str | None = None) -> Container:
        container = Container(unique_name("ipnc-image-"))
        self.started.append(container)
        head = ["--entrypoint", entrypoint] if entrypoint else []
        podman("run", "-d", "--name", container.name, *head, *flags, self.image, *args)
        return container

    def remove_all(self) -> None:
        for container in self.started:
            with contextlib.suppress(Exception):
                podman("rm", "-f", "-t", "0", container.name, check=False)


@contextlib.contextmanager
def containers(image: str) -> Iterator[Containers]:
    made = Containers(image)
    try:
        yield made
    finally:
        made.remove_all()


def with_arg(args: list[str], flag: str, value: str) -> list[str]:
    """`args` with `--flag=...` replaced (or appended) by `--flag=value`."""
    kept = [a for a in args if not a.startswith(f"{flag}=")]
    return [*kept, f"{flag}={value}"]
