"""The chaos soak (issue 8): random API faults, pod churn, mid-apply deletes and controller SIGKILLs.

IPNC_SOAK_SECONDS sets the length of the chaos phase (default 20: the `make test` version; `make soak`
runs 300), IPNC_SOAK_SEED the seed (default: random, printed, so a failure can be replayed exactly).
The engine is `ipnc_lab.sim.chaos`; `bench/soak_report.py` runs it for the report.
"""

from __future__ import annotations

import os
import random

import pytest

from ipnc_lab.sim.chaos import FAULTS, INELIGIBLE, ChaosSoak

SECONDS = float(os.environ.get("IPNC_SOAK_SECONDS", "20"))
pytestmark = [pytest.mark.root, pytest.mark.timeout(int(SECONDS) + 150)]


def test_chaos_soak_ends_with_every_eligible_pod_initialized_once_and_nothing_else_touched() -> None:
    seed = int(os.environ.get("IPNC_SOAK_SEED") or random.randrange(2**32))
    print(f"chaos soak: IPNC_SOAK_SEED={seed} IPNC_SOAK_SECONDS={SECONDS:g}")
    soak = ChaosSoak(seed, SECONDS)
    report = soak.run()
    print(soak.markdown())
    assert report.problems == [], f"seed {seed}:\n" + "\n".join(report.problems)
    # The run exercised what it claims to: every fault kind, pods of every kind, restarts.
    assert set(report.faults) == set(FAULTS), report.faults
    assert set(INELIGIBLE) <= set(report.created), report.created
    assert report.restarts >= 1
    assert report.eligible_live > 0 and report.initialized == report.eligible_live
    assert report.duplicates == 0
    assert report.deleted > 0
