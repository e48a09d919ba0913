"""The retriever router: micro-batching across clients, one encode, fan-out, merge.

    ZeroMQ DEALER clients ──RetrieveRequest──▶ front ROUTER ─┐
    HTTP /retrieve threads ──submit() (Future)───────────────┤  validate (bad input -> ErrorReply
                                                             ▼   to that caller only)
    retriever/batching.py  Batcher: pending queue (FIFO of requests; a request above max_batch
                       queries is queued as pieces of max_batch); batch = requests / pieces up to
                       max_batch queries, once the oldest has waited max_wait_ms or the batch is
                       full, the encoder is idle and fewer than max_inflight batches are at the shards
                                                             ▼
                       encoder thread: distinct queries not in the LRU vector cache (torch, no grad)
                                                             ▼
    retriever/fanout.py    FanOut: back ROUTER ── ShardSearch(seq, k, vectors) ──▶ every shard (FAISS)
                                               ◀── ShardResult(seq, scores, global rows) ──
                                                             ▼
    retriever/merge.py     merge top-k by score ─▶ each request's slice ─▶ document store (memmap)
                                                             ▼
    retriever/router.py    Router (this file): the loop, the front socket, the answers
                           ─▶ RetrieveReply / ErrorReply over ZeroMQ, or the HTTP caller's Future

Everything but encoding runs on one thread (the loop below); the encoder thread wakes the loop
through a pipe, as do HTTP threads. A shard that dies or stops answering fails only the batches
it held, with ErrorReply(code="unavailable" / "timeout"); while any shard is down, or not
answering since a batch timed out at it (until it answers a probe, retriever/shards.py), new
requests are answered "unavailable" at once (no partial results that would look like real
answers, and no request waits a whole shard timeout for a shard already known to be stuck).
`retriever.max_batch` is a hard bound: no encoder batch and no shard search holds more queries;
the pieces of a large request are answered together, in order, or fail together.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import queue
import threading
import time
from typing import Any

import msgpack
import numpy as np
import zmq

from common.wire import ProtocolError, decode, encode
from common.protocol import RetrieveReply, RetrieveRequest, error_frames
from common.transport import bind, split_envelope
from retriever.batching import Batch, Batcher, Pending
from retriever.docstore import DocStore
from retriever.fanout import FanOut, received
from retriever.merge import join_piece, merge_shards, passages_for, per_request

log = logging.getLogger("scout.retriever.router")


class ServiceError(RuntimeError):
    """An error answer for an HTTP caller (same codes as ErrorReply)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def _part_attribute(part: str, name: str, doc: str) -> property:
    """An attribute of the router that lives on one of its parts (read and set through it)."""
    return property(lambda self: getattr(getattr(self, part), name),
                    lambda self, value: setattr(getattr(self, part), name, value), doc=doc)


class Router:
    """The loop: front socket and HTTP submissions in, answers out; batching (`batcher`),
    fan-out to the shards (`fanout`) and merging (retriever/merge.py) are its parts."""

    def __init__(self, cfg, manifest: dict, docs: DocStore, metrics, ctx: zmq.Context | None = None):
        self.cfg, self.rc, self.manifest, self.docs = cfg, cfg.retriever, manifest, docs
        self.ctx = ctx or zmq.Context.instance()
        self.front: zmq.Socket | None = None
        self.metrics = metrics  # metrics.reject(socket, reason): bad input on the ZeroMQ front or HTTP API
        self.m_requests = metrics.counter("scout_retriever_requests_total", "requests answered", ("source", "outcome"))
        self.m_queries = metrics.counter("scout_retriever_queries_total", "queries received", ("source",))
        self.batcher = Batcher(self.rc, manifest, metrics, self.wake)
        self.fanout = FanOut(self.ctx, self.rc, metrics, on_done=self._finish, on_fail=self._fail_batch,
                             next_seq=lambda: next(self.batcher.seq), dim=int(manifest["dim"]),
                             kind=manifest.get("kind", "dense"))
        self.poller = zmq.Poller()
        self.poller.register(self.fanout.back, zmq.POLLIN)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.poller.register(self._wake_r, zmq.POLLIN)
        self.stop = threading.Event()
        self.submitted: queue.SimpleQueue[Pending] = queue.SimpleQueue()
        self.ready = False
        self._last_shard_check = 0.0
        m = metrics
        self.m_merge = m.histogram("scout_retriever_merge_seconds", "merge + document lookup + reply, per batch")
        self.m_latency = m.histogram("scout_retriever_request_seconds", "arrival to reply, per request", ("source",))
        self.m_pending = m.gauge("scout_retriever_pending_queries", "queries waiting for a batch")
        self.m_inflight = m.gauge("scout_retriever_inflight_batches", "batches at the shards")

    # ------------------------------------------------------------------ parts, health
    shards = _part_attribute("fanout", "shards", "The ShardSet, attached by the service (the fan-out sends "
                             "through it).")
    encoder = _part_attribute("batcher", "encoder", "The query encoder, attached by the service (the batcher's "
                              "encoder thread uses it).")

    def health(self) -> dict[str, Any]:
        shards = self.shards.health() if self.shards else []
        if not self.ready:
            status = "starting"
        elif all(s["up"] for s in shards):
            status = "ok"
        else:
            status = "degraded"
        return {"status": status, "index": str(self.rc.index_dir), "passages": self.manifest["count"],
                "kind": self.manifest.get("kind", "dense"),
                "factory": self.manifest["factory"], "endpoint": self.rc.endpoint, "shards": shards,
                "pending_queries": self.batcher.pending_queries, "inflight_batches": len(self.fanout.inflight)}

    # ------------------------------------------------------------------ set-up
    def bind_back(self, endpoint: str) -> str:
        return self.fanout.bind(endpoint)

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
        return self.fanout.wait_ready(timeout_s, self.stop)

    def start_encoder(self) -> None:
        self.batcher.start()

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
        waiting = self.batcher.pending_queries
        if waiting + len(p.queries) > self.rc.max_pending_queries:
            return self._fail(p, "unavailable", f"overloaded: {waiting} queries waiting; retry later")
        self.batcher.add(p)

    def _read_front(self, budget: int = 512) -> None:
        for frames in received(self.front, budget):
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
        joined = join_piece(piece, scores, rows)
        if joined is not None:
            self._deliver(w, *joined)

    # ------------------------------------------------------------------ the loop
    def run(self) -> None:
        self.ready = True
        log.info("router serving on %s", self.rc.endpoint)
        while not self.stop.is_set():
            try:
                self.step(self.batcher.timeout_ms(len(self.fanout.inflight)))
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
        if self.fanout.back in events:
            self.fanout.read()
        while True:
            try:
                self._accept(self.submitted.get_nowait())
            except queue.Empty:
                break
        self._take_encoded()
        now = time.monotonic()
        if now - self._last_shard_check > 0.1:
            self._last_shard_check = now
            self.fanout.check_shards(now)
            self.fanout.expire(now)
        self._dispatch(now)
        self.m_pending.set(self.batcher.pending_queries)
        self.m_inflight.set(len(self.fanout.inflight))

    def _dispatch(self, now: float) -> None:
        if not self.batcher.due(now, len(self.fanout.inflight)):
            return
        if not self.shards.all_up():
            reason = self.shards.describe_down()
            while self.batcher.pending:
                self._fail(self.batcher.pending.popleft(), "unavailable", reason)
            self.batcher.pending_queries = 0
            return
        self.batcher.start_batch()

    def _take_encoded(self) -> None:
        for batch in self.batcher.finished():
            if batch.error:
                self._fail_batch(batch, "internal", batch.error)
            elif not self.shards.all_up():
                self._fail_batch(batch, "unavailable", self.shards.describe_down())
            else:
                self.fanout.send(batch)

    def _finish(self, batch: Batch) -> None:
        """Every shard answered `batch` (FanOut's on_done): merge, then answer each request."""
        t0 = time.monotonic()
        try:
            scores, rows = merge_shards(batch.parts, batch.k)
        except Exception as e:
            log.exception("merge failed")
            return self._fail_batch(batch, "internal", f"merge failed: {type(e).__name__}: {e}")
        for p, p_scores, p_rows in per_request(batch.items, scores, rows):
            self._deliver(p, p_scores, p_rows)
        self.m_merge.observe(time.monotonic() - t0)

    def _fail_batch(self, batch: Batch, code: str, message: str) -> None:
        for p in batch.items:
            self._fail(p, code, message)

    def _drain_on_stop(self) -> None:
        msg = "the retriever is shutting down"
        self.fanout.fail_all(msg)
        while self.batcher.pending:
            self._fail(self.batcher.pending.popleft(), "unavailable", msg)
        while True:
            try:
                self._fail(self.submitted.get_nowait(), "unavailable", msg)
            except queue.Empty:
                break

    def close(self) -> None:
        self.batcher.close()
        if self.front is not None:
            self.front.close(0)
        self.fanout.close()
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
