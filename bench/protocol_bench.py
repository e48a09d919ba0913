"""Trajectory-group transport benchmark: encode + send + receive + decode over loopback tcp and
ipc, next to a raw ZeroMQ send of the same bytes, in the same run. Also times `cli.py --help`.

    python bench/protocol_bench.py [--samples 16] [--tokens 2048] [--messages 2000] [--rounds 5]

    sender (this process)                          receiver (spawned process)
    raw:   frames of one encoded group ──PUSH──▶ PULL  recv_multipart(copy=False), count bytes
    scout: encode(group) each time     ──PUSH──▶ PULL  recv_multipart(copy=False), decode (full checks)

Each round runs raw and scout back to back (alternating which goes first), so load drift on a
shared host hits both; the table gives medians over rounds and the median of the per-round
scout/raw ratios. CPU is user+system seconds of both processes (all threads, zmq I/O included)
per message: steadier than wall time when other jobs share the cores.
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

from common.wire import decode, encode  # noqa: E402
from common.protocol import TrajectoryGroup  # noqa: E402


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


def receiver(endpoint: str, n: int, warmup: int, mode: str, hwm: int, out: mp.Queue) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.RCVTIMEO, 60_000)  # never wait forever on the sender
    sock.bind(endpoint)
    out.put("ready")
    for _ in range(warmup):  # same path as the timed loop: page faults and allocator settle first
        frames = sock.recv_multipart(copy=False)
        if mode == "scout":
            decode(frames, expect=TrajectoryGroup)
    t0, c0 = time.perf_counter(), time.process_time()
    nbytes = 0
    for _ in range(n):
        frames = sock.recv_multipart(copy=False)
        if mode == "scout":
            msg = decode(frames, expect=TrajectoryGroup)
            nbytes += msg.tokens.nbytes + msg.loss_mask.nbytes + msg.logprobs.nbytes + msg.versions.nbytes
        else:
            nbytes += sum(len(f.buffer) for f in frames[1:])
    out.put((time.perf_counter() - t0, time.process_time() - c0, nbytes))
    sock.close(0)
    ctx.term()


def sender(endpoint: str, n: int, mode: str, group: TrajectoryGroup, hwm: int) -> float:
    """Send n messages; returns the CPU seconds this process spent (zmq I/O thread included)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.SNDTIMEO, 60_000)
    sock.connect(endpoint)
    raw = [bytes(f) for f in encode(group)]
    c0 = time.process_time()
    for _ in range(n):
        if mode == "scout":
            sock.send_multipart(encode(group), copy=False)
        else:
            sock.send_multipart(raw, copy=False)
    sock.close(linger=-1)
    ctx.term()
    return time.process_time() - c0


def run(endpoint: str, mode: str, group: TrajectoryGroup, n: int, warmup: int, hwm: int) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    r = ctx.Process(target=receiver, args=(endpoint, n, warmup, mode, hwm, q))
    r.start()
    assert q.get(timeout=60) == "ready"
    send_cpu = sender(endpoint, n + warmup, mode, group, hwm)
    seconds, recv_cpu, nbytes = q.get(timeout=600)
    r.join(60)
    # the sender's CPU covers warm-up messages too: scale it to the timed ones
    send_cpu *= n / (n + warmup)
    return {"mbps": nbytes / seconds / 1e6, "us": seconds / n * 1e6, "cpu_us": (recv_cpu + send_cpu) / n * 1e6,
            "send_us": send_cpu / n * 1e6, "recv_us": recv_cpu / n * 1e6}


def codec_us(group: TrajectoryGroup, n: int = 2000, repeat: int = 7) -> tuple[float, float]:
    """encode and decode CPU µs per group in this process (thread CPU time, best of `repeat`)."""
    frames = [bytes(f) for f in encode(group)]
    out = []
    for fn in (lambda: encode(group), lambda: decode(frames, expect=TrajectoryGroup)):
        best = float("inf")
        for _ in range(repeat):
            t = time.thread_time()
            for _ in range(n):
                fn()
            best = min(best, (time.thread_time() - t) / n * 1e6)
        out.append(best)
    return out[0], out[1]


def cli_help_seconds() -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "cli.py", "--help"], cwd=ROOT, capture_output=True, check=True)
    return time.perf_counter() - t


def endpoint(name: str, tmp: str, tag: str) -> str:
    if name == "tcp":
        from common.transport import free_tcp_port
        return f"tcp://127.0.0.1:{free_tcp_port()}"
    return f"ipc://{tmp}/{tag}.sock"


def measure(name: str, group: TrajectoryGroup, args: argparse.Namespace, tmp: str) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {"raw": [], "scout": []}
    for r in range(args.rounds):
        order = ("raw", "scout") if r % 2 == 0 else ("scout", "raw")  # alternate who goes first
        for mode in order:
            runs[mode].append(run(endpoint(name, tmp, f"{mode}-{r}"), mode, group, args.messages, args.warmup,
                                  args.hwm))
    return runs


def report(name: str, runs: dict[str, list[dict]]) -> None:
    med = {m: {k: statistics.median(x[k] for x in v) for k in ("mbps", "us", "cpu_us", "send_us", "recv_us")}
           for m, v in runs.items()}
    paired = statistics.median(s["mbps"] / r["mbps"] for r, s in zip(runs["raw"], runs["scout"]))
    per_round = ", ".join(f"{s['mbps'] / r['mbps']:.0%}" for r, s in zip(runs["raw"], runs["scout"]))
    for mode in ("raw", "scout"):
        m = med[mode]
        ratio = f"{paired:.0%} ({per_round})" if mode == "scout" else ""
        cpu_ratio = f"{med['raw']['cpu_us'] / m['cpu_us']:.0%}" if mode == "scout" else ""
        path = "zmq send of the same bytes" if mode == "raw" else "encode+send+recv+decode"
        print(f"| {name} | {path} | {m['mbps']:,.0f} | {m['us']:,.0f} | {ratio} | {m['cpu_us']:,.0f} "
              f"({m['send_us']:,.0f} + {m['recv_us']:,.0f}) | {cpu_ratio} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5, help="raw/scout pairs per transport; medians reported")
    ap.add_argument("--transports", default="tcp,ipc")
    ap.add_argument("--hwm", type=int, default=100, help="SNDHWM/RCVHWM on both sides, both paths")
    args = ap.parse_args()
    group = make_group(args.samples, args.tokens)
    size = sum(len(f) for f in encode(group)) / 1e6
    print(f"group: {args.samples} samples x {args.tokens} tokens = {size:.3f} MB per message; "
          f"load average before: {os.getloadavg()[0]:.2f}")
    print("| transport | path | MB/s | µs/message | scout / raw (paired median; per round) "
          "| CPU µs/message (sender + receiver) | raw / scout, CPU |")
    print("| --- | --- | ---: | ---: | --- | ---: | ---: |")
    tmp = tempfile.mkdtemp(prefix="scout-bench-")
    for name in args.transports.split(","):
        report(name, measure(name, group, args, tmp))
    enc, dec = codec_us(group)
    print(f"\nencode {enc:.1f} µs, decode {dec:.1f} µs per group (thread CPU, best of 7 x 2000)")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(f"`python cli.py --help`: {cli_help_seconds():.2f} s")


if __name__ == "__main__":
    main()
