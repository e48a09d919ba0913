"""One shard process: holds one FAISS (or BM25) shard and answers the router's searches.

    router ROUTER ◀── ShardHello (once loaded) ── shard DEALER (identity "shard-<i>")
    router ROUTER ── ShardSearch(seq, topk, vectors [n, d] float32) ──▶ shard
                  ── ShardSearchTokens(seq, topk, token ids, lengths) ──▶ shard of a BM25 index
    router ROUTER ◀── ShardResult(seq, shard, scores [n, k], ids [n, k] global rows) ── shard
                  ◀── ErrorReply(internal, request_id=str(seq)) when the search fails

Started by `retriever.service` as `python -m retriever.shard --index DIR --shard I --endpoint
ipc://...`. Exits on SIGTERM/SIGINT, and on its own when the router process is gone.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time

import numpy as np
import zmq

from common.log import setup_logging
from common.wire import ProtocolError, decode
from common.protocol import ErrorReply, ShardHello, ShardResult, ShardSearch, ShardSearchTokens
from common.transport import send

log = logging.getLogger("scout.retriever.shard")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="scout retriever shard process")
    ap.add_argument("--index", required=True)
    ap.add_argument("--shard", type=int, required=True)
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--gpu", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--params", default="")
    ap.add_argument("--parent-pid", type=int, default=0)
    ap.add_argument("--log-level", default="INFO")
    return ap.parse_args(argv)


class Shard:
    def __init__(self, args: argparse.Namespace):
        from retriever.index import index_device, load_manifest, read_shard, search_shard

        self.args = args
        manifest = load_manifest(args.index)
        if not 0 <= args.shard < len(manifest["shards"]):
            raise SystemExit(f"shard {args.shard} does not exist (index has {len(manifest['shards'])})")
        self.entry = manifest["shards"][args.shard]
        self.dim = int(manifest["dim"])  # BM25: the vocabulary size
        self.metric = manifest.get("metric", "inner_product")
        self.kind = manifest.get("kind", "dense")
        self._search = search_shard
        self.start = int(self.entry["start"])
        self.stop = False
        if self.kind == "bm25":  # a sparse score matrix, searched with numpy on the CPU
            from retriever.bm25 import Bm25Shard

            self.index, self.device = Bm25Shard(args.index, self.entry, self.dim), "cpu"
            return
        import faiss

        faiss.omp_set_num_threads(max(1, args.threads))
        self.index = read_shard(args.index, self.entry, params=args.params, gpu=args.gpu)
        self.device = index_device(self.index)

    def search(self, req: ShardSearch | ShardSearchTokens) -> ShardResult:
        if (self.kind == "bm25") != isinstance(req, ShardSearchTokens):
            raise ValueError(f"a {req.TYPE} message for a {self.kind} shard")
        if isinstance(req, ShardSearchTokens):
            scores, ids = self.index.search(req.tokens, req.lengths, req.topk)
        else:
            scores, ids = self._search_vectors(req)
        ids = np.where(ids >= 0, ids + self.start, -1).astype(np.int64)
        return ShardResult(seq=req.seq, shard=self.args.shard, scores=scores.astype(np.float32), ids=ids)

    def _search_vectors(self, req: ShardSearch) -> tuple[np.ndarray, np.ndarray]:
        if req.vectors.shape[1] != self.dim:
            raise ValueError(f"query vectors are {req.vectors.shape[1]}-d, shard holds {self.dim}-d")
        k = min(req.topk, max(1, self.index.ntotal))
        return self._search(self.index, req.vectors, k, self.metric)  # L2: negated distances
    def serve(self) -> int:
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)  # internal ipc socket in a private folder: no CURVE
        sock.setsockopt(zmq.IDENTITY, f"shard-{self.args.shard}".encode())
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDTIMEO, 10_000)
        sock.connect(self.args.endpoint)
        send(sock, ShardHello(shard=self.args.shard, pid=os.getpid(), count=int(self.index.ntotal), dim=self.dim,
                              device=self.device))
        log.info("shard %d ready: rows %d..%d (%d vectors)", self.args.shard, self.entry["start"],
                 self.entry["end"], self.index.ntotal)
        while not self.stop:
            if not sock.poll(500, zmq.POLLIN):
                if self.args.parent_pid and os.getppid() != self.args.parent_pid:
                    log.warning("router process %d is gone; exiting", self.args.parent_pid)
                    break
                continue
            self._handle(sock, sock.recv_multipart(copy=False))
        sock.close(0)
        return 0

    def _handle(self, sock: zmq.Socket, frames) -> None:
        try:
            req = decode(frames, expect=(ShardSearch, ShardSearchTokens))
        except ProtocolError as e:
            log.warning("bad message from router: %s", e)
            send(sock, ErrorReply(code="bad_request", message=str(e)[:4096]))
            return
        try:
            reply = self.search(req)
        except Exception as e:  # report, keep serving
            log.exception("search failed")
            send(sock, ErrorReply(code="internal", message=f"shard {self.args.shard}: {type(e).__name__}: {e}"[:4096],
                                  request_id=str(req.seq)))
            return
        send(sock, reply)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    setup_logging(f"retriever-shard{args.shard}", args.log_level)
    log.info("shard resolved config: %s", vars(args))
    t0 = time.time()
    shard = Shard(args)

    def _stop(signum, _frame):
        shard.stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    log.info("shard %d loaded in %.2f s", args.shard, time.time() - t0)
    return shard.serve()


if __name__ == "__main__":
    sys.exit(main())
