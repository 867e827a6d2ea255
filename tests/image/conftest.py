"""The image `make image` built (the chart's reference), shared by the tests that run it in real containers.

`make test` builds it first (the pytest target depends on `image-archive`). A run without it, or with an
image holding other sources than src/, skips these root tests, which fails the run under CI=true
(tests/conftest.py): CI cannot pass without building the current sources into the image and running it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator

import pytest
from image_helpers import ROOT, Containers, chart_image, containers, podman

PACKAGE = "istio_pod_network_controller"
HASH_PACKAGE = f"""
import hashlib, json, pathlib, {PACKAGE}
base = pathlib.Path({PACKAGE}.__file__).parent
digest = {{str(p.relative_to(base)): hashlib.sha256(p.read_bytes()).hexdigest() for p in base.rglob("*.py")}}
print(json.dumps(digest))
"""


def source_hashes() -> dict[str, str]:
    base = ROOT / "src" / PACKAGE
    return {str(p.relative_to(base)): hashlib.sha256(p.read_bytes()).hexdigest() for p in base.rglob("*.py")}


@pytest.fixture(scope="session")
def image() -> str:
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed: run `make image`")
    reference = chart_image()
    if podman("image", "exists", reference, check=False).returncode != 0:
        pytest.skip(f"{reference} is not built: run `make image`")
    inside = podman("run", "--rm", "--network", "none", "--entrypoint", "/opt/ipnc/bin/python", reference,
                    "-c", HASH_PACKAGE)  # fmt: skip
    if json.loads(inside.stdout) != source_hashes():
        pytest.skip(f"{reference} holds other sources than src/: run `make image`")
    return reference


@pytest.fixture
def run_container(image: str) -> Iterator[Containers]:
    with containers(image) as made:
        yield made
