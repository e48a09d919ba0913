"""Soak: the demo configuration for N minutes with an actor worker killed (-9) every K minutes.

    prepare (demo world, index, base model; cached) ─▶ run config (demo recipe, steps unbounded)
    retriever + learner + actor (1 worker) as separate processes, exactly as `cli.py demo`
    every 10 s: RSS and open file descriptors of every role's process tree, learner step, worker pid
    every K min: kill -9 the actor worker (the supervisor restarts it)
    end: stop everything; check that no process of the run is left; print and write a JSON report

    python bench/soak.py --minutes 30 --kill-every 5 --out /tmp/soak

Reported: RSS per role at 5 minutes and at the end (growth = the bound we state), fds, learner
steps per minute in each window between kills, and for each kill how long until the learner had
trained on a group from the restarted worker's new run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


# --------------------------------------------------------------------------- /proc helpers
def children_of(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def tree(pid: int) -> list[int]:
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        if p not in seen and Path(f"/proc/{p}").exists():
            seen.append(p)
            todo += children_of(p)
    return seen


def alive(pids: list[int]) -> list[int]:
    """Those of `pids` that still run (zombies waiting for their parent's wait() do not)."""
    out = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.append(pid)
    return out


def rss_mb(pids: list[int]) -> float:
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def fds(pids: list[int]) -> int:
    n = 0
    for p in pids:
        try:
            n += len(os.listdir(f"/proc/{p}/fd"))
        except OSError:
            pass
    return n


def worker_pid(actor_pid: int) -> int | None:
    for p in children_of(actor_pid):
        try:
            if b"actors.worker" in Path(f"/proc/{p}/cmdline").read_bytes():
                return p
        except OSError:
            pass
    return None


def learner_steps(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


# --------------------------------------------------------------------------- the run
def run(args) -> dict:
    from common.config import load_config
    from demo.children import Children, cfg_port, wait_healthy
    from demo.recipe import prepare, write_run_config

    cfg = load_config(None, [f"demo.dir='{args.demo_dir}'", f"run_dir='{args.out}'", "demo.steps=1000000",
                             "learner.checkpoint_every=200", "learner.keep_checkpoints=2"])
    run_dir = Path(args.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = prepare(cfg)
    config = write_run_config(cfg, paths, run_dir)
    children = Children(run_dir / "logs")
    samples, kills = [], []
    try:
        children.start("retriever", ["cli.py", "retriever", "--config", str(config)])
        wait_healthy(cfg_port(config, "retriever_port"), "retriever", children, "retriever")
        children.start("learner", ["cli.py", "learner", "--config", str(config)])
        children.start("actor", ["cli.py", "actor", "--config", str(config)])
        t0 = time.monotonic()
        next_kill = args.kill_every * 60
        while (now := time.monotonic() - t0) < args.minutes * 60:
            children.check_alive("retriever", "learner", "actor")
            sample = {"t": round(now, 1), "step": (learner_steps(run_dir) or [{"step": 0}])[-1]["step"],
                      "worker": worker_pid(children.procs["actor"].pid)}
            for role in ("retriever", "learner", "actor"):
                pids = tree(children.procs[role].pid)
                sample[role] = {"rss_mb": round(rss_mb(pids), 1), "fds": fds(pids), "procs": len(pids)}
            samples.append(sample)
            if now >= next_kill and sample["worker"]:
                os.kill(sample["worker"], signal.SIGKILL)
                kills.append({"t": round(now, 1), "pid": sample["worker"], "step": sample["step"],
                              "wall": time.time()})
                print(f"[{now:6.0f} s] killed actor worker {sample['worker']} at learner step {sample['step']}",
                      flush=True)
                next_kill += args.kill_every * 60
            print(f"[{now:6.0f} s] step {sample['step']}  rss MB: retriever {sample['retriever']['rss_mb']:.0f} "
                  f"learner {sample['learner']['rss_mb']:.0f} actor {sample['actor']['rss_mb']:.0f}", flush=True)
            time.sleep(10)
        all_pids = [p for role in ("retriever", "learner", "actor") for p in tree(children.procs[role].pid)]
    finally:
        children.stop_all()
    time.sleep(2)
    leaked = alive(all_pids)
    return {"samples": samples, "kills": kills, "leaked": leaked, "steps": learner_steps(run_dir)}


# --------------------------------------------------------------------------- the report
def recovery(kill: dict, steps: list[dict]) -> float | None:
    """Seconds from the kill until the learner trained on tokens generated after it (approximately:
    the first step whose oldest token version is newer than the step at the kill)."""
    after = [s for s in steps if s["time"] > kill["wall"]]
    if not after:
        return None
    # steps keep coming from groups already in the learner's buffer; the rate recovers when the
    # restarted worker streams again: the first step whose batch is newer than the kill's step
    fresh = [s for s in after if s.get("token_version_min", 0) > kill["step"]]
    return round(fresh[0]["time"] - kill["wall"], 1) if fresh else None


def summarise(res: dict, args) -> dict:
    samples, kills, steps = res["samples"], res["kills"], res["steps"]
    at5 = next((s for s in samples if s["t"] >= 300), samples[0])
    end = samples[-1]
    roles = {}
    for role in ("retriever", "learner", "actor"):
        peak = max(s[role]["rss_mb"] for s in samples if s["t"] >= 300) if len(samples) > 30 else end[role]["rss_mb"]
        roles[role] = {"rss_mb_at_5min": at5[role]["rss_mb"], "rss_mb_end": end[role]["rss_mb"], "rss_mb_peak_after_5min": peak,
                       "growth_mb": round(end[role]["rss_mb"] - at5[role]["rss_mb"], 1),
                       "fds_at_5min": at5[role]["fds"], "fds_end": end[role]["fds"]}
    edges = [0.0] + [k["t"] for k in kills] + [samples[-1]["t"]]
    windows = []
    for a, b in zip(edges[:-1], edges[1:]):
        inside = [s for s in samples if a <= s["t"] <= b]
        if len(inside) >= 2 and inside[-1]["t"] > inside[0]["t"]:
            windows.append(round(60 * (inside[-1]["step"] - inside[0]["step"]) / (inside[-1]["t"] - inside[0]["t"]), 1))
    return {"minutes": args.minutes, "kill_every_min": args.kill_every, "kills": len(kills),
            "steps": samples[-1]["step"], "roles": roles, "steps_per_min_between_kills": windows,
            "recovery_s": [recovery(k, steps) for k in kills],
            "workers_seen": len({s["worker"] for s in samples if s["worker"]}), "leaked_processes": res["leaked"]}


def _interrupt(signum, _frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30)
    p.add_argument("--kill-every", type=float, default=5, help="minutes between worker kills")
    p.add_argument("--demo-dir", default=".scout/demo", help="demo cache (world, index, base model)")
    p.add_argument("--out", default="/tmp/scout-soak")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # so that `finally` stops the children
    res = run(args)
    summary = summarise(res, args)
    Path(args.out, "soak.json").write_text(json.dumps({"summary": summary, **res}, indent=1))
    print(json.dumps(summary, indent=2))
    return 0 if not summary["leaked_processes"] else 1


if __name__ == "__main__":
    sys.exit(main())
