"""What actors use to search: one interface over our ZeroMQ service or a Search-R1 HTTP server.

    client = make_client(cfg)                       # actor.retriever_url -> HTTP, else ZeroMQ
    passages = await client.search(["q1", "q2"], topk=3)   # list[list[Passage]], best first
    observation = format_passages(passages[0])      # "Doc 1(Title: T) text\\nDoc 2(...)...\\n"

Every call has a deadline (`timeout_s` per attempt), failed attempts are retried with
exponential backoff and jitter (`retries` times, only for errors that can pass: unavailable,
timeout, internal), and a call that cannot be answered raises `RetrievalError` with a `code`
(never an empty list that would look like "nothing found"). Large calls are split into requests
of at most `max_queries_per_request` queries, sent concurrently. `SyncRetriever` wraps either
client for synchronous code.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import math
import random
import threading
import time
import urllib.error
import urllib.request
import uuid
from typing import Any, Awaitable
from urllib.parse import urlparse

import zmq
import zmq.asyncio
from pydantic import ValidationError

from common.config import TransportConfig
from common.wire import ProtocolError, decode, encode
from common.protocol import ErrorReply, Passage, RetrieveReply, RetrieveRequest
from common.transport import connect
from retriever.docstore import split_title

log = logging.getLogger("scout.retriever.client")

RETRYABLE = {"unavailable", "timeout", "internal"}
PASSAGES_PER_REPLY = 2048


class RetrievalError(RuntimeError):
    """Retrieval could not be done. `code`: bad_request (fix the call), unavailable, timeout,
    internal, unauthorised; `attempts`: how many requests were tried."""

    def __init__(self, message: str, code: str = "unavailable", attempts: int = 0):
        super().__init__(message)
        self.code, self.attempts = code, attempts


class _Fail(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def format_passages(passages: list[Passage]) -> str:
    """Search-R1's observation text: one `Doc i(Title: T) text` line per passage."""
    return "".join(f"Doc {i}(Title: {p.title}) {p.text}\n" for i, p in enumerate(passages, 1))


def _check_request(queries: list[str], topk: int) -> None:
    try:
        RetrieveRequest(request_id="check", queries=list(queries), topk=topk)
    except ValidationError as e:
        msg = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'request'}: {err['msg']}" for err in e.errors()[:3])
        raise RetrievalError(f"invalid retrieval request: {msg}", code="bad_request") from None


class _RetryingClient:
    """Deadline + retry/backoff + request splitting shared by both clients."""

    def __init__(self, timeout_s: float, retries: int, backoff_s: float, backoff_max_s: float,
                 max_queries_per_request: int):
        if timeout_s <= 0 or retries < 0 or max_queries_per_request < 1:
            raise ValueError("timeout_s > 0, retries >= 0 and max_queries_per_request >= 1 are required")
        self.timeout_s, self.retries = timeout_s, retries
        self.backoff_s, self.backoff_max_s = backoff_s, backoff_max_s
        self.max_queries_per_request = max_queries_per_request

    async def search(self, queries: list[str], topk: int = 3) -> list[list[Passage]]:
        queries = list(queries)
        if not queries:
            return []
        # at most ~2048 passages per reply keeps replies well under the 4 MiB header cap
        step = max(1, min(self.max_queries_per_request, PASSAGES_PER_REPLY // max(1, topk)))
        parts = await asyncio.gather(*(self._with_retries(queries[i:i + step], topk)
                                       for i in range(0, len(queries), step)))
        return [r for part in parts for r in part]

    async def _with_retries(self, queries: list[str], topk: int) -> list[list[Passage]]:
        _check_request(queries, topk)
        last = _Fail("unavailable", "no attempt made")
        for attempt in range(self.retries + 1):
            if attempt:
                delay = min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1))
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            try:
                results = await self._attempt(queries, topk)
            except _Fail as e:
                last = e
                if e.code not in RETRYABLE:
                    break
                log.debug("retrieval attempt %d failed: %s (%s)", attempt + 1, e, e.code)
                continue
            if len(results) != len(queries):
                last = _Fail("internal", f"{len(results)} result lists for {len(queries)} queries")
                continue
            return results
        n = attempt + 1
        raise RetrievalError(f"retrieval failed after {n} attempt(s) against {self.target}: {last} ({last.code})",
                             code=last.code, attempts=n)

    target = "?"

    async def _attempt(self, queries: list[str], topk: int) -> list[list[Passage]]:
        raise NotImplementedError

    async def close(self) -> None:
        pass

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()


class RetrieverClient(_RetryingClient):
    """asyncio client of the scout retriever (ZeroMQ DEALER); concurrent calls share one socket
    and are matched to replies by request id."""

    def __init__(self, endpoint: str, transport: TransportConfig | None = None, timeout_s: float = 10.0,
                 retries: int = 3, backoff_s: float = 0.1, backoff_max_s: float = 5.0,
                 max_queries_per_request: int = 256, client_key: str = "client"):
        super().__init__(timeout_s, retries, backoff_s, backoff_max_s, max_queries_per_request)
        self.endpoint, self.target = endpoint, endpoint
        self.transport = transport or TransportConfig()
        self.client_key = client_key
        self._sock: zmq.asyncio.Socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: asyncio.Task | None = None
        self._waiting: dict[str, asyncio.Future] = {}

    def _ensure(self) -> zmq.asyncio.Socket:
        loop = asyncio.get_running_loop()
        if self._sock is not None and self._loop is loop:
            return self._sock
        self._drop_socket()
        self._sock = connect(zmq.asyncio.Context.instance(), zmq.DEALER, self.endpoint, self.transport,
                             client_key=self.client_key)
        self._loop = loop
        self._reader = loop.create_task(self._read_loop(self._sock))
        return self._sock

    async def _read_loop(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            try:
                frames = await sock.recv_multipart(copy=False)
            except zmq.Again:
                continue  # the socket's receive timeout passed while idle: keep listening
            except (zmq.ZMQError, asyncio.CancelledError):
                return
            try:
                msg = decode(frames, expect=(RetrieveReply, ErrorReply))
            except ProtocolError as e:
                log.warning("unreadable reply from %s: %s", self.endpoint, e)
                continue
            fut = self._waiting.get(msg.request_id)
            if fut is not None and not fut.done():
                fut.set_result(msg)
            elif isinstance(msg, ErrorReply) and not msg.request_id:
                log.warning("error from %s without a request id: %s", self.endpoint, msg.message)

    async def _attempt(self, queries: list[str], topk: int) -> list[list[Passage]]:
        sock = self._ensure()
        rid = uuid.uuid4().hex
        fut = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        deadline = time.monotonic() + self.timeout_s
        try:
            frames = encode(RetrieveRequest(request_id=rid, queries=queries, topk=topk))
            await asyncio.wait_for(sock.send_multipart(frames, copy=False), self.timeout_s)
            reply = await asyncio.wait_for(fut, max(0.001, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise _Fail("timeout", f"no reply within {self.timeout_s:g} s") from None
        except zmq.ZMQError as e:
            raise _Fail("unavailable", f"socket error: {e}") from None
        finally:
            self._waiting.pop(rid, None)
        if isinstance(reply, ErrorReply):
            raise _Fail(reply.code, reply.message)
        return reply.results

    def _drop_socket(self) -> None:
        if self._reader is not None and self._loop is not None and not self._loop.is_closed():
            self._reader.cancel()
        if self._sock is not None:
            self._sock.close(0)
        self._sock = self._reader = self._loop = None

    async def close(self) -> None:
        reader = self._reader
        self._drop_socket()
        if reader is not None:
            try:
                await reader
            except (asyncio.CancelledError, RuntimeError):
                pass


class HttpRetrievalClient(_RetryingClient):
    """Client of any Search-R1 retrieval server (`POST /retrieve`), ours included."""

    def __init__(self, url: str, timeout_s: float = 10.0, retries: int = 3, backoff_s: float = 0.1,
                 backoff_max_s: float = 5.0, max_queries_per_request: int = 256):
        super().__init__(timeout_s, retries, backoff_s, backoff_max_s, max_queries_per_request)
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"retriever url {url!r}: expected http://host:port/retrieve")
        if parsed.path in ("", "/"):
            url = url.rstrip("/") + "/retrieve"
        self.url = self.target = url

    async def _attempt(self, queries: list[str], topk: int) -> list[list[Passage]]:
        """One POST, bounded by timeout_s in total: urllib's timeout is per socket operation, so a
        server that drips its answer a byte at a time would otherwise hold the call for ever."""
        body = json.dumps({"queries": queries, "topk": topk, "return_scores": True}).encode()
        deadline = time.monotonic() + self.timeout_s
        try:
            data = await asyncio.wait_for(asyncio.to_thread(self._post, body, deadline), self.timeout_s)
        except asyncio.TimeoutError:
            raise _Fail("timeout", f"{self.url}: no complete answer within {self.timeout_s:g} s") from None
        return parse_search_r1(data, len(queries))

    def _post(self, body: bytes, deadline: float) -> Any:
        """Runs in a worker thread; it also stops reading at the deadline (soon after the caller
        gave up), so slow servers do not pile up threads."""
        req = urllib.request.Request(self.url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                raw = _read_until(resp, deadline)
        except urllib.error.HTTPError as e:
            detail = e.read()[:2000].decode("utf-8", "replace")
            code = "bad_request" if 400 <= e.code < 500 and e.code not in (408, 429) else (
                "timeout" if e.code in (408, 504) else "unavailable")
            raise _Fail(code, f"HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
            reason = getattr(e, "reason", e)
            code = "timeout" if isinstance(reason, TimeoutError) or "timed out" in str(reason) else "unavailable"
            raise _Fail(code, f"{self.url}: {reason}") from None
        try:
            return json.loads(raw)
        except json.JSONDecodeError as e:
            raise _Fail("internal", f"answer is not JSON: {e}") from None


def _read_until(resp, deadline: float, piece: int = 1 << 16) -> bytes:
    chunks = []
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError("the answer did not arrive in time")
        chunk = resp.read1(piece)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def parse_search_r1(data: Any, n: int) -> list[list[Passage]]:
    """Search-R1 `{"result": [...]}` (with or without scores) -> passages; malformed -> _Fail."""
    result = data.get("result") if isinstance(data, dict) else None
    if not isinstance(result, list) or len(result) != n:
        raise _Fail("internal", f"answer has no 'result' list of {n} entries")
    out = []
    for items in result:
        if not isinstance(items, list):
            raise _Fail("internal", "each entry of 'result' must be a list")
        lst = []
        for item in items:
            doc, score = (item.get("document"), item.get("score")) if isinstance(item, dict) and "document" in item \
                else (item, None)
            if not isinstance(doc, dict):
                raise _Fail("internal", "a result item is not a document object")
            if "contents" in doc:
                title, text = split_title(str(doc["contents"]))
            else:
                title, text = str(doc.get("title", "")), str(doc.get("text", ""))
            s = float(score) if isinstance(score, (int, float)) and not isinstance(score, bool) else math.nan
            lst.append(Passage(id=str(doc.get("id", "")), title=title, text=text, score=s))
        out.append(lst)
    return out


class SyncRetriever:
    """Synchronous wrapper: runs an async client on a private event loop thread."""

    def __init__(self, client: _RetryingClient):
        self.client = client
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="retriever-client", daemon=True)
        self._thread.start()
        self._lock = threading.Lock()
        self._pending: set[concurrent.futures.Future] = set()  # calls other threads are waiting on

    def _run(self, coro: Awaitable, timeout: float | None = None) -> Any:
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        with self._lock:
            self._pending.add(fut)
        try:
            return fut.result(timeout)
        finally:
            with self._lock:
                self._pending.discard(fut)

    def search(self, queries: list[str], topk: int = 3) -> list[list[Passage]]:
        """Raises RetrievalError, or concurrent.futures.CancelledError when the client is closed
        meanwhile."""
        return self._run(self.client.search(queries, topk))

    def close(self) -> None:
        """Close the client; searches other threads still wait on are cancelled (they raise
        CancelledError) rather than left blocked on a loop that no longer runs, which would
        keep the process from exiting."""
        if self._loop.is_closed():
            return
        with self._lock:
            pending = list(self._pending)
        for fut in pending:
            fut.cancel()
        try:
            self._run(self.client.close(), timeout=5.0)
        except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def make_client(cfg) -> _RetryingClient:
    """The client an actor should use: `actor.retriever_url` (an external Search-R1 server)
    when set, else our ZeroMQ service at `actor.retriever_endpoint`."""
    a = cfg.actor
    common = {"timeout_s": a.retrieval_timeout_s, "retries": a.retrieval_retries}
    if a.retriever_url:
        return HttpRetrievalClient(a.retriever_url, **common)
    return RetrieverClient(a.retriever_endpoint, transport=cfg.transport, **common)
