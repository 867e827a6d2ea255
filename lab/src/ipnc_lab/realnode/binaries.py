"""Where the Kubernetes server binaries come from: a directory or an archive named by a variable, never a path
of this repository's surroundings (`.ci/run` sets the variable when it knows one)."""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

BIN_VARIABLE = "IPNC_REALNODE_BIN"
ARCHIVE_VARIABLE = "IPNC_REALNODE_ARCHIVE"
NAMES = ("etcd", "kube-apiserver", "kube-controller-manager", "kubelet")


class RealNodeUnavailable(RuntimeError):
    """The tier cannot run here (no binaries, a missing tool); the message says what to provide."""


@dataclass(frozen=True, slots=True)
class Binaries:
    directory: Path
    pause_archive: Path
    pause_image: str

    def __getitem__(self, name: str) -> Path:
        return self.directory / name


def requested() -> bool:
    """True when the environment names binaries for the tier."""
    return bool(os.environ.get(BIN_VARIABLE) or os.environ.get(ARCHIVE_VARIABLE))


def locate(workdir: Path) -> Binaries:
    """The binaries from $IPNC_REALNODE_BIN (a directory), else from $IPNC_REALNODE_ARCHIVE unpacked into
    `workdir`."""
    directory = os.environ.get(BIN_VARIABLE)
    archive = os.environ.get(ARCHIVE_VARIABLE)
    if directory:
        source = Path(directory)
    elif archive:
        if not Path(archive).is_file():
            raise RealNodeUnavailable(f"{ARCHIVE_VARIABLE}={archive}: no such file")
        source = workdir / "bin"
        source.mkdir(parents=True, exist_ok=True)
        _unpack(Path(archive), source)
    else:
        raise RealNodeUnavailable(
            f"set {BIN_VARIABLE}=DIR or {ARCHIVE_VARIABLE}=FILE.tar.xz (kube-apiserver, "
            "kube-controller-manager, kubelet and etcd of 1.30 or newer, and a pause image *pause*.tar)"
        )
    missing = [n for n in NAMES if not os.access(source / n, os.X_OK)]
    if missing:
        raise RealNodeUnavailable(f"{source} lacks {', '.join(missing)}")
    pauses = sorted(source.glob("*pause*.tar"))
    if not pauses:
        raise RealNodeUnavailable(f"{source} holds no pause image archive (*pause*.tar)")
    for tool in ("containerd", "ctr", "runc", "nsenter", "nft", "iptables-legacy-save"):
        if shutil.which(tool) is None:
            raise RealNodeUnavailable(f"{tool} is not installed (make realnode installs it)")
    if not Path("/usr/lib/cni/bridge").is_file():
        raise RealNodeUnavailable("the CNI plugins are not installed (containernetworking-plugins)")
    return Binaries(source, pauses[0], archive_image(pauses[0]))


def archive_image(path: Path) -> str:
    """The first image reference a docker-archive names (its manifest.json RepoTags)."""
    with tarfile.open(path) as tar:
        member = tar.extractfile("manifest.json")
        if member is None:
            raise RealNodeUnavailable(f"{path} is not a docker archive")
        tags = json.load(member)[0].get("RepoTags") or []
    if not tags:
        raise RealNodeUnavailable(f"{path} names no image")
    return str(tags[0])


def _unpack(archive: Path, directory: Path) -> None:
    """The archive's regular files with plain names, executable (nothing else is taken from it)."""
    with tarfile.open(archive) as tar:
        for member in tar:
            name = Path(member.name).name
            if not member.isfile() or name in {"", ".", ".."}:
                continue
            source = tar.extractfile(member)
            if source is None:
                continue
            target = directory / name
            with source, target.open("wb") as out:
                shutil.copyfileobj(source, out)
            target.chmod(0o755)
