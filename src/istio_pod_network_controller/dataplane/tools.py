"""Run the rule tools (iptables-*, nft, ip) with argument lists; failures become DataplaneError."""

from __future__ import annotations

import subprocess

from ..errors import DataplaneError

TIMEOUT_SECONDS = 30.0


def run(argv: list[str], stdin: str | None = None, *, tolerate: str | None = None) -> str:
    """Run one tool in the calling thread's network namespace and return its stdout.

    `tolerate`: a message fragment that means "nothing to do" (e.g. flushing a table that does not exist).
    """
    try:
        done = subprocess.run(
            argv, input=stdin, capture_output=True, text=True, timeout=TIMEOUT_SECONDS, check=False
        )
    except FileNotFoundError:
        raise DataplaneError(f"{argv[0]}: not installed") from None
    except subprocess.TimeoutExpired:
        raise DataplaneError(f"{argv[0]}: no answer within {TIMEOUT_SECONDS:.0f} s") from None
    if done.returncode != 0:
        if tolerate and tolerate in done.stderr:
            return ""
        detail = (done.stderr or done.stdout).strip() or f"exit status {done.returncode}"
        raise DataplaneError(f"{' '.join(argv[:3])}: {detail}")
    return done.stdout
