"""The retriever service over real sockets: `cli.py index build` + `cli.py retriever` as real
processes (router + shard processes, real packaged encoder, real FAISS), the ZeroMQ client, the
Search-R1 HTTP API, bad input, metrics, a shard killed with SIGKILL, SIGTERM shutdown."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import msgpack
import numpy as np
import pytest
import zmq

from common.wire import decode, encode
from common.protocol import ErrorReply, Hello, RetrieveReply, RetrieveRequest
from retriever.client import HttpRetrievalClient, RetrievalError, RetrieverClient, SyncRetriever
from bench.faults import build_index_here
from tests.conftest import Procs, ipc_dir
from tests.test_retriever_index import make_corpus, write_jsonl

pytestmark = pytest.mark.slow

N = 200
ROWS = make_corpus(N, seed=11)
NAMES = [r["contents"].split("\n")[0].strip('"') for r in ROWS]


# --------------------------------------------------------------------------- helpers
def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 30):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def post(svc, obj) -> tuple[int, dict]:
    return http("POST", svc["http"], json.dumps(obj).encode())


def health(svc) -> dict:
    return http("GET", f"http://127.0.0.1:{svc['metrics_port']}/health", timeout=5)[1]


def metrics_text(svc) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{svc['metrics_port']}/metrics", timeout=5) as r:
        return r.read().decode()


def wait_until(pred, timeout: float, what: str, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: the service exited with code {proc.returncode}")
        try:
            if pred():
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def start_service(procs, index_dir, ipc, port_http, port_metrics, *sets: str, gpus: str | None = None) -> dict:
    endpoint = ipc("retriever")
    args = ["cli.py", "retriever", "--index", str(index_dir), "--endpoint", endpoint, "--http-port", str(port_http),
            "--set", f"metrics.retriever_port={port_metrics}"] + (["--gpus", gpus] if gpus is not None else [])
    for s in sets:
        args += ["--set", s]
    proc = procs.start(args)
    svc = {"proc": proc, "endpoint": endpoint, "http": f"http://127.0.0.1:{port_http}/retrieve",
           "metrics_port": port_metrics}
    wait_until(lambda: health(svc)["status"] == "ok", 240, "retriever /health ok", proc)
    return svc


def raw_request(endpoint: str, frames: list, timeout_ms: int = 20000):
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send_multipart(frames)
        assert sock.poll(timeout_ms), "no reply"
        return decode(sock.recv_multipart())
    finally:
        sock.close(0)


def header(t: str, body: dict, v: int = 1) -> bytes:
    return msgpack.packb({"p": 1, "t": t, "v": v, "b": body, "a": []})


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    """Built by the real CLI: 200 passages, 2 Flat shards."""
    base = tmp_path_factory.mktemp("svc")
    corpus = write_jsonl(base / "corpus.jsonl", ROWS)
    out = base / "index"
    return build_index_here(corpus, out, shards=2)


@pytest.fixture(scope="module")
def service(index_dir, tmp_path_factory):
    from common.transport import free_tcp_port
    import uuid

    d = ipc_dir()
    procs = Procs()
    try:
        yield start_service(procs, index_dir, lambda n: f"ipc://{d}/{n}-{uuid.uuid4().hex[:8]}", free_tcp_port(),
                            free_tcp_port(), "retriever.topk_cap=20", "retriever.shard_restart_s=0.5")
    finally:
        procs.stop_all()


@pytest.fixture(scope="module")
def local(index_dir):
    from retriever.index import LocalIndex, encoder_for, load_manifest

    return LocalIndex(index_dir, encoder_for(load_manifest(index_dir), threads=1))


# --------------------------------------------------------------------------- tests
def test_zmq_client_matches_in_process_search(service, local):
    queries = [f"what is the capital of {n}?" for n in NAMES[::10]]

    async def go():
        async with RetrieverClient(service["endpoint"], timeout_s=30, retries=1) as c:
            single = await c.search(queries[:1], topk=3)
            many = await asyncio.gather(*(c.search([q], topk=5) for q in queries))
            return single, [m[0] for m in many]

    single, many = asyncio.run(go())
    assert len(single) == 1 and len(single[0]) == 3
    top = single[0][0]
    assert (top.id, top.title) == ("0", NAMES[0]) and top.text.startswith(f"{NAMES[0]} is a land")
    scores, rows = local.search_vectors(local.encode_queries(queries), 5)
    for q, got in enumerate(many):
        assert [p.id for p in got] == [str(r) for r in rows[q]]
        np.testing.assert_allclose([p.score for p in got], scores[q], atol=1e-4)
        assert [p.score for p in got] == sorted((p.score for p in got), reverse=True)
    assert np.mean([got[0].title == NAMES[10 * i] for i, got in enumerate(many)]) >= 0.8


def test_client_keeps_listening_after_an_idle_spell(service):
    """The socket's receive timeout passing while idle must not silence the client's reader."""
    from common.config import TransportConfig

    async def go():
        async with RetrieverClient(service["endpoint"], TransportConfig(recv_timeout_ms=200), timeout_s=30,
                                   retries=0) as c:
            first = await c.search(["capital of x"], topk=1)
            await asyncio.sleep(1.0)  # several receive timeouts pass with nothing to read
            second = await c.search(["capital of x"], topk=1)
            return first, second

    first, second = asyncio.run(go())
    assert first[0][0].id == second[0][0].id


def test_http_search_r1_schema(service):
    q = [f"capital of {NAMES[3]}", f"who founded {NAMES[4]}"]
    status, body = post(service, {"queries": q, "topk": 2, "return_scores": True})
    assert status == 200 and list(body) == ["result"] and len(body["result"]) == 2
    for items in body["result"]:
        assert len(items) == 2
        for item in items:
            assert set(item) == {"document", "score"} and set(item["document"]) == {"id", "contents"}
            assert isinstance(item["score"], float) and isinstance(item["document"]["id"], str)
    assert body["result"][0][0]["document"] == ROWS[3]  # contents exactly as in the corpus
    status, plain = post(service, {"queries": q, "topk": 2, "return_scores": False})
    assert status == 200 and plain["result"] == [[i["document"] for i in items] for items in body["result"]]
    status, default = post(service, {"queries": q[:1]})  # Search-R1 clients may omit topk
    assert status == 200 and len(default["result"][0]) == 3 and set(default["result"][0][0]) == {"id", "contents"}


def test_http_client_and_sync_wrapper_agree_with_zmq(service):
    q = [f"the {NAMES[i]} river" for i in range(5)]
    with SyncRetriever(HttpRetrievalClient(service["http"], timeout_s=30)) as h, \
            SyncRetriever(RetrieverClient(service["endpoint"], timeout_s=30)) as z:
        a, b = h.search(q, topk=4), z.search(q, topk=4)
    assert [[p.id for p in r] for r in a] == [[p.id for p in r] for r in b]
    assert [[p.title for p in r] for r in a] == [[p.title for p in r] for r in b]
    np.testing.assert_allclose([[p.score for p in r] for r in a], [[p.score for p in r] for r in b], atol=1e-4)


class GoodClient(threading.Thread):
    """Keeps searching through the ZeroMQ endpoint while bad input is thrown at the service."""

    def __init__(self, endpoint: str):
        super().__init__(daemon=True)
        self.endpoint, self.ok, self.errors, self.stop = endpoint, 0, [], threading.Event()

    def run(self):
        with SyncRetriever(RetrieverClient(self.endpoint, timeout_s=30, retries=0)) as c:
            while not self.stop.is_set() or self.ok < 3:
                try:
                    res = c.search([f"capital of {NAMES[self.ok % N]}"], topk=2)
                    assert len(res) == 1 and len(res[0]) == 2
                    self.ok += 1
                except Exception as e:  # noqa: BLE001 - recorded and asserted on
                    self.errors.append(repr(e))
                    return


def test_bad_input_gets_errors_while_others_are_served(service):
    good = GoodClient(service["endpoint"])
    good.start()
    ep = service["endpoint"]
    cases = [  # (frames, text in the error, request_id echoed: readable from a header that decodes)
        ([b"\x93not msgpack"], "not valid msgpack", ""),
        ([header("no_such_type", {})], "unknown message type", ""),
        (encode(Hello(role="client", peer_id="p", run_id="r")), "expected retrieve_request", ""),
        ([header("retrieve_request", {"request_id": "a", "queries": [""], "topk": 3})], "query 0 is empty", "a"),
        ([header("retrieve_request", {"request_id": "b", "queries": ["x" * 5000], "topk": 3})], "cap is 4096", "b"),
        ([header("retrieve_request", {"request_id": "c", "queries": ["ok"], "topk": 0})], "topk", "c"),
        ([header("retrieve_request", {"request_id": "d", "queries": ["ok"], "topk": 101})], "topk", "d"),
        ([header("retrieve_request", {"request_id": "e", "queries": [], "topk": 3})], "queries", "e"),
        ([header("retrieve_request", {"request_id": "f", "queries": "ok", "topk": 3})], "queries", "f"),
        ([header("retrieve_request", {"request_id": "g", "queries": ["ok"], "topk": 3}), b"extra"], "frames follow",
         "g"),
        ([header("retrieve_request", {"request_id": 7, "queries": ["ok"], "topk": 3})], "request_id", ""),
        ([header("retrieve_request", {"request_id": "h" * 300, "queries": ["ok"], "topk": 3})], "request_id", ""),
        ([header("retrieve_request", {"request_id": "i", "queries": ["ok"], "topk": 3}, v=99)], "version", "i"),
    ]
    for frames, needle, rid in cases:
        err = raw_request(ep, frames)
        assert isinstance(err, ErrorReply) and err.code == "bad_request" and needle in err.message, (needle, err)
        assert err.request_id == rid, (needle, err)
    capped = raw_request(ep, encode(RetrieveRequest(request_id="cap", queries=["ok"], topk=50)))
    assert isinstance(capped, ErrorReply) and capped.request_id == "cap" and "above the cap 20" in capped.message
    ok = raw_request(ep, encode(RetrieveRequest(request_id="fine", queries=["ok"], topk=20)))
    assert isinstance(ok, RetrieveReply) and ok.request_id == "fine" and len(ok.results[0]) == 20

    url = service["http"]
    for body, needle in [(b"{not json", "not valid JSON"), (b"[1, 2]", "JSON object"),
                         (json.dumps({"queries": "q"}).encode(), "list of strings"),
                         (json.dumps({"queries": [1]}).encode(), "list of strings"),
                         (json.dumps({"queries": [""], "topk": 3}).encode(), "empty"),
                         (json.dumps({"queries": ["x" * 5000]}).encode(), "cap is 4096"),
                         (json.dumps({"queries": ["q"], "topk": 0}).encode(), "between 1 and 20"),
                         (json.dumps({"queries": ["q"], "topk": 21}).encode(), "between 1 and 20"),
                         (json.dumps({"queries": ["q"], "topk": "3"}).encode(), "integer"),
                         (json.dumps({"queries": ["q"], "return_scores": "yes"}).encode(), "true or false"),
                         (json.dumps({"queries": [""], "k": 3}).encode(), "empty")]:  # ignored field, bad query
        status, err = http("POST", url, body)
        assert status == 400 and err["error"]["code"] == "bad_request", (needle, err)
        assert needle in err["error"]["message"], (needle, err)
    assert http("POST", url.replace("/retrieve", "/nope"), b"{}")[0] == 404
    # fields Search-R1 clients may add are ignored, as Search-R1's FastAPI server does
    ignored = 'scout_retriever_http_ignored_fields_total{role="retriever"}'
    before = float(next(x for x in metrics_text(service).splitlines() if x.startswith(ignored)).split()[-1])
    status, body = http("POST", url, json.dumps({"queries": ["q"], "topk": 2, "k": 9, "extra": {"x": 1}}).encode())
    assert status == 200 and len(body["result"][0]) == 2
    assert f"{ignored} {before + 2}" in metrics_text(service)
    assert http("GET", url)[0] == 405
    good.stop.set()
    good.join(timeout=120)
    assert not good.errors and good.ok >= 3
    text = metrics_text(service)
    assert 'outcome="bad_request",role="retriever",source="zmq"' in text
    assert 'outcome="bad_request",role="retriever",source="http"' in text


def cache_hits(svc) -> float:
    line = [x for x in metrics_text(svc).splitlines()
            if x.startswith("scout_retriever_query_cache_total{") and 'result="hit"' in x]
    return float(line[0].split()[-1]) if line else 0.0


def test_metrics_health_and_query_cache(service):
    hits = cache_hits(service)
    status, first = post(service, {"queries": ["metrics please", "metrics please"], "topk": 2, "return_scores": True})
    assert status == 200 and first["result"][0] == first["result"][1]
    assert cache_hits(service) == hits + 1  # the repeat inside one batch is encoded once
    status, again = post(service, {"queries": ["metrics please"], "topk": 2, "return_scores": True})
    assert again["result"][0] == first["result"][0] and cache_hits(service) == hits + 2
    text = metrics_text(service)
    for name in ("scout_retriever_requests_total", "scout_retriever_queries_total", "scout_retriever_batch_queries",
                 "scout_retriever_encode_seconds", "scout_retriever_search_seconds", "scout_retriever_merge_seconds",
                 "scout_retriever_request_seconds", 'scout_retriever_shard_up{role="retriever",shard="1"} 1.0'):
        assert name in text, name
    h = health(service)
    assert h["status"] == "ok" and h["passages"] == N and [s["rows"] for s in h["shards"]] == [[0, 100], [100, 200]]
    assert all(s["pid"] and s["up"] for s in h["shards"])


def batch_stats(svc) -> dict[str, float]:
    """scout_retriever_batch_queries: sum, count and the le="64.0" bucket (64 = max_batch here)."""
    out = {}
    for line in metrics_text(svc).splitlines():
        if line.startswith("scout_retriever_batch_queries_sum{"):
            out["sum"] = float(line.split()[-1])
        elif line.startswith("scout_retriever_batch_queries_count{"):
            out["count"] = float(line.split()[-1])
        elif line.startswith("scout_retriever_batch_queries_bucket{") and 'le="64.0"' in line:
            out["le64"] = float(line.split()[-1])
    return out


def test_concurrent_one_query_clients_are_micro_batched(service):
    """N separate clients with one query each: the router encodes and searches them together."""
    n = 24
    before = batch_stats(service)

    async def one(i: int):
        async with RetrieverClient(service["endpoint"], timeout_s=30, retries=0) as c:
            return await c.search([f"who founded {NAMES[i]}, asked by client {i}?"], topk=2)

    async def go():
        return await asyncio.gather(*(one(i) for i in range(n)))

    results = asyncio.run(go())
    assert all(len(r) == 1 and len(r[0]) == 2 for r in results)
    after = batch_stats(service)
    queries, batches = after["sum"] - before["sum"], after["count"] - before["count"]
    assert queries == n and batches < n, (queries, batches)  # mean batch above one query


def test_a_request_above_max_batch_is_split_and_answered_in_order(service, local):
    """max_batch (64 here) bounds every encoder batch and shard search: one request of 150
    queries goes as pieces of at most 64, and its answer keeps the query order."""
    queries = [f"the capital of {NAMES[i % N]}, question {i}" for i in range(150)]
    before = batch_stats(service)
    reply = raw_request(service["endpoint"], encode(RetrieveRequest(request_id="big", queries=queries, topk=4)))
    assert isinstance(reply, RetrieveReply) and reply.request_id == "big" and len(reply.results) == 150
    after = batch_stats(service)
    assert after["sum"] - before["sum"] == 150 and after["count"] - before["count"] >= 3
    assert after["le64"] == after["count"]  # no batch above max_batch, ever
    scores, rows = local.search_vectors(local.encode_queries(queries), 4)
    assert [[p.id for p in r] for r in reply.results] == [[str(x) for x in row] for row in rows]
    np.testing.assert_allclose([[p.score for p in r] for r in reply.results], scores, atol=1e-4)


def test_killed_shard_restarts(service):
    """Last in this module: SIGKILL a shard of the shared service; it is reported (health,
    deaths metric), restarted with a new pid, and the router answers throughout."""
    before = health(service)["shards"][0]
    os.kill(before["pid"], signal.SIGKILL)
    wait_until(lambda: health(service)["shards"][0]["deaths"] == 1, 30, "death reported", service["proc"])
    assert 'scout_retriever_shard_deaths_total{role="retriever",shard="0"} 1.0' in metrics_text(service)
    status, body = post(service, {"queries": ["anyone there?"], "topk": 1})
    assert status in (200, 503)  # answered either way: served after the restart, or "unavailable" before
    if status == 503:
        assert body["error"]["code"] == "unavailable" and "shard 0" in body["error"]["message"]
    wait_until(lambda: health(service)["status"] == "ok", 60, "shard restarted", service["proc"])
    after = health(service)["shards"][0]
    assert after["pid"] != before["pid"] and after["up"]
    status, body = post(service, {"queries": [f"capital of {NAMES[0]}"], "topk": 1})
    assert status == 200 and body["result"][0][0]["id"] == "0"


def test_shard_death_is_seen_whole_by_health():
    """The flake of the test below: /health (its own thread) used to reap a dead shard through
    Popen.poll() and report it down before the router thread had recorded its exit code and
    metrics. Now only the router's poll() reaps, and records everything before `up` drops."""
    from common.config import RetrieverConfig
    from common.metrics import Metrics
    from retriever.shards import ShardSet

    m = Metrics("retriever")
    shards = ShardSet(RetrieverConfig(shard_restart_s=0), "unused", {"shards": [{"start": 0, "end": 1, "count": 1}]},
                      "ipc://unused", [], metrics=m)
    s = shards.shards[0]
    s.proc, s.ready = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]), True
    try:
        os.kill(s.proc.pid, signal.SIGKILL)
        wait_until(lambda: open(f"/proc/{s.proc.pid}/stat").read().split(") ")[1][0] == "Z", 10, "a zombie")
        assert [h["up"] for h in shards.health()] == [True]  # dead, but the router has not looked yet
        assert shards.poll(time.monotonic()) == [0]
        h = shards.health()[0]
        assert (h["up"], h["alive"], h["last_exit"], h["deaths"]) == (False, False, -signal.SIGKILL, 1)
        assert 'scout_retriever_shard_up{role="retriever",shard="0"} 0.0' in m.render().decode()
    finally:
        s.proc.kill()
        s.proc.wait()


def test_dead_shard_without_restart_and_sigterm(index_dir, procs, ipc_path, free_port):
    """With restarts off: a killed shard makes the service degraded, callers get a clear
    'unavailable' (ZeroMQ and HTTP), the router keeps answering; SIGTERM stops everything."""
    svc = start_service(procs, index_dir, ipc_path, free_port(), free_port(), "retriever.shard_restart_s=0")
    shards = health(svc)["shards"]
    os.kill(shards[1]["pid"], signal.SIGKILL)
    wait_until(lambda: health(svc)["status"] == "degraded", 30, "degraded health", svc["proc"])
    h = health(svc)
    assert h["shards"][1]["up"] is False and h["shards"][1]["last_exit"] == -signal.SIGKILL and h["shards"][0]["up"]
    assert 'scout_retriever_shard_up{role="retriever",shard="1"} 0.0' in metrics_text(svc)

    async def go():
        async with RetrieverClient(svc["endpoint"], timeout_s=10, retries=1, backoff_s=0.01) as c:
            with pytest.raises(RetrievalError) as err:
                await c.search(["capital?"], topk=2)
            return err.value

    err = asyncio.run(go())
    assert err.code == "unavailable" and "shard 1 is down" in str(err)
    status, body = post(svc, {"queries": ["capital?"], "topk": 2})
    assert status == 503 and body["error"]["code"] == "unavailable"
    assert svc["proc"].poll() is None
    os.kill(svc["proc"].pid, signal.SIGTERM)  # the router only: it must stop its shards itself
    assert svc["proc"].wait(timeout=30) == 0
    with pytest.raises(ProcessLookupError):
        os.kill(shards[0]["pid"], 0)  # the surviving shard was stopped too


def _faiss_gpu() -> bool:
    try:
        import faiss

        return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    except Exception:
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _faiss_gpu(), reason="needs faiss-gpu and a GPU")
def test_gpu_shards_match_the_cpu_search(index_dir, local, procs, ipc_path, free_port, tmp_path):
    """--gpus 0 on a Flat index: shards search on cuda:0 (float16 copies), the encoder runs on
    the GPU; results are the CPU in-process search's, up to float16 rounding. An HNSW index
    (no GPU version in faiss) with --gpus stays on the CPU and serves instead of crash-looping."""
    svc = start_service(procs, index_dir, ipc_path, free_port(), free_port(), gpus="0")
    assert [s["device"] for s in health(svc)["shards"]] == ["cuda:0", "cuda:0"]
    queries = [f"what is the capital of {n}?" for n in NAMES[::10]]
    status, body = post(svc, {"queries": queries, "topk": 5, "return_scores": True})
    assert status == 200
    q = local.encode_queries(queries)
    scores, rows = local.search_vectors(q, 5)
    all_scores, all_rows = local.search_vectors(q, N)
    for i, items in enumerate(body["result"]):
        exact = dict(zip(all_rows[i].tolist(), all_scores[i].tolist()))
        got = [(int(it["document"]["id"]), it["score"]) for it in items]
        np.testing.assert_allclose([s for _, s in got], scores[i], atol=5e-3)
        assert all(abs(exact[r] - s) < 5e-3 for r, s in got), (got, rows[i])
        if scores[i][0] - scores[i][1] > 1e-2:
            assert got[0][0] == rows[i][0]

    hnsw = tmp_path / "hnsw"
    corpus = write_jsonl(tmp_path / "corpus.jsonl", ROWS)
    build_index_here(corpus, hnsw, shards=2, factory="HNSW32")
    svc = start_service(procs, hnsw, ipc_path, free_port(), free_port(), gpus="0")
    h = health(svc)
    assert [s["device"] for s in h["shards"]] == ["cpu", "cpu"] and all(s["deaths"] == 0 for s in h["shards"])
    status, body = post(svc, {"queries": [f"capital of {NAMES[0]}"], "topk": 1})
    assert status == 200 and body["result"][0][0]["id"] == "0"
