"""Pod Security Standards checks (baseline + restricted), written from the published rules.

Source: kubernetes.io/docs/concepts/security/pod-security-standards (the "Baseline" and "Restricted" tables).
Each function returns human-readable violations; [] means the pod passes the profile.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

BASELINE_CAPABILITIES = {
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE",
    "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
}  # fmt: skip
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}  # fmt: skip
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
RESTRICTED_VOLUME_TYPES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected",
    "secret",
}  # fmt: skip
APPARMOR_ANNOTATION = "container.apparmor.security.beta.kubernetes.io/"


def _all_containers(spec: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    for key in ("initContainers", "containers", "ephemeralContainers"):
        for container in spec.get(key) or []:
            yield f"{key}[{container.get('name')}]", container


def baseline_violations(spec: Mapping[str, Any], metadata: Mapping[str, Any] | None = None) -> list[str]:
    out: list[str] = []
    pod_sc = spec.get("securityContext") or {}
    annotations = (metadata or {}).get("annotations") or {}
    # HostProcess
    if (pod_sc.get("windowsOptions") or {}).get("hostProcess"):
        out.append("pod: windowsOptions.hostProcess")
    # Host namespaces
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            out.append(f"pod: {field}")
    # HostPath volumes
    for volume in spec.get("volumes") or []:
        if "hostPath" in volume:
            out.append(f"volume {volume.get('name')}: hostPath")
    # Sysctls
    for sysctl in pod_sc.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            out.append(f"pod: unsafe sysctl {sysctl.get('name')}")
    # Seccomp (pod level): not Unconfined
    if (pod_sc.get("seccompProfile") or {}).get("type") == "Unconfined":
        out.append("pod: seccompProfile Unconfined")
    # AppArmor (pod level field and the annotations)
    if (pod_sc.get("appArmorProfile") or {}).get("type") == "Unconfined":
        out.append("pod: appArmorProfile Unconfined")
    for key, value in annotations.items():
        if (
            key.startswith(APPARMOR_ANNOTATION)
            and value not in ("runtime/default",)
            and not str(value).startswith("localhost/")
        ):
            out.append(f"annotation {key}={value}")
    # SELinux (pod level)
    out += _selinux("pod", pod_sc.get("seLinuxOptions") or {})
    for where, container in _all_containers(spec):
        sc = container.get("securityContext") or {}
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            out.append(f"{where}: windowsOptions.hostProcess")
        if sc.get("privileged"):
            out.append(f"{where}: privileged")
        added = {str(c) for c in (sc.get("capabilities") or {}).get("add") or []}
        if added - BASELINE_CAPABILITIES:
            out.append(f"{where}: adds capabilities {sorted(added - BASELINE_CAPABILITIES)}")
        for port in container.get("ports") or []:
            if port.get("hostPort"):
                out.append(f"{where}: hostPort {port['hostPort']}")
        if (sc.get("appArmorProfile") or {}).get("type") == "Unconfined":
            out.append(f"{where}: appArmorProfile Unconfined")
        out += _selinux(where, sc.get("seLinuxOptions") or {})
        if sc.get("procMount", "Default") != "Default":
            out.append(f"{where}: procMount {sc.get('procMount')}")
        if (sc.get("seccompProfile") or {}).get("type") == "Unconfined":
            out.append(f"{where}: seccompProfile Unconfined")
    return out


def _selinux(where: str, options: Mapping[str, Any]) -> list[str]:
    out = []
    if options.get("type", "") not in SELINUX_TYPES:
        out.append(f"{where}: seLinuxOptions.type {options.get('type')}")
    for field in ("user", "role"):
        if options.get(field):
            out.append(f"{where}: seLinuxOptions.{field} set")
    return out


def restricted_violations(spec: Mapping[str, Any], metadata: Mapping[str, Any] | None = None) -> list[str]:
    out = baseline_violations(spec, metadata)
    pod_sc = spec.get("securityContext") or {}
    # Volume types
    for volume in spec.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            out.append(f"volume {volume.get('name')}: type {sorted(kinds - RESTRICTED_VOLUME_TYPES)}")
    if pod_sc.get("runAsUser") == 0:
        out.append("pod: runAsUser 0")
    pod_seccomp = (pod_sc.get("seccompProfile") or {}).get("type")
    for where, container in _all_containers(spec):
        sc = container.get("securityContext") or {}
        # Privilege escalation: must be explicitly false
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{where}: allowPrivilegeEscalation is not false")
        # Running as non-root: container true, or unset with the pod true; never false
        non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
        if non_root is not True:
            out.append(f"{where}: runAsNonRoot is not true")
        # Non-root user: runAsUser must not be 0
        if sc.get("runAsUser") == 0:
            out.append(f"{where}: runAsUser 0")
        # Seccomp: RuntimeDefault or Localhost, on the container or inherited from the pod
        seccomp = (sc.get("seccompProfile") or {}).get("type", pod_seccomp)
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{where}: seccompProfile {seccomp}")
        # Capabilities: drop ALL, add at most NET_BIND_SERVICE
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{where}: capabilities do not drop ALL")
        extra = {str(c) for c in caps.get("add") or []} - {"NET_BIND_SERVICE"}
        if extra:
            out.append(f"{where}: adds {sorted(extra)}")
    return out
