"""Issue #21, case 2: a retriever shard frozen with SIGSTOP under load, then SIGCONT.

    cli.py index build (2 Flat shards) ─▶ cli.py retriever (router + 2 shard processes)
    load: `--callers` concurrent RetrieverClient searches (actor-like deadline and retries)
    probe: one search every second with no retry (how long a request takes to fail, over time)
    warm-up ─▶ SIGSTOP shard 1 for `--freeze-s` ─▶ SIGCONT ─▶ `--after-s` more

    python bench/frozen_shard.py --freeze-s 120 --out /tmp/scout-frozen
    python bench/frozen_shard.py --code-root /tmp/scout-before ...   # the retriever of another checkout

Prints one JSON line of figures: when the router saw the shard not answering, how long requests
took to fail during the freeze, each client's longest call, SIGCONT -> first good answer, the
router's resident memory and queue lengths during the freeze. Processes are ended by PID (group).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.faults import get_json  # noqa: E402
from common.procs import stop_processes  # noqa: E402
from common.transport import free_tcp_port  # noqa: E402
from retriever.client import RetrievalError, RetrieverClient  # noqa: E402


def build_index(base: Path, passages: int) -> Path:
    rows = [{"id": str(i), "contents": f'"land {i}"\nland {i} has a capital called town {i} by the river {i}.'}
            for i in range(passages)]
    corpus = base / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    subprocess.run([sys.executable, "cli.py", "index", "build", "--corpus", str(corpus), "--out", str(base / "index"),
                    "--shards", "2", "--factory", "Flat", "--batch-size", "64"], cwd=ROOT, check=True, timeout=900,
                   capture_output=True)
    return base / "index"


def start_retriever(base: Path, index: Path, code_root: Path, sets: list[str]) -> dict:
    port = free_tcp_port()
    endpoint = f"ipc://{base}/retriever"
    args = [sys.executable, "cli.py", "retriever", "--index", str(index), "--endpoint", endpoint, "--http-port", "0",
            "--set", f"metrics.retriever_port={port}"] + [x for s in sets for x in ("--set", s)]
    log = open(base / "retriever.log", "w")
    proc = subprocess.Popen(args, cwd=code_root, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    svc = {"proc": proc, "endpoint": endpoint, "health": f"http://127.0.0.1:{port}/health",
           "metrics": f"http://127.0.0.1:{port}/metrics"}
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the retriever exited ({proc.returncode}); see {base / 'retriever.log'}")
        try:
            if get_json(svc["health"])["status"] == "ok":
                return svc
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the retriever did not become ready")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024


class Run:
    """The load, the probe and the sampler around one SIGSTOP / SIGCONT of shard 1."""

    def __init__(self, svc: dict, a: argparse.Namespace):
        self.svc, self.a = svc, a
        self.calls, self.probes, self.samples = [], [], []
        self.t_stop = self.t_cont = self.t_seen = None
        self.stop = threading.Event()

    async def _caller(self, client: RetrieverClient, i: int) -> None:
        while not self.stop.is_set():
            qs = [f"what is the capital of land {(i * 7 + j) % self.a.passages}?" for j in range(self.a.queries)]
            i += self.a.callers
            t0 = time.monotonic()
            try:
                await client.search(qs, topk=3)
                self.calls.append((t0, time.monotonic(), None))
            except RetrievalError as e:
                self.calls.append((t0, time.monotonic(), e.code))
                await asyncio.sleep(0.05)

    async def _probe(self) -> None:
        async with RetrieverClient(self.svc["endpoint"], timeout_s=self.a.timeout_s, retries=0) as c:
            while not self.stop.is_set():
                t0 = time.monotonic()
                try:
                    await c.search(["what is the capital of land 1?"], topk=3)
                    code = None
                except RetrievalError as e:
                    code = e.code
                self.probes.append((t0, time.monotonic(), code))
                await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - t0)))

    async def _load(self) -> None:
        client = RetrieverClient(self.svc["endpoint"], timeout_s=self.a.timeout_s, retries=self.a.retries)
        try:
            await asyncio.gather(self._probe(), *(self._caller(client, i) for i in range(self.a.callers)))
        finally:
            await client.close()

    def _sample(self) -> None:
        pid = self.svc["proc"].pid
        while not self.stop.is_set():
            try:
                h = get_json(self.svc["health"])
                self.samples.append((time.monotonic(), rss_mb(pid), h.get("pending_queries", 0),
                                     h.get("inflight_batches", 0), h["status"]))
                if self.t_stop and not self.t_seen and h["status"] != "ok":
                    self.t_seen = time.monotonic()
            except (OSError, KeyError, ValueError):
                pass
            time.sleep(0.25)

    def go(self, shard_pid: int) -> None:
        threads = [threading.Thread(target=lambda: asyncio.run(self._load()), daemon=True),
                   threading.Thread(target=self._sample, daemon=True)]
        for t in threads:
            t.start()
        time.sleep(self.a.warm_s)
        os.kill(shard_pid, signal.SIGSTOP)
        self.t_stop = time.monotonic()
        try:
            time.sleep(self.a.freeze_s)
        finally:
            os.kill(shard_pid, signal.SIGCONT)
        self.t_cont = time.monotonic()
        time.sleep(self.a.after_s)
        self.stop.set()
        for t in threads:
            t.join(timeout=120)


def figures(run: Run, late: float) -> dict:
    a, s0, s1 = run.a, run.t_stop, run.t_cont
    during = [p for p in run.probes if s0 <= p[0] < s1]
    settled = [p[1] - p[0] for p in during if run.t_seen and p[0] >= run.t_seen]
    freeze = [s for s in run.samples if s0 <= s[0] < s1]
    before = [s for s in run.samples if s[0] < s0]
    ok_after = [c[1] for c in run.calls + run.probes if c[2] is None and c[1] >= s1]
    calls = lambda t0, t1: [c for c in run.calls if c[1] >= t0 and c[0] < t1]  # noqa: E731  (overlapping)
    done_before = [c for c in run.calls if c[1] < s0]
    return {
        "freeze_s": round(s1 - s0, 1), "shard_timeout_s": a.shard_timeout_s, "client": [a.timeout_s, a.retries],
        "callers": a.callers, "queries_per_call": a.queries,
        "seen_not_ok_after_s": round(run.t_seen - s0, 2) if run.t_seen else None,
        "first_probe_in_freeze": [round(during[0][1] - during[0][0], 2), during[0][2]] if during else None,
        "probe_fail_s_after_seen": {"n": len(settled), "median": round(statistics.median(settled), 4),
                                    "max": round(max(settled), 4)} if settled else None,
        "probe_s_in_freeze": {"median": round(statistics.median(p[1] - p[0] for p in during), 3),
                              "max": round(max(p[1] - p[0] for p in during), 2)} if during else None,
        "probe_outcomes_in_freeze": {str(k): sum(p[2] == k for p in during) for k in {p[2] for p in during}},
        "longest_call_s": {"before": _longest(done_before), "freeze": _longest(calls(s0, s1)),
                           "after": _longest(calls(s1 + 1e-9, float("inf")))},
        "calls_ok_failed": {ph: [sum(c[2] is None for c in cs), sum(c[2] is not None for c in cs)]
                            for ph, cs in (("before", done_before), ("freeze", calls(s0, s1)),
                                           ("after", calls(s1 + 1e-9, float("inf"))))},
        "sigcont_to_first_good_answer_s": round(min(ok_after) - s1, 3) if ok_after else None,
        "router_rss_mb": {"before": round(before[-1][1], 1) if before else None,
                          "freeze_max": round(max(s[1] for s in freeze), 1), "freeze_end": round(freeze[-1][1], 1)},
        "pending_queries_max_in_freeze": max(s[2] for s in freeze),
        "inflight_batches_max_in_freeze": max(s[3] for s in freeze),
        "late_results_dropped": late,
    }


def _longest(cs: list) -> float | None:
    return round(max(c[1] - c[0] for c in cs), 2) if cs else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--passages", type=int, default=2000)
    ap.add_argument("--shard-timeout-s", type=float, default=30.0)
    ap.add_argument("--timeout-s", type=float, default=10.0, help="the clients' per-attempt deadline")
    ap.add_argument("--retries", type=int, default=5)
    ap.add_argument("--callers", type=int, default=16)
    ap.add_argument("--queries", type=int, default=4, help="queries per call")
    ap.add_argument("--warm-s", type=float, default=10.0)
    ap.add_argument("--freeze-s", type=float, default=120.0)
    ap.add_argument("--after-s", type=float, default=20.0)
    ap.add_argument("--code-root", type=Path, default=ROOT, help="checkout whose cli.py runs the retriever")
    ap.add_argument("--out", type=Path, default=Path("/tmp/scout-frozen"))
    a = ap.parse_args(argv)
    base = a.out / f"run-{time.time():.0f}"
    base.mkdir(parents=True)
    index = build_index(base, a.passages)
    svc = start_retriever(base, index, a.code_root, [f"retriever.shard_timeout_s={a.shard_timeout_s}"])
    try:
        run = Run(svc, a)
        run.go(get_json(svc["health"])["shards"][1]["pid"])
        with urllib.request.urlopen(svc["metrics"], timeout=5) as r:
            text = r.read().decode()
        late = sum(float(v) for v in re.findall(r'^scout_retriever_shard_late_results_total\{[^}]*shard="1"[^}]*\} (\S+)$',
                                                 text, re.M))
        print(json.dumps({"code_root": str(a.code_root), **figures(run, late)}), flush=True)
    finally:
        stop_processes([svc["proc"]], timeout=15)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
