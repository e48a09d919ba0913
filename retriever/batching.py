"""The router's batching: accepted requests -> batches of at most max_batch queries -> vectors.

    Batcher.add(request)     a request above max_batch queries is queued as pieces of max_batch
       ▼
    pending (FIFO) ── due()? (oldest waited max_wait_ms, or max_batch queries waiting; encoder
       │                      idle; fewer than max_inflight batches at the shards)
       ▼ start_batch()
    to_encode ─▶ encoder thread: distinct queries not in the LRU vector cache ─▶ encoded
                 (a BM25 index: the bm25s tokenizer instead, token ids, no cache)
                                                                                  ▼
                                                     finished() -> Batch (vectors, or error)

Everything here but the encoder thread runs on the router loop's thread; the encoder thread
wakes the loop through `wake` when a batch is done.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

log = logging.getLogger("scout.retriever.router")  # a part of the router: logs as the router

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


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
    tokens: tuple[np.ndarray, np.ndarray] | None = None  # BM25 index: (token ids back to back, ids per query)
    error: str = ""
    waiting: set = field(default_factory=set)
    parts: dict = field(default_factory=dict)
    sent_at: float = 0.0
    deadline: float = 0.0

    @property
    def n(self) -> int:
        return sum(len(p.queries) for p in self.items)


class Batcher:
    """The pending queue, micro-batch assembly and the encoder thread with its vector cache."""

    def __init__(self, rc, manifest: dict, metrics, wake: Callable[[], None]):
        self.rc, self.manifest, self.wake = rc, manifest, wake
        self.encoder = None
        self.pending: deque[Pending] = deque()
        self.pending_queries = 0
        self.to_encode: queue.Queue[Batch | None] = queue.Queue()
        self.encoded: queue.SimpleQueue[Batch] = queue.SimpleQueue()
        self.encoding: Batch | None = None
        self.seq = itertools.count()
        self.cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._thread: threading.Thread | None = None
        m = metrics
        self.m_batch = m.histogram("scout_retriever_batch_queries", "queries per encoded batch", buckets=BATCH_BUCKETS)
        self.m_encode = m.histogram("scout_retriever_encode_seconds",
                                    "encoder time per batch (its distinct, uncached queries)")
        self.m_cache = m.counter("scout_retriever_query_cache_total", "queries answered from the vector cache (hit) "
                                 "or encoded (miss; repeats inside a batch count as hits)", ("result",))

    # ------------------------------------------------------------------ the queue (loop thread)
    def add(self, p: Pending) -> None:
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

    def _can_start(self, inflight: int) -> bool:
        return bool(self.pending) and self.encoding is None and inflight < self.rc.max_inflight

    def timeout_ms(self, inflight: int) -> int:
        """How long the loop may sleep before the oldest request's max_wait_ms runs out."""
        if self._can_start(inflight):
            wait = self.rc.max_wait_ms / 1000 - (time.monotonic() - self.pending[0].arrived)
            return max(0, min(100, int(wait * 1000 + 0.999)))
        return 100

    def due(self, now: float, inflight: int) -> bool:
        """A batch may start now: the encoder is idle, the shards have room, and the batch is
        full or its oldest request has waited max_wait_ms."""
        if not self._can_start(inflight):
            return False
        full = self.pending_queries >= self.rc.max_batch
        return full or (now - self.pending[0].arrived) * 1000 >= self.rc.max_wait_ms

    def start_batch(self) -> None:
        """The oldest requests / pieces, up to max_batch queries, go to the encoder thread."""
        items, n = [], 0
        while self.pending and (not items or n + len(self.pending[0].queries) <= self.rc.max_batch):
            p = self.pending.popleft()
            items.append(p)
            n += len(p.queries)
        self.pending_queries -= n
        self.encoding = Batch(next(self.seq), items, k=max(p.topk for p in items))
        self.to_encode.put(self.encoding)

    def finished(self) -> Iterator[Batch]:
        """The batches the encoder thread has done (with vectors, or with `error` set)."""
        while True:
            try:
                batch = self.encoded.get_nowait()
            except queue.Empty:
                return
            self.encoding = None
            yield batch

    # ------------------------------------------------------------------ the encoder thread
    def start(self) -> None:
        self._thread = threading.Thread(target=self._encode_loop, name="retriever-encoder", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.to_encode.put(None)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _encode_loop(self) -> None:
        while True:
            batch = self.to_encode.get()
            if batch is None:
                return
            queries = [q for p in batch.items for q in p.queries]
            try:
                if self.manifest.get("kind") == "bm25":  # no encoder: the shards take token ids
                    batch.tokens = self.encoder.tokenize(queries)
                else:
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
