"""`python cli.py retriever --index DIR`: the retrieval service, one process tree.

    main(cfg)
      ├─ metrics + /health on metrics.retriever_port          (status "starting" until ready)
      ├─ router back ROUTER on ipc://<private tmp dir>/shards
      ├─ shard processes, one per shard (python -m retriever.shard), faiss-gpu with --gpus
      ├─ query encoder (loads while the shards load; a BM25 index: bm25s's tokenizer)
      ├─ wait for every ShardHello, then bind retriever.endpoint (ZeroMQ ROUTER)
      ├─ Search-R1 HTTP API on retriever.http_host:http_port (0 = off; Bearer token: http_token_file)
      └─ router loop until SIGTERM / SIGINT, then: stop HTTP, answer what is pending
         "unavailable", SIGTERM the shards (SIGKILL after 10 s), remove the ipc folder.

Exit codes: 0 clean shutdown, 1 shards failed to start, 2 bad configuration or index.
"""

from __future__ import annotations

import logging
import shutil
import signal
import tempfile
import time
from pathlib import Path

import zmq

from common.config import ConfigError, parse_device_indices
from common.metrics import Metrics, read_token_file
from common.transport import check_bind_address, check_host_bind
from retriever.docstore import DocStore
from retriever.index import IndexFolderError, encoder_for, load_manifest, verify_checksums
from retriever.presets import warn_conventions
from retriever.router import Router
from retriever.shards import ShardSet

log = logging.getLogger("scout.retriever.service")


def _gpus(spec: str | None) -> list[str]:
    # faiss places shards by CUDA ordinal in the shard processes, which inherit this process's
    # CUDA_VISIBLE_DEVICES: ordinals, not the names parse_devices gives a child of its own.
    gpus = parse_device_indices(spec)
    if not gpus:
        return []
    try:
        import faiss

        ok = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    except Exception:
        ok = False
    if not ok:
        log.warning("--gpus %s given but faiss-gpu or a GPU is not available: shards use faiss-cpu", spec)
        return []
    return gpus


def _open_index(rc) -> tuple[dict, DocStore]:
    if not rc.index_dir:
        raise ConfigError("retriever.index_dir (--index) is required")
    t0 = time.time()
    manifest = load_manifest(rc.index_dir)
    if rc.verify_checksums:
        verify_checksums(rc.index_dir, manifest)
        log.info("index checksums verified in %.1f s", time.time() - t0)
    docs = DocStore(Path(rc.index_dir) / "docs")
    if len(docs) != manifest["count"]:
        raise IndexFolderError(f"document store holds {len(docs)} passages, manifest says {manifest['count']}")
    kind = manifest.get("kind", "dense")
    if rc.kind not in ("auto", kind):  # the manifest decides; a kind set in the config is a check
        raise IndexFolderError(f"{rc.index_dir} holds a {kind} index, but retriever.kind is {rc.kind!r} "
                               f"(set retriever.kind={kind} or auto, or serve a {rc.kind} index)")
    if kind == "bm25":
        b = manifest["bm25"]
        log.info("index %s: %d passages, %d shards, BM25 (%s, k1 %g, b %g, global IDF), vocabulary %d", rc.index_dir,
                 manifest["count"], len(manifest["shards"]), b["method"], b["k1"], b["b"], manifest["dim"])
        return manifest, docs
    log.info("index %s: %d passages, %d shards, factory %s, metric %s, encoder %s, query prefix %r", rc.index_dir,
             manifest["count"], len(manifest["shards"]), manifest["factory"], manifest.get("metric", "inner_product"),
             manifest["encoder"]["path"], manifest["encoder"]["query_prefix"])
    warn_conventions(manifest["encoder"])  # e.g. an e5 index without "query: ": queries would not match
    return manifest, docs


def _query_encoder(manifest: dict, rc, device: str):
    """The router's query side: the encoder of a dense index, bm25s's tokenizer for a BM25 one."""
    if manifest.get("kind") == "bm25":
        from retriever.bm25 import QueryTokenizer

        return QueryTokenizer(rc.index_dir, manifest)
    return encoder_for(manifest, rc.encoder, threads=rc.encoder_threads, device=device)


def _http_server(cfg, router, docs):
    """The Search-R1 HTTP API on the server retriever.http_server names (same API either way)."""
    if cfg.retriever.http_server == "uvicorn":
        from retriever.http_asgi import AsgiSearchR1Server

        return AsgiSearchR1Server(cfg, router, docs)
    from retriever.http_api import SearchR1Server

    return SearchR1Server(cfg, router, docs)


def main(cfg) -> int:
    rc = cfg.retriever
    try:
        check_bind_address(rc.endpoint, cfg.transport)
        if rc.http_port:
            check_host_bind(rc.http_host, cfg.transport, "retriever.http_host")
        if cfg.metrics.retriever_port:
            check_host_bind(cfg.metrics.host, cfg.transport, "metrics.host")
        # a bad token file fails here, before the index loads (the servers read it again to serve)
        if rc.http_port and rc.http_token_file:
            read_token_file(rc.http_token_file, "retriever.http_token_file")
        if cfg.metrics.retriever_port and cfg.metrics.token_file:
            read_token_file(cfg.metrics.token_file, "metrics.token_file")
        gpus = _gpus(rc.gpus)
        manifest, docs = _open_index(rc)
    except (ConfigError, IndexFolderError, FileNotFoundError) as e:
        log.error("%s", e)
        return 2
    metrics = Metrics(role="retriever")
    ipc_dir = Path(tempfile.mkdtemp(prefix="scout-retriever-"))
    router = Router(cfg, manifest, docs, metrics, ctx=zmq.Context.instance())
    shards = ShardSet(rc, rc.index_dir, manifest, router.bind_back(f"ipc://{ipc_dir}/shards"), gpus,
                      log_level=cfg.log_level, metrics=metrics)
    router.shards = shards
    http = None

    def _stop(signum, _frame):
        log.info("signal %d: shutting down", signum)
        router.stop.set()
        router.wake()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        if cfg.metrics.retriever_port:
            port = metrics.serve(cfg.metrics.host, cfg.metrics.retriever_port, health=router.health,
                                 token_file=cfg.metrics.token_file)
            log.info("metrics on http://%s:%d/metrics", cfg.metrics.host, port)
        shards.start_all()
        device = f"cuda:{gpus[0]}" if gpus else "cpu"
        router.encoder = _query_encoder(manifest, rc, device)
        router.start_encoder()
        if not router.wait_ready(rc.shard_start_timeout_s):
            return 0 if router.stop.is_set() else 1
        router.bind_front(cfg.transport)
        if rc.http_port:
            http = _http_server(cfg, router, docs)
            http.start()
        log.info("retriever ready: %d shards up, ZeroMQ %s", len(shards.shards), rc.endpoint)
        router.run()
        return 0
    except (ConfigError, IndexFolderError) as e:
        log.error("%s", e)
        return 2
    except Exception:
        log.exception("retriever failed")
        return 1
    finally:
        if http is not None:
            http.close()
        router.stop.set()
        router._drain_on_stop()
        shards.stop_all()
        router.close()
        metrics.close()
        shutil.rmtree(ipc_dir, ignore_errors=True)
        log.info("retriever stopped")
