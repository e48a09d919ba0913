"""The Search-R1 HTTP API under load, next to the ZeroMQ path, on one retriever and the same queries.

    python bench/http_load.py [--passages 2000] [--clients 64] [--seconds 15] [--slow 128,400]
                              [--servers threading,uvicorn,threading-unbounded] [--rounds 1] [--index DIR]
                              [--set retriever.KEY=VALUE ...]

For each server (retriever.http_server; "threading-unbounded" is http.server with the slow-client
limits set out of reach: http_max_connections=100000, http_request_deadline_s=3600, i.e. what it
did before them) one retriever process is started, then:
  zmq      64 concurrent RetrieverClient callers (asyncio, one socket each), 1 query, topk 3
  http     64 threads calling requests.post per query: a new connection per call, as Search-R1's
           trainer does (requests.post without a Session)
  session  the same with one requests.Session per thread (keep-alive)
  slowN    N slow clients (half send the headers a byte a second, half send the headers then the
           body a byte a second, and reconnect when dropped) while the 64 `http` clients run
Each phase records QPS, latency p50/p95/p99, errors, the retriever process's CPU (router, encoder
and HTTP server threads; the shard processes are apart) and its peak thread count and RSS. The
query cache is on and warmed, so the HTTP stack, not the encoder, is what is measured. With
--rounds R the servers take turns R times (load from other jobs then hits each alike).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.retriever_bench import make_corpus, queries_for  # noqa: E402
from common.transport import free_tcp_port  # noqa: E402

TOPK = 3
SERVERS = {"threading": ["retriever.http_server='threading'"],
           "uvicorn": ["retriever.http_server='uvicorn'"],
           "threading-unbounded": ["retriever.http_server='threading'", "retriever.http_max_connections=100000",
                                   "retriever.http_request_deadline_s=3600"]}


# --------------------------------------------------------------------------- the process
class Proc:
    """The retriever process: CPU seconds, threads and RSS from /proc."""

    def __init__(self, pid: int):
        self.pid = pid
        self.peak_threads = self.peak_rss_mb = 0
        self._stop = threading.Event()

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def sample(self) -> tuple[int, float]:
        st = dict(line.split(":", 1) for line in Path(f"/proc/{self.pid}/status").read_text().splitlines())
        return int(st["Threads"]), int(st["VmRSS"].split()[0]) / 1024

    def watch(self) -> None:
        self.peak_threads = self.peak_rss_mb = 0
        self._stop.clear()

        def loop():
            while not self._stop.wait(0.25):
                t, r = self.sample()
                self.peak_threads, self.peak_rss_mb = max(self.peak_threads, t), max(self.peak_rss_mb, r)

        threading.Thread(target=loop, daemon=True).start()

    def unwatch(self) -> None:
        self._stop.set()


def start_retriever(index_dir: Path, sets: list[str]) -> tuple[subprocess.Popen, str, int]:
    endpoint = f"ipc://{tempfile.mkdtemp(prefix='scout-httpload-')}/retriever"
    http_port, mport = free_tcp_port(), free_tcp_port()
    args = [sys.executable, "cli.py", "retriever", "--index", str(index_dir), "--endpoint", endpoint,
            "--http-port", str(http_port), "--set", f"metrics.retriever_port={mport}",
            "--set", "log_level='WARNING'"] + [x for s in sets for x in ("--set", s)]
    proc = subprocess.Popen(args, cwd=ROOT, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the retriever exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=30) as r:
                if json.loads(r.read())["status"] == "ok":
                    return proc, endpoint, http_port
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit("the retriever did not become healthy")


# --------------------------------------------------------------------------- load
async def _zmq_caller(endpoint: str, qs: list[str], t_end: float, seed: int, lat: list, errors: list):
    from retriever.client import RetrieverClient

    rng = random.Random(seed)
    async with RetrieverClient(endpoint, timeout_s=30, retries=0) as c:
        while time.perf_counter() < t_end:
            a = time.perf_counter()
            try:
                await c.search([rng.choice(qs)], topk=TOPK)
                lat.append(time.perf_counter() - a)
            except Exception as e:  # noqa: BLE001 (counted, not fatal)
                errors.append(type(e).__name__)


def run_zmq(endpoint: str, qs: list[str], clients: int, seconds: float) -> dict:
    lat, errors = [], []

    async def go():
        t_end = time.perf_counter() + seconds
        await asyncio.gather(*(_zmq_caller(endpoint, qs, t_end, s, lat, errors) for s in range(clients)))

    t0 = time.perf_counter()
    asyncio.run(go())
    return {"lat": lat, "errors": errors, "wall": time.perf_counter() - t0}


def run_http(url: str, qs: list[str], clients: int, seconds: float, session: bool) -> dict:
    lat, errors = [], []
    t_end = time.perf_counter() + seconds

    def caller(seed: int):
        rng = random.Random(seed)
        s = requests.Session() if session else requests
        while time.perf_counter() < t_end:
            a = time.perf_counter()
            try:
                r = s.post(url, json={"queries": [rng.choice(qs)], "topk": TOPK, "return_scores": True}, timeout=30)
                if r.status_code != 200 or len(r.json()["result"][0]) != TOPK:
                    errors.append(f"http_{r.status_code}")
                else:
                    lat.append(time.perf_counter() - a)
            except Exception as e:  # noqa: BLE001 (counted, not fatal)
                errors.append(type(e).__name__)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=caller, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"lat": lat, "errors": errors, "wall": time.perf_counter() - t0}


def slow_client(port: int, stop: threading.Event, body_slow: bool, held: list) -> None:
    """Slowloris: a request that trickles in a byte a second; reconnects when the server drops it."""
    body = json.dumps({"queries": ["slow " * 40], "topk": TOPK}).encode()
    head = (f"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    while not stop.is_set():
        t0 = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                if body_slow:
                    s.sendall(head)
                for b in (body if body_slow else head + body):
                    s.sendall(bytes([b]))
                    if stop.wait(1.0):
                        return
        except OSError:
            pass
        held.append(time.monotonic() - t0)  # dropped (or refused) after this long
        stop.wait(0.2)


def run_slow(url: str, port: int, qs: list[str], clients: int, seconds: float, n_slow: int) -> dict:
    stop, held = threading.Event(), []
    slow = [threading.Thread(target=slow_client, args=(port, stop, i % 2 == 1, held), daemon=True)
            for i in range(n_slow)]
    for t in slow:
        t.start()
    time.sleep(3)  # let them connect and start trickling
    r = run_http(url, qs, clients, seconds, session=False)
    stop.set()
    r["slow_dropped"] = len(held)
    r["slow_held_s"] = float(np.median(held)) if held else float("nan")
    return r


# --------------------------------------------------------------------------- report
def summarise(r: dict, cpu: float) -> dict:
    lat = np.asarray(r["lat"]) * 1000 if r["lat"] else np.asarray([float("nan")])
    errs: dict[str, int] = {}
    for e in r["errors"]:
        errs[e] = errs.get(e, 0) + 1
    return {"qps": len(r["lat"]) / r["wall"], "p50": float(np.percentile(lat, 50)),
            "p95": float(np.percentile(lat, 95)), "p99": float(np.percentile(lat, 99)), "ok": len(r["lat"]),
            "errors": errs, "cpu": 100 * cpu / r["wall"],
            **{k: r[k] for k in ("slow_dropped", "slow_held_s") if k in r}}


def phase(proc: Proc, fn, *args) -> dict:
    c0 = proc.cpu_s()
    proc.watch()
    r = fn(*args)
    proc.unwatch()
    out = summarise(r, proc.cpu_s() - c0)
    out.update(threads=proc.peak_threads, rss_mb=round(proc.peak_rss_mb))
    threads_after, rss_after = proc.sample()
    out.update(threads_after=threads_after, rss_after_mb=round(rss_after))
    return out


def bench_server(name: str, index_dir: Path, qs: list[str], a, rnd: int) -> list[tuple[str, str, dict]]:
    p, endpoint, port = start_retriever(index_dir, a.set + SERVERS[name])  # the server's own win
    url, proc, rows = f"http://127.0.0.1:{port}/retrieve", Proc(p.pid), []
    try:
        run_http(url, qs, 8, 0, session=True)  # nothing: the threads start and stop
        for q in qs:  # warm the query cache: the HTTP stack, not the encoder, is measured
            requests.post(url, json={"queries": [q], "topk": TOPK}, timeout=60)
        phases = [] if name.endswith("unbounded") else [
            ("zmq", run_zmq, endpoint, qs, a.clients, a.seconds),
            ("http", run_http, url, qs, a.clients, a.seconds, False),
            ("session", run_http, url, qs, a.clients, a.seconds, True)]
        phases += [(f"slow{n}", run_slow, url, port, qs, a.clients, a.seconds, n) for n in a.slow]
        phases = [ph for ph in phases if ph[0].startswith(a.only)]
        for label, fn, *args in phases:
            r = phase(proc, fn, *args)
            print(json.dumps({"server": name, "round": rnd, "phase": label, **r}), flush=True)
            rows.append((f"{name} r{rnd}", label, r))
            time.sleep(12 if label.startswith("slow") else 1)  # let dropped slow connections go
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(timeout=60)
    return rows


def table(rows: list[tuple[str, str, dict]]) -> str:
    lines = ["| server | load | QPS | p50 ms | p95 ms | p99 ms | ok | errors | retriever CPU | peak threads "
             "| peak RSS MB | slow clients dropped (median held s) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- |"]
    for name, label, r in rows:
        server = f"— (ZeroMQ, next to {name})" if label == "zmq" else name
        errs = ", ".join(f"{k} {v}" for k, v in sorted(r["errors"].items())) or "0"
        slow = f"{r['slow_dropped']} ({r['slow_held_s']:.1f})" if "slow_dropped" in r else ""
        lines.append(f"| {server} | {label} | {r['qps']:.0f} | {r['p50']:.1f} | {r['p95']:.1f} | {r['p99']:.1f} | "
                     f"{r['ok']} | {errs} | {r['cpu']:.0f}% | {r['threads']} | {r['rss_mb']} | {slow} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--passages", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--queries", type=int, default=256)
    ap.add_argument("--slow", type=lambda s: [int(x) for x in s.split(",") if x], default=[128, 400])
    ap.add_argument("--servers", default="threading,uvicorn,threading-unbounded")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--set", action="append", default=[],
                    help="a retriever --set, e.g. retriever.http_max_connections=512")
    ap.add_argument("--only", default="", help="phases to run, e.g. slow (default: all)")
    ap.add_argument("--index", type=Path, help="an index folder (else one is built in a temp folder)")
    a = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="scout-httpload-"))
    names = make_corpus(base / "corpus.jsonl", a.passages)
    index_dir = a.index
    if index_dir is None:
        index_dir = base / "index"
        subprocess.run([sys.executable, "cli.py", "index", "build", "--corpus", str(base / "corpus.jsonl"), "--out",
                        str(index_dir), "--shards", "1", "--factory", "Flat"], cwd=ROOT, check=True)
    qs = queries_for(names, a.queries)
    print("load average before:", " ".join(f"{x:.2f}" for x in os.getloadavg()), flush=True)
    rows = [row for rnd in range(1, a.rounds + 1) for name in a.servers.split(",")
            for row in bench_server(name, index_dir, qs, a, rnd)]
    print("load average after:", " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(table(rows))


if __name__ == "__main__":
    main()
