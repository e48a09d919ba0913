"""Bearer tokens on the HTTP surfaces: the Search-R1 `POST /retrieve` (retriever.http_token_file)
and every role's `/metrics` (metrics.token_file). Real servers on free loopback ports: a real
`cli.py retriever` over an index built by the real CLI, and real Metrics servers in-process."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from common.config import ConfigError
from common.metrics import Metrics, bearer_ok, read_token_file
from common.transport import free_tcp_port
from retriever.http_api import open_bind_warning
from bench.faults import build_index_here
from tests.conftest import ROOT, Procs, ipc_dir
from tests.test_retriever_index import make_corpus, write_jsonl

TOKEN = "s3cret-" + uuid.uuid4().hex
METRICS_TOKEN = "m3trics-" + uuid.uuid4().hex
ROWS = make_corpus(40, seed=5)
BODY = json.dumps({"queries": ["capital of somewhere", "who founded it"], "topk": 2}).encode()


# --------------------------------------------------------------------------- helpers
def call(method: str, url: str, body: bytes | None = None, token: str | None = None, auth: str | None = None,
         timeout: float = 30) -> tuple[int, dict, bytes]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if auth is not None:
        headers["Authorization"] = auth
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, r.read()  # an HTTPMessage: names case-insensitive
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def metric(text: str, prefix: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def wait_health(port: int, proc, timeout: float = 240) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the retriever exited with code {proc.returncode}")
        try:
            status, _, raw = call("GET", f"http://127.0.0.1:{port}/health", timeout=5)
            if status == 200 and json.loads(raw)["status"] == "ok":
                return
        except OSError:
            pass
        time.sleep(0.1)
    pytest.fail("timed out waiting for the retriever's /health")


def start(procs: Procs, index_dir: Path, log_path: Path, *extra: str) -> dict:
    http_port, metrics_port = free_tcp_port(), free_tcp_port()
    endpoint = f"ipc://{ipc_dir()}/retriever"
    log = open(log_path, "w")
    proc = procs.start(["cli.py", "retriever", "--index", str(index_dir), "--endpoint", endpoint,
                        "--http-port", str(http_port), "--set", f"metrics.retriever_port={metrics_port}", *extra],
                       stdout=log, stderr=subprocess.STDOUT)
    log.close()
    wait_health(metrics_port, proc)
    return {"proc": proc, "retrieve": f"http://127.0.0.1:{http_port}/retrieve",
            "http_health": f"http://127.0.0.1:{http_port}/health",
            "metrics": f"http://127.0.0.1:{metrics_port}/metrics",
            "health": f"http://127.0.0.1:{metrics_port}/health", "log": log_path}


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("auth")


@pytest.fixture(scope="module")
def index_dir(base):
    corpus = write_jsonl(base / "corpus.jsonl", ROWS)
    out = base / "index"
    return build_index_here(corpus, out)


@pytest.fixture(scope="module")
def token_files(base) -> tuple[Path, Path]:
    http_tok, metrics_tok = base / "http.token", base / "metrics.token"
    http_tok.write_text(f"  {TOKEN}\n")  # surrounding whitespace is stripped
    metrics_tok.write_text(METRICS_TOKEN + "\n")
    return http_tok, metrics_tok


@pytest.fixture(scope="module")
def secured(index_dir, token_files, base):
    procs = Procs()
    try:
        yield start(procs, index_dir, base / "secured.log", "--http-token-file", str(token_files[0]),
                    "--set", f"metrics.token_file={str(token_files[1])!r}")
    finally:
        procs.stop_all()


@pytest.fixture(scope="module")
def open_service(index_dir, base):
    procs = Procs()
    try:
        yield start(procs, index_dir, base / "open.log")
    finally:
        procs.stop_all()


# --------------------------------------------------------------------------- the Search-R1 API
@pytest.mark.slow
def test_retrieve_without_or_with_a_wrong_token_is_401(secured):
    for kw in ({}, {"token": "wrong"}, {"token": TOKEN + "x"}, {"token": ""}, {"auth": f"Basic {TOKEN}"},
               {"auth": TOKEN}):
        status, headers, raw = call("POST", secured["retrieve"], BODY, **kw)
        assert status == 401, kw
        assert headers["WWW-Authenticate"].startswith("Bearer")
        assert headers["Content-Type"] == "application/json"
        body = json.loads(raw)
        assert list(body) == ["error"] and body["error"]["code"] == "unauthorised"
        assert "Bearer" in body["error"]["message"] and TOKEN not in body["error"]["message"]


@pytest.mark.slow
def test_retrieve_with_the_token_answers(secured):
    status, _, raw = call("POST", secured["retrieve"], BODY, token=TOKEN)
    assert status == 200
    result = json.loads(raw)["result"]
    assert len(result) == 2 and all(len(items) == 2 for items in result)
    assert {"id", "contents"} <= set(result[0][0])
    # the scheme is case-insensitive (RFC 7235), as Search-R1 clients may send "bearer"
    assert call("POST", secured["retrieve"], BODY, auth=f"bearer {TOKEN}")[0] == 200
    # a bad body with the right token is still the API's 400
    status, _, raw = call("POST", secured["retrieve"], b"{", token=TOKEN)
    assert status == 400 and json.loads(raw)["error"]["code"] == "bad_request"


@pytest.mark.slow
def test_health_stays_open(secured):
    for url in (secured["http_health"], secured["health"]):
        status, _, raw = call("GET", url)
        assert status == 200 and json.loads(raw)["status"] == "ok"


@pytest.mark.slow
def test_metrics_needs_its_token_and_counts_the_401s(secured):
    status, headers, _ = call("GET", secured["metrics"])
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert call("GET", secured["metrics"], token=TOKEN)[0] == 401  # the API's token is not the metrics token
    status, _, raw = call("GET", secured["metrics"], token=METRICS_TOKEN)
    assert status == 200
    before = raw.decode()
    unauth = 'scout_retriever_requests_total{outcome="unauthorised",role="retriever",source="http"}'
    rejected = 'scout_retriever_rejected_messages_total{reason="http_401",role="retriever",socket="http"}'
    metrics_rejected = ('scout_retriever_rejected_messages_total{reason="http_401",role="retriever",'
                        'socket="metrics_http"}')
    n_unauth, n_rejected, n_metrics = metric(before, unauth), metric(before, rejected), metric(before, metrics_rejected)
    assert n_metrics >= 2
    for _ in range(3):
        assert call("POST", secured["retrieve"], BODY, token="nope")[0] == 401
    after = call("GET", secured["metrics"], token=METRICS_TOKEN)[2].decode()
    assert metric(after, unauth) == n_unauth + 3
    assert metric(after, rejected) == n_rejected + 3
    assert metric(after, metrics_rejected) == n_metrics


@pytest.mark.slow
def test_the_token_is_never_logged(secured):
    call("POST", secured["retrieve"], BODY, token="wrong")
    call("POST", secured["retrieve"], BODY, token=TOKEN)
    text = secured["log"].read_text()
    assert "Bearer token required" in text  # the start line says the API is protected
    assert TOKEN not in text and METRICS_TOKEN not in text
    assert "open to anyone" not in text  # loopback: no warning


@pytest.mark.slow
def test_without_token_files_everything_is_open(open_service):
    status, _, raw = call("POST", open_service["retrieve"], BODY)
    assert status == 200 and len(json.loads(raw)["result"]) == 2
    assert call("POST", open_service["retrieve"], BODY, token="anything")[0] == 200  # a header is ignored
    status, _, raw = call("GET", open_service["metrics"])
    assert status == 200 and b"scout_retriever_requests_total" in raw
    assert call("GET", open_service["health"])[0] == 200
    assert "open to anyone" not in open_service["log"].read_text()  # loopback: no warning


@pytest.mark.slow
@pytest.mark.parametrize("which", ["http", "metrics"])
@pytest.mark.parametrize("problem", ["empty", "missing"])
def test_a_bad_token_file_fails_at_start(index_dir, tmp_path, which, problem):
    path = tmp_path / "tok"
    if problem == "empty":
        path.write_text("  \n")
    key = "retriever.http_token_file" if which == "http" else "metrics.token_file"
    args = ["--http-token-file", str(path)] if which == "http" else ["--set", f"metrics.token_file={str(path)!r}"]
    r = subprocess.run([sys.executable, "cli.py", "retriever", "--index", str(index_dir), "--http-port",
                        str(free_tcp_port()), "--set", f"metrics.retriever_port={free_tcp_port()}", *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in (r.stdout + r.stderr).splitlines() if key in line and str(path) in line]
    assert errors and ("empty" if problem == "empty" else "cannot read") in errors[-1]


# --------------------------------------------------------------------------- in-process pieces
def test_metrics_server_token(tmp_path):
    tok = tmp_path / "t"
    tok.write_text("abc123\n")
    m = Metrics(role="unit")
    port = m.serve("127.0.0.1", 0, health=lambda: {"engine": "ready"}, token_file=str(tok))
    try:
        url = f"http://127.0.0.1:{port}"
        status, headers, _ = call("GET", f"{url}/metrics")
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
        assert call("GET", f"{url}/metrics", token="abc12")[0] == 401
        assert call("GET", f"{url}/health")[0] == 200
        status, _, raw = call("GET", f"{url}/metrics", token="abc123")
        assert status == 200
        assert 'scout_unit_rejected_messages_total{reason="http_401",role="unit",socket="metrics_http"} 2.0' \
            in raw.decode()
    finally:
        m.close()
    m2 = Metrics(role="unit2")
    port = m2.serve("127.0.0.1", 0)
    try:
        assert call("GET", f"http://127.0.0.1:{port}/metrics")[0] == 200
    finally:
        m2.close()


def test_metrics_serve_refuses_an_empty_token_file(tmp_path):
    (tmp_path / "e").write_text("")
    with pytest.raises(ConfigError, match=r"metrics\.token_file.*is empty"):
        Metrics(role="unit3").serve("127.0.0.1", 0, token_file=str(tmp_path / "e"))


def test_read_token_file_and_bearer_ok(tmp_path):
    p = tmp_path / "t"
    p.write_text("\n tok-EN_1 \r\n")
    assert read_token_file(str(p), "k") == b"tok-EN_1"
    p.write_text("two words")
    with pytest.raises(ConfigError, match="printable ASCII"):
        read_token_file(str(p), "k")
    with pytest.raises(ConfigError, match=r"k: cannot read token file"):
        read_token_file(str(tmp_path / "nope"), "k")
    tok = b"tok-EN_1"
    assert bearer_ok("Bearer tok-EN_1", tok) and bearer_ok("bearer  tok-EN_1 ", tok)
    for bad in (None, "", "Bearer", "Bearer ", "tok-EN_1", "Basic tok-EN_1", "Bearer tok-EN_", "Bearer tok-EN_12",
                "Bearer t\u00f6k"):
        assert not bearer_ok(bad, tok), bad


def test_open_bind_warning():
    msg = open_bind_warning("0.0.0.0", None)
    assert msg and "open to anyone" in msg and "retriever.http_token_file" in msg and "--http-token-file" in msg
    assert open_bind_warning("10.1.2.3", "") is not None
    assert open_bind_warning("0.0.0.0", "/etc/scout/token") is None
    for host in ("127.0.0.1", "::1", "localhost"):
        assert open_bind_warning(host, None) is None


def test_the_warning_is_logged_at_start(caplog, monkeypatch):
    """SearchR1Server.start logs open_bind_warning's text; checked without binding a public address."""
    from retriever import http_api

    class Stub:
        rc = type("RC", (), {"http_host": "0.0.0.0", "http_token_file": None})()
        port, token, thread = 1, None, None
        server = type("S", (), {"serve_forever": staticmethod(lambda **kw: None)})()

    with caplog.at_level(logging.WARNING, logger="scout.retriever.http"):
        http_api.SearchR1Server.start(Stub())
    assert any(r.levelno == logging.WARNING and "open to anyone" in r.getMessage() for r in caplog.records)


def test_a_bad_metrics_token_file_stops_the_actor_at_start(tmp_path):
    """The actor checks metrics.token_file before it starts any worker (each would fail on it)."""
    from demo.tinymodel import build_tiny_model

    model = build_tiny_model(tmp_path / "tiny", layers=1, hidden=32)
    empty = tmp_path / "empty.token"
    empty.write_text("  \n")
    r = subprocess.run([sys.executable, "cli.py", "actor", "--model", str(model), "--set", "actor.engine='transformers'",
                        "--set", f"metrics.token_file='{empty}'", "--set", "metrics.actor_port=0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "metrics.token_file" in r.stderr and str(empty) in r.stderr
