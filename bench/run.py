"""`make bench`: run every benchmark script in one go and rewrite docs/benchmarks.md from their output.

Each script prints its own Markdown section; a failing script is reported in the file, not hidden.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from plots import plot_all
from samples import MISSED

HERE = Path(__file__).parent
SCRIPTS = [
    "dataplane_bench.py",
    "discovery_bench.py",
    "waiter_bench.py",
    "image_bench.py",
    "controller_bench.py",
    "lifecycle_bench.py",
    "recovery_bench.py",
    "localapi_bench.py",
    "many_nodes_bench.py",
    "realnode_bench.py",
    "soak_report.py",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="docs/benchmarks.md")
    parser.add_argument("--only", nargs="*", help="run only these scripts (others keep no section)")
    args = parser.parse_args()
    sections = []
    data_dir = Path(tempfile.mkdtemp(prefix="ipnc-bench-"))
    env = {**os.environ, "IPNC_BENCH_DATA": str(data_dir)}
    for script in SCRIPTS:
        if args.only and script not in args.only:
            continue
        path = HERE / script
        if not path.exists():
            continue
        print(f"running {script} ...", file=sys.stderr, flush=True)
        done = subprocess.run(
            [sys.executable, str(path)], capture_output=True, text=True, check=False, env=env
        )
        if done.returncode != 0:
            sections.append(
                f"## {script} FAILED (exit {done.returncode})\n\n```\n{done.stderr[-3000:]}\n```\n"
            )
        else:
            sections.append(done.stdout.strip() + "\n")
    out = Path(args.out)
    stamp = f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC"
    plots = plot_all(data_dir, out.parent / "img", stamp)
    shutil.rmtree(data_dir, ignore_errors=True)
    if plots:
        sections.append(
            "## Plots\n\n" + "\n\n".join(f"{title}\n\n![{title}](img/{name})" for title, name in plots) + "\n"
        )
    header = (
        "# Benchmarks\n\n"
        f"Written by `make bench` on {stamp}, "
        f"{os.cpu_count()} cores, kernel {platform.release()}, Python {platform.python_version()}. "
        "Every figure below was measured in that run, with its sample count; none is a timed assertion in "
        "the tests.\n"
    )
    missed = [line for section in sections for line in section.splitlines() if MISSED in line]
    summary = "## Targets missed in this run\n\n" + ("\n".join(missed) if missed else "none") + "\n"
    out.write_text(header + "\n" + summary + "\n" + "\n".join(sections))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
