"""Bad input (issue #8, item 4): bench/fuzz.py's generators against real sockets and servers.

Fast, in-process (real ZeroMQ sockets, real http.server threads):
- the generators only produce messages `decode` refuses, and it refuses them with ProtocolError
  (a known reason) and nothing else;
- the learner's IngestServer answers every fuzz message with a refusal and counts each in
  scout_learner_rejected_messages_total{socket="ingest"}, then serves a real actor exchange;
- a refused group does not make a re-queued prompt vanish (a fix found while fuzzing);
- the weight-sync control socket handles a flood in bounded slices (the training loop is never
  held in `Membership.drain`), and answers and counts every message in the end;
- a metrics server refuses and counts malformed HTTP and drops peers that stall mid-request;
- the Search-R1 body parser refuses what used to crash the retriever (deep JSON, lone surrogates).
Slow: bench.fuzz.run with the real retriever and learner processes, a few thousand messages
per socket while legitimate clients keep working (the bench runs 100,000 and the actor too).
"""

from __future__ import annotations

import random
import time
import uuid

import pytest
import zmq

from bench.fuzz import (TARGET_TYPES, HttpGen, ZmqGen, _group, fire_http, fire_zmq, get, refused_builders, rejected,
                        run)
from common import protocol as P
from common import wire as W
from common.weightsync import messages as S
from common.config import load_config
from common.metrics import CountingHandler, Metrics
from common.wire import ProtocolError, decode, encode
from common.transport import connect

REASONS = {"malformed", "too_large", "version", "unknown_type", "unexpected_type", "invalid"}
VOCAB = 300


def test_generated_messages_are_refused_with_protocol_errors_only():
    for target, accept in TARGET_TYPES.items():
        gen = ZmqGen(7, accept, refused_builders(target, VOCAB), VOCAB)
        kinds = set()
        for _ in range(1500):
            kind, frames = gen.next()
            kinds.add(kind)
            try:
                msg = decode(frames, expect=accept)
            except ProtocolError as e:  # nothing else may escape decode
                assert e.reason in REASONS, e
                assert len(str(e)) <= W.MAX_STR
                continue
            assert kind == "refused", f"{target}: a {kind} mutation decoded: {msg!r:.200}"
        assert {"random_bytes", "random_multipart", "bitflip", "truncate", "header", "array_garbage"} <= kinds


def test_long_peer_values_do_not_come_back_in_errors():
    import msgpack

    hdr = msgpack.packb({"p": 1, "t": "x" * 1_000_000, "v": 1, "b": {}, "a": []})
    with pytest.raises(ProtocolError) as e:
        decode([hdr])
    assert e.value.reason == "unknown_type" and len(str(e.value)) < 200


# --------------------------------------------------------------------------- learner ingest
@pytest.fixture
def ingest(ipc_path):
    from learner.ingest import Dispatcher, IngestServer

    rows = [{"question": f"q{i}?", "golden_answers": [f"a{i}"], "data_source": "t"} for i in range(20)]
    cfg = load_config(None, [f"learner.ingest_endpoint='{ipc_path('ingest')}'", "learner.n_samples=2",
                             "learner.groups_per_step=2", "learner.max_staleness=1"])
    metrics = Metrics("learner")
    srv = IngestServer(cfg, Dispatcher(rows, seed=3), vocab_size=VOCAB, metrics=metrics).start()
    yield srv, metrics
    srv.stop()


def _counted(metrics: Metrics, socket: str) -> int:
    text = metrics.render().decode()
    total = 0
    for line in text.splitlines():
        if line.startswith("scout_learner_rejected_messages_total{") and f'socket="{socket}"' in line:
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


def test_ingest_refuses_and_counts_every_fuzz_message_then_serves_an_actor(ingest):
    srv, metrics = ingest
    gen = ZmqGen(11, TARGET_TYPES["ingest"], refused_builders("ingest", VOCAB), VOCAB)
    out = fire_zmq(srv.endpoint, gen, 1500, window=64, drain_s=10.0)
    assert out["refusals"] == out["sent"] == 1500 and not out["other_replies"] and not out["unanswered"], out
    assert _counted(metrics, "ingest") == 1500
    assert srv.snapshot().get("accepted", 0) == 0 and not srv.buffer
    # a real actor exchange still works
    ctx = zmq.Context()
    sock = connect(ctx, zmq.DEALER, srv.endpoint, srv.cfg.transport)

    def ask(msg, expect):
        sock.send_multipart(encode(msg))
        assert sock.poll(5000)
        return decode(sock.recv_multipart(), expect=expect)

    run_id = uuid.uuid4().hex
    ask(P.Hello(role="actor", peer_id="a", run_id=run_id), P.HelloAck)
    work = ask(P.WorkRequest(peer_id="a", run_id=run_id, max_prompts=2, version=0), P.WorkAssignment)
    for p in work.prompts:
        g = _group(random.Random(0), VOCAB, prompt_id=p.prompt_id, version=0, peer="a", run=run_id)
        assert ask(g, P.GroupAck).accepted
    assert len(srv.buffer) == 2
    sock.close(0)
    ctx.term()


def test_refused_group_keeps_a_requeued_prompt(ingest):
    srv, _ = ingest
    ctx = zmq.Context()
    sock = connect(ctx, zmq.DEALER, srv.endpoint, srv.cfg.transport)

    def ask(msg, expect):
        sock.send_multipart(encode(msg))
        assert sock.poll(5000)
        return decode(sock.recv_multipart(), expect=expect)

    ids = [p.prompt_id for p in ask(P.WorkRequest(peer_id="a", run_id="r1", max_prompts=2, version=0),
                                    P.WorkAssignment).prompts]
    ask(P.Hello(role="actor", peer_id="a", run_id="r2"), P.HelloAck)  # a restarted: its prompts are re-queued
    bad = _group(random.Random(1), VOCAB, n=3, prompt_id=ids[0], version=0, peer="x", run="y")  # wrong group size
    assert not ask(bad, P.GroupAck).accepted
    again = [p.prompt_id for p in ask(P.WorkRequest(peer_id="a", run_id="r2", max_prompts=2, version=0),
                                      P.WorkAssignment).prompts]
    assert again == ids, "the refused group took a re-queued prompt out of circulation"
    sock.close(0)
    ctx.term()


# --------------------------------------------------------------------------- weight-sync control socket
@pytest.mark.slow
def test_sync_socket_flood_is_handled_in_bounded_slices(ipc_path):
    from common.weightsync.sender import WeightSender

    cfg = load_config(None, [f"learner.sync_endpoint='{ipc_path('sync')}'", "learner.store_port=0"])
    metrics = Metrics("learner")
    sender = WeightSender(cfg.learner, cfg.transport, metrics=metrics)
    sender.start()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(sender.endpoint)
    gen = ZmqGen(3, TARGET_TYPES["sync"], refused_builders("sync", VOCAB), VOCAB)
    sent = 0
    try:
        for _ in range(2500):  # until the pipe is full: the sender is not draining meanwhile
            try:
                sock.send_multipart(gen.next()[1], flags=zmq.NOBLOCK)
                sent += 1
            except zmq.Again:
                break
        time.sleep(0.5)
        assert sender.members() == []
        assert _counted(metrics, "sync") <= 1000, "one call handled more than its budget"
        replies, deadline = 0, time.monotonic() + 60
        while replies < sent and time.monotonic() < deadline:
            sender.members()
            while sock.poll(10):
                assert isinstance(decode(sock.recv_multipart()), P.ErrorReply)
                replies += 1
        assert replies == sent == _counted(metrics, "sync") and sent >= 1000
    finally:
        sock.close(0)
        ctx.term()
        sender.close()


# --------------------------------------------------------------------------- HTTP
@pytest.mark.slow
def test_metrics_server_refuses_malformed_http_and_drops_stalled_peers(monkeypatch):
    monkeypatch.setattr(CountingHandler, "timeout", 1.0)
    m = Metrics("fuzzed")
    port = m.serve("127.0.0.1", 0)
    try:
        out = fire_http("127.0.0.1", port, HttpGen(5, "metrics", "127.0.0.1"), 400, stalls=3)
        counted = sum(rejected(f"http://127.0.0.1:{port}/metrics").get("metrics_http", {}).values())
        assert out["rejected"] == counted > 300 and not out["internal_errors"], out
        assert out["stall_closed"] == 3 and max(out["stall_s"]) < 10
        assert get(f"http://127.0.0.1:{port}/metrics")[0] == 200
    finally:
        m.close()


def test_search_r1_body_parser_refuses_what_crashed_the_retriever():
    from retriever.http_api import HttpError, parse_body

    for body in (b"[" * 100_000 + b"]" * 100_000, b'{"queries": ["\\ud800"]}', b'{"queries": ["a\\udfffb"]}'):
        with pytest.raises(HttpError) as e:
            parse_body(body, 3, 10)
        assert e.value.status == 400
    assert parse_body('{"queries": ["caf\\u00e9 \\ud83d\\ude00"]}'.encode(), 3, 10)[0] == ["café 😀"]
    # unknown top-level fields are ignored (as Search-R1's FastAPI server does), the rest still checked
    told = []
    assert parse_body(b'{"queries": ["q"], "topk": 2, "k": 9, "extra": {}}', 3, 10, told.append) == (["q"], 2, False)
    assert told == [2]
    with pytest.raises(HttpError) as e:
        parse_body(b'{"queries": [""], "extra": 1}', 3, 10)
    assert e.value.status == 400


# --------------------------------------------------------------------------- the real roles
@pytest.mark.slow
@pytest.mark.long
def test_roles_survive_fuzz_and_keep_serving_legit_traffic(tmp_path):
    s = run(tmp_path, messages=2000, actor=False, quiet_s=2.0, seed=1)
    assert s["ok"], s["problems"]
    for name, t in s["targets"].items():
        assert t["bad"] > 0 and t["counted"] == t["bad"], (name, t)
    assert all(c["failures"] == 0 and c["during"]["n"] > 0 for c in s["legit"].values()), s["legit"]
    assert s["learner_steps_during_fuzz"] > 0 and s["sync_versions_loaded"] > 0


# --------------------------------------------------------------------------- client sockets (actors bind none)
def test_clients_skip_malformed_replies_from_a_bad_server(ipc_path):
    """Actors only connect out; what they receive comes from our servers, or from whoever stands
    in for them. The retriever client and the weight-sync client drop fuzz replies and keep
    working on the real ones."""
    import asyncio
    import threading

    from common.config import TransportConfig
    from common.weightsync.client import SyncClient
    from retriever.client import RetrieverClient

    ep = ipc_path("bad-server")
    ctx = zmq.Context()
    server = ctx.socket(zmq.ROUTER)
    server.setsockopt(zmq.LINGER, 0)
    server.bind(ep)
    junk = ZmqGen(9, (P.RetrieveReply, P.ErrorReply, S.SyncPlan, S.WeightUpdateHeader, S.SyncAbort, P.Heartbeat),
                  [lambda r: P.GroupAck(group_id="g", accepted=False, version=0)], VOCAB)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            if not server.poll(100):
                continue
            ident, *frames = server.recv_multipart()
            for _ in range(50):
                server.send_multipart([ident, *junk.next()[1]])
            msg = decode(frames)
            if isinstance(msg, P.RetrieveRequest):
                reply = P.RetrieveReply(request_id=msg.request_id, results=[[P.Passage(id="7", title="t", text="x",
                                                                                       score=1.0)]])
            else:
                reply = S.SyncAbort(version=3, generation=1, reason="test")
            server.send_multipart([ident, *encode(reply)])

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        async def search():
            client = RetrieverClient(ep, timeout_s=10.0, retries=0)
            try:
                return await client.search(["q"], topk=1)
            finally:
                await client.close()

        assert [p.id for p in asyncio.run(search())[0]] == ["7"]
        sync = SyncClient(ep, "a", "r", TransportConfig(), transports=("zmq",))
        sync.join(-1)
        got, deadline = None, time.monotonic() + 10
        while got is None and time.monotonic() < deadline:
            got = sync.poll(200)
        sync.close()
        assert isinstance(got, S.SyncAbort) and got.reason == "test"
    finally:
        stop.set()
        t.join(5)
        server.close(0)
        ctx.term()
