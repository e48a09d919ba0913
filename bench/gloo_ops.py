"""What one gloo op costs: N MB between two processes over loopback, split into K ops, as
broadcasts or as point-to-point send/recv, into a fresh or a kept receive buffer.

    python bench/gloo_ops.py [--mb 500] [--ops 1,8,64,256] [--reps 4]

Prints, per (ops, buffer, op kind), the median wall time of a transfer (including a 1-byte
answer from the receiver) and the receiver's CPU seconds. This is the measurement behind
learner.sync_gloo_op = "send" (docs/BENCHMARKS.md, weight sync).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.weightsync_bench import from_member, raw_group  # noqa: E402
from common.transport import free_tcp_port  # noqa: E402
from common.weightsync.collective import broadcast_opts  # noqa: E402


def transfer(pg, rank: int, src: torch.Tensor, keep: torch.Tensor, nops: int, fresh: bool, kind: str
             ) -> tuple[float, float]:
    n = src.numel()
    buf = src if rank == 0 else (torch.empty(n, dtype=torch.uint8) if fresh else keep)
    seg = n // nops
    t0, c0 = time.perf_counter(), sum(os.times()[:2])
    works = []
    for i in range(nops):
        view = buf[i * seg:(i + 1) * seg] if i < nops - 1 else buf[i * seg:]
        if kind == "broadcast":
            works.append(pg.broadcast([view], broadcast_opts()))
        elif rank == 0:
            works.append(pg.send([view], 1, i))
        else:
            works.append(pg.recv([view], 0, i))
    for w in works:
        w.wait()
    from_member(pg)
    return time.perf_counter() - t0, sum(os.times()[:2]) - c0


def run(rank: int, port: int, args) -> None:
    pg, _store = raw_group(port, rank)
    n = int(args.mb * (1 << 20))
    src = torch.randint(0, 255, (n,), dtype=torch.uint8)
    keep = torch.zeros(n, dtype=torch.uint8)
    res: dict[str, list] = {}
    for rep in range(args.reps + 1):  # the first round warms up
        for nops in args.ops:
            for fresh in (True, False):
                for kind in ("broadcast", "send"):
                    t, c = transfer(pg, rank, src, keep, nops, fresh, kind)
                    if rep:
                        res.setdefault(f"{nops}|{'fresh' if fresh else 'kept'}|{kind}", []).append((t, c))
    if rank == 1:
        print(json.dumps({k: [statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)]
                          for k, v in res.items()}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=500.0)
    ap.add_argument("--ops", default="1,8,64,256")
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--rank", type=int, default=-1)
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    args.ops = [int(x) for x in args.ops.split(",")]
    torch.set_num_threads(1)
    if args.rank >= 0:
        return run(args.rank, args.port, args)
    port = free_tcp_port()
    base = [sys.executable, __file__, "--mb", str(args.mb), "--ops", ",".join(map(str, args.ops)),
            "--reps", str(args.reps), "--port", str(port)]
    sender = subprocess.Popen(base + ["--rank", "0"], cwd=ROOT)
    out = subprocess.run(base + ["--rank", "1"], cwd=ROOT, stdout=subprocess.PIPE, text=True, check=True).stdout
    sender.wait(60)
    res = json.loads(out.strip().splitlines()[-1])
    print(f"\n{args.mb:g} MB over loopback gloo, median of {args.reps} rounds\n")
    print("| ops | receive buffer | op | seconds | receiver CPU s |")
    print("| ---: | --- | --- | ---: | ---: |")
    for key, (t, c) in res.items():
        nops, buf, kind = key.split("|")
        print(f"| {nops} | {buf} | {kind} | {t:.3f} | {c:.3f} |")


if __name__ == "__main__":
    main()
