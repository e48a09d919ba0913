"""Fan-out weight-sync benchmark: WeightSender -> 1, 2, 4 and 8 member processes, for the pipelined
chain (learner.sync_gloo_op "chain") and the point-to-point path ("send"), same run.

    python bench/fanout_bench.py [--members 1,2,4,8] [--sizes-mb 50,500] [--reps 3] [--ops chain,send]
                                 [--answers sends-later,later,wait] [--step-s 0.5] [--gather-copy]
                                 [--nice-downstream 19]

For each member count N, N member processes (SyncClient + BucketReceiver, as an actor's; this
script with --role member) join a learner-side WeightSender in this process and stay for every
cell of that N; the op changes re-form the group. Per cell (op, answers, size, N): one warm-up
sync, then --reps syncs of the fake model (bf16 decoder layers + fp32 norms,
bench/weightsync_bench.py). answers: when broadcast() returns (learner.sync_answers and
learner.sync_sends): "wait" = once every member answered SyncDone; "later" = once the learner's
own sends are done, and the sender's thread collects the answers; "sends-later" = once the
sender holds the tensors, and its thread also runs the sends. --step-s S: after each broadcast
returns, the learner runs a fixed CPU job that takes about S seconds on an idle box (one thread
of matmuls: a stand-in for the next training step on a CPU learner), then waits for the sync's
end. --gather-copy: broadcast gets a fresh copy of each tensor, made as it consumes them (as the
learner's gather on one rank hands them over), so "broadcast s" includes that copy. Columns,
medians over the reps:

- learner send s: WeightSender.broadcast's `transfer_seconds`, until the learner's last send
  completed (the learner's time on the wire);
- broadcast s: WeightSender.broadcast's wall time: what the training loop is held. With "wait"
  it includes waiting for every member's SyncDone; with "later" it ends with the sends; with
  "sends-later" it ends once the sender holds the tensors;
- step s (with --step-s): the stand-in step's wall time, run right after broadcast returned, so
  beside whatever the sync still does (on a shared box its CPU slows the step); step s alone is
  printed once, measured before the members start;
- last member s: from the start of broadcast() until the last member has the whole update
  (each member's monotonic clock when follow_sync returned; one clock on one host);
- learner MB out: bytes of the learner's sends, counted on the works post_segments returned
  (segments x sizes x destinations), per sync;
- learner CPU s: user + system of the learner process alone, per sync (what the learner pays,
  with little of the other processes' contention in it; the stand-in step's own CPU time is
  taken out, here and in the next column);
- CPU s: user + system of the learner and all members (/proc/<pid>/stat, all threads), per sync;
  and CPU s / cores: the time those CPU seconds need at the least on this host's cores. When
  "last member s" is close to it, the members' time is CPU contention (they share the cores),
  not the chain's length.

Printed at the end, per op and answers, from the medians at the largest size: the ratio
8 members / 1 member of "learner send s" (the learner's time on the wire), of "broadcast s" (the
learner held), and with --step-s of "broadcast s + step s" (held plus the next step).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.weightsync_bench import fake_model  # noqa: E402
from common.config import LearnerConfig, TransportConfig  # noqa: E402
from common.transport import free_tcp_port  # noqa: E402
from common.weightsync import sender as sender_mod  # noqa: E402
from common.weightsync.client import SyncClient, follow_sync  # noqa: E402
from common.weightsync.receiver import BucketReceiver  # noqa: E402
from common.weightsync.sender import WeightSender  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def renice_threads(nice: int) -> None:
    """Set every thread of this process (gloo's included) to `nice` (Linux's nice is per thread;
    threads started later inherit the caller's)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.setpriority(os.PRIO_PROCESS, int(tid), nice)
        except (ProcessLookupError, PermissionError):
            pass


def member(args) -> None:
    """Follow every update; append {"version", "t", "ok"} to --out once it is all here.
    --nice-downstream N: at each plan, ranks 2.. run at nice N and rank 1 at 0 (the diagnostic)."""
    client = SyncClient(args.endpoint, args.peer_id, uuid.uuid4().hex, TransportConfig(), ("gloo",))
    receiver = BucketReceiver()

    def setup(plan: dict):
        if args.nice_downstream:
            renice_threads(args.nice_downstream if plan["rank"] >= 2 else 0)
        return receiver.setup(plan)

    client.join(-1)
    with open(args.out, "a") as out:
        while True:
            rep = follow_sync(client, client.poll(1000), setup, lambda h, d: receiver.receive(h, d))
            if rep is None:
                if os.getppid() == 1:  # the leader is gone
                    break
                continue
            t = time.monotonic()
            receiver.release()  # as an actor does after SyncDone
            out.write(json.dumps({"version": rep["version"], "t": t, "ok": rep["ok"], "msg": rep["message"]}) + "\n")
            out.flush()


class Counting:
    """Wraps post_segments in the sender: counts the bytes of every send the learner posts."""

    def __init__(self):
        self.bytes = 0
        self.orig = sender_mod.post_segments

    def __call__(self, *a, **kw):
        works = self.orig(*a, **kw)
        self.bytes += sum(src.numel() * src.element_size() for _w, src in works)
        return works


def wait_done(outs: list[Path], version: int, timeout_s: float = 60.0) -> list[float]:
    """Each member's completion time of `version` (they answered SyncDone just before)."""
    end = time.monotonic() + timeout_s
    times: list[float] = []
    for out in outs:
        while True:
            lines = [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []
            hit = [r for r in lines if r["version"] == version]
            if hit:
                assert hit[-1]["ok"], hit[-1]
                times.append(hit[-1]["t"])
                break
            if time.monotonic() > end:
                raise SystemExit(f"{out} never reported version {version}")
            time.sleep(0.002)
    return times


ANSWERS = ("sends-later", "later", "wait")


def step_job(iters: int) -> float:
    """The stand-in training step: `iters` single-thread 256x256 matmuls; returns its wall time."""
    a = torch.ones(256, 256)
    t0 = time.monotonic()
    for _ in range(iters):
        a = (a @ a).mul_(1.0 / 256)
    return time.monotonic() - t0


def calibrate_step(seconds: float) -> int:
    """The iterations that take about `seconds` here, now (call it while the box is idle)."""
    step_job(20)
    per = min(step_job(200) for _ in range(3)) / 200
    return max(1, round(seconds / per))


def gathered(model: list, copy: bool):
    """The tensors as broadcast consumes them; copy: each a fresh copy, made as it is consumed (what
    Trainer.full_parameters(owned=True) hands over on one rank, so the copy is part of the hold)."""
    return ((n, t.clone()) for n, t in model) if copy else model


def run_cell(sender, counter, model, outs, pids, op: str, answers: str, reps: int, version: list,
             step_iters: int = 0, copy: bool = False) -> dict:
    sender.gloo_op = op
    sender.answers_later, sender.sends_later = answers != "wait", answers == "sends-later"
    rows = []
    for rep in range(reps + 1):  # the first one warms up (and re-forms the group for this op)
        version[0] += 1
        mine = proc_cpu(os.getpid())
        pids_cpu = sum(proc_cpu(p) for p in pids) + mine
        b0, t0 = counter.bytes, time.monotonic()
        report = sender.broadcast(version[0], gathered(model, copy))
        wall = time.monotonic() - t0
        c0 = time.thread_time()
        step = step_job(step_iters) if step_iters else 0.0
        step_cpu = time.thread_time() - c0  # taken out of the CPU columns below: they are the sync's
        assert sender.settle(120), "the answers never came"  # first: the file polling below costs CPU
        done = wait_done(outs, version[0])
        assert len(report["ok"]) == len(outs) and report["error"] is None, report
        learner_cpu = proc_cpu(os.getpid()) - mine - step_cpu
        cpu = sum(proc_cpu(p) for p in pids) + learner_cpu + mine - pids_cpu
        if rep:
            rows.append({"send": report["transfer_seconds"], "wall": wall, "step": step, "last": max(done) - t0,
                         "bytes": counter.bytes - b0, "learner_cpu": learner_cpu, "cpu": cpu})
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def run_members(args, n: int, models: dict, counter, version: list) -> list[dict]:
    cfg = LearnerConfig(sync_endpoint=f"tcp://127.0.0.1:{free_tcp_port()}", store_port=0,
                        bucket_mb=args.bucket_mb, sync_timeout_s=120.0)
    sender = WeightSender(cfg, TransportConfig())
    sender.start()
    tmp = Path(args.tmp)
    outs = [tmp / f"m{n}-{i}.jsonl" for i in range(n)]
    procs = [subprocess.Popen([sys.executable, __file__, "--role", "member", "--endpoint", sender.endpoint,
                               "--peer-id", f"m{i}", "--out", str(outs[i]),
                               "--nice-downstream", str(args.nice_downstream)], cwd=ROOT)
             for i in range(n)]
    cells = []
    try:
        assert sender.wait_members(n, 120), "members did not join"
        for size, model in models.items():
            for op in args.ops:
                for answers in args.answers:
                    r = run_cell(sender, counter, model, outs, [p.pid for p in procs], op, answers, args.reps, version,
                                 args.step_iters, args.gather_copy)
                    cells.append({"op": op, "answers": answers, "size": size, "members": n, **r})
                    print(json.dumps(cells[-1]), flush=True)
    finally:
        sender.close()
        for p in procs:
            p.kill()
            p.wait()
    return cells


def print_table(cells: list[dict], nbytes: dict, step_alone: float | None) -> None:
    cores = os.cpu_count() or 1
    if step_alone is not None:
        print(f"\nstep s alone (the stand-in step before the members started): {step_alone:.3f}")
    print("\n| op | answers | weights | members | learner send s | broadcast s | step s | last member s "
          f"| learner MB out | learner CPU s | CPU s (all processes) | CPU s / {cores} cores |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for c in sorted(cells, key=lambda c: (c["op"] != "chain", ANSWERS.index(c["answers"]), c["size"], c["members"])):
        print(f"| {c['op']} | {c['answers']} | {nbytes[c['size']] / 1e6:.0f} MB | {c['members']} | {c['send']:.3f} "
              f"| {c['wall']:.4f} | {c['step']:.3f} | {c['last']:.3f} | {c['bytes'] / 1e6:.0f} | {c['learner_cpu']:.2f} "
              f"| {c['cpu']:.2f} | {c['cpu'] / cores:.2f} |")
    big = max(c["size"] for c in cells)
    lo, hi = min(c["members"] for c in cells), max(c["members"] for c in cells)
    for key in dict.fromkeys((c["op"], c["answers"]) for c in cells):
        one = [c for c in cells if (c["op"], c["answers"]) == key and c["size"] == big and c["members"] == lo]
        many = [c for c in cells if (c["op"], c["answers"]) == key and c["size"] == big and c["members"] == hi]
        if one and many:
            a, b = one[0], many[0]
            line = (f"{key[0]}, answers {key[1]}: {hi} members / {lo} member: learner held (broadcast s) "
                    f"{b['wall'] / a['wall']:.2f}x, {a['wall']:.4f} -> {b['wall']:.4f} s; on the wire (learner send s) "
                    f"{b['send'] / a['send']:.2f}x")
            if step_alone is not None:
                line += (f"; held + step {(b['wall'] + b['step']) / (a['wall'] + a['step']):.2f}x, "
                         f"{a['wall'] + a['step']:.3f} -> {b['wall'] + b['step']:.3f} s")
            print(line)


def leader(args) -> None:
    torch.set_num_threads(1)
    models = {s: fake_model(s) for s in args.sizes}
    nbytes = {s: sum(t.numel() * t.element_size() for _, t in m) for s, m in models.items()}
    counter = Counting()
    sender_mod.post_segments = counter
    os.makedirs(args.tmp, exist_ok=True)
    cells, version = [], [0]
    args.step_iters = calibrate_step(args.step_s) if args.step_s else 0
    step_alone = statistics.median(step_job(args.step_iters) for _ in range(3)) if args.step_s else None
    try:
        for n in args.members:
            cells += run_members(args, n, models, counter, version)
    finally:
        shutil.rmtree(args.tmp, ignore_errors=True)
    print_table(cells, nbytes, step_alone)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--members", default="1,2,4,8")
    ap.add_argument("--sizes-mb", default="50,500")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ops", default="chain,send")
    ap.add_argument("--answers", default=",".join(ANSWERS),
                    help="when broadcast returns: sends-later (learner.sync_sends later), later "
                         "(learner.sync_answers later, sends wait), wait (both wait); one or more")
    ap.add_argument("--gather-copy", action="store_true",
                    help="hand broadcast a fresh copy of every tensor, made as it is consumed (the learner's gather "
                         "on one rank), instead of the same tensors every time")
    ap.add_argument("--step-s", type=float, default=0.0,
                    help="after each broadcast, a stand-in training step of about this many CPU seconds")
    ap.add_argument("--bucket-mb", type=float, default=256.0)
    ap.add_argument("--tmp", default=f"/tmp/fanout-bench-{os.getpid()}")
    ap.add_argument("--role", default="leader", choices=["leader", "member"])
    ap.add_argument("--endpoint", default="")
    ap.add_argument("--peer-id", default="")
    ap.add_argument("--out", default="")
    ap.add_argument("--nice-downstream", type=int, default=0,
                    help="diagnostic: members of rank 2.. run at this nice value (rank 1 and the learner at 0), "
                         "so that on a shared box the learner's send is not slowed by the relays behind rank 1")
    args = ap.parse_args()
    args.members = [int(x) for x in args.members.split(",")]
    args.sizes = [int(x) for x in args.sizes_mb.split(",")]
    args.ops = args.ops.split(",")
    args.answers = args.answers.split(",")
    bad = [o for o in args.ops if o not in ("chain", "send", "broadcast")]
    bad += [a for a in args.answers if a not in ANSWERS]
    bad += [f"--step-s {args.step_s}"] if not 0 <= args.step_s <= 60 else []
    if bad or min(args.members) < 1 or args.reps < 1 or not 0 <= args.nice_downstream <= 19:
        raise SystemExit(f"bad --ops/--answers/--members/--reps/--nice-downstream: {bad}, members {args.members}, "
                         f"reps {args.reps}, nice {args.nice_downstream} (0-19)")
    (leader if args.role == "leader" else member)(args)


if __name__ == "__main__":
    main()
