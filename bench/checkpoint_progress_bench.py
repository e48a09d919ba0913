"""Does checkpoint progress slow a save? learner/checkpoint.save_checkpoint as it is (rank 0
watches the .tmp folder from a thread, twice a second), next to the same save with the watch
replaced by a no-op, alternating, in one process (gloo group of one rank).

    python bench/checkpoint_progress_bench.py [--layers 24] [--hidden 1024] [--reps 6] [--dir /tmp/x]

The model is `layers` Linear(hidden, hidden) layers with AdamW state (weights + two moments:
about 12 bytes per parameter on disk). Columns: median wall seconds and MiB/s per path, and the
median of per-round ratios (same round, same background load); CPU seconds of the process (all
threads, so the watcher's polling counts), which a busy host disturbs less than wall time.
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import learner.checkpoint as ckpt  # noqa: E402


class _NoWatch:
    def __init__(self, *args, **kwargs):
        pass

    def stop(self):
        return 0, 0


def model_and_optimizer(layers: int, hidden: int):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(hidden, hidden) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(2, hidden)).sum().backward()
    opt.step()
    return model, opt


def timed_save(root: Path, step: int, model, opt, watch: bool) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process: every thread, the watcher's included)"""
    saved = ckpt._SaveWatch
    if not watch:
        ckpt._SaveWatch = _NoWatch
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        ckpt.save_checkpoint(root, step, model, opt, {"version": step}, None, rank=0, keep=1)
        return time.perf_counter() - t0, time.process_time() - c0
    finally:
        ckpt._SaveWatch = saved


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp folder)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    base = Path(args.dir or tempfile.mkdtemp(prefix="scout-ckpt-bench-"))
    model, opt = model_and_optimizer(args.layers, args.hidden)
    size = ckpt._local_bytes(ckpt._state(model, opt))
    times: dict[bool, list[float]] = {True: [], False: []}
    cpu: dict[bool, list[float]] = {True: [], False: []}
    ratios = []
    try:
        timed_save(base / "warm", 0, model, opt, True)  # first save imports DCP and warms the page cache
        for r in range(args.reps):
            order = (True, False) if r % 2 == 0 else (False, True)
            got = {w: timed_save(base / ("with" if w else "without"), r + 1, model, opt, w) for w in order}
            for w, (t, c) in got.items():
                times[w].append(t)
                cpu[w].append(c)
            ratios.append(got[True][0] / got[False][0])
        folder = ckpt.find_latest(base / "with")
        c0 = time.process_time()
        for _ in range(2000):
            ckpt.folder_usage(folder)
        poll_us = (time.process_time() - c0) / 2000 * 1e6
    finally:
        shutil.rmtree(base, ignore_errors=True)
        dist.destroy_process_group()
    print(f"{datetime.date.today()}  {args.layers} x Linear({args.hidden}): {size / 2**20:,.0f} MiB per save, "
          f"{args.reps} rounds")
    print("| path | median wall s | MiB/s | median CPU s |")
    print("| --- | --- | --- | --- |")
    for w, name in ((False, "save, no progress watch"), (True, "save with progress (as shipped)")):
        m = statistics.median(times[w])
        print(f"| {name} | {m:.3f} | {size / 2**20 / m:,.0f} | {statistics.median(cpu[w]):.3f} |")
    print(f"median per-round ratio with/without: {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f})")
    print(f"one poll of the folder (what the watcher does every 0.5 s): {poll_us:.1f} µs CPU")


if __name__ == "__main__":
    main()
