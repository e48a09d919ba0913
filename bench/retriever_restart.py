"""How long after a restarted retriever is ready do its clients get answers again?

    4 client threads (RetrieverClient over SyncRetriever, 2 s timeout, no retries) search in a loop
        │ the retriever (router + shard, `cli.py retriever`) is killed with SIGKILL (group)
        │ ... down for --outage-s ...
        │ restarted on the same endpoint; "ready" = its /health answers ok
        └▶ ready_to_first_answer_s: from ready to the first answer any client gets

The client sockets' ZeroMQ reconnect interval grows while the retriever is away, from
`transport.reconnect_ivl_ms` up to `transport.reconnect_ivl_max_ms`; the gap after "ready" is
mostly the wait for the next reconnect attempt. Runs alternate between the values of --ivl-max.

    python bench/retriever_restart.py --runs 3 --ivl-max 5000 1000
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.faults import build_index, default_start, get_json  # noqa: E402
from common.transport import free_tcp_port  # noqa: E402


def start_retriever(config: Path, log: Path) -> subprocess.Popen:
    """`cli.py retriever` in its own session (router and shard end together by killpg)."""
    return default_start(["cli.py", "retriever", "--config", str(config)],
                         stdout=open(log, "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 300.0) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the retriever exited with {proc.returncode}")
        try:
            if get_json(f"http://127.0.0.1:{port}/health", timeout=0.5).get("status") == "ok":
                return time.time()
        except OSError:
            pass
        time.sleep(0.02)
    raise TimeoutError("the retriever did not become ready")


def one_run(config: Path, port: int, endpoint: str, ivl_max: int, outage_s: float, after_s: float, log: Path) -> dict:
    from common.config import TransportConfig
    from retriever.client import RetrieverClient, SyncRetriever

    proc = start_retriever(config, log)
    wait_ready(port, proc)
    client = SyncRetriever(RetrieverClient(endpoint, transport=TransportConfig(reconnect_ivl_max_ms=ivl_max),
                                           timeout_s=2.0, retries=0))
    events: list[tuple[float, float, bool]] = []
    stop = threading.Event()

    def loop(i: int) -> None:
        while not stop.is_set():
            t0 = time.time()
            try:
                client.search([f"capital of land {i}"], 3)
                ok = True
            except Exception:  # a failed search is what the outage makes
                ok = False
            events.append((t0, time.time(), ok))
            time.sleep(0.02)

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(4)]
    try:
        for t in threads:
            t.start()
        time.sleep(3.0)
        t_kill = time.time()
        os.killpg(proc.pid, signal.SIGKILL)  # router and shard
        proc.wait()
        time.sleep(outage_s)
        proc = start_retriever(config, log)
        t_ready = wait_ready(port, proc)
        time.sleep(after_s)
    finally:
        stop.set()
        for t in threads:
            t.join(5)
        client.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
    answers = sorted(t1 for _, t1, ok in events if ok and t1 > t_ready)
    return {"ivl_max_ms": ivl_max, "down_s": round(t_ready - t_kill, 2),
            "ready_to_first_answer_s": round(answers[0] - t_ready, 3) if answers else None,
            "answers_in_first_2_s": sum(1 for t in answers if t < t_ready + 2.0),
            "searches_during_outage": sum(1 for t0, _, _ in events if t_kill <= t0 < t_ready)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--ivl-max", type=int, nargs="+", default=[5000, 1000], help="client reconnect_ivl_max_ms values")
    ap.add_argument("--outage-s", type=float, default=8.0)
    ap.add_argument("--after-s", type=float, default=6.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="scout-retriever-restart-"))
    index = build_index(base)
    port, endpoint = free_tcp_port(), f"ipc://{base}/retriever"
    config = base / "scout.toml"
    config.write_text(f'[metrics]\nretriever_port = {port}\n[retriever]\nindex_dir = "{index}"\n'
                      f'endpoint = "{endpoint}"\nhttp_port = 0\nencoder_threads = 1\n')
    rows = []
    for r in range(args.runs):
        for ivl in args.ivl_max:
            row = one_run(config, port, endpoint, ivl, args.outage_s, args.after_s, base / "retriever.log")
            print(json.dumps({"run": r, **row}), flush=True)
            rows.append(row)
    summary = {}
    for ivl in args.ivl_max:
        gaps = [x["ready_to_first_answer_s"] for x in rows if x["ivl_max_ms"] == ivl and x["ready_to_first_answer_s"] is not None]
        summary[ivl] = {"median": statistics.median(gaps), "min": min(gaps), "max": max(gaps)} if gaps else None
    print(json.dumps({"ready_to_first_answer_s": summary}))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
