"""Trajectory-group transport benchmark: encode + send + receive + decode over loopback tcp and
ipc, next to a raw ZeroMQ send of the same bytes, in the same run. Also times `cli.py --help`.

    python bench/protocol_bench.py [--samples 16] [--tokens 2048] [--messages 2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.protocol import TrajectoryGroup, decode, encode  # noqa: E402


def make_group(samples: int, tokens: int) -> TrajectoryGroup:
    rng = np.random.default_rng(0)
    total = samples * tokens
    mask = np.zeros(total, np.uint8)
    for s in range(samples):
        mask[s * tokens + tokens // 4:(s + 1) * tokens] = 1
    return TrajectoryGroup(
        group_id="bench", peer_id="a", run_id="r", prompt_id=0, num_searches=[1] * samples,
        retrieval_failed=[False] * samples, correct=[False] * samples,
        lengths=np.full(samples, tokens, np.int32), tokens=rng.integers(0, 150_000, total).astype(np.int32),
        loss_mask=mask, logprobs=np.where(mask == 1, -rng.random(total), 0).astype(np.float32),
        versions=np.where(mask == 1, 1, -1).astype(np.int32), rewards=np.zeros(samples, np.float32))


def receiver(endpoint: str, n: int, mode: str, out: mp.Queue) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, 100)
    sock.bind(endpoint)
    out.put("ready")
    frames = sock.recv_multipart(copy=False)  # warm-up message
    t0 = time.perf_counter()
    nbytes = 0
    for _ in range(n):
        frames = sock.recv_multipart(copy=False)
        if mode == "scout":
            msg = decode(frames, expect=TrajectoryGroup)
            nbytes += msg.tokens.nbytes + msg.loss_mask.nbytes + msg.logprobs.nbytes + msg.versions.nbytes
        else:
            nbytes += sum(len(f.buffer) for f in frames[1:])
    out.put((time.perf_counter() - t0, nbytes))
    sock.close(0)
    ctx.term()


def sender(endpoint: str, n: int, mode: str, group: TrajectoryGroup) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, 100)
    sock.connect(endpoint)
    raw = [bytes(f) for f in encode(group)]
    for _ in range(n + 1):
        if mode == "scout":
            sock.send_multipart(encode(group), copy=False)
        else:
            sock.send_multipart(raw, copy=False)
    sock.close(linger=-1)
    ctx.term()


def run(endpoint: str, mode: str, group: TrajectoryGroup, n: int) -> tuple[float, float]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    r = ctx.Process(target=receiver, args=(endpoint, n, mode, q))
    r.start()
    assert q.get(timeout=30) == "ready"
    sender(endpoint, n, mode, group)
    seconds, nbytes = q.get(timeout=300)
    r.join()
    return nbytes / seconds / 1e6, seconds / n * 1e6


def cli_help_seconds() -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "cli.py", "--help"], cwd=ROOT, capture_output=True, check=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved raw/scout rounds; medians reported")
    args = ap.parse_args()
    group = make_group(args.samples, args.tokens)
    size = sum(len(f) for f in encode(group)) / 1e6
    print(f"group: {args.samples} samples x {args.tokens} tokens = {size:.3f} MB per message")
    print("| transport | path | MB/s | µs/message | scout / raw |")
    print("| --- | --- | --- | --- | --- |")
    tmp = tempfile.mkdtemp(prefix="scout-bench-")
    for name in ("tcp", "ipc"):
        runs: dict[str, list[tuple[float, float]]] = {"raw": [], "scout": []}
        for r in range(args.rounds):
            for mode in ("raw", "scout"):  # interleaved, so load changes hit both alike
                if name == "tcp":
                    from common.transport import free_tcp_port
                    ep = f"tcp://127.0.0.1:{free_tcp_port()}"
                else:
                    ep = f"ipc://{tmp}/{mode}-{r}.sock"
                runs[mode].append(run(ep, mode, group, args.messages))
        results = {m: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for m, v in runs.items()}
        for mode in ("raw", "scout"):
            mbps, us = results[mode]
            ratio = f"{results['scout'][0] / results['raw'][0]:.0%}" if mode == "scout" else ""
            print(f"| {name} | {'zmq send of the same bytes' if mode == 'raw' else 'encode+send+recv+decode'} "
                  f"| {mbps:,.0f} | {us:,.0f} | {ratio} |")
    print(f"\n`python cli.py --help`: {cli_help_seconds():.2f} s")


if __name__ == "__main__":
    main()
