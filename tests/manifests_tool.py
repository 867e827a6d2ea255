"""tools/render_manifests.py as a module, for every test that renders the chart (it is not in a package)."""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def render_tool() -> Any:
    """The loaded tool (render_chart, split_rendered, stale_files, ...), loaded once per session."""
    spec = importlib.util.spec_from_file_location("render_manifests", ROOT / "tools" / "render_manifests.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["render_manifests"] = module
    spec.loader.exec_module(module)
    return module
