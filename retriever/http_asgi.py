"""The Search-R1 HTTP API on uvicorn + starlette (retriever.http_server = "uvicorn").

The same interface, JSON shapes, auth, error codes and /health as retriever/http_api.py's
http.server version; one asyncio event loop in a thread of the router process instead of a
thread per connection. A request is handed to the router loop (Router.submit, a
concurrent.futures.Future) and awaited without holding a thread.

Slow clients: uvicorn has no timeout for a request that arrives slowly (its keep-alive timer
is cancelled by any byte), so DeadlineProtocol closes a connection whose request line and
headers are not in within retriever.http_request_deadline_s of their first byte, and the body
read has the same deadline (408). Beyond retriever.http_max_connections open connections, one
more is answered 503 at once and closed, as the http.server version does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from common.config import ConfigError
from retriever.http_api import REFUSED_LINGER_S, HttpError, SearchR1Api, announce, busy_response

log = logging.getLogger("scout.retriever.http")


def _protocol(deadline_s: float, cap: int, busy: bytes, on_busy):
    """uvicorn's httptools protocol with the slow-client limits: at most `cap` connections (one
    more is answered `busy`, a 503, at once and closed), and a request line and headers that must
    arrive within `deadline_s` of their first byte."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        raise ConfigError("retriever.http_server = 'uvicorn' needs httptools (pip install 'uvicorn[standard]'); "
                          "or set retriever.http_server = 'threading'") from None

    class DeadlineProtocol(HttpToolsProtocol):
        _header_timer = None
        _refused = False

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > cap:  # this one included
                on_busy()
                self._refused = True
                transport.write(busy)
                transport.write_eof()
                # closed now, with the request unread, the connection would be reset and the 503
                # could be lost: read (and drop) what comes for a moment first
                self.loop.call_later(REFUSED_LINGER_S, transport.close)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            between = self.cycle is None or self.cycle.response_complete
            if between and self._header_timer is None:  # a new request's first bytes: start its clock
                self._header_timer = self.loop.call_later(deadline_s, self._too_slow)
            super().data_received(data)

        def on_headers_complete(self) -> None:
            self._stop_timer()
            super().on_headers_complete()

        def connection_lost(self, exc) -> None:
            self._stop_timer()
            super().connection_lost(exc)

        def _stop_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _too_slow(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.close()

    return DeadlineProtocol


class AsgiSearchR1Server(SearchR1Api):
    def __init__(self, cfg, router, docs):
        super().__init__(cfg, router, docs)
        rc = self.rc
        family = socket.AF_INET6 if ":" in rc.http_host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((rc.http_host, rc.http_port))  # bound here, as http.server does: the port is known now
        self.port = self.sock.getsockname()[1]
        app = Starlette(routes=[Route("/retrieve", self.retrieve, methods=["GET", "POST"]),
                                Route("/health", self.health, methods=["GET"])],
                        exception_handlers={HTTPException: self.http_exception})
        cap = rc.http_max_connections
        protocol = _protocol(rc.http_request_deadline_s, cap, busy_response(cap),
                             lambda: router.metrics.reject("http", "http_503"))
        config = uvicorn.Config(app, http=protocol, log_level="warning", access_log=False, lifespan="off",
                                backlog=128, timeout_keep_alive=10)
        self.server = uvicorn.Server(config)
        self.thread: threading.Thread | None = None

    def start(self) -> int:
        self.sock.listen(128)
        # not the main thread: uvicorn leaves the process's signal handlers alone
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="retriever-http", daemon=True)
        self.thread.start()
        announce("uvicorn", self.rc, self.token, self.port)
        return self.port

    def close(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=10)
        self.sock.close()

    @staticmethod
    def _json(status: int, obj, headers: tuple[tuple[str, str], ...] = ()) -> Response:
        # uvicorn writes header names in lower case (http.server: as given); HTTP does not care
        body = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        return Response(body, status_code=status, media_type="application/json", headers=dict(headers))

    def _error(self, e: HttpError) -> Response:
        # Connection: close: the body may be unread, do not reuse the connection
        return self._json(e.status, {"error": {"code": e.code, "message": str(e)}},
                          (*e.headers, ("Connection", "close")))

    async def http_exception(self, request: Request, exc: HTTPException) -> Response:
        what = "use GET /health or POST /retrieve" if exc.status_code == 405 else "POST /retrieve"
        e = HttpError(exc.status_code, "bad_request", f"no such endpoint {request.url.path!r}: {what}")
        self.router.metrics.reject("http", f"http_{e.status}")
        return self._error(e)

    async def health(self, request: Request) -> Response:
        h = self.router.health()
        return self._json(200 if h["status"] == "ok" else 503, h)

    async def retrieve(self, request: Request) -> Response:
        if request.method == "GET":
            self.router.metrics.reject("http", "http_405")
            return self._error(HttpError(405, "bad_request", "use POST /retrieve with a JSON body"))
        try:
            self.authorise(request.headers.get("authorization"))  # before the body is read
            raw = await self._body(request)
            fut, return_scores = self.submit(raw)
            try:
                await asyncio.wait_for(asyncio.wrap_future(fut), self.rc.request_timeout_s)
            except asyncio.TimeoutError:
                fut.cancel()
                raise self.timeout_error() from None
            except Exception:
                pass  # answer() raises it as an HttpError
            return self._json(200, self.answer(fut, return_scores))
        except HttpError as e:
            self.count_refusal(e)
            return self._error(e)
        except Exception as e:  # never leave a caller without an answer
            log.exception("HTTP /retrieve failed")
            return self._error(HttpError(500, "internal", f"{type(e).__name__}: {e}"))

    async def _body(self, request: Request) -> bytes:
        n = self.check_length(request.headers.get("content-length"))
        try:
            raw = await asyncio.wait_for(request.body(), self.rc.http_request_deadline_s)
        except asyncio.TimeoutError:
            raise HttpError(408, "bad_request", f"body not received within "
                            f"{self.rc.http_request_deadline_s:g} s of the request's headers") from None
        except ClientDisconnect:
            raise HttpError(400, "bad_request", "the client went away before the body ended") from None
        if len(raw) != n:
            raise HttpError(400, "bad_request", f"body ended after {len(raw)} of {n} bytes")
        return raw
