"""Learner ingest over real ZeroMQ sockets: a test-side DEALER plays the actor."""

from __future__ import annotations

import json
import random
import threading
import time
import uuid

import numpy as np
import pytest
import zmq

from common.config import ConfigError, load_config
from common.wire import decode, encode
from common.protocol import (ErrorReply, GroupAck, Heartbeat, Hello, HelloAck, RetrieveRequest, TrajectoryGroup,
                             WorkAssignment, WorkRequest)
from common.transport import connect, recv, send
from learner.ingest import Dispatcher, IngestServer, load_qa

VOCAB = 50


def make_group(prompt_id: int, version: int, n: int = 2, peer="a0", run="r1", vocab=VOCAB, gid=None) -> TrajectoryGroup:
    lengths = np.array([4] * n, dtype=np.int32)
    total = int(lengths.sum())
    mask = np.tile(np.array([0, 0, 1, 1], dtype=np.uint8), n)
    return TrajectoryGroup(
        group_id=gid or uuid.uuid4().hex, peer_id=peer, run_id=run, prompt_id=prompt_id,
        num_searches=[0] * n, retrieval_failed=[False] * n, correct=[False] * n,
        lengths=lengths, tokens=(np.arange(total, dtype=np.int32) % vocab), loss_mask=mask,
        logprobs=np.where(mask, -0.5, 0.0).astype(np.float32),
        versions=np.where(mask, version, -1).astype(np.int32), rewards=np.arange(n, dtype=np.float32))


@pytest.fixture
def rows():
    return [{"question": f"q{i}?", "golden_answers": [f"a{i}"], "data_source": "t"} for i in range(20)]


@pytest.fixture
def server(ipc_path, rows):
    cfg = load_config(None, [f"learner.ingest_endpoint='{ipc_path('ingest')}'", "learner.n_samples=2",
                             "learner.groups_per_step=2", "learner.max_staleness=1", "learner.retry_after_s=0.25",
                             ])
    srv = IngestServer(cfg, Dispatcher(rows, seed=3), vocab_size=VOCAB).start()
    yield srv
    srv.stop()


@pytest.fixture
def actor(server):
    ctx = zmq.Context()
    socks = []

    def make():
        s = connect(ctx, zmq.DEALER, server.endpoint, server.cfg.transport)
        socks.append(s)
        return lambda msg, expect=None: (send(s, msg), recv(s, 5000, expect))[1]

    yield make
    for s in socks:
        s.close(0)
    ctx.term()


def _work(ask, n, peer="a0", run="r1", version=0) -> WorkAssignment:
    return ask(WorkRequest(peer_id=peer, run_id=run, max_prompts=n, version=version), WorkAssignment)


def test_hello_heartbeat_and_bad_input_get_error_replies(server, actor):
    ask = actor()
    ack = ask(Hello(role="actor", peer_id="a0", run_id="r1"), HelloAck)
    assert ack.n_samples == 2 and ack.max_staleness == 1 and ack.version == 0 and ack.learner_run_id == server.run_id
    assert ask(Heartbeat(peer_id="a0", run_id="r1", seq=7), Heartbeat).seq == 7

    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.connect(server.endpoint)
    for junk in ([b"\x93not msgpack"], [b"\x81\xa1x\x01"], [b"", b"extra"]):
        raw.send_multipart(junk)
        assert raw.poll(5000)
        err = decode(raw.recv_multipart())
        assert isinstance(err, ErrorReply) and err.code == "bad_request" and err.message
    raw.close(0)
    # well-formed but wrong message / wrong role: refused, not crashed
    err = ask(RetrieveRequest(request_id="x", queries=["q"], topk=1))
    assert isinstance(err, ErrorReply) and "does not take" in err.message
    err = ask(Hello(role="client", peer_id="c", run_id="r"))
    assert isinstance(err, ErrorReply) and "only actors" in err.message
    # a group that decodes but cannot be trained on: rejected with a reason
    bad = make_group(0, 0, vocab=VOCAB + 10)
    bad.tokens[0] = VOCAB + 5
    ack = ask(bad, GroupAck)
    assert not ack.accepted and "vocabulary" in ack.reason
    ack = ask(make_group(0, 0, n=3), GroupAck)
    assert not ack.accepted and "groups of 2" in ack.reason
    assert ask(Heartbeat(peer_id="a0", run_id="r1", seq=1), Heartbeat).seq == 1  # still serving


def test_credits_bound_work_in_flight(server, actor):
    ask = actor()
    # (max_staleness 1 + 1) · groups_per_step 2 = 4 credits
    first = _work(ask, 10)
    assert len(first.prompts) == 4 and first.retry_after_s == 0 and first.min_version == 0
    empty = _work(ask, 10)
    assert empty.prompts == [] and empty.retry_after_s == pytest.approx(0.25)
    for p in first.prompts[:2]:
        assert ask(make_group(p.prompt_id, 0), GroupAck).accepted
    assert _work(ask, 10).prompts == []  # buffered groups still hold their credits
    groups = server.take_groups(2, timeout=5)
    assert [g.prompt_id for g in groups] == [p.prompt_id for p in first.prompts[:2]]
    assert _work(ask, 10).prompts == []  # ... and so do groups in training
    server.release(version=1)
    again = _work(ask, 10, version=1)
    assert len(again.prompts) == 2 and again.version == 1 and again.min_version == 0


def test_stale_groups_dropped_and_their_prompts_handed_out_again(server, actor):
    ask = actor()
    got = _work(ask, 3)
    server.release(version=3)  # learner moved on: min accepted version is 3 - 1 = 2
    ack = ask(make_group(got.prompts[0].prompt_id, version=1), GroupAck)
    assert not ack.accepted and "older than 2" in ack.reason and ack.version == 3
    assert ask(make_group(got.prompts[1].prompt_id, version=2), GroupAck).accepted
    assert server.counts["stale"] == 1 and server.snapshot()["buffer"] == 1
    # an actor that reports an old version gets no work until it has synced
    assert _work(ask, 2, version=1).prompts == []
    retry = _work(ask, 2, version=3)
    assert retry.prompts[0].prompt_id == got.prompts[0].prompt_id  # the dropped prompt comes first
    # a buffered group that goes stale before training is dropped when the trainer takes
    server.release(version=9)
    assert server.take_groups(1, timeout=0.5) is None and server.counts["stale"] == 2


def test_duplicate_group_is_acknowledged_once(server, actor):
    ask = actor()
    pid = _work(ask, 1).prompts[0].prompt_id
    g = make_group(pid, 0, gid="same")
    assert ask(g, GroupAck).accepted
    dup = ask(g, GroupAck)
    assert dup.accepted and dup.reason == "duplicate" and server.snapshot()["buffer"] == 1


def test_restarted_actor_prompts_are_handed_out_again(server, actor):
    ask = actor()
    ask(Hello(role="actor", peer_id="a0", run_id="r1"), HelloAck)
    lost = [p.prompt_id for p in _work(ask, 3, run="r1").prompts]
    ask(Hello(role="actor", peer_id="a0", run_id="r2"), HelloAck)  # same peer, new process
    other = actor()
    handed = [p.prompt_id for p in _work(other, 4, peer="a1", run="x").prompts]
    assert handed[:3] == lost and handed[3] not in lost


def test_silent_actor_prompts_are_handed_out_again(server, actor):
    server.lc.peer_timeout_s = 1.0
    ask = actor()
    lost = [p.prompt_id for p in _work(ask, 2, peer="dead", run="r").prompts]
    deadline = time.monotonic() + 20
    while server.snapshot()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.2)  # the sweep runs every second
    assert server.snapshot()["in_flight"] == 0
    assert [p.prompt_id for p in _work(ask, 2, peer="live", run="r").prompts] == lost


def test_trainer_is_woken_once_its_groups_are_there(rows):
    """take_groups(k) waits on the buffer; an accepted group wakes the trainer only once k are
    buffered (a wake per group cost the ingest thread a notify and the trainer a stale scan)."""
    cfg = load_config(None, ["learner.n_samples=2", "learner.groups_per_step=4", "learner.max_staleness=1"])
    srv = IngestServer(cfg, Dispatcher(rows, seed=0), vocab_size=VOCAB)
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(srv.take_groups(3, 20.0)))
    waiter.start()
    deadline = time.monotonic() + 10
    while srv._wanted != 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    wakes, notify = [], srv._cond.notify_all
    srv._cond.notify_all = lambda: (wakes.append(len(srv.buffer)), notify())
    for pid in range(3):
        env, ack = srv._handle([b"id", *encode(make_group(pid, 0))])
        assert ack.accepted, ack
    waiter.join(10)
    assert wakes == [3] and [g.prompt_id for g in got[0]] == [0, 1, 2]
    assert srv._wanted == 0  # nobody waits now: a later group wakes no one
    srv._handle([b"id", *encode(make_group(3, 0))])
    assert wakes == [3] and len(srv.buffer) == 1


def test_dispatcher_order_and_state_round_trip(rows):
    d = Dispatcher(rows, seed=5)
    a = d.take(("p", "r"), 6)
    assert a == Dispatcher(rows, seed=5).take(("q", "s"), 6)  # seeded
    assert d.returned(("p", "r"), a[0]) and not d.returned(("p", "r"), a[0])  # a[0] was trained on
    assert d.returned(("p", "r"), a[1])  # a[1] came back and sits in the buffer at save time
    state = json.loads(json.dumps(d.state_dict(pending=[a[1]])))
    e = Dispatcher(rows, seed=5)
    e.load_state_dict(state)
    nxt = e.take(("p", "r2"), 20)
    assert sorted(nxt[:5]) == sorted(a[1:])  # buffered + in flight come first
    first_epoch = a[:1] + nxt[:19]
    assert sorted(first_epoch) == list(range(20))  # nothing skipped, nothing repeated in the epoch


def test_dispatcher_in_flight_count_follows_every_run(rows):
    """in_flight is kept as a running count (asked on every work request): it must equal the held
    prompts summed over runs after any mix of take / returned / release_run / load_state_dict."""
    rng = random.Random(7)
    d = Dispatcher(rows, seed=1)
    runs = [("a", "1"), ("b", "1"), ("a", "2")]
    for _ in range(400):
        run, op = rng.choice(runs), rng.random()
        if op < 0.4:
            d.take(run, rng.randint(0, 3))
        elif op < 0.85:  # a group for a prompt this run may or may not hold (a duplicate, a stranger)
            d.returned(run, rng.choice(d.ids), accepted=rng.random() < 0.8)
        elif op < 0.97:
            d.release_run(run)
        else:
            d.load_state_dict(json.loads(json.dumps(d.state_dict())))
        assert d.in_flight() == sum(sum(c.values()) for c in d.held.values())


def test_load_qa_jsonl_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    j = tmp_path / "qa.jsonl"
    j.write_text(json.dumps({"question": "who?", "golden_answers": "me"}) + "\n\n" +
                 json.dumps({"question": "what?", "golden_answers": ["x", "y"], "data_source": "nq"}) + "\n")
    rows = load_qa(j)
    assert rows[0]["golden_answers"] == ["me"] and rows[1]["data_source"] == "nq"
    pq.write_table(pa.table({"question": ["q1"], "golden_answers": [["g1", "g2"]]}), tmp_path / "qa.parquet")
    assert load_qa(tmp_path / "qa.parquet")[0]["golden_answers"] == ["g1", "g2"]
    (tmp_path / "bad.jsonl").write_text('{"golden_answers": ["x"]}\n')
    with pytest.raises(ConfigError, match="question"):
        load_qa(tmp_path / "bad.jsonl")
    # A row missing a key, or with no answers, names the file and the row (never a row that scores 0).
    ok = json.dumps({"question": "who?", "golden_answers": ["me"]})
    for i, row in enumerate([{"question": "who?"}, {"question": "who?", "golden_answers": []},
                             {"question": "who?", "golden_answers": None}, {"golden_answers": ["me"]}]):
        f = tmp_path / f"bad{i}.jsonl"
        f.write_text(ok + "\n\n" + json.dumps(row) + "\n")  # row 1, on line 3
        with pytest.raises(ConfigError, match="golden_answers" if "question" in row else "question") as e:
            load_qa(f)
        assert f"{f} row 1 (line 3)" in str(e.value), e.value
    pq.write_table(pa.table({"question": ["q1", "q2"], "golden_answers": [["g1"], []]}), tmp_path / "bad.parquet")
    with pytest.raises(ConfigError, match=r"bad\.parquet row 1: golden_answers is empty"):
        load_qa(tmp_path / "bad.parquet")
    pq.write_table(pa.table({"question": ["q1"]}), tmp_path / "noanswers.parquet")
    with pytest.raises(ConfigError, match=r"noanswers\.parquet row 0: needs `golden_answers`"):
        load_qa(tmp_path / "noanswers.parquet")
    # The eval loader shares the checks; the demo's toy-world QA files load in both.
    from actors.evaluate import load_questions
    from demo.toyworld import build_world

    with pytest.raises(ConfigError, match=r"eval data .*bad1\.jsonl row 1 \(line 3\): golden_answers is empty"):
        load_questions(tmp_path / "bad1.jsonl")
    paths = build_world(tmp_path / "world")
    assert all(r["golden_answers"] for r in load_qa(paths.train))
    assert [p.prompt_id for p in load_questions(paths.heldout, limit=3)] == [0, 1, 2]
