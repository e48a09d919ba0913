"""Ingest from many actors (issue #18, item 2): scout's ingest against raw zmq, and a real learner
driven faster than it can train.

    throughput  for 32 and 64 simulated actors (bench/ingest_sim.py, spread over --procs processes),
                demo-sized and 3B-sized groups, CURVE off and on:
                  scout  the real IngestServer (learner rank 0's ingest: decode, checks, credits,
                         buffer) in this process, drained as fast as it fills; actors in `credit`
                         mode (WorkRequest → WorkAssignment → one group per prompt → GroupAck)
                  raw    a plain ROUTER answering the same frames with an ack of the same size
                accepted groups/s and MB/s in a measured window, and scout / raw
    learner     the real `cli.py learner` (tiny model, 16 groups per step, buffer of 32), fed by 8
                credit actors throughout; 30 s phases: quiet → 32 or 64 more actors respecting
                credits → as many flooding actors (groups without credits, back to back) → quiet.
                Reported: the learner's step_s and ingest_s (metrics.jsonl) per phase, its RSS, the
                refusals and drops on /metrics, and the balance accepted = trained + dropped stale
                in the buffer + still held (bench/soak.py's Ledger reading).

    python bench/ingest_bench.py --out /tmp/ingest-bench              # everything (~13 min on 2 cores)
    python bench/ingest_bench.py --skip-learner --actors 32 --seconds 5   # a quicker look
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
sys.path.insert(0, str(ROOT))

from bench.ingest_sim import SIZES, raw_server  # noqa: E402
from bench.soak import by_result, rss_mb, scrape, total, tree  # noqa: E402
from common.config import load_config  # noqa: E402
from common.protocol import GroupAck  # noqa: E402
from common.transport import free_tcp_port, generate_keys, term_context  # noqa: E402
from common.wire import encode  # noqa: E402

SIM = str(ROOT / "bench" / "ingest_sim.py")
MB = 1e6


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# --------------------------------------------------------------------------- simulated actors
def start_actors(endpoint: str, actors: int, procs: int, mode: str, size: str, extra: list[str], out: Path,
                 tag: str, cpus: set[int] | None = None) -> list[tuple[subprocess.Popen, Path]]:
    """`actors` simulated actors over `procs` OS processes; each writes its counts to a JSON file."""
    started = []
    per = [actors // procs + (1 if i < actors % procs else 0) for i in range(procs)]
    first = 0
    for i, k in enumerate(per):
        if not k:
            continue
        path = out / f"{tag}-{i}.json"
        cmd = [sys.executable, SIM, "--endpoint", endpoint, "--actors", str(k), "--first", str(first),
               "--mode", mode, "--size", size, "--out", str(path), *extra]
        pre = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        started.append((subprocess.Popen(cmd, cwd=ROOT, preexec_fn=pre, env={**os.environ, "OMP_NUM_THREADS": "1"}),
                        path))
        first += k
    return started


def collect(started: list[tuple[subprocess.Popen, Path]], timeout: float) -> dict:
    """Wait for the actor processes and add up their counts."""
    agg = {"sent": 0, "answers": {}, "accepted_in_window": 0, "bytes_in_window": 0, "work_requests": 0,
           "cpu_s_in_window": 0.0, "window_s": 0.0, "failed_procs": 0}
    for p, path in started:
        try:
            rc = p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = p.wait()
        if rc != 0 or not path.is_file():
            agg["failed_procs"] += 1
            continue
        d = json.loads(path.read_text())
        for k in ("sent", "accepted_in_window", "bytes_in_window", "work_requests", "cpu_s_in_window"):
            agg[k] += d[k]
        for reason, v in d["answers"].items():
            agg["answers"][reason] = agg["answers"].get(reason, 0) + v
        agg["window_s"] = d["window_s"]
    return agg


# --------------------------------------------------------------------------- throughput
DRAIN_MIN = 16  # the demo's learner.groups_per_step: the trainer takes that many at a time


def ingest_server(endpoint: str, curve_dir: str | None, rows: int, vocab: int):
    """The real IngestServer with a drain thread that takes groups as fast as they are accepted."""
    import zmq

    from learner.ingest import Dispatcher, IngestServer

    sets = [f"learner.ingest_endpoint='{endpoint}'", "learner.n_samples=8", "learner.groups_per_step=256",
            "learner.buffer_groups=512", "learner.max_staleness=1", "learner.retry_after_s=0.05"]
    if curve_dir:
        sets.append(f"transport.curve_dir='{curve_dir}'")
    cfg = load_config(None, sets)
    qa = [{"question": f"question {i}?", "golden_answers": [f"a{i}"], "data_source": "bench"} for i in range(rows)]
    ctx = zmq.Context()
    srv = IngestServer(cfg, Dispatcher(qa, seed=0), vocab_size=vocab, ctx=ctx).start()
    stop = threading.Event()

    def drain():  # like the trainer: a step's worth of groups per take (at least DRAIN_MIN, up to 256)
        while not stop.is_set():
            if srv.take_groups(max(DRAIN_MIN, min(len(srv.buffer), 256)), 0.2) is not None:
                srv.release(0)

    t = threading.Thread(target=drain, daemon=True)
    t.start()

    def close():
        stop.set()
        srv.stop()
        t.join(5)
        term_context(ctx)
    return srv, close


def throughput(args, kind: str, actors: int, size: str, curve_dir: str | None) -> dict:
    endpoint = f"tcp://127.0.0.1:{free_tcp_port()}"
    start_at = time.time() + args.startup_s
    extra = ["--start-at", str(start_at), "--warmup", str(args.warmup), "--seconds", str(args.seconds),
             "--vocab", str(args.vocab), "--rows", str(args.rows)] + (["--curve-dir", curve_dir] if curve_dir else [])
    marks: list[float] = []  # this process's CPU seconds (the server's) at the window's start and end
    window = (start_at + args.warmup, start_at + args.warmup + args.seconds)
    marker = threading.Thread(target=lambda: [(time.sleep(max(0.0, w - time.time())), marks.append(time.process_time()))
                                             for w in window], daemon=True)
    marker.start()
    if kind == "scout":
        srv, close = ingest_server(endpoint, curve_dir, args.rows, args.vocab)
    else:
        stop = threading.Event()
        ack = sum(len(f) for f in encode(GroupAck(group_id="f" * 32, accepted=True, reason="", version=0)))
        th = threading.Thread(target=raw_server, args=(endpoint, curve_dir, ack, stop), daemon=True)
        th.start()
        time.sleep(0.3)
        close = lambda: (stop.set(), th.join(5))  # noqa: E731
    started = start_actors(endpoint, actors, args.procs, "credit" if kind == "scout" else "raw", size, extra,
                           Path(args.out), f"{kind}-{actors}-{size}-{'curve' if curve_dir else 'plain'}")
    agg = collect(started, args.startup_s + args.warmup + args.seconds + 120)
    marker.join(5)
    server_cpu = marks[1] - marks[0] if len(marks) == 2 else float("nan")
    counts = srv.snapshot() if kind == "scout" else {}
    busy = srv.busy_seconds() if kind == "scout" else None
    close()
    w = agg["window_s"] or 1.0
    return {"kind": kind, "actors": actors, "size": size, "curve": bool(curve_dir),
            "groups_per_s": agg["accepted_in_window"] / w, "mb_per_s": agg["bytes_in_window"] / w / MB,
            "group_bytes": agg["bytes_in_window"] / max(1, agg["accepted_in_window"]),
            "server_cpu_s": server_cpu, "ingest_busy_s": busy, "server_counts": counts, **agg}


def throughput_matrix(args) -> list[dict]:
    curve_dir = str(Path(args.out) / "curve")
    generate_keys(curve_dir)
    rows = []
    for actors in args.actors:
        for size in args.sizes:
            for curve in args.curve:
                for kind in ("raw", "scout"):
                    r = throughput(args, kind, actors, size, curve_dir if curve == "on" else None)
                    rows.append(r)
                    print(f"  {kind:5s} {actors:2d} actors {size:4s} CURVE {curve:3s}: {r['groups_per_s']:8.1f} "
                          f"groups/s {r['mb_per_s']:7.1f} MB/s  answers {r['answers']}  load {load_avg()}",
                          flush=True)
    return rows


def cpu_per_group(r: dict) -> dict:
    """CPU microseconds per accepted group in the window: the server's process, the senders' processes."""
    n = max(1, r["accepted_in_window"])
    return {"server": 1e6 * r["server_cpu_s"] / n, "senders": 1e6 * r["cpu_s_in_window"] / n}


def ratios(rows: list[dict]) -> list[dict]:
    out = []
    for s in (r for r in rows if r["kind"] == "scout"):
        raw = next(r for r in rows if r["kind"] == "raw" and all(r[k] == s[k] for k in ("actors", "size", "curve")))
        out.append({"actors": s["actors"], "size": s["size"], "curve": s["curve"],
                    "scout_groups_per_s": s["groups_per_s"], "scout_mb_per_s": s["mb_per_s"],
                    "raw_groups_per_s": raw["groups_per_s"], "raw_mb_per_s": raw["mb_per_s"],
                    "ratio": s["mb_per_s"] / raw["mb_per_s"] if raw["mb_per_s"] else 0.0,
                    "ingest_busy_s": s["ingest_busy_s"], "scout_server_cpu_s": s["server_cpu_s"],
                    "raw_server_cpu_s": raw["server_cpu_s"], "group_bytes": s["group_bytes"],
                    "scout_us_per_group": cpu_per_group(s), "raw_us_per_group": cpu_per_group(raw)})
    return out


# --------------------------------------------------------------------------- the real learner
def learner_config(args, work: Path, flood: int) -> tuple[Path, str, int, int]:
    from demo.tinymodel import build_tiny_model

    model = work / "tiny"
    if not (model / "config.json").is_file():
        build_tiny_model(model, layers=2, hidden=64)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    qa = work / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": f"question {i}?", "golden_answers": [f"a{i}"]}) + "\n"
                          for i in range(args.rows)))
    run = work / f"run-{flood}"
    endpoint, port = f"tcp://127.0.0.1:{free_tcp_port()}", free_tcp_port()
    cfg = work / f"learner-{flood}.toml"
    cfg.write_text(f"""run_dir = "{run}"
[metrics]
learner_port = {port}
[learner]
model = "{model}"
data = "{qa}"
ingest_endpoint = "{endpoint}"
sync_endpoint = "ipc://{tempfile.mkdtemp(prefix='ingest-bench-')}/sync"
store_port = {free_tcp_port()}
n_samples = 8
groups_per_step = 16
buffer_groups = {args.buffer_groups}
micro_batch_tokens = 4096
max_staleness = 1
steps = 1000000
lr = 1e-4
cpu_threads = 1
batch_wait_s = 0.5
end_grace_s = 0
""")
    return cfg, endpoint, port, vocab


class Sampler(threading.Thread):
    """RSS (MB) of the learner's process tree every 0.5 s: (time, MB)."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.samples, self.stop = pid, [], threading.Event()

    def run(self):
        while not self.stop.wait(0.5):
            self.samples.append((time.time(), rss_mb(tree(self.pid))))


def steps_of(run: Path) -> list[dict]:
    f = run / "metrics.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines() if x.endswith("}")] if f.is_file() else []


def wait_steps(run: Path, n: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(steps_of(run)) < n:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"learner stopped or too slow: {len(steps_of(run))} of {n} steps")
        time.sleep(0.5)


def settled_metrics(port: int, timeout: float = 30.0) -> dict:
    """The learner's /metrics once nothing moves any more (actors stopped, last step logged and
    the gauges refreshed by the ingest thread's 1 s sweep)."""
    def key(m):
        return (total(m, "scout_learner_groups_consumed_total"), total(m, "scout_learner_buffer_groups"),
                total(m, "scout_learner_training_groups"), total(m, "scout_learner_groups_dropped_stale_total"))
    last, deadline = None, time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(2.5)
        m = scrape(port) or {}
        if last is not None and key(m) == key(last):
            return m
        last = m
    return last or {}


def balance(m: dict) -> dict:
    """bench/soak.py's Ledger reading of the learner's counters."""
    received = by_result(m, "scout_learner_groups_received_total")
    trained = total(m, "scout_learner_groups_consumed_total")
    stale_in_buffer = total(m, "scout_learner_groups_dropped_stale_total") - received.get("stale", 0)
    held = total(m, "scout_learner_buffer_groups") + total(m, "scout_learner_training_groups")
    return {"received": received, "trained": trained, "dropped_stale_in_buffer": stale_in_buffer, "held": held,
            "lost_after_acceptance": received.get("accepted", 0) - trained - stale_in_buffer - held}


def phase_steps(steps: list[dict], t0: float, t1: float, key: str = "step_s") -> list[float]:
    """`key` of the steps that ran entirely inside [t0, t1)."""
    return [s[key] for s in steps if s["time"] - s["step_s"] >= t0 and s["time"] < t1]


def learner_run(args, flood: int) -> dict:
    """quiet → flood (`flood` actors ignoring back-pressure) → quiet, on one real learner."""
    work = Path(args.out)
    cfg, endpoint, port, vocab = learner_config(args, work, flood)
    two = (os.cpu_count() or 1) >= 2  # learner on CPU 0, simulated actors on CPU 1: they do not steal its core
    learner_cpus, actor_cpus = ({0}, {1}) if two else (None, None)
    log = open(work / f"learner-{flood}.log", "w")
    p = subprocess.Popen([sys.executable, "cli.py", "learner", "--config", str(cfg)], cwd=ROOT, stdout=log,
                         stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         preexec_fn=(lambda: os.sched_setaffinity(0, learner_cpus)) if two else None)
    rss = Sampler(p.pid)
    rss.start()
    stop_file = work / f"stop-feeders-{flood}"
    stop_file.unlink(missing_ok=True)
    common = ["--vocab", str(vocab), "--rows", str(args.rows), "--ack-timeout-ms", "180000"]
    feeders = start_actors(endpoint, 8, 1, "credit", "demo", [*common, "--seconds", "86400", "--stop-file",
                           str(stop_file)], work, f"feeder-{flood}", actor_cpus)
    try:
        run = Path(cfg.read_text().split('"')[1])
        wait_steps(run, 3, p, 600)
        t, counts = [time.time()], {}
        time.sleep(args.phase_s)
        for mode in ("credit", "flood"):  # n more actors: first respecting credits, then ignoring them
            start_at = time.time() + args.startup_s
            extra = [*common, "--start-at", str(start_at), "--seconds", str(args.phase_s)]
            sims = start_actors(endpoint, flood, args.procs, mode, "demo", extra, work, f"{mode}-{flood}", actor_cpus)
            t.append(start_at)
            counts[mode] = collect(sims, args.startup_s + args.phase_s + 300)
            t.append(time.time())
        time.sleep(args.phase_s)
        t.append(time.time())
        stop_file.touch()
        feed_counts = collect(feeders, 300)
        m = settled_metrics(port)
    finally:
        stop_file.touch()
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
        rss.stop.set()
        log.close()
    steps = steps_of(run)
    # t: quiet from t0, credit load t1..t2, flood t3..t4, quiet t4..t5
    phases = {"quiet": phase_steps(steps, t[0], t[1]) + phase_steps(steps, t[4], t[5]),
              "credit": phase_steps(steps, t[1], t[2]), "flood": phase_steps(steps, t[3], t[4])}
    rss_at = lambda a, b: [mb for when, mb in rss.samples if a <= when < b] or [0.0]  # noqa: E731
    ingest = {"quiet": phase_steps(steps, t[0], t[1], "ingest_s") + phase_steps(steps, t[4], t[5], "ingest_s"),
              "credit": phase_steps(steps, t[1], t[2], "ingest_s"), "flood": phase_steps(steps, t[3], t[4], "ingest_s")}
    return {"actors": flood, "steps": {k: len(v) for k, v in phases.items()},
            "ingest_s_median": {k: statistics.median(v) if v else None for k, v in ingest.items()},
            "step_s_median": {k: statistics.median(v) if v else None for k, v in phases.items()},
            "rss_mb": {"quiet_before": max(rss_at(t[0], t[1])), "credit_max": max(rss_at(t[1], t[2])),
                       "flood_max": max(rss_at(t[3], t[4])), "flood_first": rss_at(t[3], t[4])[0],
                       "flood_last": rss_at(t[3], t[4])[-1], "end": (rss.samples or [(0, 0.0)])[-1][1]},
            "credit": counts.get("credit"), "flood": counts.get("flood"), "feeders": feed_counts,
            "refused": {k: v for k, v in by_result(m, "scout_learner_groups_received_total").items()},
            "rejects": by_result(m, "scout_rejects_total") if m else {}, "balance": balance(m) if m else {},
            "ingest_s_total": sum(s.get("ingest_s", 0.0) for s in steps), "steps_total": len(steps)}


# --------------------------------------------------------------------------- report
def report(res: dict) -> None:
    print("\nscout ingest / raw zmq, accepted MB/s (same frames, same senders):")
    for r in res["ratios"]:
        print(f"  {r['actors']:2d} actors, {r['size']:4s} groups ({r['group_bytes'] / 1e3:.1f} kB), CURVE "
              f"{'on ' if r['curve'] else 'off'}: scout {r['scout_groups_per_s']:7.1f} groups/s "
              f"{r['scout_mb_per_s']:6.1f} MB/s, raw {r['raw_mb_per_s']:6.1f} MB/s: {100 * r['ratio']:.0f}%; CPU us/group "
              f"server {r['scout_us_per_group']['server']:.0f} vs {r['raw_us_per_group']['server']:.0f}, senders "
              f"{r['scout_us_per_group']['senders']:.0f} vs {r['raw_us_per_group']['senders']:.0f}")
    for n in sorted({r["actors"] for r in res["ratios"]}):
        worst = min((r for r in res["ratios"] if r["actors"] == n), key=lambda r: r["ratio"])
        print(f"ingest from {n} simulated actors: {100 * worst['ratio']:.0f}% of raw zmq "
              f"(worst of the sizes and CURVE settings: {worst['size']} groups, CURVE {'on' if worst['curve'] else 'off'})")
    for lr in res["learner"]:
        med = lr["step_s_median"]
        q = med["quiet"]
        for mode in ("credit", "flood"):
            f = med[mode]
            slow = f"{100 * (f / q - 1):+.1f}%" if q and f else "n/a"
            ing = lr["ingest_s_median"]
            print(f"learner step, {lr['actors']} more actors ({mode}): median {f or 0:.3f} s vs {q or 0:.3f} s quiet "
                  f"({slow}); ingest thread per step {ing[mode] or 0:.3f} s vs {ing['quiet'] or 0:.3f} s; "
                  f"steps {lr['steps']}")
        print(f"  RSS MB {lr['rss_mb']}; received {lr['refused']}; balance {lr['balance']}")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/ingest-bench")
    p.add_argument("--actors", type=int, nargs="+", default=[32, 64])
    p.add_argument("--sizes", nargs="+", choices=tuple(SIZES), default=list(SIZES))
    p.add_argument("--curve", nargs="+", choices=("off", "on"), default=["off", "on"])
    p.add_argument("--procs", type=int, default=4, help="OS processes the simulated actors are spread over")
    p.add_argument("--seconds", type=float, default=10.0, help="measured window of each throughput run")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--startup-s", type=float, default=6.0, help="time given to the actor processes to start")
    p.add_argument("--phase-s", type=float, default=30.0, help="length of each learner phase")
    p.add_argument("--buffer-groups", type=int, default=32, help="the learner's buffer in the learner runs")
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=1000, help="token ids in the throughput runs")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-learner", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    res = {"command": " ".join(["python", "bench/ingest_bench.py", *(argv or sys.argv[1:])]),
           "load_before": load_avg(), "ratios": [], "throughput": [], "learner": []}
    print(f"load average before: {res['load_before']}", flush=True)
    if not args.skip_throughput:
        res["throughput"] = throughput_matrix(args)
        res["ratios"] = ratios(res["throughput"])
    if not args.skip_learner:
        for n in args.actors:
            res["learner"].append(learner_run(args, n))
            print(f"  learner run, {n} flooding actors done; load {load_avg()}", flush=True)
    res["load_after"] = load_avg()
    report(res)
    print(f"load average after: {res['load_after']}")
    (Path(args.out) / "ingest_bench.json").write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
