"""Prometheus `/metrics` and `/health` for every process, from the process's own registry.

    m = Metrics(role="actor", labels={"worker": "0", "gpu": "cpu"})
    tokens = m.counter("scout_actor_generated_tokens_total", "tokens sampled")
    tokens.inc(128)
    m.serve("127.0.0.1", 9201, health=lambda: {"engine": "ready"})

Every metric carries the process's constant labels (role, worker, gpu, shard ...), so a slow
actor can be found in a query. Names follow Prometheus conventions (`_total`, `_seconds`).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self, role: str, labels: dict[str, str] | None = None):
        self.role = role
        self.registry = CollectorRegistry(auto_describe=True)
        self.const = {"role": role, **{k: str(v) for k, v in (labels or {}).items()}}
        self._server: ThreadingHTTPServer | None = None
        self._health: Callable[[], dict[str, Any]] = lambda: {}
        self.started = time.time()
        self.up = self.gauge("scout_up", "1 while the process is serving")
        self.up.set(1)

    def _names(self, extra: tuple[str, ...]) -> list[str]:
        return [*self.const, *extra]

    def counter(self, name: str, doc: str, labels: tuple[str, ...] = ()):
        c = Counter(name, doc, self._names(labels), registry=self.registry)
        return _Bound(c, self.const, labels)

    def gauge(self, name: str, doc: str, labels: tuple[str, ...] = ()):
        g = Gauge(name, doc, self._names(labels), registry=self.registry)
        return _Bound(g, self.const, labels)

    def histogram(self, name: str, doc: str, labels: tuple[str, ...] = (), buckets=LATENCY_BUCKETS):
        h = Histogram(name, doc, self._names(labels), registry=self.registry, buckets=buckets)
        return _Bound(h, self.const, labels)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def health(self) -> dict[str, Any]:
        try:
            extra = self._health()
            status = extra.pop("status", "ok") if isinstance(extra, dict) else "ok"
        except Exception as e:  # a failing health probe reports, it does not crash the server
            extra, status = {"error": f"{type(e).__name__}: {e}"}, "error"
        return {"status": status, "role": self.role, **self.const,
                "uptime_s": round(time.time() - self.started, 3), **(extra or {})}

    def serve(self, host: str, port: int, health: Callable[[], dict[str, Any]] | None = None) -> int:
        """Serve /metrics and /health in a daemon thread; returns the bound port (0 = pick)."""
        if health is not None:
            self._health = health
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server API)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    body, ctype, code = metrics.render(), CONTENT_TYPE_LATEST, 200
                elif path == "/health":
                    h = metrics.health()
                    body, ctype = json.dumps(h).encode(), "application/json"
                    code = 200 if h["status"] == "ok" else 503
                else:
                    body, ctype, code = b"not found: try /metrics or /health\n", "text/plain", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # keep stderr for our own logs
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name=f"metrics-{self.role}", daemon=True).start()
        return self._server.server_address[1]

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _Bound:
    """A metric with the process's constant labels already applied."""

    def __init__(self, metric, const: dict[str, str], extra: tuple[str, ...]):
        self._metric, self._const, self._extra = metric, const, extra
        self._plain = None if extra else metric.labels(**const)

    def labels(self, **kw):
        return self._metric.labels(**self._const, **kw)

    def __getattr__(self, item):  # inc / set / observe / time on the unlabelled child
        if self._plain is None:
            raise AttributeError(f"metric has labels {self._extra}: call .labels(...) first")
        return getattr(self._plain, item)
