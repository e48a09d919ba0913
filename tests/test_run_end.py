"""The end of a learner run, with real processes: `cli.py learner` finishes its steps and tells
its actors; `cli.py actor` exits 0 (a Slurm or Kubernetes job ends cleanly), or with `--stay`
waits for the next learner run and trains for it.

    cli.py learner (steps = 2) ── WorkAssignment(ended) ──▶ cli.py actor ──▶ exit 0
    cli.py learner (steps = 2) ──  ...  ──▶ cli.py actor --stay ──▶ waits ──▶ second learner run
"""

from __future__ import annotations

import json
import time

import pytest

from tests.helpers.logged import start, wait
from tests.test_pipeline_modes import tiny_model, write_config  # noqa: F401  (the module's model fixture)

pytestmark = pytest.mark.slow


def _two_step_config(base, model, ipc_path):
    cfg = write_config(base, model, ipc_path, staleness=1)
    cfg.write_text(cfg.read_text().replace("steps = 6", "steps = 2").replace("sync_timeout_s = 20.0",
                                                                            "sync_timeout_s = 20.0\nend_grace_s = 30.0"))
    return cfg


def _start(procs, base, role, *args):
    return start(procs, base, role, role, "--config", str(base / "scout.toml"), *args)


def test_actor_exits_0_when_the_learners_run_ends(tmp_path, tiny_model, ipc_path, procs):  # noqa: F811
    _two_step_config(tmp_path, tiny_model, ipc_path)
    learner, llog = _start(procs, tmp_path, "learner")
    actor, alog = _start(procs, tmp_path, "actor", "--workers", "1")
    wait(lambda: learner.poll() is not None and actor.poll() is not None, 300, "learner and actor to exit",
          [llog, alog])
    assert learner.returncode == 0 and actor.returncode == 0, (learner.returncode, actor.returncode)
    assert "run ended: actors told" in llog.read_text() and "(" not in llog.read_text().split("run ended")[-1]
    assert "the learner's run ended: every worker is done" in alog.read_text()


def test_actor_with_stay_waits_for_the_next_learner_run(tmp_path, tiny_model, ipc_path, procs):  # noqa: F811
    _two_step_config(tmp_path, tiny_model, ipc_path)
    learner, llog = _start(procs, tmp_path, "learner")
    actor, alog = _start(procs, tmp_path, "actor", "--workers", "1", "--stay")
    wait(lambda: learner.poll() is not None, 300, "the first learner run to end", [llog, alog])
    assert learner.returncode == 0
    ended = [line for line in llog.read_text().splitlines() if "run ended: actors told" in line]
    # the staying actor comes back under a new run id, saying hello: it was told, the learner does
    # not wait end_grace_s (30 s) for it
    assert ended and "did not ask" not in ended[0], ended
    wait(lambda: "waiting for a new learner run" in alog.read_text(), 60, "the actor to hear the end", [alog])
    time.sleep(3)
    assert actor.poll() is None, "with --stay the actor outlives the learner's run"
    first = len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines())

    learner2, llog2 = _start(procs, tmp_path, "learner")  # a new run on the same endpoints
    wait(lambda: learner2.poll() is not None, 300, "the second learner run to end", [llog2, alog])
    assert learner2.returncode == 0
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][first:]
    assert [s["step"] for s in steps] == [1, 2] and all(s["groups"] > 0 for s in steps), steps
    assert actor.poll() is None, "still waiting for the run after that"
