"""Issue #8, item 1 with a single actor worker (the demo's set-up): after kill -9 of the only
worker, nobody else feeds the learner, so the restarted worker must be pushed the current
weights while the learner waits. A regression test: the learner once treated the restarted
worker (same peer id, new run id) as already synced and both sides waited forever."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return json.loads(lines[-1])["step"] if lines and lines[-1].endswith("}") else 0


def _wait(pred, timeout: float, what: str, children):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children.check_alive("retriever", "learner", "actor")
        if pred():
            return
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_lone_actor_killed_comes_back_and_training_resumes(tmp_path, demo_prepared):
    from bench.soak import worker_pid
    from common.config import load_config
    from demo.children import Children, cfg_port, wait_healthy
    from demo.recipe import prepare, write_run_config
    from demo.tinymodel import build_tiny_model

    model = build_tiny_model(tmp_path / "model", layers=1, hidden=64, heads=2)
    run = tmp_path / "run"
    cfg = load_config(None, [f"demo.dir='{demo_prepared}'", f"run_dir='{run}'", f"demo.base_model='{model}'",
                             "demo.steps=100000", "learner.checkpoint_every=0", "learner.groups_per_step=2",
                             "actor.max_groups_in_flight=4", "actor.max_new_tokens=8"])
    paths = prepare(cfg)
    run.mkdir()
    config = write_run_config(cfg, paths, run)
    children = Children(run / "logs")
    try:
        children.start("retriever", ["cli.py", "retriever", "--config", str(config)])
        children.start("learner", ["cli.py", "learner", "--config", str(config)])  # needs no retriever
        wait_healthy(cfg_port(config, "retriever_port"), "retriever", children, "retriever")
        children.start("actor", ["cli.py", "actor", "--config", str(config)])
        _wait(lambda: _steps(run) >= 3, 600, "3 learner steps", children)
        victim = worker_pid(children.procs["actor"].pid)
        assert victim
        os.kill(victim, signal.SIGKILL)
        at_kill = _steps(run)
        _wait(lambda: (worker_pid(children.procs["actor"].pid) or victim) != victim, 120, "a new worker", children)
        # the new worker gets the current weights and the learner trains on its groups again
        _wait(lambda: _steps(run) >= at_kill + 3, 240, "3 more learner steps after the kill", children)
        log = (run / "logs" / "learner.log").read_text(errors="replace")
        assert "restarted (run" in log
    finally:
        children.stop_all()
