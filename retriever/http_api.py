"""Search-R1 compatible HTTP API, served next to the ZeroMQ endpoint, through the same batcher.

    POST /retrieve  {"queries": [str, ...], "topk": k, "return_scores": bool}
      -> 200 {"result": [[{"document": {"id": str, "contents": str}, "score": float}, ...], ...]}
         (return_scores false: the inner items are the documents alone)
      -> 400 / 401 / 404 / 405 / 413 / 503 / 504 {"error": {"code": ..., "message": ...}}
    GET /health     the service health (same JSON as the metrics port's /health); always open

With retriever.http_token_file set, POST /retrieve needs `Authorization: Bearer <token>`: without
it, or with another token, the answer is 401 {"error": {"code": "unauthorised", ...}} with a
`WWW-Authenticate: Bearer` header (counted as outcome="unauthorised", rejected reason "http_401").

`topk` may be omitted or null (then `retriever.http_default_topk`, as Search-R1 falls back to
its configured top-k); 0, negatives, or values above the cap are refused with 400. Unknown
top-level fields are ignored, as Search-R1's FastAPI server does (counted in
scout_retriever_http_ignored_fields_total); the known ones are validated in full.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Callable

from pydantic import ValidationError

from common.metrics import (BEARER_CHALLENGE, HTTP_TIMEOUT_S, CountingHandler, QuietHTTPServer, bearer_ok,
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


class SearchR1Server:
    def __init__(self, cfg, router: Router, docs: DocStore):
        rc = cfg.retriever
        check_host_bind(rc.http_host, cfg.transport, "retriever.http_host")
        # read once, here; never logged
        self.token = read_token_file(rc.http_token_file, "retriever.http_token_file") if rc.http_token_file else None
        self.rc, self.router, self.docs = rc, router, docs
        self.m_ignored = router.metrics.counter("scout_retriever_http_ignored_fields_total",
                                                "unknown top-level /retrieve body fields ignored")
        self.server = QuietHTTPServer((rc.http_host, rc.http_port), self._handler())
        self.port = self.server.server_address[1]
        self.thread: threading.Thread | None = None

    def start(self) -> int:
        self.thread = threading.Thread(target=self.server.serve_forever, name="retriever-http", daemon=True)
        self.thread.start()
        log.info("Search-R1 HTTP API on http://%s:%d/retrieve (%s)", self.rc.http_host, self.port,
                 "Bearer token required" if self.token is not None else "no token")
        warning = open_bind_warning(self.rc.http_host, self.rc.http_token_file)
        if warning:
            log.warning("%s", warning)
        return self.port

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def authorise(self, authorization: str | None) -> None:
        """Raise HttpError(401) unless no token is configured or the header carries it."""
        if self.token is not None and not bearer_ok(authorization, self.token):
            why = "no Authorization header" if not authorization else "the Authorization header is not the token"
            raise HttpError(401, "unauthorised", f"{why}: send Authorization: Bearer <token>",
                            headers=(BEARER_CHALLENGE,))

    def retrieve(self, raw: bytes) -> dict:
        queries, topk, return_scores = parse_body(raw, self.rc.http_default_topk, self.rc.topk_cap,
                                                  self.m_ignored.inc)
        fut = self.router.submit(queries, topk, source="http")
        try:
            scores, rows = fut.result(timeout=self.rc.request_timeout_s)
        except ServiceError as e:
            raise HttpError(STATUS.get(e.code, 500), e.code, str(e), counted=True) from None
        except TimeoutError:
            fut.cancel()
            raise HttpError(504, "timeout", f"no answer within {self.rc.request_timeout_s:.0f} s") from None
        return {"result": render_result(self.docs, scores, rows, return_scores)}

    def _handler(self):
        return type("Handler", (SearchR1Handler,), {"api": self})


class SearchR1Handler(CountingHandler):
    """One connection to the Search-R1 API; `api` (the SearchR1Server) is set by a subclass."""

    api: SearchR1Server
    protocol_version = "HTTP/1.1"
    served = 0  # requests answered on this connection: a keep-alive that idles out is no refusal

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
        if 400 <= e.status < 500:
            self.reject(f"http_{e.status}")
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
            if not e.counted:  # refused before reaching the batcher
                outcome = "unauthorised" if e.status == 401 else "bad_request"
                api.router.m_requests.labels(source="http", outcome=outcome).inc()
            self._error(e)
        except Exception as e:  # never leave a caller without an answer
            log.exception("HTTP /retrieve failed")
            self._error(HttpError(500, "internal", f"{type(e).__name__}: {e}"))

    def _body(self) -> bytes:
        cap = self.api.rc.http_max_body_bytes
        length = self.headers.get("Content-Length")
        # ASCII digits only: str.isdigit() also accepts e.g. "²", which int() refuses
        if length is None or not (length.isascii() and length.isdigit()):
            raise HttpError(411, "bad_request", "a Content-Length header of ASCII digits is required")
        n = int(length)
        if n > cap:
            raise HttpError(413, "bad_request", f"body of {n} bytes, cap is {cap}")
        try:
            raw = self.rfile.read(n)
        except TimeoutError:
            raise HttpError(408, "bad_request", f"body not received within {HTTP_TIMEOUT_S:.0f} s") from None
        if len(raw) != n:
            raise HttpError(400, "bad_request", f"body ended after {len(raw)} of {n} bytes")
        return raw

    def do_GET(self):  # noqa: N802
        path = self.path.split("?", 1)[0]
        if path == "/health":
            h = self.api.router.health()
            self._send(200 if h["status"] == "ok" else 503, h)
        elif path == "/retrieve":
            self._error(HttpError(405, "bad_request", "use POST /retrieve with a JSON body"))
        else:
            self._error(HttpError(404, "bad_request", f"no such endpoint {self.path!r}: POST /retrieve"))
