"""Synchronous and asynchronous pipeline modes, end to end with real processes.

    `cli.py actor --workers 1` (transformers engine, tiny Qwen2, no retriever: actor.no_search)
         │ TrajectoryGroup (per-token versions)        ▲ weights after every step (gloo)
         ▼                                             │
    `cli.py learner` ── metrics.jsonl per step: batch_version, token_version_min/max, staleness

- test_sync_mode_trains_only_on_current_weights: learner.max_staleness = 0. Every trained
  token's version equals the learner's version when the step took its batch, on every step; no
  group arrives stale; versions go up one per step (nothing deadlocks: all steps are done).
- test_async_mode_trains_on_stale_groups: learner.max_staleness = 2. Some step trains on
  tokens of an older version (the actor ran ahead), and none older than max_staleness.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.long]

STEPS = 6
GROUPS_PER_STEP = 2
N_SAMPLES = 2


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from demo.tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("pipeline") / "tiny", layers=2, hidden=64)


def write_config(base: Path, model: Path, ipc_path, staleness: int) -> Path:
    qa = base / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": f"what is the capital of place {i} ?",
                                      "golden_answers": [f"city {i}"]}) + "\n" for i in range(50)))
    ingest, sync = ipc_path("ingest"), ipc_path("sync")
    cfg = base / "scout.toml"
    cfg.write_text(f"""run_dir = "{base / 'run'}"
[metrics]
retriever_port = 0
actor_port = 0
learner_port = 0
[learner]
model = "{model}"
data = "{qa}"
ingest_endpoint = "{ingest}"
sync_endpoint = "{sync}"
store_port = 0
n_samples = {N_SAMPLES}
groups_per_step = {GROUPS_PER_STEP}
max_staleness = {staleness}
micro_batch_tokens = 2048
steps = {STEPS}
lr = 1e-3
batch_wait_s = 0.5
cpu_threads = 1
sync_timeout_s = 20.0
dump_groups_dir = "{base / 'groups'}"
[actor]
model = "{model}"
engine = "transformers"
dtype = "float32"
learner_endpoint = "{ingest}"
no_search = true
n_samples = {N_SAMPLES}
max_turns = 0
max_new_tokens = 8
max_total_tokens = 512
prompts_per_request = 2
max_groups_in_flight = 8
temperature = 1.0
heartbeat_s = 1.0
""")
    return cfg


def run_pipeline(base: Path, model: Path, ipc_path, procs, staleness: int) -> list[dict]:
    """Learner + one actor worker until the learner has done STEPS steps; its metrics.jsonl."""
    cfg = write_config(base, model, ipc_path, staleness)
    env = {"OMP_NUM_THREADS": "1"}
    logs = {role: open(base / f"{role}.log", "wb") for role in ("learner", "actor")}  # noqa: SIM115
    learner = procs.start(["cli.py", "learner", "--config", str(cfg)], env=env, stdout=logs["learner"],
                          stderr=subprocess.STDOUT)
    actor = procs.start(["cli.py", "actor", "--config", str(cfg), "--workers", "1"], env=env, stdout=logs["actor"],
                        stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while learner.poll() is None and actor.poll() in (None, 0) and time.monotonic() < deadline:  # 0: run ended
        time.sleep(0.5)
    tail = "\n".join(f"--- {r}\n" + "\n".join((base / f"{r}.log").read_text(errors="replace").splitlines()[-30:])
                     for r in logs)
    assert learner.poll() == 0, f"learner did not finish {STEPS} steps (code {learner.poll()})\n{tail}"
    steps = [json.loads(line) for line in (base / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1)), tail
    return steps


def test_sync_mode_trains_only_on_current_weights(tmp_path, tiny_model, ipc_path, procs):
    steps = run_pipeline(tmp_path, tiny_model, ipc_path, procs, staleness=0)
    for s in steps:
        assert s["batch_version"] == s["step"] - 1 and s["version"] == s["step"], s
        # every generated token of the batch was sampled by the weights being trained
        assert s["token_version_min"] == s["token_version_max"] == s["batch_version"], s
        assert s["staleness_max"] == 0 and s["groups"] == GROUPS_PER_STEP, s
    assert steps[-1]["dropped_stale_total"] == 0, "no group generated under old weights even reached the learner"
    assert all(s["sync_ok"] == 1 for s in steps), "the actor loaded every version"
    # the groups the learner accepted were all generated under its version at that moment
    import numpy as np

    dumped = sorted((tmp_path / "groups").glob("*.npz"))
    assert len(dumped) >= STEPS * GROUPS_PER_STEP
    for f in dumped:
        with np.load(f, allow_pickle=False) as z:
            gen = z["loss_mask"] == 1
            assert (z["versions"][gen] == int(z["learner_version"])).all(), f.name


def test_async_mode_trains_on_stale_groups(tmp_path, tiny_model, ipc_path, procs):
    staleness = 2
    steps = run_pipeline(tmp_path, tiny_model, ipc_path, procs, staleness=staleness)
    lags = [s["batch_version"] - s["token_version_min"] for s in steps]
    assert max(lags) > 0, f"the actor never ran ahead of the learner: {lags}"
    assert all(0 <= lag <= staleness for lag in lags), lags
    assert all(s["token_version_max"] <= s["batch_version"] for s in steps)
    assert any(s["staleness_mean"] > 0 for s in steps)
