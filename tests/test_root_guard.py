"""The CI guard itself: a skipped root test must fail a CI=true run and only that."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

SKIPPING_ROOT_TEST = """
import pytest

@pytest.mark.root
def test_needs_root():
    pytest.skip("pretend the kernel lacks something")

def test_plain():
    assert True
"""


@pytest.fixture
def guarded(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makeini("[pytest]\nmarkers =\n    root: needs root\n")
    pytester.makepyfile(SKIPPING_ROOT_TEST)
    return pytester


def test_skipped_root_test_fails_ci(guarded: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    result = guarded.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*1 root test(s) skipped: FAILS the run (CI=true)*"])


def test_skipped_root_test_allowed_outside_ci(
    guarded: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CI", raising=False)
    result = guarded.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.OK
    result.assert_outcomes(passed=1, skipped=1)
