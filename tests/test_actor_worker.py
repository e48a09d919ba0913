"""`cli.py actor` end to end, without vLLM (actor.engine = transformers keeps this module light):
the supervisor and a real worker process against the learner's real IngestServer and a real
WeightSender in this process, the retriever deliberately unreachable (the streaming test runs
with actor.no_search; `cli.py eval` meets the unreachable retriever).

Shows: Hello / WorkRequest / TrajectoryGroup / GroupAck over real sockets, groups of the learner's
n_samples, credits respected, retrieval failures flagged (never scored, in eval), a weight update applied
by the worker (later groups carry the new version), per-worker metrics, a killed worker restarted
with a fresh run_id, SIGTERM stopping everything, Ctrl-C stopping two workers and their supervisor;
bad --gpus lists refused; `cli.py eval`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

QUESTION = "what is the capital of zorland ?"


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read()


def _wait(pred, timeout: float, what: str, proc=None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: process exited with code {proc.returncode}")
        try:
            value = pred()
            if value:
                return value
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Tiny Qwen2 taught to search first (its search will fail: no retriever runs)."""
    from actors.engine import TransformersEngine
    from actors.rollout import RolloutRunner
    from demo.teach import script_example, script_texts, teach
    from common.config import ActorConfig
    from common.protocol import Passage
    from demo.tinymodel import build_tiny_model

    path = build_tiny_model(tmp_path_factory.mktemp("worker-model") / "tiny", texts=script_texts())
    eng = TransformersEngine(path, dtype="float32")
    obs = RolloutRunner(eng, None, ActorConfig(max_obs_tokens=60)).observation_ids(
        [Passage(id="0", title="zorland", text="the capital of zorland is mirabel .", score=1.0)])
    teach(path, [script_example(eng.tokenizer, QUESTION, "capital of zorland", obs, "mirabel")])
    return path


@pytest.fixture
def learner(ipc_path, free_port):
    """The learner's real ingest (IngestServer + Dispatcher) and weight sender, in this process."""
    from common.config import load_config
    from common.weightsync.sender import WeightSender
    from learner.ingest import Dispatcher, IngestServer

    cfg = load_config(None, [f"learner.ingest_endpoint='{ipc_path('ingest')}'", "learner.n_samples=2",
                             "learner.groups_per_step=2", "learner.max_staleness=1", "learner.retry_after_s=0.2",
                             f"learner.sync_endpoint='tcp://127.0.0.1:{free_port()}'",
                             f"learner.store_port={free_port()}", "learner.sync_timeout_s=30"])
    rows = [{"question": QUESTION, "golden_answers": ["mirabel"], "data_source": "toy"} for _ in range(50)]
    srv = IngestServer(cfg, Dispatcher(rows, seed=1), vocab_size=4096).start()
    ws = WeightSender(cfg.learner, cfg.transport)
    ws.start()
    yield srv, ws
    ws.close()
    srv.stop()


def actor_args(model_dir, srv, metrics_port: int, *extra: str, workers: int = 1) -> list[str]:
    sets = {"actor.engine": "'transformers'", "actor.dtype": "'float32'",
            "actor.learner_endpoint": f"'{srv.endpoint}'", "actor.retriever_endpoint": "'ipc:///nonexistent/retriever'",
            "actor.retrieval_timeout_s": "0.5", "actor.retrieval_retries": "0", "actor.max_new_tokens": "24",
            "actor.max_turns": "1", "actor.max_total_tokens": "512", "actor.max_groups_in_flight": "1",
            "actor.prompts_per_request": "2", "actor.heartbeat_s": "1.0", "actor.restart_backoff_s": "0.5",
            "metrics.actor_port": str(metrics_port)}
    args = ["cli.py", "actor", "--workers", str(workers), "--model", str(model_dir)]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    for s in extra:
        args += ["--set", s]
    return args


def take(srv, k: int, timeout: float = 120.0):
    groups = srv.take_groups(k, timeout)
    assert groups is not None, "no groups from the actor"
    return groups


def test_actor_streams_groups_updates_restarts_and_stops(model_dir, learner, procs, free_port):
    import torch
    from transformers import AutoModelForCausalLM

    srv, ws = learner
    mport = free_port(count=3)  # the supervisor and up to two workers
    # actor.no_search: every search finds nothing (an empty <information> block). With the retriever
    # unreachable every group would consist of failed retrievals only, which the learner now refuses
    # (tests/test_faults_retriever.py covers that path; test_eval_command_writes_summary below too).
    sup = procs.start(actor_args(model_dir, srv, mport, "actor.no_search=true"))

    # Groups stream in: the learner's n_samples, one (empty) search per sample, nothing failed.
    in_flight_seen = []
    groups = take(srv, 2)
    in_flight_seen.append(srv.dispatcher.in_flight())
    for g in groups:
        assert g.n == 2 and g.peer_id.startswith("actor-") and g.peer_id.endswith("-0")
        assert not any(g.retrieval_failed) and g.num_searches == [1, 1]
        assert set(g.versions[g.loss_mask.astype(bool)].tolist()) == {0}
    assert max(in_flight_seen) <= 1, "actor.max_groups_in_flight = 1 bounds the credits it holds"

    # A weight update from the learner's WeightSender; later groups carry version 1.
    assert ws.wait_members(1, 60)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    weights = [(n, p.detach() + 0.01) for n, p in model.named_parameters()]
    report = ws.broadcast(1, weights)
    assert report["ok"] == [groups[0].peer_id] and report["backend"] == "gloo", report
    srv.release(1)
    deadline = time.monotonic() + 120
    while True:
        got = take(srv, 1)
        if got[0].oldest_version() == 1:
            break
        srv.release(1)
        assert time.monotonic() < deadline, "no group generated under version 1"

    # Per-worker metrics with worker / gpu labels.
    text = _get(f"http://127.0.0.1:{mport + 1}/metrics").decode()
    assert 'scout_actor_generated_tokens_total{gpu="cpu",role="actor",worker="0"}' in text
    assert 'scout_actor_weight_load_seconds_count{gpu="cpu",role="actor",worker="0"} 1.0' in text
    assert "scout_actor_retrieval_failed_total" in text and "scout_actor_version_lag" in text

    # A killed worker is restarted (fresh run_id); the supervisor counts it.
    health = json.loads(_get(f"http://127.0.0.1:{mport + 1}/health"))
    old_pid, old_run = health["pid"], health["run_id"]
    os.kill(old_pid, signal.SIGKILL)
    new = _wait(lambda: (h := json.loads(_get(f"http://127.0.0.1:{mport + 1}/health")))["pid"] != old_pid and h,
                180, "worker restarted", sup)
    assert new["run_id"] != old_run
    assert 'scout_actor_worker_restarts_total{gpu="all",role="actor",slot="0",worker="supervisor"} 1.0' in \
        _get(f"http://127.0.0.1:{mport}/metrics").decode()
    srv.release(1)
    _wait(lambda: srv.peers[groups[0].peer_id].run_id == new["run_id"], 120, "restarted worker said hello")

    # SIGTERM stops the supervisor and its worker cleanly.
    sup.send_signal(signal.SIGTERM)
    assert sup.wait(60) == 0
    _wait(lambda: not Path(f"/proc/{new['pid']}").exists() or
          Path(f"/proc/{new['pid']}/stat").read_text().split()[2] == "Z", 30, "worker gone")


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except FileNotFoundError:
        return True


def test_ctrl_c_stops_the_supervisor_and_every_worker(model_dir, learner, procs, free_port):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) on `cli.py actor --workers 2`:
    exit code 0 (actors/main.py) and no process of the group left. The actor starts with SIGINT
    ignored, as a background job of a non-interactive shell (CI) does: it must install its handler."""
    srv, _ = learner
    mport = free_port(count=3)  # the supervisor and up to two workers
    sup = procs.start(actor_args(model_dir, srv, mport, "actor.no_search=true", workers=2),
                      preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    pids: list[int] = []
    try:
        _wait(lambda: len(srv.peers) == 2, 180, "both workers said hello", sup)
        pids = [w["pid"] for w in json.loads(_get(f"http://127.0.0.1:{mport}/health"))["workers"]]
        assert len(pids) == 2 and None not in pids
        os.killpg(sup.pid, signal.SIGINT)
        assert sup.wait(60) == 0
        assert all(_gone(pid) for pid in pids)

        def group_empty():
            try:
                os.killpg(sup.pid, 0)
            except ProcessLookupError:
                return True
            return False

        _wait(group_empty, 10, "every process of the actor's group gone")
    finally:
        for pid in pids:
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)


def test_worker_whose_metrics_port_is_taken_is_not_restarted(model_dir, learner, procs, free_port, tmp_path):
    """Worker 1's metrics port (actor_port + 2) is taken: it says so and exits before loading its
    engine, the supervisor does not restart it (no restart can help) and worker 0 keeps working."""
    import socket

    srv, _ = learner
    mport = free_port(count=3)  # the supervisor and up to two workers
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", mport + 2))
    squatter.listen(1)
    log_path = tmp_path / "actor.log"
    sup = procs.start(actor_args(model_dir, srv, mport, "actor.no_search=true", workers=2),
                      stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    try:
        def health():
            return json.loads(_get(f"http://127.0.0.1:{mport}/health"))["workers"]

        _wait(lambda: health()[1]["config_error"], 120, "worker 1 given up", sup)
        _wait(lambda: len(srv.peers) == 1, 180, "worker 0 said hello", sup)
        w0, w1 = health()
        assert w1["down"] and w1["restarts"] == 0 and w1["pid"] is None
        assert not w0["down"] and w0["pid"] is not None
        os.killpg(sup.pid, signal.SIGTERM)
        assert sup.wait(60) == 0
        out = log_path.read_text(errors="replace")
        assert f"cannot serve metrics on 127.0.0.1:{mport + 2}" in out and "not restarting it" in out
    finally:
        squatter.close()


@pytest.mark.parametrize("spec, needle", [("0-x", "expected a list like 0-3"), ("3-1", "expected a list"),
                                          ("0,0", "listed twice")])
def test_bad_gpu_list_is_a_clear_error(spec, needle, tmp_path):
    r = subprocess.run([sys.executable, "cli.py", "actor", "--gpus", spec, "--model", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and needle in r.stderr and "--gpus" in r.stderr


def test_missing_model_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "cli.py", "actor", "--workers", "1", "--model", str(tmp_path / "nope")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not a local HF model folder" in r.stderr


def test_eval_command_writes_summary(model_dir, tmp_path):
    """`cli.py eval` through the real rollout loop (transformers engine; retriever down, so every
    search fails and is reported as such, never scored as an answer)."""
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": QUESTION, "golden_answers": ["mirabel"], "data_source": s}) + "\n"
                            for s in ("a", "b", "b")))
    r = subprocess.run([sys.executable, "cli.py", "eval", "--model", str(model_dir), "--data", str(data),
                        "--set", "actor.engine='transformers'", "--set", "actor.dtype='float32'",
                        "--set", "actor.retriever_endpoint='ipc:///nonexistent/retriever'",
                        "--set", "actor.retrieval_timeout_s=0.5", "--set", "actor.retrieval_retries=0",
                        "--set", "actor.max_new_tokens=24", "--set", f"run_dir='{tmp_path / 'run'}'"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "eval" / "qa.json").read_text())
    assert summary["n"] == 3 and summary["retrieval_failed"] == 3 and summary["em"] == 0.0
    assert summary["search_rate"] == 1.0 and set(summary["by_source"]) == {"a", "b"}
    records = [json.loads(x) for x in (tmp_path / "run" / "eval" / "qa.jsonl").read_text().splitlines()]
    assert [rec["finish"] for rec in records] == ["retrieval_failed"] * 3
    assert np.all([rec["queries"] == ["capital of zorland"] for rec in records])
