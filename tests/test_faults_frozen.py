"""Issue #21, cases 1 and 3: a frozen actor worker and a frozen learner (SIGSTOP, later SIGCONT).

    `cli.py learner` ◀── groups ── `cli.py actor` (transformers engine, tiny model)
    SIGSTOP worker 1 (or the learner) for FREEZE_S, then SIGCONT (bench/faults_frozen.py)

A stopped process keeps its sockets open: its peers see silence, not a broken connection, so only
deadlines can tell. The CI tests freeze for FREEZE_S = 12 s with the deadlines made small to match
(learner.sync_timeout_s 4 -> a sync ends within ~5 s; learner.peer_timeout_s 6; actor.request_timeout_s 4):
the freeze outlasts every one of them. The `long` variants freeze for the issue's full 60 s. The
frozen-worker case is `long` in both forms (CI's 30 minutes); the frozen-learner case stays in CI.

- test_frozen_worker_is_dropped_and_rejoins: two workers; worker 1 is frozen twice, once while the
  learner is inside a weight sync and once between two syncs. The learner keeps stepping on worker
  0's groups, each sync returns within 1.25 x sync_timeout_s (+1 s of scheduling noise), the
  frozen member is dropped from the weight sync; after SIGCONT the same process notices (SIGCONT
  after a stop longer than actor.request_timeout_s), starts a new run, joins the weight sync again
  and holds the learner's version within 30 s; its groups from before the freeze are answered (accepted once, or refused
  as stale) and counted, none unaccounted. A group generated before the freeze and sent during it
  (a raw peer that took a prompt before the learner moved on) is refused as stale and counted in
  scout_learner_groups_dropped_stale_total; no accepted group is beyond max_staleness.
- test_frozen_learner_actor_waits_and_loses_nothing: one worker at its in-flight cap; the learner
  is frozen. The worker finishes and sends every group it holds, then waits: it keeps all of them
  (unacked, never dropped) and uses little CPU (not a retry loop); after SIGCONT training resumes
  and the worker's sent = accepted + duplicate + stale + rejected + error, matching the learner's
  counters.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import zmq

from bench.faults import Stack, build_world
from bench.faults_frozen import frozen_actor, frozen_learner, learner_groups
from common.protocol import GroupAck, Hello, HelloAck, TrajectoryGroup, WorkAssignment, WorkRequest
from common.transport import connect, recv, send

FREEZE_S = 12.0
SYNC_TIMEOUT_S = 4.0
PEER_TIMEOUT_S = 6.0
REQUEST_TIMEOUT_S = 4.0
# the frozen-learner case: the worker's cap of groups must finish generating before its request
# deadline ends the link (a link loss aborts what is still generating); 8 s leaves room on a loaded
# machine (a CI run beside other jobs took more than 4 s), and the freeze still outlasts it
LEARNER_CASE_REQUEST_TIMEOUT_S, LEARNER_CASE_FREEZE_S = 8.0, 16.0
MAX_STALENESS = 2
N_SAMPLES = 2


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("faults-frozen-world"), questions=100)


def _stack(world, procs, tmp_path, workers: int, request_timeout_s: float = REQUEST_TIMEOUT_S) -> Stack:
    stack = Stack(tmp_path, world, start=procs.start)
    stack.write_config(workers=workers, actor={"no_search": True, "request_timeout_s": request_timeout_s},
                       learner={"sync_timeout_s": SYNC_TIMEOUT_S, "peer_timeout_s": PEER_TIMEOUT_S,
                                "max_staleness": MAX_STALENESS, "n_samples": N_SAMPLES})
    return stack


# --------------------------------------------------------------------------- a group held through a freeze
class StaleProbe:
    """A raw actor peer standing for the frozen worker's oldest group: it takes a prompt before the
    learner moves on, then (while the worker is frozen) sends that group once the learner is more
    than max_staleness versions further."""

    def __init__(self, stack: Stack):
        self.stack, self.ack, self.before, self.after = stack, None, None, None
        self.ctx = zmq.Context()
        self.sock = connect(self.ctx, zmq.DEALER, f"tcp://127.0.0.1:{stack.ports['ingest']}", _transport())

    def __call__(self, _frozen) -> None:
        send(self.sock, Hello(role="actor", peer_id="actor-probe", run_id="probe-1"))
        recv(self.sock, 10_000, HelloAck)
        deadline = time.monotonic() + 60
        while True:  # the frozen run's credits come free after peer_timeout_s
            send(self.sock, WorkRequest(peer_id="actor-probe", run_id="probe-1", max_prompts=1, version=-1))
            a = recv(self.sock, 10_000, WorkAssignment)
            if a.prompts or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert a.prompts, "no prompt for the probe within 60 s"
        self.version = a.version
        self.stack.wait(lambda: int(self.stack.health("learner")["version"]) > a.version + MAX_STALENESS, 120,
                        "the learner moving past the probe's version", ("learner",))
        self.before = learner_groups(self.stack)
        send(self.sock, _group(a.prompts[0].prompt_id, a.version))
        self.ack = recv(self.sock, 10_000, GroupAck)
        self.after = learner_groups(self.stack)

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def _transport():
    from common.config import TransportConfig

    return TransportConfig()


def _group(prompt_id: int, version: int, tokens_per_sample: int = 24) -> TrajectoryGroup:
    lengths = np.full(N_SAMPLES, tokens_per_sample, dtype=np.int32)
    mask = np.tile((np.arange(tokens_per_sample) >= 8).astype(np.uint8), N_SAMPLES)
    return TrajectoryGroup(
        group_id=f"probe-{prompt_id}-{version}", peer_id="actor-probe", run_id="probe-1", prompt_id=prompt_id,
        num_searches=[0] * N_SAMPLES, retrieval_failed=[False] * N_SAMPLES, correct=[False] * N_SAMPLES,
        lengths=lengths, tokens=(np.arange(int(lengths.sum())) % 50 + 1).astype(np.int32), loss_mask=mask,
        logprobs=np.where(mask, -1.0, 0.0).astype(np.float32),
        versions=np.where(mask, version, -1).astype(np.int32), rewards=np.array([0.0, 1.0], dtype=np.float32))


# --------------------------------------------------------------------------- case 1: a frozen worker
def _check_frozen_worker(f: dict) -> None:
    # the learner kept stepping, and every sync it ran meanwhile returned within its deadline
    assert f["steps_frozen"] >= 1, f
    assert f["syncs_frozen"] and max(s["seconds"] for s in f["syncs_frozen"]) <= 1.25 * SYNC_TIMEOUT_S + 1.0, f
    normal = max(f["max_step_gap_before_s"], f["max_step_gap_after_s"])
    # a step waits at most for a sync's deadline, or for the prompts the frozen worker holds: the
    # learner re-queues them once it has been silent for peer_timeout_s (swept every second)
    assert f["max_step_gap_frozen_s"] <= max(1.25 * SYNC_TIMEOUT_S, PEER_TIMEOUT_S + 1.0) + 2 * normal + 1.0, f
    # the frozen member was dropped from the weight sync
    assert f["dropped_from_sync"], f
    # the same process came back, noticed it had been stopped, started a new run and had the
    # learner's weights within 30 s
    assert f["pid_after"] == f["pid"] and any("was stopped for" in n for n in f["noticed"]), f
    assert f["run_id_after"] != f["run_id"], f
    assert f["cont_to_weights_s"] <= 30.0, f
    # every group it sent got an answer or is still awaiting one: none unaccounted
    g = f["groups"]
    assert g["sent"] == g["answered"] + g["unacked"], g


def _check_no_group_beyond_staleness(stack: Stack) -> None:
    for g in stack.groups():
        mask = g["loss_mask"].astype(bool)
        assert int(g["versions"][mask].min()) >= int(g["learner_version"]) - MAX_STALENESS, g["group_id"]


def _run_frozen_worker(world, procs, tmp_path, freeze_s: float) -> None:
    stack = _stack(world, procs, tmp_path, workers=2)
    probe = StaleProbe(stack)
    freezes = 0

    def during(frozen) -> None:  # the first freeze (during a sync) also runs the probe
        nonlocal freezes
        freezes += 1
        if freezes == 1:
            probe(frozen)

    try:
        r = frozen_actor(stack, freeze_s, whens=("sync", "between"), during=during)
    finally:
        probe.close()
    print(f"\nfrozen actor: {r}")
    for f in r["freezes"]:
        _check_frozen_worker(f)
    # the group held through the freeze was refused as stale, and counted
    assert probe.ack is not None and not probe.ack.accepted and "older than" in probe.ack.reason, probe.ack
    assert probe.after["dropped_stale"] >= probe.before["dropped_stale"] + 1, (probe.before, probe.after)
    assert probe.after["stale"] >= probe.before["stale"] + 1
    _check_no_group_beyond_staleness(stack)


@pytest.mark.slow
@pytest.mark.long  # ~60 s: out of CI's 30 minutes since 2026-12-07 (the weight sync's frozen members stay in CI:
# test_weightsync_chain's test_member_frozen_mid_chain, test_weightsync's test_slow_member_is_dropped_and_comes_back)
def test_frozen_worker_is_dropped_and_rejoins(world, procs, tmp_path):
    _run_frozen_worker(world, procs, tmp_path, FREEZE_S)


@pytest.mark.slow
@pytest.mark.long
def test_frozen_worker_is_dropped_and_rejoins_60s(world, procs, tmp_path):
    _run_frozen_worker(world, procs, tmp_path, 60.0)


# --------------------------------------------------------------------------- case 3: a frozen learner
def _run_frozen_learner(world, procs, tmp_path, freeze_s: float) -> None:
    stack = _stack(world, procs, tmp_path, workers=1, request_timeout_s=LEARNER_CASE_REQUEST_TIMEOUT_S)
    r = frozen_learner(stack, freeze_s)
    print(f"\nfrozen learner: {r}")
    # the worker filled its cap, sent every group, then held all of them through the freeze
    assert r["stop_to_all_sent_s"] < freeze_s, r
    assert r["steps_while_frozen"] == 0
    assert all(unacked == r["cap"] for t, _, unacked in r["samples"] if t >= r["stop_to_all_sent_s"]), r["samples"]
    # it waited without spinning: a retry loop would take a whole core
    assert r["worker_cpu_frozen"] < 0.1, r
    # it kept its process, and it sent its groups again when the link came back (the freeze
    # outlasted actor.request_timeout_s)
    assert r["worker_pid_same"] and r["accounts"]["worker"]["resent"] >= 1, r
    # nothing silently lost: every group sent has the learner's answer, which the learner counted
    assert r["accounts"]["agree"], r["accounts"]


@pytest.mark.slow
def test_frozen_learner_actor_waits_and_loses_nothing(world, procs, tmp_path):
    _run_frozen_learner(world, procs, tmp_path, LEARNER_CASE_FREEZE_S)


@pytest.mark.slow
@pytest.mark.long
def test_frozen_learner_actor_waits_and_loses_nothing_60s(world, procs, tmp_path):
    _run_frozen_learner(world, procs, tmp_path, 60.0)
