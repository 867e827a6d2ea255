"""PNG plots for docs/benchmarks.md from the raw samples the benchmark scripts saved."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after matplotlib.use: the backend must be chosen first


def _box(series: dict[str, list[float]], title: str, ylabel: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.boxplot(list(series.values()), showfliers=True)
    ax.set_ylim(bottom=0)
    labels = [f"{name} (n={len(values)})" for name, values in series.items()]
    ax.set_xticks(range(1, len(series) + 1), labels, rotation=20, ha="right", fontsize=8)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _line(
    x: list[float], ys: dict[str, list[float]], title: str, xlabel: str, ylabel: str, path: Path
) -> None:
    fig, ax = plt.subplots(figsize=(8, 4))
    for label, y in ys.items():
        ax.plot(x, y, marker="o", label=label)
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_all(data_dir: Path, out_dir: Path, stamp: str) -> list[tuple[str, str]]:
    """Write every plot whose samples exist, titled with the run's date and sample counts; return (title,
    file name) pairs for the Markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    made: list[tuple[str, str]] = []

    def load(name: str) -> dict[str, object] | None:
        path = data_dir / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else None

    dataplane = load("dataplane")
    if dataplane:
        series = {k: [v * 1000 for v in values] for k, values in dataplane.items()}  # type: ignore[union-attr]
        title = f"Per-pod rule load, fresh namespace ({stamp})"
        _box(series, title, "ms", out_dir / "dataplane-apply.png")
        made.append((f"Data plane: apply vs bare restore, per sample ({stamp})", "dataplane-apply.png"))
    waiter = load("waiter")
    if waiter:
        series = {k: list(v) for k, v in waiter.items()}  # type: ignore[union-attr]
        _box(series, f"Waiter ({stamp})", "ms", out_dir / "waiter.png")
        made.append((f"Waiter: rules applied → exit, and start → first probe ({stamp})", "waiter.png"))
    controller = load("controller")
    if controller:
        latencies = controller.get("latency_ms")  # type: ignore[union-attr]
        if latencies:
            _box(
                {"pod visible → marked": latencies},
                f"Controller burst ({stamp})",
                "ms",
                out_dir / "controller-latency.png",
            )
            title = f"Controller: pod visible → marked in 1 burst of {len(latencies)} pods ({stamp})"
            made.append((title, "controller-latency.png"))
        sweep = controller.get("concurrency_sweep")  # type: ignore[union-attr]
        if sweep:
            _line(
                [row["concurrency"] for row in sweep],
                {"pods/s": [row["pods_per_s"] for row in sweep]},
                f"Controller throughput against concurrency, 1 burst per point ({stamp})",
                "--concurrency",
                "pods/s",
                out_dir / "controller-concurrency.png",
            )
            title = f"Controller: pods/s against --concurrency, 1 burst per point ({stamp})"
            made.append((title, "controller-concurrency.png"))
    return made
