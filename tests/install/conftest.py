"""Fixtures for the install tests; the helpers live in install_helpers.py."""

from __future__ import annotations

import pytest
from install_helpers import injected_deployment, injected_pod


@pytest.fixture
def deployment() -> dict:
    return injected_deployment()


@pytest.fixture
def pod() -> dict:
    return injected_pod()
