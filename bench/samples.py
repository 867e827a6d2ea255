"""Raw samples from a benchmark script, kept for `bench/run.py` to plot (only when IPNC_BENCH_DATA is set)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def save(name: str, data: dict[str, Any]) -> None:
    directory = os.environ.get("IPNC_BENCH_DATA")
    if directory:
        Path(directory, f"{name}.json").write_text(json.dumps(data))
