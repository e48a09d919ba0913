"""Slow clients on the Search-R1 HTTP API, for both servers (retriever.http_server): a request that
trickles in (slowloris) is dropped at retriever.http_request_deadline_s without blocking normal
requests, and connections beyond retriever.http_max_connections are answered 503 at once, so
neither threads nor connections grow without bound. A real `cli.py retriever` per server."""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from pathlib import Path

import pytest

from bench.faults import build_index_here
from tests.conftest import Procs
from tests.test_http_auth import ROWS, call, start
from tests.test_retriever_index import write_jsonl

DEADLINE_S = 3.0
CAP = 8
BODY = json.dumps({"queries": ["capital of somewhere"], "topk": 2}).encode()
HEAD = (f"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(BODY)}\r\n\r\n").encode()


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("slow")
    out = base / "index"
    return build_index_here(write_jsonl(base / "c.jsonl", ROWS), out)


# uvicorn is the alternative server (retriever.http_server): its run is `long`, kept out of CI time
@pytest.fixture(scope="module", params=["threading", pytest.param("uvicorn", marks=pytest.mark.long)])
def svc(request, index_dir, tmp_path_factory):
    if request.param == "uvicorn":  # installed with vllm (fastapi[standard]); not a direct requirement
        for module in ("uvicorn", "starlette", "httptools"):
            pytest.importorskip(module)
    procs = Procs()
    try:
        yield start(procs, index_dir, tmp_path_factory.mktemp("log") / "retriever.log",
                    "--set", f"retriever.http_server={request.param!r}",
                    "--set", f"retriever.http_request_deadline_s={DEADLINE_S}",
                    "--set", f"retriever.http_max_connections={CAP}")
    finally:
        procs.stop_all()


def port_of(svc) -> int:
    return int(svc["retrieve"].rsplit(":", 1)[1].split("/")[0])


def read_to_close(s: socket.socket, timeout_s: float = 5.0) -> bytes:
    got, end = b"", time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            part = s.recv(4096)
        except OSError:
            break
        if not part:
            break
        got += part
    return got


def trickle(port: int, at_once: bytes, slowly: bytes, out: dict, every_s: float = 0.3) -> None:
    """Send `at_once`, then `slowly` a byte every `every_s`, until the server answers or closes the
    connection; record how long it held on and what came back. No single read on the server waits
    long, so only a whole-request deadline ends it."""
    t0 = time.monotonic()
    got = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        if at_once:
            s.sendall(at_once)
        for b in slowly:
            try:
                s.sendall(bytes([b]))
            except OSError:
                break
            if select.select([s], [], [], every_s)[0]:  # an answer, or the server closed the connection
                got = read_to_close(s)  # the status line and the JSON body may come in separate writes
                break
    out.update(held_s=time.monotonic() - t0, got=got)


def threads_of(svc) -> int:
    status = Path(f"/proc/{svc['proc'].pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("Threads:")).split()[1])


@pytest.mark.slow
def test_a_slow_client_is_dropped_at_the_deadline_and_blocks_no_one(svc):
    port = port_of(svc)
    slow_head, slow_body = {}, {}  # trickling in ~30 s: the request line and headers; ~15 s: the body
    slow = [threading.Thread(target=trickle, args=(port, b"", HEAD, slow_head)),
            threading.Thread(target=trickle, args=(port, HEAD, BODY, slow_body))]
    for t in slow:
        t.start()
    time.sleep(0.5)
    for _ in range(3):  # normal requests are answered while both trickle
        status, _, raw = call("POST", svc["retrieve"], BODY, timeout=30)
        assert status == 200 and len(json.loads(raw)["result"][0]) == 2
    for t in slow:
        t.join(timeout=60)
    for r in (slow_head, slow_body):
        assert r["held_s"] < DEADLINE_S + 5, r  # dropped at the deadline, not held for the whole trickle
    assert slow_body["got"].startswith(b"HTTP/1.1 408"), slow_body
    assert json.loads(slow_body["got"].split(b"\r\n\r\n", 1)[1])["error"]["code"] == "bad_request"
    assert call("POST", svc["retrieve"], BODY, timeout=30)[0] == 200


@pytest.mark.slow
def test_connections_beyond_the_cap_are_refused_at_once(svc):
    port = port_of(svc)
    time.sleep(DEADLINE_S + 1)  # the previous test's connections are gone
    threads_before = threads_of(svc)
    results = [{} for _ in range(CAP + 6)]
    slow = [threading.Thread(target=trickle, args=(port, b"", HEAD, r, 1.0)) for r in results]
    for t in slow:
        t.start()
    time.sleep(1.0)
    threads_during = threads_of(svc)
    t0 = time.monotonic()
    status, headers, raw = call("POST", svc["retrieve"], BODY, timeout=30)
    assert status == 503 and time.monotonic() - t0 < DEADLINE_S, (status, raw)  # at once, not after a wait
    assert headers["Content-Type"] == "application/json"
    assert json.loads(raw)["error"]["code"] == "unavailable" and "http_max_connections" in raw.decode()
    assert threads_during <= threads_before + CAP + 1, (threads_before, threads_during)  # + the accepting thread
    for t in slow:
        t.join(timeout=60)
    refused = [r for r in results if r["got"].startswith(b"HTTP/1.1 503")]
    assert len(refused) >= 6 - 1, results  # those beyond the cap (one slot may be free a moment)
    assert all(r["held_s"] < DEADLINE_S + 5 for r in results), results
    status, _, raw = call("POST", svc["retrieve"], BODY, timeout=30)  # the slots are free again
    assert status == 200, raw
