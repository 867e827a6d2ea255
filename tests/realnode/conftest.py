"""The real-node tier: one real node (kube-apiserver, kubelet, containerd) per session, the chart's controller
from the project's image on it. Runs only when asked (`make realnode`, marker `realnode`) and only with the
binaries named by IPNC_REALNODE_BIN or IPNC_REALNODE_ARCHIVE; the tests are also `root` tests, so under
CI=true a tier that skips fails the run (tests/conftest.py)."""

from __future__ import annotations

import contextlib
import os
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from realnode_helpers import Tier

from ipnc_lab.realnode import binaries
from ipnc_lab.realnode.session import NO_REPAIR_PASS, image_archive, node_with_controller

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tier() -> Iterator[Tier]:
    if not binaries.requested():
        pytest.skip(f"the real-node tier needs {binaries.BIN_VARIABLE} or {binaries.ARCHIVE_VARIABLE}")
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    archive = Path(os.environ.get("IPNC_REALNODE_IMAGE") or image_archive(ROOT, version))
    if not archive.is_file():
        pytest.skip(f"{archive} is missing: run `make image-archive`")
    with contextlib.ExitStack() as stack:
        try:
            node = stack.enter_context(node_with_controller(archive, NO_REPAIR_PASS))
        except binaries.RealNodeUnavailable as exc:
            pytest.skip(str(exc))
        yield Tier(node, node.api, node.pki.ca.read_text())
    left = node.leftovers()
    assert not left, f"the real node left behind: {left}"
