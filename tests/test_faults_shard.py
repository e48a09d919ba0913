"""Issue #21, case 2: a retriever shard frozen with SIGSTOP (alive, socket open, never answering).

    clients (load) ── RetrieveRequest ──▶ router ── ShardSearch ──▶ shard 0 (answers)
                                                 └─ ShardSearch ──▶ shard 1 SIGSTOPped
    shard_timeout_s after the first search it holds: that batch fails "timeout", shard 1 is "not
    answering" (health, metrics), the other batches it holds fail "unavailable", and every request
    fails "unavailable" at once; shard 1 gets one probe search and no other work.
    SIGCONT: it works off what it held (late answers, counted and dropped), answers the probe,
    and the router serves again: the same answers as before the freeze.

- test_frozen_shard_fails_fast_and_recovers: `cli.py index build` (2 Flat shards) and `cli.py
  retriever` as real processes, two RetrieverClients looping searches on the real socket (one
  whose per-attempt deadline is above the shard timeout, one below it). SIGSTOP shard 1, then:
  the shard is reported not answering within the shard timeout (plus the loaded machine's
  slack); requests then fail "unavailable ... shard 1 is not answering" well before a shard
  timeout; metrics count the timeout, the stall and the failed requests; no client call lasts
  longer than its attempts' deadlines plus backoff; the frozen shard is sent no more than the
  batches it held. SIGCONT (always, in a finally): the late answers are dropped, never mixed into
  new answers (every successful search during the whole run equals the answer from before the
  freeze), and the service answers correctly again.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from retriever.client import RetrievalError, RetrieverClient
from bench.faults import build_index_here
from tests.conftest import Procs, ipc_dir
from tests.test_retriever_index import make_corpus, write_jsonl
from tests.test_retriever_service import health, metrics_text, start_service, wait_until

N = 200
ROWS = make_corpus(N, seed=21)
NAMES = [r["contents"].split("\n")[0].strip('"') for r in ROWS]
QUERIES = [f"what is the capital of {n}?" for n in NAMES[::20]]
SHARD_TIMEOUT_S = 2.0
MAX_INFLIGHT = 2
# (per-attempt deadline, retries): one client more patient than the shard timeout, one less
CLIENTS = {"patient": (3.0, 2), "hasty": (1.0, 1)}
BACKOFF_S = 0.1
SLACK_S = 1.5  # scheduling on the shared 2-core machine


def call_bound(timeout_s: float, retries: int) -> float:
    """The longest a search call may take: every attempt's deadline plus the largest backoffs."""
    return (retries + 1) * timeout_s + sum(BACKOFF_S * 2 ** i for i in range(retries))


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    total = 0.0
    for m in re.finditer(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


def answer_of(passages) -> list:
    return [(p.id, round(p.score, 4)) for p in passages]


class Load:
    """Each client of CLIENTS searches QUERIES in a loop (2 concurrent calls each) on one event
    loop thread; every call is recorded as (client, query, start, end, code or None, answer)."""

    def __init__(self, endpoint: str):
        self.endpoint, self.calls, self.stop = endpoint, [], threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        clients = {name: RetrieverClient(self.endpoint, timeout_s=t, retries=r, backoff_s=BACKOFF_S)
                   for name, (t, r) in CLIENTS.items()}
        try:
            await asyncio.gather(*(self._loop(name, c, i) for name, c in clients.items() for i in range(2)))
        finally:
            for c in clients.values():
                await c.close()

    async def _loop(self, name: str, client: RetrieverClient, i: int) -> None:
        while not self.stop.is_set():
            q = QUERIES[i % len(QUERIES)]
            i += 1
            t0 = time.monotonic()
            try:
                res = await client.search([q], topk=3)
                self.calls.append((name, q, t0, time.monotonic(), None, answer_of(res[0])))
            except RetrievalError as e:
                self.calls.append((name, q, t0, time.monotonic(), e.code, str(e)))
                await asyncio.sleep(0.05)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=30)


def search_once(endpoint: str, query: str, timeout_s: float = 10.0):
    """(seconds, answer or RetrievalError) of one search with no retry."""
    async def go():
        async with RetrieverClient(endpoint, timeout_s=timeout_s, retries=0) as c:
            return (await c.search([query], topk=3))[0]

    t0 = time.monotonic()
    try:
        out = answer_of(asyncio.run(go()))
    except RetrievalError as e:
        out = e
    return time.monotonic() - t0, out


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("frozen-shard")
    corpus = write_jsonl(base / "corpus.jsonl", ROWS)
    out = base / "index"
    return build_index_here(corpus, out, shards=2)


@pytest.fixture
def service(index_dir, free_port):
    d = ipc_dir()
    procs = Procs()
    try:
        yield start_service(procs, index_dir, lambda n: f"ipc://{d}/{n}-{uuid.uuid4().hex[:8]}", free_port(),
                            free_port(), f"retriever.shard_timeout_s={SHARD_TIMEOUT_S}",
                            f"retriever.max_inflight={MAX_INFLIGHT}", "retriever.shard_restart_s=0.5")
    finally:
        procs.stop_all()


@pytest.mark.slow
def test_frozen_shard_fails_fast_and_recovers(service):
    ep = service["endpoint"]
    reference = {q: search_once(ep, q)[1] for q in QUERIES}
    assert all(isinstance(a, list) and len(a) == 3 for a in reference.values()), reference
    frozen = health(service)["shards"][1]["pid"]
    with Load(ep) as load:
        wait_until(lambda: sum(c[4] is None for c in load.calls) >= 20, 60, "searches before the freeze")
        os.kill(frozen, signal.SIGSTOP)
        t_stop = time.monotonic()
        try:
            wait_until(lambda: not health(service)["shards"][1]["answering"], SHARD_TIMEOUT_S + 15,
                       "shard 1 reported not answering", service["proc"])
            t_seen = time.monotonic()
            fast = [search_once(ep, q) for q in QUERIES[:3]]
            # requests fail at once with the reason, not after a shard timeout each
            for seconds, err in fast:
                assert isinstance(err, RetrievalError) and err.code == "unavailable", err
                assert "shard 1 is not answering" in str(err)
                assert seconds < SHARD_TIMEOUT_S, f"a request took {seconds:.2f} s to fail, shard 1 known stuck"
            h = health(service)
            assert h["status"] == "degraded" and h["shards"][1]["alive"] and h["shards"][0]["answering"]
            time.sleep(2 * SHARD_TIMEOUT_S)  # the freeze goes on under load
            frozen_metrics = metrics_text(service)
        finally:
            os.kill(frozen, signal.SIGCONT)
        t_cont = time.monotonic()
        wait_until(lambda: health(service)["status"] == "ok", 30, "shard 1 answering again", service["proc"])
        t_ok = time.monotonic()
        wait_until(lambda: any(c[4] is None and c[2] >= t_cont for c in load.calls), 30, "searches after SIGCONT")
    calls = list(load.calls)

    assert t_seen - t_stop < SHARD_TIMEOUT_S + 0.2 + SLACK_S + 1.0  # + /health polling
    # metrics count it
    assert metric(frozen_metrics, "scout_retriever_shard_up", shard="1") == 0
    assert metric(frozen_metrics, "scout_retriever_shard_stalls_total", shard="1") == 1
    assert metric(frozen_metrics, "scout_retriever_shard_timeouts_total", shard="1") >= 1
    assert metric(frozen_metrics, "scout_retriever_requests_total", outcome="unavailable") >= len(fast)
    assert metric(frozen_metrics, "scout_retriever_shard_timeouts_total", shard="0") == 0
    # no client waited past its attempts' deadlines (plus backoff)
    for name, (timeout_s, retries) in CLIENTS.items():
        longest = max(c[3] - c[2] for c in calls if c[0] == name)
        assert longest <= call_bound(timeout_s, retries) + SLACK_S, (name, longest)
        assert any(c[4] is not None for c in calls if c[0] == name and t_stop <= c[2] < t_cont), name
    # stale answers were dropped, and only the batches it held at the stall reached the frozen shard
    after = metrics_text(service)
    late = metric(after, "scout_retriever_shard_late_results_total", shard="1")
    assert 1 <= late <= MAX_INFLIGHT, late
    assert metric(after, "scout_retriever_shard_late_results_total", shard="0") == 0
    # never a wrong answer: every success, before, during and after, is the reference answer
    ok = [c for c in calls if c[4] is None]
    wrong = [c for c in ok if c[5] != reference[c[1]]]
    assert not wrong, wrong[:3]
    assert all(search_once(ep, q)[1] == reference[q] for q in QUERIES)
    first_ok = min(c[3] for c in ok if c[3] >= t_cont)
    print(f"\nfrozen shard: seen not answering {t_seen - t_stop:.2f} s after SIGSTOP; fail while known stuck "
          f"{max(s for s, _ in fast) * 1000:.0f} ms; longest call "
          f"{ {n: round(max(c[3] - c[2] for c in calls if c[0] == n), 2) for n in CLIENTS} } s; SIGCONT -> health ok "
          f"{t_ok - t_cont:.2f} s, -> first good answer {first_ok - t_cont:.2f} s; late answers dropped {late:.0f}")


# --------------------------------------------------------------------------- the fan-out in-process
class FakeShards:
    """The router's real FanOut and ShardSet over a real ROUTER socket, with two DEALER sockets in
    this process standing in for the shard processes (a sleeping child each, so they are alive)."""

    def __init__(self, endpoint: str):
        import itertools

        import zmq

        from common.config import RetrieverConfig
        from common.metrics import Metrics
        from retriever.fanout import FanOut
        from retriever.shards import ShardSet

        self.metrics, self.done, self.failed = Metrics("retriever"), [], []
        self.rc = RetrieverConfig(shard_timeout_s=SHARD_TIMEOUT_S)
        entries = [{"start": 0, "end": 10, "count": 10}, {"start": 10, "end": 20, "count": 10}]
        self.seq = itertools.count()
        self.fanout = FanOut(zmq.Context.instance(), self.rc, self.metrics, on_done=self.done.append,
                             on_fail=lambda b, code, msg: self.failed.append((b.seq, code, msg)),
                             next_seq=lambda: next(self.seq), dim=4)
        self.shards = ShardSet(self.rc, "unused", {"shards": entries}, endpoint, [], metrics=self.metrics)
        self.fanout.shards = self.shards
        self.fanout.bind(endpoint)
        self.socks = []
        for s in self.shards.shards:
            s.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
            sock = zmq.Context.instance().socket(zmq.DEALER)
            sock.setsockopt(zmq.IDENTITY, f"shard-{s.idx}".encode())
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
            self.socks.append(sock)
        from common.protocol import ShardHello
        from common.transport import send

        for s, sock in zip(self.shards.shards, self.socks):
            send(sock, ShardHello(shard=s.idx, pid=s.proc.pid, count=10, dim=4, device="cpu"))
        self.pump(lambda: self.shards.all_up())

    def batch(self):
        import numpy as np

        from retriever.batching import Batch, Pending

        b = Batch(next(self.seq), [Pending(["q"], 2, "zmq", "r")], k=2, vectors=np.ones((1, 4), np.float32))
        self.fanout.send(b)
        return b

    def pump(self, until, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            assert time.monotonic() < deadline, "the fan-out did not get there"
            if self.fanout.back.poll(50):
                self.fanout.read()

    def received(self, shard: int) -> list:
        """The searches waiting at a fake shard (seq, topk)."""
        import zmq

        from common.protocol import ShardSearch
        from common.wire import decode

        out, sock = [], self.socks[shard]
        while sock.poll(200):
            msg = decode(sock.recv_multipart(), expect=ShardSearch)
            out.append((msg.seq, msg.topk))
        assert not sock.poll(0, zmq.POLLIN)
        return out

    def answer(self, shard: int, seq: int, rows: list[int]) -> None:
        import numpy as np

        from common.protocol import ShardResult
        from common.transport import send

        send(self.socks[shard], ShardResult(seq=seq, shard=shard, scores=np.array([[0.9, 0.8][:len(rows)]], np.float32),
                                            ids=np.array([rows], np.int64)))

    def close(self) -> None:
        for sock in self.socks:
            sock.close(0)
        self.fanout.close()
        for s in self.shards.shards:
            s.proc.kill()
            s.proc.wait()


@pytest.fixture
def fake(ipc_path):
    f = FakeShards(ipc_path("back"))
    yield f
    f.close()


def test_stalled_shard_gets_one_probe_and_no_work(fake):
    """A batch times out at shard 1: it fails "timeout", the other batch shard 1 holds fails
    "unavailable" at once, shard 1 is not up and gets one probe, however often the router looks;
    its late answers are dropped and counted; the probe's answer makes it up again."""
    a, b = fake.batch(), fake.batch()
    fake.answer(0, a.seq, [1, 2])
    fake.answer(0, b.seq, [3, 4])
    fake.pump(lambda: not fake.fanout.inflight[a.seq].waiting - {1} and not fake.fanout.inflight[b.seq].waiting - {1})
    b.deadline = a.deadline + 10  # only a is due
    fake.fanout.expire(a.deadline + 0.01)
    assert [(seq, code) for seq, code, _ in fake.failed] == [(a.seq, "timeout"), (b.seq, "unavailable")]
    assert "shard 1 is not answering" in fake.failed[1][2] and not fake.fanout.inflight
    assert not fake.shards.all_up() and [s.idx for s in fake.shards.stalled()] == [1]
    for k in range(20):  # the router's loop looks every 0.1 s
        fake.fanout.expire(a.deadline + 0.1 * k)
    probe = fake.shards.shards[1].probe_seq
    assert fake.received(1) == [(a.seq, 2), (b.seq, 2), (probe, 1)]
    assert fake.received(0) == [(a.seq, 2), (b.seq, 2)]
    fake.answer(1, a.seq, [11, 12])
    fake.answer(1, b.seq, [13, 14])
    late = 'scout_retriever_shard_late_results_total{role="retriever",shard="1"} 2.0'
    fake.pump(lambda: late in fake.metrics.render().decode())
    assert not fake.shards.all_up() and not fake.done
    fake.answer(1, probe, [15])
    fake.pump(fake.shards.all_up)
    assert not fake.done and fake.shards.health()[1]["answering"]
    text = fake.metrics.render().decode()
    assert 'scout_retriever_shard_stalls_total{role="retriever",shard="1"} 1.0' in text and late in text


def test_late_answer_is_dropped_while_a_newer_batch_waits(fake):
    """Shard 0 fails batch a (an error reply) while shard 1, slow, still holds it; batch b goes
    out; shard 1's answer to a then arrives while b waits on shard 1: it is dropped (counted
    late), and b is answered with b's rows only."""
    from common.protocol import ErrorReply
    from common.transport import send

    a = fake.batch()
    send(fake.socks[0], ErrorReply(code="internal", message="search failed", request_id=str(a.seq)))
    fake.pump(lambda: fake.failed)
    b = fake.batch()
    fake.answer(1, a.seq, [11, 12])  # late: a has failed
    fake.answer(0, b.seq, [1, 2])
    fake.answer(1, b.seq, [13, 14])
    fake.pump(lambda: fake.done)
    assert [(seq, code) for seq, code, _ in fake.failed] == [(a.seq, "internal")]
    assert fake.done == [b] and {i: ids.tolist() for i, (_, ids) in b.parts.items()} == {0: [[1, 2]], 1: [[13, 14]]}
    assert 'scout_retriever_shard_late_results_total{role="retriever",shard="1"} 1.0' in fake.metrics.render().decode()
