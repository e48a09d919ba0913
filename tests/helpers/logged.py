"""Role processes whose output goes to a log file, and waits that show those logs' tails when
they time out (tests where a process exiting is the expected outcome, unlike test_e2e's
wait_until, which fails on any exit)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

ENV = {"OMP_NUM_THREADS": "1"}


def start(procs, base: Path, name: str, *args: str):
    """`python cli.py ARGS` through the procs fixture, output appended to <base>/<name>.log."""
    log = base / f"{name}.log"
    return procs.start(["cli.py", *args], env=ENV, stdout=open(log, "ab"), stderr=subprocess.STDOUT), log  # noqa: SIM115


def wait(cond, timeout: float, what: str, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.5)
    tails = "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-25:]) for p in logs)
    raise AssertionError(f"timed out waiting for {what}\n{tails}")
