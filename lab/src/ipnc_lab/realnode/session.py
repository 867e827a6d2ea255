"""A real node with the chart's controller running on it: what the tier's tests and its bench start from."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import workloads as wl
from .kubeapi import wait_for
from .node import RealNode

#: no periodic repair pass: every capture seen is the controller's answer to an event
NO_REPAIR_PASS: dict[str, Any] = {"controller": {"repairInterval": "3600"}}


def image_archive(root: Path, version: str) -> Path:
    """The archive `make image-archive` writes under `root`."""
    return root / "build" / "image" / f"istio-pod-network-controller-{version}.tar"


@contextmanager
def node_with_controller(archive: Path, values: dict[str, Any] | None = None) -> Iterator[RealNode]:
    """A started RealNode, the project's image imported, the chart applied and its controller Ready; on the
    way out the node is removed whatever happened, and its own namespace must hold none of Istio's rules."""
    with RealNode() as node:
        before = wl.istio_lines(node.host_rules())
        node.import_image(archive)
        binder = wl.Binder(node.api, node.name)
        try:
            wl.deploy_controller(node.api, node.name, node.pki.ca.read_text(), values)
            api = node.api
            wait_for("the controller Ready", lambda: wl.controller_ready(api), timeout=180)
            yield node
        finally:
            binder.close()
        after = wl.istio_lines(node.host_rules())
        if after != before:
            raise AssertionError(f"the node's own namespace was changed: {after[:5]}")
