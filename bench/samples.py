"""What benchmark scripts share: the run's provenance line, the Markdown rows their samples become, and the
raw samples kept for `bench/run.py` to plot (only when IPNC_BENCH_DATA is set)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def save(name: str, data: dict[str, Any]) -> None:
    directory = os.environ.get("IPNC_BENCH_DATA")
    if directory:
        Path(directory, f"{name}.json").write_text(json.dumps(data))


def provenance(script: str) -> str:
    """ "`bench/SCRIPT`, date, nproc, Linux release." — where and when the figures after it were taken."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"`bench/{script}`, {now}, nproc {os.cpu_count()}, Linux {platform.release()}."


MISSED = "**MISSED**"


def target(what: str, measured: str, goal: str, met: bool, samples: str) -> str:
    """One Markdown bullet: a figure against its target, flagged when missed, with its sample count."""
    return f"- {'met' if met else MISSED}: {what}: {measured} against {goal} ({samples})"


def pct(values: list[float], q: float) -> float:
    """The q-quantile by nearest rank (no interpolation: a value that was measured)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def timing_table(rows: Mapping[str, list[float]]) -> str:
    """A Markdown table of durations in seconds, shown in ms: median, p90, min, max and run count per row."""
    lines = ["| metric (ms) | median | p90 | min | max | runs |", "|---|---|---|---|---|---|"]
    for name, values in rows.items():
        ms = sorted(v * 1000 for v in values)
        p90 = statistics.quantiles(ms, n=10)[-1]
        lines.append(
            f"| {name} | {statistics.median(ms):.1f} | {p90:.1f} | {ms[0]:.1f} | {ms[-1]:.1f} | {len(ms)} |"
        )
    return "\n".join(lines)
