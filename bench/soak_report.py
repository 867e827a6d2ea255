"""The chaos soak of `make soak`, run for the report: prints `## Chaos soak` and saves samples as `soak`.

IPNC_SOAK_SECONDS (default 60) and IPNC_SOAK_SEED (default 8) as for tests/soak/test_chaos.py, which asserts
the same end state. A run with problems prints its table to stderr and exits 1, so `make bench` shows it
as FAILED. Needs root.
"""

from __future__ import annotations

import os
import sys

from samples import save

from ipnc_lab.sim.chaos import ChaosSoak


def main() -> None:
    seed = int(os.environ.get("IPNC_SOAK_SEED") or 8)
    seconds = float(os.environ.get("IPNC_SOAK_SECONDS") or 60)
    soak = ChaosSoak(seed, seconds)
    report = soak.run()
    save("soak", report.as_dict())
    section = (
        "## Chaos soak\n\n"
        f"One node, the API emulator and the real controller; for {seconds:.0f} s a seeded schedule "
        "(`IPNC_SOAK_SEED`) creates and deletes pods continuously and injects API faults, mid-apply pod "
        "deletions and namespace removals, rule flushes inside pods and controller SIGKILLs (each followed "
        "by a restart). Then faults stop and the end state is checked: every eligible live pod initialized "
        "and its rules verified, each of our jump rules present exactly once (counted with iptables-save / "
        "nft), ineligible pods and the host namespace untouched, RSS bounded "
        "(tests/soak/test_chaos.py asserts the same; `make soak` runs it for 300 s).\n\n" + soak.markdown()
    )
    print(section)
    if report.problems:
        print(section, file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
