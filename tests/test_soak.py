"""A short soak: the demo configuration with every kind of fault, one after another (`long`: it runs
for about 10 minutes plus the demo's preparation; `make test-long` or `pytest -m long tests/test_soak.py`).

The full one-hour soak is `bench/soak.py --minutes 60 --fault-every 5` (docs/RELIABILITY.md, "Soak");
this test runs the same harness for a few minutes and asserts what the hour is judged on: every
process stays up or comes back, the learner keeps stepping, no process is left behind, and no group
the learner accepted is lost.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.long
@pytest.mark.slow
def test_short_soak_with_every_fault(tmp_path):
    out = tmp_path / "soak"
    cmd = [sys.executable, "bench/soak.py", "--minutes", "8", "--fault-every", "1.5", "--stop-s", "30",
           "--warmup", "1.5", "--seed", "7", "--demo-dir", str(tmp_path / "demo"), "--out", str(out)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=2400)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    report = json.loads((out / "soak.json").read_text())
    summary, groups = report["summary"], report["groups"]
    assert len(summary["faults"]) >= 4
    assert summary["leaked_processes"] == []
    assert groups["lost_after_acceptance"] == 0
    assert groups["learner_trained"] > 0
    # every whole window between two faults trains: the learner is never stuck for good (the first
    # holds the start-up, the last may be cut short by the end of the run)
    assert all(rate > 0 for rate in summary["steps_per_min_between_faults"][1:-1])
