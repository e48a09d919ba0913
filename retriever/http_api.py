"""Search-R1 compatible HTTP API, served next to the ZeroMQ endpoint, through the same batcher.

    POST /retrieve  {"queries": [str, ...], "topk": k, "return_scores": bool}
      -> 200 {"result": [[{"document": {"id": str, "contents": str}, "score": float}, ...], ...]}
         (return_scores false: the inner items are the documents alone)
      -> 400 / 401 / 404 / 405 / 408 / 411 / 413 / 503 / 504 {"error": {"code": ..., "message": ...}}
    GET /health     the service health (same JSON as the metrics port's /health); always open

Two servers share this API (retriever.http_server): SearchR1Server below (http.server, a thread
per connection) and retriever/http_asgi.py (uvicorn + starlette). Both bound slow clients: a
request's line, headers and body must arrive within retriever.http_request_deadline_s of its
first byte (else 408, or the connection is closed while the headers are incomplete), and beyond
retriever.http_max_connections open connections one more is answered 503 at once and closed.

With retriever.http_token_file set, POST /retrieve needs `Authorization: Bearer <token>`: without
it, or with another token, the answer is 401 {"error": {"code": "unauthorised", ...}} with a
`WWW-Authenticate: Bearer` header (counted as outcome="unauthorised", rejected reason "http_401").

`topk` may be omitted or null (then `retriever.http_default_topk`, as Search-R1 falls back to
its configured top-k); 0, negatives, or values above the cap are refused with 400. Unknown
top-level fields are ignored, as Search-R1's FastAPI server does (counted in
scout_retriever_http_ignored_fields_total); the known ones are validated in full.
"""

from __future__ import annotations

import io
import json
import logging
import socket
import threading
import time
from typing import Callable

from pydantic import ValidationError

from common.metrics import (BEARER_CHALLENGE, SERVE_POLL_S, CountingHandler, QuietHTTPServer, bearer_ok,
                            read_token_file)
from common.protocol import RetrieveRequest
from common.transport import check_host_bind, is_loopback
from retriever.docstore import DocStore
from retriever.router import Router, ServiceError

log = logging.getLogger("scout.retriever.http")

KNOWN_FIELDS = frozenset({"queries", "topk", "return_scores"})
STATUS = {"bad_request": 400, "unauthorised": 401, "unavailable": 503, "timeout": 504, "internal": 500, "stale": 409}


class HttpError(Exception):
    def __init__(self, status: int, code: str, message: str, counted: bool = False,
                 headers: tuple[tuple[str, str], ...] = ()):
        super().__init__(message)
        self.status, self.code, self.counted, self.headers = status, code, counted, headers


def open_bind_warning(host: str, token_file: str | None) -> str | None:
    """The start-up warning for an HTTP API reachable beyond loopback with no token, else None."""
    if token_file or is_loopback(host):
        return None
    return (f"Search-R1 HTTP API bound to {host!r} without a token: POST /retrieve is open to anyone who can "
            "reach the port. Put a secret in a file (e.g. `openssl rand -hex 32 > token`) and set "
            "retriever.http_token_file (cli.py retriever --http-token-file FILE); clients then send "
            "`Authorization: Bearer <token>`")


def parse_body(raw: bytes, default_topk: int, cap: int,
               on_unknown: Callable[[int], None] | None = None) -> tuple[list[str], int, bool]:
    """Validate a /retrieve body -> (queries, topk, return_scores); raises HttpError(400).
    Unknown top-level fields are ignored (`on_unknown(count)` is told)."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:  # bad UTF-8 / JSON, or nested too deep for the parser
        raise HttpError(400, "bad_request", f"body is not valid JSON: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(body, dict):
        raise HttpError(400, "bad_request", "body must be a JSON object with 'queries'")
    unknown = set(body) - KNOWN_FIELDS
    if unknown:  # Search-R1's FastAPI server ignores them too
        log.debug("ignoring unknown field(s) %s", [f[:64] for f in sorted(unknown)[:10]])
        if on_unknown is not None:
            on_unknown(len(unknown))
    queries = body.get("queries")
    if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
        raise HttpError(400, "bad_request", "'queries' must be a list of strings")
    topk = body.get("topk")
    if topk is None:
        topk = default_topk
    if isinstance(topk, bool) or not isinstance(topk, int):
        raise HttpError(400, "bad_request", f"'topk' must be an integer, got {type(topk).__name__}")
    if not 1 <= topk <= cap:
        raise HttpError(400, "bad_request", f"'topk' must be between 1 and {cap}, got {topk}")
    for i, q in enumerate(queries):  # JSON may carry lone surrogates ("\ud800"): no tokenizer takes them
        if not q.isascii():
            try:
                q.encode("utf-8")
            except UnicodeEncodeError:
                raise HttpError(400, "bad_request", f"query {i} is not valid Unicode (a lone surrogate)") from None
    scores = body.get("return_scores", False)
    if not isinstance(scores, bool):
        raise HttpError(400, "bad_request", "'return_scores' must be true or false")
    try:  # the same limits as the ZeroMQ path (non-empty, length caps, count caps)
        RetrieveRequest(request_id="http", queries=queries, topk=topk)
    except ValidationError as e:
        msg = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'request'}: {err['msg']}" for err in e.errors()[:3])
        raise HttpError(400, "bad_request", msg) from None
    return queries, topk, scores


def render_result(docs: DocStore, scores, rows, return_scores: bool) -> list[list[dict]]:
    out = []
    for qi in range(rows.shape[0]):
        valid = rows[qi][rows[qi] >= 0]
        ids, contents = docs.ids(valid), docs.contents(valid)
        items = []
        for j, (i, c) in enumerate(zip(ids, contents)):
            doc = {"id": i, "contents": c}
            items.append({"document": doc, "score": float(scores[qi, j])} if return_scores else doc)
        out.append(items)
    return out


def busy_response(cap: int) -> bytes:
    """The whole 503 answer to a connection beyond retriever.http_max_connections."""
    msg = f"{cap} connections open (retriever.http_max_connections): try again shortly"
    body = json.dumps({"error": {"code": "unavailable", "message": msg}}).encode()
    return (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


def announce(kind: str, rc, token: bytes | None, port: int) -> None:
    log.info("Search-R1 HTTP API (%s) on http://%s:%d/retrieve (%s)", kind, rc.http_host, port,
             "Bearer token required" if token is not None else "no token")
    warning = open_bind_warning(rc.http_host, rc.http_token_file)
    if warning:
        log.warning("%s", warning)


class SearchR1Api:
    """What both servers share: the token, body validation, the hand-off to the router, the
    answer's shape. Subclasses add the server: start() -> port, close()."""

    def __init__(self, cfg, router: Router, docs: DocStore):
        rc = cfg.retriever
        check_host_bind(rc.http_host, cfg.transport, "retriever.http_host")
        # read once, here; never logged
        self.token = read_token_file(rc.http_token_file, "retriever.http_token_file") if rc.http_token_file else None
        self.rc, self.router, self.docs = rc, router, docs
        self.m_ignored = router.metrics.counter("scout_retriever_http_ignored_fields_total",
                                                "unknown top-level /retrieve body fields ignored")

    def count_refusal(self, e: HttpError) -> None:
        """Count an HttpError: refused before the batcher -> a request outcome; 4xx -> a rejection."""
        if not e.counted:
            outcome = "unauthorised" if e.status == 401 else "bad_request"
            self.router.m_requests.labels(source="http", outcome=outcome).inc()
        if 400 <= e.status < 500:
            self.router.metrics.reject("http", f"http_{e.status}")

    def check_length(self, length: str | None) -> int:
        """The Content-Length header -> the body's size; raises HttpError(411/413)."""
        # ASCII digits only: str.isdigit() also accepts e.g. "²", which int() refuses
        if length is None or not (length.isascii() and length.isdigit()):
            raise HttpError(411, "bad_request", "a Content-Length header of ASCII digits is required")
        n, cap = int(length), self.rc.http_max_body_bytes
        if n > cap:
            raise HttpError(413, "bad_request", f"body of {n} bytes, cap is {cap}")
        return n

    def submit(self, raw: bytes):
        """Validate a body and hand it to the router -> (future, return_scores)."""
        queries, topk, return_scores = parse_body(raw, self.rc.http_default_topk, self.rc.topk_cap,
                                                  self.m_ignored.inc)
        return self.router.submit(queries, topk, source="http"), return_scores

    def answer(self, fut, return_scores: bool) -> dict:
        """The response body for a finished future; raises HttpError for a ServiceError."""
        try:
            scores, rows = fut.result(timeout=0)
        except ServiceError as e:
            raise HttpError(STATUS.get(e.code, 500), e.code, str(e), counted=True) from None
        return {"result": render_result(self.docs, scores, rows, return_scores)}

    def timeout_error(self) -> HttpError:
        return HttpError(504, "timeout", f"no answer within {self.rc.request_timeout_s:.0f} s")

    def authorise(self, authorization: str | None) -> None:
        """Raise HttpError(401) unless no token is configured or the header carries it."""
        if self.token is not None and not bearer_ok(authorization, self.token):
            why = "no Authorization header" if not authorization else "the Authorization header is not the token"
            raise HttpError(401, "unauthorised", f"{why}: send Authorization: Bearer <token>",
                            headers=(BEARER_CHALLENGE,))


class DeadlineReader(io.RawIOBase):
    """A connection's reads under a whole-request deadline: once a request's first byte arrives, its
    line, headers and body must all arrive within `deadline_s`. A per-read timeout alone lets a
    client that sends a byte every few seconds hold its thread for ever (slowloris)."""

    def __init__(self, sock: socket.socket, idle_s: float, deadline_s: float):
        self.sock, self.idle_s, self.deadline_s = sock, idle_s, deadline_s
        self.deadline: float | None = None  # None: between requests (waiting up to idle_s)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.deadline is None:
            timeout = self.idle_s
        else:
            timeout = self.deadline - time.monotonic()
            if timeout <= 0:
                raise TimeoutError(f"request not received within {self.deadline_s:g} s")
        self.sock.settimeout(timeout)
        try:
            n = self.sock.recv_into(b)
        finally:
            self.sock.settimeout(self.idle_s)  # writes keep the plain timeout
        if n and self.deadline is None:
            self.deadline = time.monotonic() + self.deadline_s
        return n


REFUSED_LINGER_S = 0.5  # how long a connection answered 503 is read before it is closed


class BoundedHTTPServer(QuietHTTPServer):
    """At most `max_connections` connections (threads) at once: one more is answered 503 on the
    accepting thread and closed, so slow clients cannot grow threads without bound."""

    request_queue_size = 128  # listen backlog (socketserver's default 5 drops SYNs under 64 clients)

    def __init__(self, address, handler, max_connections: int, on_busy):
        super().__init__(address, handler)
        self.max_connections, self.on_busy = max_connections, on_busy
        self.live = 0
        self._lock = threading.Lock()
        self.refused: list[tuple[float, socket.socket]] = []  # answered 503, closed soon (service_actions)

    def process_request(self, request, client_address):
        with self._lock:
            busy = self.live >= self.max_connections
            if not busy:
                self.live += 1
        if busy:
            self.refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _release(self) -> None:
        with self._lock:
            self.live -= 1

    def refuse(self, request) -> None:
        self.on_busy()
        try:
            request.settimeout(1.0)
            request.sendall(busy_response(self.max_connections))
            request.shutdown(socket.SHUT_WR)
            request.setblocking(False)
        except OSError:
            request.close()
            return
        # closed now, with the request unread, the connection would be reset and the 503 on its way
        # could be lost: read what comes for a moment first (service_actions), off this thread's path
        self.refused.append((time.monotonic() + REFUSED_LINGER_S, request))

    def service_actions(self) -> None:  # serve_forever calls it after each accept and every SERVE_POLL_S
        super().service_actions()
        now, keep = time.monotonic(), []
        for until, sock in self.refused:
            if until > now and _drain(sock):
                keep.append((until, sock))
            else:
                sock.close()
        self.refused = keep

    def server_close(self) -> None:
        super().server_close()
        for _, sock in self.refused:
            sock.close()
        self.refused = []


def _drain(sock: socket.socket) -> bool:
    """Read what has arrived on a non-blocking socket; False once the peer has closed it."""
    try:
        while sock.recv(65536):
            pass
        return False  # b"": the peer closed
    except BlockingIOError:
        return True
    except OSError:
        return False


class SearchR1Server(SearchR1Api):
    """The API on http.server: a thread per connection, at most retriever.http_max_connections."""

    def __init__(self, cfg, router: Router, docs: DocStore):
        super().__init__(cfg, router, docs)
        rc = self.rc
        handler = type("Handler", (SearchR1Handler,), {"api": self})
        self.server = BoundedHTTPServer((rc.http_host, rc.http_port), handler, rc.http_max_connections,
                                        lambda: router.metrics.reject("http", "http_503"))
        self.port = self.server.server_address[1]
        self.thread: threading.Thread | None = None

    def start(self) -> int:
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": SERVE_POLL_S},
                                       name="retriever-http", daemon=True)
        self.thread.start()
        announce("threading", self.rc, self.token, self.port)
        return self.port

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def retrieve(self, raw: bytes) -> dict:
        fut, return_scores = self.submit(raw)
        try:
            fut.result(timeout=self.rc.request_timeout_s)
        except TimeoutError:
            fut.cancel()
            raise self.timeout_error() from None
        except Exception:
            pass  # answer() raises it as an HttpError
        return self.answer(fut, return_scores)


class SearchR1Handler(CountingHandler):
    """One connection to the Search-R1 API; `api` (the SearchR1Server) is set by a subclass."""

    api: SearchR1Server
    protocol_version = "HTTP/1.1"
    served = 0  # requests answered on this connection: a keep-alive that idles out is no refusal

    def setup(self) -> None:
        super().setup()
        self.reader = DeadlineReader(self.connection, self.timeout, self.api.rc.http_request_deadline_s)
        self.rfile = io.BufferedReader(self.reader)

    def handle_one_request(self) -> None:
        self.reader.deadline = None  # the next request's clock starts at its first byte
        super().handle_one_request()

    def reject(self, reason: str) -> None:
        if reason != "http_timeout" or not self.served:
            self.api.router.metrics.reject("http", reason)

    def _send(self, status: int, obj, headers: tuple[tuple[str, str], ...] = ()) -> None:
        body = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)
        self.served += 1

    def _error(self, e: HttpError) -> None:
        self.close_connection = True  # the body may be unread: do not reuse the connection
        self._send(e.status, {"error": {"code": e.code, "message": str(e)}}, e.headers)

    def do_POST(self):  # noqa: N802 (http.server API)
        api = self.api
        try:
            if self.path.split("?", 1)[0] != "/retrieve":
                raise HttpError(404, "bad_request", f"no such endpoint {self.path!r}: POST /retrieve")
            api.authorise(self.headers.get("Authorization"))  # before the body is read
            raw = self._body()
            self._send(200, api.retrieve(raw))
        except HttpError as e:
            api.count_refusal(e)
            self._error(e)
        except Exception as e:  # never leave a caller without an answer
            log.exception("HTTP /retrieve failed")
            self._error(HttpError(500, "internal", f"{type(e).__name__}: {e}"))

    def _body(self) -> bytes:
        n = self.api.check_length(self.headers.get("Content-Length"))
        try:
            raw = self.rfile.read(n)
        except TimeoutError:
            raise HttpError(408, "bad_request", f"body not received within "
                            f"{self.api.rc.http_request_deadline_s:g} s of the request's start") from None
        if len(raw) != n:
            raise HttpError(400, "bad_request", f"body ended after {len(raw)} of {n} bytes")
        return raw

    def do_GET(self):  # noqa: N802
        path = self.path.split("?", 1)[0]
        try:
            if path == "/health":
                h = self.api.router.health()
                self._send(200 if h["status"] == "ok" else 503, h)
                return
            if path == "/retrieve":
                raise HttpError(405, "bad_request", "use POST /retrieve with a JSON body")
            raise HttpError(404, "bad_request", f"no such endpoint {self.path!r}: POST /retrieve")
        except HttpError as e:
            self.api.router.metrics.reject("http", f"http_{e.status}")
            self._error(e)
