"""The image `make image` built (the chart's reference), shared by the tests that run it in real containers.

`make test` builds it first (the pytest target depends on `image`); a run without it skips these root tests,
which fails the run under CI=true (tests/conftest.py), so CI can never pass without building and running it.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
from image_helpers import Containers, chart_image, containers, podman


@pytest.fixture(scope="session")
def image() -> str:
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed: run `make image`")
    reference = chart_image()
    if podman("image", "exists", reference, check=False).returncode != 0:
        pytest.skip(f"{reference} is not built: run `make image`")
    return reference


@pytest.fixture
def run_container(image: str) -> Iterator[Containers]:
    with containers(image) as made:
        yield made
