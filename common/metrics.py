"""Prometheus `/metrics` and `/health` for every process, from the process's own registry.

    m = Metrics(role="actor", labels={"worker": "0", "gpu": "cpu"})
    tokens = m.counter("scout_actor_generated_tokens_total", "tokens sampled")
    tokens.inc(128)
    m.serve("127.0.0.1", 9201, health=lambda: {"engine": "ready"})

With `token_file` (metrics.token_file), `/metrics` answers 401 unless the request carries
`Authorization: Bearer <token>`; `/health` stays open. `read_token_file` / `bearer_ok` are the
same checks the retriever's Search-R1 HTTP API uses for retriever.http_token_file.

Every metric carries the process's constant labels (role, worker, gpu, shard ...), so a slow
actor can be found in a query. Names follow Prometheus conventions (`_total`, `_seconds`).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from common.config import ConfigError
from common.procs import rss_bytes

log = logging.getLogger("scout.metrics")

HTTP_TIMEOUT_S = 10.0  # an HTTP peer that stalls mid-request is dropped after this (no thread waits forever)
SERVE_POLL_S = 0.1  # http.server threads check for shutdown() this often (its default, 0.5 s, is what a stop waits)

BEARER_CHALLENGE = ("WWW-Authenticate", 'Bearer realm="scout"')


def read_token_file(path: str, key: str) -> bytes:
    """The bearer token in `path` (surrounding whitespace stripped), read once at start. A missing,
    unreadable or empty file, or a token that is not printable ASCII, is a ConfigError naming `key`
    and the path (never the token)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{key}: cannot read token file {path!r}: {e.strerror or e}") from None
    token = raw.strip()
    if not token:
        raise ConfigError(f"{key}: token file {path!r} is empty; put a secret in it "
                          f"(e.g. `openssl rand -hex 32 > {path}`)")
    if not all(0x21 <= b <= 0x7E for b in token):
        raise ConfigError(f"{key}: the token in {path!r} must be printable ASCII without spaces (e.g. hex)")
    return token


def bearer_ok(authorization: str | None, token: bytes) -> bool:
    """Whether an Authorization header value is `Bearer <token>`; constant-time in the token."""
    scheme, _, given = (authorization or "").strip().partition(" ")
    supplied = given.strip().encode("latin-1", "replace")  # http.server decodes header bytes as latin-1
    match = hmac.compare_digest(supplied, token)  # compared even when the scheme is wrong: no early exit
    return match and scheme.lower() == "bearer"


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
        # memory and descriptors of this process, read at each scrape (a creeping RSS or fd count is
        # how a leak shows; the actor's supervisor and workers each report their own)
        self.rss = self.gauge("scout_process_resident_memory_bytes", "resident memory of this process")
        self.fds = self.gauge("scout_process_open_fds", "open file descriptors of this process")
        # bad input refused by any of this process's sockets (ZeroMQ or HTTP), e.g.
        # socket="ingest", reason="malformed" | "invalid" | "unexpected_type" | "http_400" ...
        self.rejected = self.counter(f"scout_{role}_rejected_messages_total",
                                     "bad messages or requests refused, by socket and reason", ("socket", "reason"))

    def reject(self, socket: str, reason: str) -> None:
        self.rejected.labels(socket=socket, reason=reason).inc()

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
        try:  # Linux /proc; elsewhere the two gauges stay at 0
            self.rss.set(rss_bytes())
            self.fds.set(len(os.listdir("/proc/self/fd")))
        except OSError:
            pass
        return generate_latest(self.registry)

    def health(self) -> dict[str, Any]:
        try:
            extra = self._health()
            status = extra.pop("status", "ok") if isinstance(extra, dict) else "ok"
        except Exception as e:  # a failing health probe reports, it does not crash the server
            extra, status = {"error": f"{type(e).__name__}: {e}"}, "error"
        return {"status": status, "role": self.role, **self.const,
                "uptime_s": round(time.time() - self.started, 3), **(extra or {})}

    def serve(self, host: str, port: int, health: Callable[[], dict[str, Any]] | None = None,
              token_file: str | None = None) -> int:
        """Serve /metrics and /health in a daemon thread; returns the bound port (0 = pick).
        With `token_file` (metrics.token_file), /metrics needs `Authorization: Bearer <token>`
        (a ConfigError here when the file is unreadable or empty); /health stays open."""
        token = read_token_file(token_file, "metrics.token_file") if token_file else None
        if health is not None:
            self._health = health
        metrics = self

        class Handler(CountingHandler):
            def reject(self, reason: str) -> None:
                metrics.reject("metrics_http", reason)

            def do_GET(self):  # noqa: N802 (http.server API)
                path = self.path.split("?", 1)[0]
                extra: tuple[tuple[str, str], ...] = ()
                if path == "/metrics" and token is not None and not bearer_ok(self.headers.get("Authorization"), token):
                    self.reject("http_401")
                    body, ctype, code = b"unauthorised: send Authorization: Bearer <token>\n", "text/plain", 401
                    extra = (BEARER_CHALLENGE,)
                elif path == "/metrics":
                    body, ctype, code = metrics.render(), CONTENT_TYPE_LATEST, 200
                elif path == "/health":
                    h = metrics.health()
                    body, ctype = json.dumps(h).encode(), "application/json"
                    code = 200 if h["status"] == "ok" else 503
                else:
                    self.reject("http_404")
                    body, ctype, code = b"not found: try /metrics or /health\n", "text/plain", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in extra:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

        self._server = QuietHTTPServer((host, port), Handler)
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": SERVE_POLL_S},
                         name=f"metrics-{self.role}", daemon=True).start()
        return self._server.server_address[1]

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class CountingHandler(BaseHTTPRequestHandler):
    """Request handler with a socket timeout that counts every request http.server refuses by
    itself: a malformed or blank request line, bad headers, an unsupported method or version
    (reason "http_<status>" / "http_empty") and a peer that stalls mid-request ("http_timeout").
    Subclasses implement `reject(reason)` and call it for their own refusals too."""

    timeout = HTTP_TIMEOUT_S  # a stalled peer is dropped, its thread ends
    _refused = False

    def reject(self, reason: str) -> None:
        raise NotImplementedError

    def parse_request(self) -> bool:
        self._refused = False
        ok = super().parse_request()
        if not ok and not self._refused:  # a blank request line: http.server closes without a word
            self.reject("http_empty")
        return ok

    def send_error(self, code, message=None, explain=None):
        self._refused = True
        self.reject(f"http_{code}")
        super().send_error(code, message, explain)

    def log_error(self, format, *args):  # noqa: A002 (http.server API); its one own log line: a timeout
        if format.startswith("Request timed out"):
            self.reject("http_timeout")

    def log_message(self, *args):  # keep stderr for our own logs
        pass


class QuietHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer whose per-request failures (a peer that hangs up or stalls) are one log
    line, not a traceback on stderr; request threads are daemons."""

    daemon_threads = True

    def handle_error(self, request, client_address):
        import sys

        err = sys.exc_info()[1]
        if isinstance(err, (ConnectionError, TimeoutError)):
            log.debug("HTTP peer %s: %s", client_address, err)
        else:
            log.error("HTTP request from %s failed: %s: %s", client_address, type(err).__name__, err)


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
