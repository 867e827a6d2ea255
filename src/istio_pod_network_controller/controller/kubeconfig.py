"""Which cluster configuration a command uses, checked up front so a mistake is one clear line.

The order is controller-runtime's, so a DaemonSet never picks up a stray file and a workstation needs no flag:

1. `--kubeconfig PATH`;
2. `$KUBECONFIG` (the first existing file of a colon-separated list; files are not merged as kubectl does);
3. in-cluster: the pod's service account, when KUBERNETES_SERVICE_HOST is set and its token file exists;
4. `~/.kube/config`.

lightkube loads a kubeconfig with bare KeyErrors and AttributeErrors for common mistakes; `validate` checks
the few references a usable configuration needs first and names the one that is wrong.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import yaml
from lightkube.config.client_adapter import Client as adapter_client
from lightkube.config.client_adapter import ConnectionParams
from lightkube.config.kubeconfig import KubeConfig, SingleConfig
from lightkube.core.exceptions import ConfigError

from ..errors import ControllerError

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
MAX_BYTES = 1 << 20


class KubeconfigError(ControllerError):
    """No usable cluster configuration; the message names the file or variable and what to do."""


@dataclass(frozen=True, slots=True)
class Source:
    kind: Literal["flag", "env", "in-cluster", "home"]
    path: str | None
    """The kubeconfig file; None for the in-cluster service account."""

    def describe(self) -> str:
        return {
            "flag": f"--kubeconfig {self.path}",
            "env": f"KUBECONFIG={self.path}",
            "in-cluster": "in-cluster service account",
            "home": f"{self.path}",
        }[self.kind]


def resolve(
    flag: str | None,
    env: Mapping[str, str],
    home: str,
    service_account_dir: str = SERVICE_ACCOUNT_DIR,
    exists: Callable[[str], bool] = os.path.isfile,
) -> Source:
    """Pick the configuration by the order above; KubeconfigError when a named file is missing or none is."""
    if flag:
        if not exists(flag):
            raise KubeconfigError(f"--kubeconfig {flag}: no such file")
        return Source("flag", flag)
    listed = [entry for entry in env.get("KUBECONFIG", "").split(os.pathsep) if entry]
    if listed:
        for entry in listed:
            if exists(entry):
                return Source("env", entry)
        raise KubeconfigError(f"KUBECONFIG={env['KUBECONFIG']}: no such file")
    if env.get("KUBERNETES_SERVICE_HOST") and exists(os.path.join(service_account_dir, "token")):
        return Source("in-cluster", None)
    default = os.path.join(home, ".kube", "config")
    if home and exists(default):
        return Source("home", default)
    raise KubeconfigError(
        "no cluster configuration: not in a cluster (no service account token) and no kubeconfig; "
        "give --kubeconfig PATH or set KUBECONFIG"
    )


def _named(entries: object, name: str, section: str, where: str) -> Mapping[str, Any]:
    if not isinstance(entries, list):
        raise KubeconfigError(f"{where}: invalid kubeconfig: '{section}' must be a list")
    for entry in entries:
        if isinstance(entry, Mapping) and entry.get("name") == name:
            body = entry.get(section[:-1])
            return body if isinstance(body, Mapping) else {}
    raise KubeconfigError(f"{where}: invalid kubeconfig: no entry named {name!r} in '{section}'")


FILE_FIELDS = (("cluster", "certificate-authority"), ("user", "client-certificate"), ("user", "client-key"),
               ("user", "tokenFile"))  # fmt: skip


def validate(
    data: object, where: str, base_dir: str = "", exists: Callable[[str], bool] = os.path.isfile
) -> str:
    """Check the references the current context needs, files included; returns its API server URL."""
    if not isinstance(data, Mapping):
        raise KubeconfigError(f"{where}: invalid kubeconfig: not a YAML mapping")
    current = data.get("current-context")
    if not isinstance(current, str) or not current:
        raise KubeconfigError(
            f"{where}: invalid kubeconfig: no current-context (kubectl config use-context NAME)"
        )
    context = _named(data.get("contexts"), current, "contexts", where)
    cluster_name, user_name = context.get("cluster"), context.get("user")
    if not isinstance(cluster_name, str) or not isinstance(user_name, str):
        raise KubeconfigError(f"{where}: invalid kubeconfig: context {current!r} needs a cluster and a user")
    cluster = _named(data.get("clusters"), cluster_name, "clusters", where)
    user = _named(data.get("users"), user_name, "users", where)
    for section, key in FILE_FIELDS:
        named = (cluster if section == "cluster" else user).get(key)
        if isinstance(named, str) and named and not exists(os.path.join(base_dir, os.path.expanduser(named))):
            raise KubeconfigError(f"{where}: {section} {key} {named}: no such file")
    server = cluster.get("server")
    if not isinstance(server, str) or not server.startswith(("https://", "http://")):
        raise KubeconfigError(
            f"{where}: invalid kubeconfig: cluster {cluster_name!r} has no http(s):// server address"
        )
    return server


def _read(path: str) -> object:
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_BYTES + 1)
    except OSError as exc:
        raise KubeconfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_BYTES:
        raise KubeconfigError(f"{path}: larger than {MAX_BYTES} bytes: not a kubeconfig")
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark is not None else ""
        raise KubeconfigError(f"{path}: invalid kubeconfig: not YAML{line}") from None


@dataclass(frozen=True, slots=True)
class Loaded:
    source: Source
    config: SingleConfig
    server: str
    files: tuple[str, ...] = ()
    """The directories the client reads (again: tokens rotate), for the controller's confinement."""


def load(source: Source, service_account_dir: str = SERVICE_ACCOUNT_DIR) -> Loaded:
    """Read and check the configuration `resolve` chose."""
    try:
        if source.path is None:
            single = KubeConfig.from_service_account(service_account=service_account_dir).get()
            files: tuple[str, ...] = (service_account_dir,)
        else:
            data = _read(source.path)
            base_dir = os.path.dirname(os.path.abspath(source.path))
            validate(data, source.describe(), base_dir)
            files = (base_dir, *_referenced_dirs(data, base_dir))
            single = KubeConfig.from_dict(data, fname=source.path).get()  # type: ignore[arg-type]
        if single is not None:
            # Build (and drop) a client as lightkube will: TLS material that does not load fails here, once.
            adapter_client(single, ConnectionParams()).close()
    except KubeconfigError:
        raise
    except (ConfigError, KeyError, TypeError, ValueError, AttributeError, OSError, ssl.SSLError) as exc:
        raise KubeconfigError(f"{source.describe()}: invalid cluster configuration: {exc}") from None
    if single is None:
        raise KubeconfigError(f"{source.describe()}: no usable context")
    return Loaded(source, single, str(single.cluster.server), tuple(dict.fromkeys(files)))


def _referenced_dirs(data: object, base_dir: str) -> list[str]:
    """The directories of every file a kubeconfig names (any context: a client may switch)."""
    found: list[str] = []
    for section, entries in (("cluster", _entries(data, "clusters")), ("user", _entries(data, "users"))):
        for entry in entries:
            for kind, key in FILE_FIELDS:
                named = entry.get(key) if kind == section else None
                if isinstance(named, str) and named:
                    found.append(os.path.dirname(os.path.join(base_dir, os.path.expanduser(named))))
    return found


def _entries(data: object, section: str) -> list[Mapping[str, Any]]:
    listed = data.get(section) if isinstance(data, Mapping) else None
    return [
        entry[section[:-1]]
        for entry in listed or ()
        if isinstance(entry, Mapping) and isinstance(entry.get(section[:-1]), Mapping)
    ]


def find(flag: str | None, service_account_dir: str = SERVICE_ACCOUNT_DIR) -> Loaded:
    """resolve + load from this process's environment and home directory."""
    home = os.environ.get("HOME") or os.path.expanduser("~")
    return load(resolve(flag, os.environ, home, service_account_dir), service_account_dir)
