"""Retriever clients without a service: the formatting helper, Search-R1 answer parsing, and the
clear failure (RetrievalError, never an empty list) when nothing answers."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
import time

import pytest

from common.config import load_config
from common.protocol import Passage
from retriever.client import (HttpRetrievalClient, RetrievalError, RetrieverClient, SyncRetriever, _Fail,
                              format_passages, make_client, parse_search_r1)


def test_format_passages_search_r1_style():
    ps = [Passage(id="1", title="Zorland", text="The capital is Mirabel.", score=0.9),
          Passage(id="2", title="Mirabel", text="A city.", score=0.5)]
    assert format_passages(ps) == "Doc 1(Title: Zorland) The capital is Mirabel.\nDoc 2(Title: Mirabel) A city.\n"
    assert format_passages([]) == ""


def test_parse_search_r1_both_modes():
    doc = {"id": "7", "contents": '"Zorland"\nThe capital is Mirabel.'}
    with_scores = parse_search_r1({"result": [[{"document": doc, "score": 0.25}], []]}, 2)
    assert with_scores[0][0] == Passage(id="7", title="Zorland", text="The capital is Mirabel.", score=0.25)
    assert with_scores[1] == []
    plain = parse_search_r1({"result": [[doc]]}, 1)
    assert plain[0][0].title == "Zorland" and math.isnan(plain[0][0].score)
    for bad in ({"result": [[doc]]}, {"nope": []}, {"result": [["x"]]}, [1, 2]):
        with pytest.raises(_Fail):
            parse_search_r1(bad, 2 if bad == {"result": [[doc]]} else 1)


def test_zmq_client_raises_when_service_is_down(ipc_path):
    async def go():
        client = RetrieverClient(ipc_path(), timeout_s=0.2, retries=2, backoff_s=0.01)
        t0 = time.monotonic()
        with pytest.raises(RetrievalError) as err:
            await client.search(["where is zorland"], topk=3)
        await client.close()
        return err.value, time.monotonic() - t0

    err, _ = asyncio.run(go())
    assert err.code == "timeout" and err.attempts == 3 and "after 3 attempt(s)" in str(err)


def test_client_refuses_bad_input_without_retrying(ipc_path):
    async def go():
        client = RetrieverClient(ipc_path(), timeout_s=5, retries=5)
        for queries, topk in ((["  "], 3), (["ok"], 0), (["ok"], 101), (["x" * 5000], 3)):
            with pytest.raises(RetrievalError) as err:
                await client.search(queries, topk)
            assert err.value.code == "bad_request" and err.value.attempts == 0
        assert await client.search([], 3) == []
        await client.close()

    asyncio.run(go())


def test_http_client_raises_when_server_is_down():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    client = SyncRetriever(HttpRetrievalClient(f"http://127.0.0.1:{port}", timeout_s=0.5, retries=1, backoff_s=0.01))
    try:
        assert client.client.url.endswith("/retrieve")
        with pytest.raises(RetrievalError) as err:
            client.search(["where is zorland"], topk=3)
        assert err.value.code == "unavailable" and err.value.attempts == 2
    finally:
        client.close()
    with pytest.raises(ValueError):
        HttpRetrievalClient("ftp://somewhere")


def test_make_client_follows_actor_config():
    cfg = load_config(None, ["actor.retriever_url='http://127.0.0.1:8000/retrieve'", "actor.retrieval_retries=2"])
    c = make_client(cfg)
    assert isinstance(c, HttpRetrievalClient) and c.retries == 2
    cfg = load_config(None, ["actor.retriever_endpoint='ipc:///tmp/x'", "actor.retrieval_timeout_s=3.5"])
    c = make_client(cfg)
    assert isinstance(c, RetrieverClient) and c.endpoint == "ipc:///tmp/x" and c.timeout_s == 3.5


class DripServer:
    """A real HTTP server that answers a valid Search-R1 body one byte at a time, `gap` seconds
    apart: every socket read succeeds, only the whole answer is slow."""

    BODY = json.dumps({"result": [[{"document": {"id": "1", "contents": '"T"\nslow text'}, "score": 0.5}]]}).encode()

    def __init__(self, gap: float):
        self.gap, self.threads = gap, []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            t = threading.Thread(target=self._drip, args=(conn,), daemon=True)
            t.start()
            self.threads.append(t)

    def _drip(self, conn: socket.socket):
        with conn:
            conn.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, rest = data.split(b"\r\n\r\n", 1)
            length = int([h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")][0].split(b":")[1])
            while len(rest) < length:
                rest += conn.recv(65536)
            try:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(self.BODY))
                for i in range(len(self.BODY)):
                    if self.stop.is_set():
                        return
                    conn.sendall(self.BODY[i:i + 1])
                    time.sleep(self.gap)
            except OSError:
                return  # the client gave up and closed the connection

    def close(self):
        self.stop.set()
        self.thread.join(5)
        for t in self.threads:
            t.join(5)
        self.sock.close()


def test_http_client_timeout_bounds_a_slow_drip_answer():
    """urllib's timeout is per socket operation; the client's timeout_s bounds the whole attempt."""
    server = DripServer(gap=0.02)  # the whole answer takes about 1.7 s, no single read over 0.02 s
    url = f"http://127.0.0.1:{server.port}/retrieve"
    try:
        with SyncRetriever(HttpRetrievalClient(url, timeout_s=0.4, retries=1, backoff_s=0.01)) as c:
            t0 = time.monotonic()
            with pytest.raises(RetrievalError) as err:
                c.search(["where is zorland"], topk=1)
            took = time.monotonic() - t0
        assert err.value.code == "timeout" and err.value.attempts == 2, err.value
        assert took < 1.5, took  # two attempts of 0.4 s (+ backoff), not two full drips
        with SyncRetriever(HttpRetrievalClient(url, timeout_s=20, retries=0)) as c:
            got = c.search(["where is zorland"], topk=1)  # the same server, given the time, answers fine
        assert got[0][0] == Passage(id="1", title="T", text="slow text", score=0.5)
    finally:
        server.close()


def test_close_releases_a_search_another_thread_waits_on():
    """A search in flight when the client closes (an actor exiting at the end of a run while its
    search threads wait on the server) ends at once with CancelledError; before, it waited forever
    on an event loop that no longer ran, and the process could not exit."""
    import concurrent.futures

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections, never answers
    port = silent.getsockname()[1]
    client = SyncRetriever(HttpRetrievalClient(f"http://127.0.0.1:{port}/retrieve", timeout_s=60.0, retries=0))
    outcome: list = []

    def search():
        try:
            outcome.append(client.search(["zorland"], 3))
        except BaseException as e:  # noqa: BLE001 (the test records what the caller sees)
            outcome.append(e)

    th = threading.Thread(target=search, daemon=True)
    th.start()
    time.sleep(0.5)  # the request is on the wire, waiting
    t0 = time.monotonic()
    client.close()
    th.join(10)
    try:
        assert not th.is_alive(), "the waiting search was left blocked"
        assert isinstance(outcome[0], concurrent.futures.CancelledError), outcome
        assert time.monotonic() - t0 < 10
    finally:
        silent.close()
