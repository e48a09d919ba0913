"""The router's fan-out: one encoded batch -> every shard process -> its per-shard top-k.

    send(batch) ── back ROUTER ── ShardSearch(seq, k, vectors) ──▶ shard-0, shard-1, ... (FAISS)
                               ── ShardSearchTokens(seq, k, token ids) ──▶ (a BM25 index)
                               ◀── ShardResult(seq, scores, global rows) / ShardHello / ErrorReply
    read() ─▶ inflight[seq].parts[shard] ─▶ every shard answered: on_done(batch)
    check_shards(), expire() ─▶ a shard died / did not answer in shard_timeout_s:
                                on_fail(batch, "unavailable" / "timeout", message)
    expire() ─▶ the shard that did not answer is "not answering" (ShardSet.stall): every other
                batch it holds fails at once, it gets one probe search and no other work
                until the probe's answer comes back (see retriever/shards.py)

Answers are matched to batches by `seq`, which is never reused: an answer for a batch that has
already failed (a frozen shard working off its queue once it runs again) is counted as late
and dropped, never merged into a newer batch.

Runs on the router loop's thread. `shards` (the ShardSet supervising the processes) is
attached by the service through `Router.shards`.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import numpy as np
import zmq

from common.wire import ProtocolError, decode, encode
from common.protocol import ErrorReply, ShardHello, ShardResult, ShardSearch, ShardSearchTokens
from common.transport import split_envelope
from retriever.batching import Batch

log = logging.getLogger("scout.retriever.router")  # a part of the router: logs as the router


def received(sock: zmq.Socket, budget: int):
    """Up to `budget` messages already waiting on `sock` (multipart, zero-copy); never blocks."""
    for _ in range(budget):
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return
        yield frames


class FanOut:
    """The back ROUTER socket, the batches in flight at the shards, and their deadlines."""

    def __init__(self, ctx: zmq.Context, rc, metrics, on_done: Callable[[Batch], None],
                 on_fail: Callable[[Batch, str, str], None], next_seq: Callable[[], int], dim: int,
                 kind: str = "dense"):
        self.rc, self.on_done, self.on_fail = rc, on_done, on_fail
        self.next_seq, self.dim = next_seq, dim  # seqs shared with the batches; the probe's vector size
        self.kind = kind  # "bm25": shards take ShardSearchTokens
        self.shards = None  # ShardSet
        self.inflight: dict[int, Batch] = {}
        self.back = ctx.socket(zmq.ROUTER)
        self.back.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.back.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.back.setsockopt(zmq.LINGER, 0)
        self.back.setsockopt(zmq.SNDTIMEO, 1000)
        m = metrics
        self.m_search = m.histogram("scout_retriever_search_seconds", "fan-out until every shard answered, per batch")
        self.m_shard = m.histogram("scout_retriever_shard_search_seconds", "fan-out until this shard answered, "
                                   "per batch (finds a slow shard)", ("shard",))
        self.m_timeouts = m.counter("scout_retriever_shard_timeouts_total", "batches a shard did not answer in time",
                                    ("shard",))
        self.m_late = m.counter("scout_retriever_shard_late_results_total", "answers for batches that had already "
                                "failed (dropped)", ("shard",))

    def bind(self, endpoint: str) -> str:
        self.back.bind(endpoint)
        return endpoint

    def wait_ready(self, timeout_s: float, stop: threading.Event) -> bool:
        """Serve shard hellos (nothing else) until every shard is up."""
        deadline = time.monotonic() + timeout_s
        while not stop.is_set() and time.monotonic() < deadline:
            if self.shards.all_up():
                return True
            dead = self.shards.poll(time.monotonic())
            if dead and self.rc.shard_restart_s == 0:
                log.error("shard(s) %s exited during start-up (see their log above)", dead)
                return False
            if self.back.poll(100, zmq.POLLIN):
                self.read()
        if not stop.is_set():
            log.error("shards not ready after %.0f s: %s", timeout_s, self.shards.describe_down())
        return False

    def send(self, batch: Batch) -> None:
        if batch.tokens is not None:  # a BM25 index
            frames = encode(ShardSearchTokens(seq=batch.seq, topk=batch.k, tokens=batch.tokens[0],
                                              lengths=batch.tokens[1]))
        else:
            frames = encode(ShardSearch(seq=batch.seq, topk=batch.k, vectors=batch.vectors))
        batch.sent_at = time.monotonic()
        batch.deadline = batch.sent_at + self.rc.shard_timeout_s
        self.inflight[batch.seq] = batch
        for s in self.shards.shards:
            try:
                self.back.send_multipart([f"shard-{s.idx}".encode(), *frames], copy=False)
            except zmq.ZMQError as e:
                self.inflight.pop(batch.seq, None)
                self.on_fail(batch, "unavailable", f"shard {s.idx} is unreachable ({e})")
                return
            batch.waiting.add(s.idx)

    def read(self, budget: int = 512) -> None:
        for frames in received(self.back, budget):
            try:
                _, body = split_envelope(frames)
                msg = decode(body, expect=(ShardResult, ShardHello, ErrorReply))
            except ProtocolError as e:
                log.error("bad message from a shard: %s", e)
                continue
            if isinstance(msg, ShardHello):
                self.shards.on_hello(msg)
            elif isinstance(msg, ShardResult):
                if not self.shards.answered(msg.shard, msg.seq, time.monotonic()):
                    self._on_result(msg)  # (the answer to a probe carries no batch)
            else:
                log.error("shard error: %s (%s)", msg.message, msg.code)
                seq, shard = int(msg.request_id) if msg.request_id.isdigit() else -1, _shard_of(frames[0])
                batch = self.inflight.pop(seq, None)
                if batch is not None:
                    self.on_fail(batch, "internal", msg.message)
                elif not self.shards.answered(shard, seq, time.monotonic()) and seq >= 0:
                    self.m_late.labels(shard=str(shard)).inc()

    def _on_result(self, res: ShardResult) -> None:
        batch = self.inflight.get(res.seq)
        if batch is None or res.shard not in batch.waiting:
            self.m_late.labels(shard=str(res.shard)).inc()
            return  # late answer for a batch already failed or answered: dropped
        if res.ids.shape[0] != batch.n or res.ids.shape[1] > batch.k:
            self.inflight.pop(res.seq)
            return self.on_fail(batch, "internal", f"shard {res.shard} answered {res.ids.shape} for "
                                                   f"{batch.n} queries, top-{batch.k}")
        batch.waiting.discard(res.shard)
        batch.parts[res.shard] = (res.scores, res.ids)
        self.m_shard.labels(shard=str(res.shard)).observe(time.monotonic() - batch.sent_at)
        if not batch.waiting:
            self.inflight.pop(res.seq)
            self.m_search.observe(time.monotonic() - batch.sent_at)
            self.on_done(batch)

    def check_shards(self, now: float) -> None:
        """Fail the batches a shard that has just died was holding."""
        dead = self.shards.poll(now)
        if not dead:
            return
        reason = self.shards.describe_down()
        for seq, batch in list(self.inflight.items()):
            if batch.waiting & set(dead):
                del self.inflight[seq]
                self.on_fail(batch, "unavailable", reason)

    def expire(self, now: float) -> None:
        """Fail the batches some shard did not answer within shard_timeout_s; that shard is not
        answering: the other batches it holds fail now (it answers in order, so they cannot
        finish before the one that expired), and it gets a probe instead of new work."""
        stalled = set()
        for seq, batch in list(self.inflight.items()):
            if now > batch.deadline:
                del self.inflight[seq]
                for s in batch.waiting:
                    self.m_timeouts.labels(shard=str(s)).inc()
                    if self.shards.stall(s, now):
                        stalled.add(s)
                self.on_fail(batch, "timeout", f"shard(s) {sorted(batch.waiting)} did not answer within "
                                               f"{self.rc.shard_timeout_s:g} s")
        if stalled:
            reason = self.shards.describe_down()
            for seq, batch in list(self.inflight.items()):
                if batch.waiting & stalled:
                    del self.inflight[seq]
                    self.on_fail(batch, "unavailable", reason)
        self.probe()

    def probe(self) -> None:
        """One small search to each stalled shard that has none yet; it queues behind the work
        the shard holds, and its answer ends the stall (ShardSet.answered). One per stall, so a
        frozen shard's queue does not grow while it is stopped."""
        for s in self.shards.stalled():
            if s.probe_seq is not None or not s.alive:
                continue
            seq = self.next_seq()
            frames = encode(self._probe_message(seq))
            try:
                self.back.send_multipart([f"shard-{s.idx}".encode(), *frames], flags=zmq.NOBLOCK, copy=False)
            except zmq.ZMQError as e:  # its queue is full or it is gone: try again at the next check
                log.debug("probe to shard %d not sent: %s", s.idx, e)
                continue
            s.probe_seq = seq

    def _probe_message(self, seq: int):
        if self.kind == "bm25":  # one query without tokens
            return ShardSearchTokens(seq=seq, topk=1, tokens=np.zeros(0, np.int32), lengths=np.zeros(1, np.int32))
        return ShardSearch(seq=seq, topk=1, vectors=np.zeros((1, self.dim), np.float32))

    def fail_all(self, message: str) -> None:
        """Shutting down: every batch in flight fails "unavailable"."""
        for batch in list(self.inflight.values()):
            self.on_fail(batch, "unavailable", message)
        self.inflight.clear()

    def close(self) -> None:
        self.back.close(0)


def _shard_of(identity) -> int:
    """The shard index in a back-socket identity frame (b"shard-<i>"); -1 if it is not one."""
    raw = identity.bytes if isinstance(identity, zmq.Frame) else identity
    tail = raw[len(b"shard-"):] if raw.startswith(b"shard-") else b""
    return int(tail) if tail.isdigit() else -1
