"""Weight-sync benchmark: WeightSender -> one member process, next to a raw flat broadcast of the
same bytes on the same kind of standalone gloo group, in the same run, alternating.

    python bench/weightsync_bench.py [--sizes-mb 50,500] [--reps 10] [--bucket-mb 256] [--variants default,bc-whole]

"weight sync" = WeightSender.broadcast(): dtype-grouped buckets, a header per bucket over ZeroMQ,
the bucket bytes over the gloo group, the member unpacks views and answers SyncDone. Variants:
"default" = the shipped LearnerConfig; "whole" = one packed segment per bucket of bucket_mb;
"ramp" = first bucket bucket_mb/16 then doubling (packing of the first bucket shows less);
"chunkX" = learner.sync_chunk_mb = X (tensors of X MB and more go from their own memory, smaller
ones packed in X MB runs). Segments travel as point-to-point gloo sends (learner.sync_gloo_op
"send"), or with the prefix "bc-" as one gloo broadcast each ("bc-whole" was the default before
2026-11-24). "raw" = one broadcast of a ready-made
flat uint8 tensor of the same size, then a 1-byte broadcast back from the member (the
counterpart of SyncDone). Both receive into fresh buffers and free them after the transfer (the
member calls BucketReceiver.release() after SyncDone, as actors do), untimed, and the next path
starts only once the member is done with that (`settle`). The fake model is bf16 decoder layers
(hidden 1024, MLP 2816) with fp32 norms, so every sync has a bf16 and an fp32 bucket.

Every round runs every path back to back in a rotating order. Columns: seconds and GB/s per
path; raw/path as the median of per-round ratios (same round, same background load); and CPU
seconds of both processes per transfer (user + system, all threads), which a busy host disturbs
less than wall time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.config import LearnerConfig, TransportConfig  # noqa: E402
from common.transport import free_tcp_port  # noqa: E402
from common.weightsync.buckets import RAMP_DIVISOR  # noqa: E402
from common.weightsync.client import SyncClient, follow_sync  # noqa: E402
from common.weightsync.collective import broadcast_opts, make_group  # noqa: E402
from common.weightsync.receiver import BucketReceiver  # noqa: E402
from common.weightsync.sender import WeightSender  # noqa: E402

HIDDEN, INTER = 1024, 2816


def fake_model(total_mb: float) -> list[tuple[str, torch.Tensor]]:
    """bf16 decoder layers (attention + MLP + norms) until `total_mb`, plus fp32 norms."""
    out, nbytes, i = [], 0, 0
    target = int(total_mb * 1e6)
    shapes = [("self_attn.q_proj.weight", (HIDDEN, HIDDEN)), ("self_attn.k_proj.weight", (HIDDEN // 4, HIDDEN)),
              ("self_attn.v_proj.weight", (HIDDEN // 4, HIDDEN)), ("self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
              ("mlp.gate_proj.weight", (INTER, HIDDEN)), ("mlp.up_proj.weight", (INTER, HIDDEN)),
              ("mlp.down_proj.weight", (HIDDEN, INTER))]
    while nbytes < target:
        for name, shape in shapes:
            t = torch.randn(shape).to(torch.bfloat16)
            out.append((f"model.layers.{i}.{name}", t))
            nbytes += t.numel() * 2
            if nbytes >= target:
                break
        for norm in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            out.append((f"model.layers.{i}.{norm}", torch.ones(HIDDEN)))
            nbytes += HIDDEN * 4
        i += 1
    return out


def raw_group(port: int, rank: int):
    store = dist.TCPStore("127.0.0.1", port, is_master=rank == 0, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=60))
    return make_group("gloo", dist.PrefixStore("raw", store), rank, 2, 60.0, True), store


def raw_once(pg, nbytes: int, rank: int, src: torch.Tensor | None = None) -> float:
    t0 = time.perf_counter()
    buf = src if rank == 0 else torch.empty(nbytes, dtype=torch.uint8)
    pg.broadcast([buf], broadcast_opts()).wait()
    from_member(pg)  # the counterpart of SyncDone
    return time.perf_counter() - t0


def from_member(pg) -> None:
    """A 1-byte broadcast from the member (rank 1): its answer after a raw transfer, and `settle`."""
    opts = dist.BroadcastOptions()
    opts.rootRank = 1
    pg.broadcast([torch.zeros(1, dtype=torch.uint8)], opts).wait()


def settle(pg) -> None:
    """Untimed, after every transfer: the member has freed what it received into (raw: its flat
    buffer; a sync: release() after SyncDone) before the next path's clock starts."""
    from_member(pg)


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads (gloo's included)."""
    t = os.times()
    return t.user + t.system


def member(args) -> None:
    pg, _store = raw_group(args.raw_port, 1)
    client = SyncClient(args.endpoint, "bench-member", uuid.uuid4().hex, TransportConfig(), ("gloo",))
    receiver = BucketReceiver()
    client.join(-1)
    cpu: dict[str, float] = {}
    for size in args.sizes:
        nbytes = int(args.nbytes[str(size)])
        for rnd in range(rounds(args, size) + 1):
            for path in order(args, rnd):
                c0 = cpu_seconds()
                if path == "raw":
                    raw_once(pg, nbytes, 1)
                else:  # the member only follows: every variant looks the same from here
                    while follow_sync(client, client.poll(60_000), receiver.setup,
                                      lambda h, d: receiver.receive(h, d)) is None:
                        pass
                    receiver.release()  # as an actor does after SyncDone (raw frees after its ack)
                if rnd:
                    key = f"{size}/{path}"
                    cpu[key] = cpu.get(key, 0.0) + cpu_seconds() - c0
                settle(pg)
    receiver.close()
    client.close()
    print("CPU " + json.dumps(cpu), flush=True)


def leader(args) -> None:
    models = {s: fake_model(s) for s in args.sizes}
    nbytes = {s: sum(t.numel() * t.element_size() for _, t in m) for s, m in models.items()}
    cfg = LearnerConfig(sync_endpoint=f"tcp://127.0.0.1:{free_tcp_port()}", store_port=0,
                        bucket_mb=args.bucket_mb, sync_timeout_s=120.0)
    sender = WeightSender(cfg, TransportConfig())
    sender.start()
    raw_port = free_tcp_port()
    spec = ",".join(f"{s}={n}" for s, n in nbytes.items())
    proc = subprocess.Popen([sys.executable, __file__, "--role", "member", "--endpoint", sender.endpoint,
                             "--raw-port", str(raw_port), "--sizes-mb", ",".join(map(str, args.sizes)),
                             "--reps", str(args.reps), "--nbytes", spec, "--variants", args.variants],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        pg, _store = raw_group(raw_port, 0)
        assert sender.wait_members(1, 60), "member did not join"
        rows, cpu = [], {}
        for size in args.sizes:
            times, nbuckets = run_size(args, size, nbytes[size], models[size], pg, sender, cpu)
            rows.append((size, nbytes[size], nbuckets, times))
        out, _ = proc.communicate(timeout=120)
        member_cpu = json.loads([x for x in out.splitlines() if x.startswith("CPU ")][-1][4:])
        for k, v in member_cpu.items():
            cpu[k] = cpu.get(k, 0.0) + v
        print_table(rows, cpu, args)
    finally:
        if proc.poll() is None:
            proc.kill()
        sender.close()


def run_size(args, size: int, nbytes: int, model, pg, sender, cpu: dict) -> tuple[dict, dict]:
    flat = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    first = max(1 << 20, sender.bucket_bytes // RAMP_DIVISOR)
    times: dict = {"raw": [], **{c: [] for c in args.chunks}}
    nbuckets: dict = {"raw": 1}
    for rnd in range(rounds(args, size) + 1):  # the first round warms every path up
        for path in order(args, rnd):
            c0 = cpu_seconds()
            if path == "raw":
                t = raw_once(pg, nbytes, 0, flat)
            else:
                chunk_mb, ramp, sender.gloo_op = variant(path)  # a new op re-forms the group
                sender.chunk_bytes = int(chunk_mb * (1 << 20))
                sender.first_bucket_bytes = first if ramp else None
                run_size.version = getattr(run_size, "version", 0) + 1
                report = sender.broadcast(run_size.version, model)
                assert report["ok"] == ["bench-member"], report
                t, nbuckets[path] = report["seconds"], report["buckets"]
            if rnd:
                times[path].append(t)
                key = f"{size}/{path}"
                cpu[key] = cpu.get(key, 0.0) + cpu_seconds() - c0
            settle(pg)
    return times, nbuckets


def variant(name: str) -> tuple[float, bool, str]:
    """(learner.sync_chunk_mb, ramp, learner.sync_gloo_op) of a --variants entry."""
    if name == "default":
        cfg = LearnerConfig()
        return cfg.sync_chunk_mb, False, cfg.sync_gloo_op
    op, base = ("broadcast", name[3:]) if name.startswith("bc-") else ("send", name)
    if base == "ramp":
        return 0.0, True, op
    if base == "whole":
        return 0.0, False, op
    if base.startswith("chunk"):
        try:
            return float(base[5:]), False, op
        except ValueError:
            pass
    raise SystemExit(f"unknown variant {name!r} (default, or [bc-]whole, [bc-]ramp, [bc-]chunkX)")


def label(key: str) -> str:
    if key == "raw":
        return "raw flat broadcast"
    if key == "default":
        chunk, _, op = variant(key)
        return f"weight sync, default ({op}, {chunk:g} MB segments)"
    chunk, ramp, op = variant(key)
    how = "whole buckets, ramp" if ramp else "whole buckets" if not chunk else f"{chunk:g} MB segments"
    return f"weight sync, {op}, {how}"


def order(args, rnd: int) -> list:
    """Every round runs every path once; the order rotates so that no path always goes first."""
    paths = ["raw", *args.chunks]
    k = rnd % len(paths)
    return paths[k:] + paths[:k]


def rounds(args, size_mb: int) -> int:
    """Small transfers are cheap and noisier: give them more rounds."""
    return args.reps * (3 if size_mb <= 100 else 1)


def print_table(rows, cpu, args) -> None:
    print(f"\nbucket_mb={args.bucket_mb:g}; every round runs every path back to back (rotating order), "
          "after one warm-up round; 1 sender + 1 member process, loopback gloo\n")
    print("| weights | buckets | path | rounds | seconds (median / best) | GB/s (median / best) "
          "| raw/path, paired median | raw/path, best vs best | CPU s per transfer (both processes) | raw/path, CPU |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for size, nb, nbuckets, times in rows:
        raw = times["raw"]
        raw_cpu = cpu[f"{size}/raw"] / len(raw)
        for key, ts in times.items():
            m, b = statistics.median(ts), min(ts)
            paired = statistics.median(r / t for r, t in zip(raw, ts))  # same round: same background load
            c = cpu[f"{size}/{key}"] / len(ts)
            path = label(key)
            print(f"| {nb / 1e6:.0f} MB | {nbuckets[key]} | {path} | {len(ts)} | {m:.3f} / {b:.3f} | {nb / m / 1e9:.2f} / "
                  f"{nb / b / 1e9:.2f} | {100 * paired:.0f}% | {100 * min(raw) / b:.0f}% | {c:.3f} | {100 * raw_cpu / c:.0f}% |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes-mb", default="50,500")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--bucket-mb", type=float, default=256.0)
    ap.add_argument("--variants", default="default,bc-whole",
                    help="comma list: default (the shipped config), or [bc-]whole, [bc-]ramp, [bc-]chunkX "
                         "(bc-: one gloo broadcast per segment; else point-to-point sends)")
    ap.add_argument("--role", default="leader", choices=["leader", "member"])
    ap.add_argument("--endpoint", default="")
    ap.add_argument("--raw-port", type=int, default=0)
    ap.add_argument("--nbytes", default="")
    args = ap.parse_args()
    args.sizes = [int(s) for s in args.sizes_mb.split(",")]
    args.chunks = args.variants.split(",")
    for v in args.chunks:
        variant(v)
    args.nbytes = dict(kv.split("=") for kv in args.nbytes.split(",")) if args.nbytes else {}
    torch.set_num_threads(1)
    (leader if args.role == "leader" else member)(args)


if __name__ == "__main__":
    main()
