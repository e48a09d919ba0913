"""The retriever router: micro-batching across clients, one encode, fan-out, merge.

    ZeroMQ DEALER clients ──RetrieveRequest──▶ front ROUTER ─┐
    HTTP /retrieve threads ──submit() (Future)───────────────┤  validate (bad input -> ErrorReply
                                                             ▼   to that caller only)
                                                pending queue (FIFO of requests)
                       (a request above max_batch queries is queued as pieces of max_batch)
                       batch = requests / pieces up to max_batch queries, once the oldest has
                       waited max_wait_ms or the batch is full, the encoder is idle and fewer
                       than max_inflight batches are at the shards
                                                             ▼
        encoder thread: distinct queries not in the LRU vector cache (torch, no grad) ─┐
                                                                                      ▼
               back ROUTER ── ShardSearch(seq, k, vectors) ──▶ every shard process (FAISS)
                           ◀── ShardResult(seq, scores, global rows) ──
                                                             ▼
                 merge top-k by score ─▶ document store (memmap) ─▶ RetrieveReply / HTTP JSON

Everything but encoding runs on one thread (the loop below); the encoder thread wakes the loop
through a pipe, as do HTTP threads. A shard that dies or stops answering fails only the batches
it held, with ErrorReply(code="unavailable" / "timeout"); while any shard is down, new requests
are answered "unavailable" at once (no partial results that would look like real answers).
`retriever.max_batch` is a hard bound: no encoder batch and no shard search holds more queries;
the pieces of a large request are answered together, in order, or fail together.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import os
import queue
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import zmq

from common.wire import MAX_STR, ProtocolError, decode, encode
from common.protocol import (ErrorReply, Passage, RetrieveReply, RetrieveRequest, ShardHello, ShardResult,
                             ShardSearch, error_frames)
from common.transport import bind, split_envelope
from retriever.docstore import DocStore, split_title
from retriever.index import merge_topk

log = logging.getLogger("scout.retriever.router")

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
MAX_TEXT = 1 << 20


class ServiceError(RuntimeError):
    """An error answer for an HTTP caller (same codes as ErrorReply)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class Pending:
    queries: list[str]
    topk: int
    source: str  # "zmq" | "http"
    request_id: str
    envelope: list | None = None
    future: concurrent.futures.Future | None = None
    arrived: float = field(default_factory=time.monotonic)
    answered: bool = False
    whole: Pending | None = None  # set on a piece of a request above max_batch: answers go there
    offset: int = 0  # a piece's first query within `whole`
    left: int = 0  # on a split request: pieces not answered yet
    parts: list = field(default_factory=list)  # on a split request: (offset, scores, rows) per piece


@dataclass
class Batch:
    seq: int
    items: list[Pending]
    k: int
    vectors: np.ndarray | None = None
    error: str = ""
    waiting: set = field(default_factory=set)
    parts: dict = field(default_factory=dict)
    sent_at: float = 0.0
    deadline: float = 0.0

    @property
    def n(self) -> int:
        return sum(len(p.queries) for p in self.items)


class Router:
    def __init__(self, cfg, manifest: dict, docs: DocStore, metrics, ctx: zmq.Context | None = None):
        self.cfg, self.rc, self.manifest, self.docs = cfg, cfg.retriever, manifest, docs
        self.ctx = ctx or zmq.Context.instance()
        self.encoder = None
        self.shards = None  # ShardSet, attached by the service
        self.front: zmq.Socket | None = None
        self.back = self.ctx.socket(zmq.ROUTER)
        self.back.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.back.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.back.setsockopt(zmq.LINGER, 0)
        self.back.setsockopt(zmq.SNDTIMEO, 1000)
        self.poller = zmq.Poller()
        self.poller.register(self.back, zmq.POLLIN)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.poller.register(self._wake_r, zmq.POLLIN)
        self.stop = threading.Event()
        self.pending: deque[Pending] = deque()
        self.pending_queries = 0
        self.submitted: queue.SimpleQueue[Pending] = queue.SimpleQueue()
        self.to_encode: queue.Queue[Batch | None] = queue.Queue()
        self.encoded: queue.SimpleQueue[Batch] = queue.SimpleQueue()
        self.encoding: Batch | None = None
        self.inflight: dict[int, Batch] = {}
        self.seq = itertools.count()
        self.ready = False
        self._last_shard_check = 0.0
        self._encoder_thread: threading.Thread | None = None
        self.cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._metrics(metrics)

    # ------------------------------------------------------------------ metrics / health
    def _metrics(self, m) -> None:
        self.metrics = m  # m.reject(socket, reason): bad input on the ZeroMQ front or HTTP API
        self.m_requests = m.counter("scout_retriever_requests_total", "requests answered", ("source", "outcome"))
        self.m_queries = m.counter("scout_retriever_queries_total", "queries received", ("source",))
        self.m_batch = m.histogram("scout_retriever_batch_queries", "queries per encoded batch", buckets=BATCH_BUCKETS)
        self.m_encode = m.histogram("scout_retriever_encode_seconds",
                                    "encoder time per batch (its distinct, uncached queries)")
        self.m_cache = m.counter("scout_retriever_query_cache_total", "queries answered from the vector cache (hit) "
                                 "or encoded (miss; repeats inside a batch count as hits)", ("result",))
        self.m_search = m.histogram("scout_retriever_search_seconds", "fan-out until every shard answered, per batch")
        self.m_shard = m.histogram("scout_retriever_shard_search_seconds", "fan-out until this shard answered, "
                                   "per batch (finds a slow shard)", ("shard",))
        self.m_merge = m.histogram("scout_retriever_merge_seconds", "merge + document lookup + reply, per batch")
        self.m_latency = m.histogram("scout_retriever_request_seconds", "arrival to reply, per request", ("source",))
        self.m_pending = m.gauge("scout_retriever_pending_queries", "queries waiting for a batch")
        self.m_inflight = m.gauge("scout_retriever_inflight_batches", "batches at the shards")
        self.m_timeouts = m.counter("scout_retriever_shard_timeouts_total", "batches a shard did not answer in time",
                                    ("shard",))

    def health(self) -> dict[str, Any]:
        shards = self.shards.health() if self.shards else []
        if not self.ready:
            status = "starting"
        elif all(s["up"] for s in shards):
            status = "ok"
        else:
            status = "degraded"
        return {"status": status, "index": str(self.rc.index_dir), "passages": self.manifest["count"],
                "factory": self.manifest["factory"], "endpoint": self.rc.endpoint, "shards": shards,
                "pending_queries": self.pending_queries, "inflight_batches": len(self.inflight)}

    # ------------------------------------------------------------------ set-up
    def bind_back(self, endpoint: str) -> str:
        self.back.bind(endpoint)
        return endpoint

    def bind_front(self, transport_cfg) -> None:
        self.front = bind(self.ctx, zmq.ROUTER, self.rc.endpoint, transport_cfg)
        self.front.setsockopt(zmq.SNDTIMEO, 0)
        self.poller.register(self.front, zmq.POLLIN)

    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # the pipe is full: the loop is awake anyway

    def wait_ready(self, timeout_s: float) -> bool:
        """Serve shard hellos (nothing else) until every shard is up."""
        deadline = time.monotonic() + timeout_s
        while not self.stop.is_set() and time.monotonic() < deadline:
            if self.shards.all_up():
                return True
            dead = self.shards.poll(time.monotonic())
            if dead and self.rc.shard_restart_s == 0:
                log.error("shard(s) %s exited during start-up (see their log above)", dead)
                return False
            if self.back.poll(100, zmq.POLLIN):
                self._read_back()
        if not self.stop.is_set():
            log.error("shards not ready after %.0f s: %s", timeout_s, self.shards.describe_down())
        return False

    def start_encoder(self) -> None:
        self._encoder_thread = threading.Thread(target=self._encode_loop, name="retriever-encoder", daemon=True)
        self._encoder_thread.start()

    # ------------------------------------------------------------------ submissions
    def validate(self, queries: list[str], topk: int) -> None:
        """Service-level limits on top of the message schema (raises ValueError)."""
        if topk > self.rc.topk_cap:
            raise ValueError(f"topk {topk} is above the cap {self.rc.topk_cap}")

    def submit(self, queries: list[str], topk: int, source: str = "http") -> concurrent.futures.Future:
        """Thread-safe entry for in-process callers (the HTTP API): the future resolves to
        (scores [n, topk], rows [n, topk]) or raises ServiceError."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self.submitted.put(Pending(list(queries), topk, source, request_id="", future=fut))
        self.wake()
        return fut

    def _accept(self, p: Pending) -> None:
        self.m_queries.labels(source=p.source).inc(len(p.queries))
        try:
            self.validate(p.queries, p.topk)
        except ValueError as e:
            if p.source == "zmq":  # HTTP bodies are checked (and counted) by the HTTP API
                self.metrics.reject("zmq", "refused")
            return self._fail(p, "bad_request", str(e))
        if not self.shards.all_up():
            return self._fail(p, "unavailable", self.shards.describe_down())
        if self.pending_queries + len(p.queries) > self.rc.max_pending_queries:
            return self._fail(p, "unavailable", f"overloaded: {self.pending_queries} queries waiting; retry later")
        self.pending.extend(self._pieces(p))
        self.pending_queries += len(p.queries)

    def _pieces(self, p: Pending) -> list[Pending]:
        """A request of more than max_batch queries -> consecutive pieces of at most max_batch."""
        b = self.rc.max_batch
        if len(p.queries) <= b:
            return [p]
        pieces = [Pending(p.queries[i:i + b], p.topk, p.source, p.request_id, whole=p, offset=i, arrived=p.arrived)
                  for i in range(0, len(p.queries), b)]
        p.left = len(pieces)
        return pieces

    def _read_front(self, budget: int = 512) -> None:
        for _ in range(budget):
            try:
                frames = self.front.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                envelope, body = split_envelope(frames)
                req = decode(body, expect=RetrieveRequest)
            except ProtocolError as e:
                self.metrics.reject("zmq", e.reason)
                self.m_requests.labels(source="zmq", outcome="bad_request").inc()
                rid = _request_id_of(frames[1:]) if e.reason != "too_large" else ""
                self._send_front(frames[:1], error_frames("bad_request", str(e), rid))
                continue
            self._accept(Pending(req.queries, req.topk, "zmq", req.request_id, envelope=envelope))

    def _send_front(self, envelope: list, frames: list) -> None:
        try:
            self.front.send_multipart([*envelope, *frames], flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as e:  # the client went away or its queue is full: nothing to do
            log.debug("reply dropped: %s", e)

    # ------------------------------------------------------------------ answers
    def _fail(self, p: Pending, code: str, message: str) -> None:
        if p.whole is not None:  # a piece fails its whole request (once)
            return self._fail(p.whole, code, message)
        if p.answered or (p.future is not None and p.future.done()):
            return
        p.answered = True
        self.m_requests.labels(source=p.source, outcome=code).inc()
        if p.future is not None:
            _resolve(p.future, ServiceError(code, message))
        else:
            self._send_front(p.envelope, error_frames(code, message, p.request_id))

    def _deliver(self, p: Pending, scores: np.ndarray, rows: np.ndarray) -> None:
        if p.whole is not None:
            return self._deliver_piece(p, scores, rows)
        if p.answered or (p.future is not None and p.future.done()):
            return  # failed already, or the HTTP caller gave up (timed out) and was answered
        p.answered = True
        self.m_requests.labels(source=p.source, outcome="ok").inc()
        self.m_latency.labels(source=p.source).observe(time.monotonic() - p.arrived)
        if p.future is not None:
            _resolve(p.future, (scores, rows))
            return
        try:
            results = passages_for(self.docs, scores, rows)
            frames = encode(RetrieveReply(request_id=p.request_id, results=results))
        except Exception as e:  # a passage the schema refuses: say so rather than drop the request
            log.exception("cannot build a reply")
            frames = error_frames("internal", f"cannot build the reply: {type(e).__name__}: {e}", p.request_id)
        self._send_front(p.envelope, frames)

    def _deliver_piece(self, piece: Pending, scores: np.ndarray, rows: np.ndarray) -> None:
        w = piece.whole
        if w.answered or (w.future is not None and w.future.done()):
            return  # another piece failed it, or the HTTP caller gave up
        w.parts.append((piece.offset, scores, rows))
        w.left -= 1
        if w.left == 0:
            w.parts.sort(key=lambda part: part[0])
            self._deliver(w, np.concatenate([s for _, s, _ in w.parts]), np.concatenate([r for _, _, r in w.parts]))
            w.parts.clear()

    # ------------------------------------------------------------------ the loop
    def run(self) -> None:
        self.ready = True
        log.info("router serving on %s", self.rc.endpoint)
        while not self.stop.is_set():
            try:
                self.step(self._timeout_ms())
            except Exception:  # last line of defence: log, keep serving (callers time out and retry)
                log.exception("router loop error")
        self._drain_on_stop()

    def step(self, timeout_ms: int) -> None:
        events = dict(self.poller.poll(timeout_ms))
        if self._wake_r in events:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
        if self.front is not None and self.front in events:
            self._read_front()
        if self.back in events:
            self._read_back()
        while True:
            try:
                self._accept(self.submitted.get_nowait())
            except queue.Empty:
                break
        self._take_encoded()
        now = time.monotonic()
        if now - self._last_shard_check > 0.1:
            self._last_shard_check = now
            self._check_shards(now)
            self._expire(now)
        self._dispatch(now)
        self.m_pending.set(self.pending_queries)
        self.m_inflight.set(len(self.inflight))

    def _timeout_ms(self) -> int:
        if self.pending and self.encoding is None and len(self.inflight) < self.rc.max_inflight:
            wait = self.rc.max_wait_ms / 1000 - (time.monotonic() - self.pending[0].arrived)
            return max(0, min(100, int(wait * 1000 + 0.999)))
        return 100

    def _dispatch(self, now: float) -> None:
        if not self.pending or self.encoding is not None or len(self.inflight) >= self.rc.max_inflight:
            return
        full = self.pending_queries >= self.rc.max_batch
        if not full and (now - self.pending[0].arrived) * 1000 < self.rc.max_wait_ms:
            return
        if not self.shards.all_up():
            reason = self.shards.describe_down()
            while self.pending:
                self._fail(self.pending.popleft(), "unavailable", reason)
            self.pending_queries = 0
            return
        items, n = [], 0
        while self.pending and (not items or n + len(self.pending[0].queries) <= self.rc.max_batch):
            p = self.pending.popleft()
            items.append(p)
            n += len(p.queries)
        self.pending_queries -= n
        self.encoding = Batch(next(self.seq), items, k=max(p.topk for p in items))
        self.to_encode.put(self.encoding)

    def _encode_loop(self) -> None:
        while True:
            batch = self.to_encode.get()
            if batch is None:
                return
            queries = [q for p in batch.items for q in p.queries]
            try:
                batch.vectors = self._vectors(queries)
            except Exception as e:  # reported to the callers of this batch; the service keeps going
                log.exception("encoding failed")
                batch.error = f"encoder failed: {type(e).__name__}: {e}"
            self.m_batch.observe(len(queries))
            self.encoded.put(batch)
            self.wake()

    def _vectors(self, queries: list[str]) -> np.ndarray:
        """Encode each distinct query once; repeated queries (the samples of a GRPO group often
        search the same words) come from an LRU cache of vectors. Encoder thread only."""
        cache, size = self.cache, self.rc.query_cache_size
        missing = [q for q in dict.fromkeys(queries) if q not in cache]
        self.m_cache.labels(result="hit").inc(len(queries) - len(missing))
        self.m_cache.labels(result="miss").inc(len(missing))
        if missing:
            t0 = time.perf_counter()
            vecs = self.encoder.encode(missing, prefix=self.manifest["encoder"]["query_prefix"],
                                       batch_size=max(1, self.rc.max_batch))
            self.m_encode.observe(time.perf_counter() - t0)
            fresh = dict(zip(missing, vecs))
        else:
            fresh = {}
        out = np.stack([fresh[q] if q in fresh else cache[q] for q in queries])
        if size:
            for q in queries:
                if q in cache:
                    cache.move_to_end(q)
            cache.update(fresh)
            while len(cache) > size:
                cache.popitem(last=False)
        return out

    def _take_encoded(self) -> None:
        while True:
            try:
                batch = self.encoded.get_nowait()
            except queue.Empty:
                return
            self.encoding = None
            if batch.error:
                self._fail_batch(batch, "internal", batch.error)
            elif not self.shards.all_up():
                self._fail_batch(batch, "unavailable", self.shards.describe_down())
            else:
                self._fan_out(batch)

    def _fan_out(self, batch: Batch) -> None:
        frames = encode(ShardSearch(seq=batch.seq, topk=batch.k, vectors=batch.vectors))
        batch.sent_at = time.monotonic()
        batch.deadline = batch.sent_at + self.rc.shard_timeout_s
        self.inflight[batch.seq] = batch
        for s in self.shards.shards:
            try:
                self.back.send_multipart([f"shard-{s.idx}".encode(), *frames], copy=False)
            except zmq.ZMQError as e:
                self.inflight.pop(batch.seq, None)
                self._fail_batch(batch, "unavailable", f"shard {s.idx} is unreachable ({e})")
                return
            batch.waiting.add(s.idx)

    def _read_back(self, budget: int = 512) -> None:
        for _ in range(budget):
            try:
                frames = self.back.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                _, body = split_envelope(frames)
                msg = decode(body, expect=(ShardResult, ShardHello, ErrorReply))
            except ProtocolError as e:
                log.error("bad message from a shard: %s", e)
                continue
            if isinstance(msg, ShardHello):
                self.shards.on_hello(msg)
            elif isinstance(msg, ShardResult):
                self._on_result(msg)
            else:
                log.error("shard error: %s (%s)", msg.message, msg.code)
                batch = self.inflight.pop(int(msg.request_id), None) if msg.request_id.isdigit() else None
                if batch is not None:
                    self._fail_batch(batch, "internal", msg.message)

    def _on_result(self, res: ShardResult) -> None:
        batch = self.inflight.get(res.seq)
        if batch is None or res.shard not in batch.waiting:
            return  # late answer for a batch already failed or answered
        if res.ids.shape[0] != batch.n or res.ids.shape[1] > batch.k:
            self.inflight.pop(res.seq)
            return self._fail_batch(batch, "internal", f"shard {res.shard} answered {res.ids.shape} for "
                                                       f"{batch.n} queries, top-{batch.k}")
        batch.waiting.discard(res.shard)
        batch.parts[res.shard] = (res.scores, res.ids)
        self.m_shard.labels(shard=str(res.shard)).observe(time.monotonic() - batch.sent_at)
        if not batch.waiting:
            self.inflight.pop(res.seq)
            self._finish(batch)

    def _finish(self, batch: Batch) -> None:
        t0 = time.monotonic()
        self.m_search.observe(t0 - batch.sent_at)
        order = sorted(batch.parts)
        try:
            scores, rows = merge_topk([batch.parts[i][0] for i in order], [batch.parts[i][1] for i in order], batch.k)
        except Exception as e:
            log.exception("merge failed")
            return self._fail_batch(batch, "internal", f"merge failed: {type(e).__name__}: {e}")
        start = 0
        for p in batch.items:
            end = start + len(p.queries)
            self._deliver(p, scores[start:end, :p.topk], rows[start:end, :p.topk])
            start = end
        self.m_merge.observe(time.monotonic() - t0)

    def _fail_batch(self, batch: Batch, code: str, message: str) -> None:
        for p in batch.items:
            self._fail(p, code, message)

    def _check_shards(self, now: float) -> None:
        dead = self.shards.poll(now)
        if not dead:
            return
        reason = self.shards.describe_down()
        for seq, batch in list(self.inflight.items()):
            if batch.waiting & set(dead):
                del self.inflight[seq]
                self._fail_batch(batch, "unavailable", reason)

    def _expire(self, now: float) -> None:
        for seq, batch in list(self.inflight.items()):
            if now > batch.deadline:
                del self.inflight[seq]
                for s in batch.waiting:
                    self.m_timeouts.labels(shard=str(s)).inc()
                self._fail_batch(batch, "timeout", f"shard(s) {sorted(batch.waiting)} did not answer within "
                                                   f"{self.rc.shard_timeout_s:.0f} s")

    def _drain_on_stop(self) -> None:
        msg = "the retriever is shutting down"
        for batch in list(self.inflight.values()):
            self._fail_batch(batch, "unavailable", msg)
        self.inflight.clear()
        while self.pending:
            self._fail(self.pending.popleft(), "unavailable", msg)
        while True:
            try:
                self._fail(self.submitted.get_nowait(), "unavailable", msg)
            except queue.Empty:
                break

    def close(self) -> None:
        self.to_encode.put(None)
        if self._encoder_thread is not None:
            self._encoder_thread.join(timeout=10)
        for sock in (self.front, self.back):
            if sock is not None:
                sock.close(0)
        os.close(self._wake_r)
        os.close(self._wake_w)


def _resolve(fut: concurrent.futures.Future, value) -> None:
    try:
        if isinstance(value, BaseException):
            fut.set_exception(value)
        else:
            fut.set_result(value)
    except concurrent.futures.InvalidStateError:
        pass  # cancelled by its HTTP thread meanwhile


def _request_id_of(body: list) -> str:
    """The request_id of a message that failed validation, when its header is readable (so the
    caller can match the ErrorReply); "" otherwise."""
    try:
        header = msgpack.unpackb(body[0].buffer if isinstance(body[0], zmq.Frame) else body[0], raw=False)
        rid = header["b"]["request_id"]
    except Exception:
        return ""
    return rid if isinstance(rid, str) and 0 < len(rid) <= 256 else ""


def passages_for(docs: DocStore, scores: np.ndarray, rows: np.ndarray) -> list[list[Passage]]:
    """[n, k] scores + rows -> per query, the passages (rows < 0 = fewer than k in the index)."""
    valid = rows >= 0
    flat = rows[valid]
    ids, contents = docs.ids(flat), docs.contents(flat)
    out: list[list[Passage]] = []
    j = 0
    for qi in range(rows.shape[0]):
        lst = []
        for ki in range(rows.shape[1]):
            if not valid[qi, ki]:
                continue
            title, text = split_title(contents[j])
            lst.append(Passage(id=ids[j][:1024], title=title[:MAX_STR], text=text[:MAX_TEXT],
                               score=float(scores[qi, ki])))
            j += 1
        out.append(lst)
    return out
