"""Soak: the demo configuration for N minutes with a fault every K minutes, chosen at random.

    prepare (demo world, index, base model; cached) ─▶ run config (demo recipe, steps unbounded)
    retriever + learner + actor (1 worker) as separate processes, exactly as `cli.py demo`
    every 10 s: RSS and open file descriptors of every role's process tree, learner step,
                /metrics of the learner and of the live actor worker (group accounting)
    every K min: one fault, drawn with a recorded seed from
        kill9              kill -9 the actor worker (the supervisor restarts it)
        sigstop            SIGSTOP the actor worker, the learner or a retriever shard for --stop-s,
                           then SIGCONT
        retriever-restart  stop the retriever (router and shards) and start it again
    end: stop the actor, read the learner's final counts, stop everything, check that no process of
         the run is left; print and write a JSON report (soak.json)

    python bench/soak.py --minutes 60 --fault-every 5 --seed 1 --out /tmp/soak

Reported: RSS per role after the warm-up (5 min) and at the end (growth = the bound we state), fds,
learner steps per minute between faults, the recovery after each fault, and the groups sent,
answered, accepted, refused and lost.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ROLES = ("retriever", "learner", "actor")
FAULTS = ("kill9", "sigstop", "retriever-restart")
STOP_TARGETS = ("actor worker", "learner", "retriever shard")


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


def big_mappings(pid: int, n: int = 2) -> list[dict]:
    """The `n` largest memory mappings of a process with their resident part (MB): tells a pool
    allocated once and touched as it fills (vLLM's KV cache) from growth elsewhere (a leak)."""
    maps, cur = [], None
    try:
        for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
            if line.startswith("Size:"):
                cur = {"size_mb": int(line.split()[1]) / 1024}
            elif line.startswith("Rss:") and cur is not None:
                cur["rss_mb"] = int(line.split()[1]) / 1024
                maps.append(cur)
                cur = None
    except OSError:
        return []
    return [{k: round(v, 1) for k, v in m.items()} for m in sorted(maps, key=lambda m: -m["size_mb"])[:n]]


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


def child_with(parent: int, marker: bytes) -> int | None:
    """The first child of `parent` whose command line contains `marker`."""
    for p in children_of(parent):
        try:
            if marker in Path(f"/proc/{p}/cmdline").read_bytes():
                return p
        except OSError:
            pass
    return None


def scrape(port: int) -> dict[str, list[tuple[dict, float]]] | None:
    """A process's /metrics as {sample name: [(labels, value), ...]}; None when it does not answer."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as r:
            text = r.read().decode()
    except OSError:
        return None
    out: dict[str, list[tuple[dict, float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def total(metrics: dict, name: str) -> float:
    return sum(v for _, v in metrics.get(name, []))


def by_result(metrics: dict, name: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for labels, v in metrics.get(name, []):
        out[labels.get("result", "")] = out.get(labels.get("result", ""), 0) + v
    return out


# --------------------------------------------------------------------------- group accounting
class Ledger:
    """The last /metrics of every actor worker process (a killed one: read just before the kill) and
    of the learner, for the groups sent / answered / accepted / trained balance at the end."""

    def __init__(self, learner_port: int, worker_port: int):
        self.learner_port, self.worker_port = learner_port, worker_port
        self.workers: dict[int, dict] = {}
        self.learner: dict | None = None

    def read(self, worker: int | None) -> None:
        if worker:
            got = scrape(self.worker_port)
            if got is not None:
                self.workers[worker] = got
        got = scrape(self.learner_port)
        if got is not None:
            self.learner = got

    def balance(self) -> dict:
        verdicts: dict[str, float] = {}
        for d in self.workers.values():
            for result, v in by_result(d, "scout_actor_groups_total").items():
                verdicts[result] = verdicts.get(result, 0) + v
        sent = sum(total(d, "scout_actor_groups_sent_total") for d in self.workers.values())
        ln = self.learner or {}
        received = by_result(ln, "scout_learner_groups_received_total")
        trained = total(ln, "scout_learner_groups_consumed_total")
        # the stale counter counts groups refused stale on arrival and accepted groups that went stale
        # in the buffer: only the latter are part of what was accepted
        stale = total(ln, "scout_learner_groups_dropped_stale_total") - received.get("stale", 0)
        held = total(ln, "scout_learner_buffer_groups") + total(ln, "scout_learner_training_groups")
        return {"worker_processes": len(self.workers), "sent": sent, "actor_verdicts": verdicts,
                # "resent" counts sends again after a link loss (not answers), "abandoned" groups the
                # worker dropped because the learner restarted
                "unanswered": sent - sum(v for k, v in verdicts.items() if k not in ("resent", "abandoned"))
                - verdicts.get("abandoned", 0), "learner_received": received,
                "never_received": sent - sum(received.values()), "learner_trained": trained,
                "learner_dropped_stale_in_buffer": stale, "learner_held_at_end": held,
                "lost_after_acceptance": received.get("accepted", 0) - trained - stale - held}


# --------------------------------------------------------------------------- faults
class Faults:
    """Draws and injects one fault at a time; a stopped process is continued after stop_s."""

    def __init__(self, args, children, config: Path, health_port: int):
        self.rng = random.Random(args.seed)
        self.kinds = args.faults.split(",")
        for k in self.kinds:
            if k not in FAULTS:
                raise SystemExit(f"unknown fault {k!r}; expected some of {', '.join(FAULTS)}")
        self.stop_s, self.children, self.config, self.health_port = args.stop_s, children, config, health_port
        self.stopped: list[tuple[float, int, str]] = []  # (continue at, pid, what)
        self.events: list[dict] = []

    def inject(self, now: float, ledger: Ledger) -> dict:
        kind = self.rng.choice(self.kinds)
        ev = {"t": round(now, 1), "wall": time.time(), "fault": kind}
        if kind == "kill9":
            pid = worker_pid(self.children.procs["actor"].pid)
            ledger.read(pid)  # its last counts, just before it dies
            if pid:
                os.kill(pid, signal.SIGKILL)
            ev.update(target="actor worker", pid=pid)
        elif kind == "sigstop":
            what = self.rng.choice(STOP_TARGETS)
            pid = self._pid_of(what)
            if pid:
                os.kill(pid, signal.SIGSTOP)
                self.stopped.append((now + self.stop_s, pid, what))
            ev.update(target=what, pid=pid, stop_s=self.stop_s)
        else:
            from demo.children import wait_healthy

            t = time.monotonic()
            self.children.stop("retriever")
            self.children.start("retriever", ["cli.py", "retriever", "--config", str(self.config)])
            wait_healthy(self.health_port, "retriever", self.children, "retriever")
            ev.update(target="retriever", restart_s=round(time.monotonic() - t, 1))
        self.events.append(ev)
        return ev

    def _pid_of(self, what: str) -> int | None:
        if what == "actor worker":
            return worker_pid(self.children.procs["actor"].pid)
        if what == "learner":
            return self.children.procs["learner"].pid
        return child_with(self.children.procs["retriever"].pid, b"retriever.shard")

    def tick(self, now: float, release_all: bool = False) -> None:
        for item in list(self.stopped):
            if release_all or now >= item[0]:
                try:
                    os.kill(item[1], signal.SIGCONT)
                except ProcessLookupError:
                    pass
                self.stopped.remove(item)
                print(f"[{now:6.0f} s] continued {item[2]} {item[1]}", flush=True)


# --------------------------------------------------------------------------- the run
def sample_roles(children, run_dir: Path, now: float) -> dict:
    sample = {"t": round(now, 1), "step": (learner_steps(run_dir) or [{"step": 0}])[-1]["step"],
              "worker": worker_pid(children.procs["actor"].pid)}
    for role in ROLES:
        pids = tree(children.procs[role].pid)
        sample[role] = {"rss_mb": round(rss_mb(pids), 1), "fds": fds(pids), "procs": len(pids)}
    if sample["worker"] and int(now) % 60 < 10:  # once a minute: where the worker's memory sits
        sample["worker_big_mappings"] = big_mappings(sample["worker"])
        sample["worker_rss_mb"] = round(rss_mb([sample["worker"]]), 1)
    return sample


def run(args) -> dict:
    from common.config import load_config
    from demo.children import Children, cfg_port, wait_healthy
    from demo.recipe import prepare, write_run_config

    cfg = load_config(None, [f"demo.dir='{args.demo_dir}'", f"run_dir='{args.out}'", "demo.steps=1000000",
                             "learner.checkpoint_every=200", "learner.keep_checkpoints=2"])
    run_dir = Path(args.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = write_run_config(cfg, prepare(cfg), run_dir)
    children = Children(run_dir / "logs")
    ledger = Ledger(cfg_port(config, "learner_port"), cfg_port(config, "actor_port") + 1)
    faults = Faults(args, children, config, cfg_port(config, "retriever_port"))
    samples = []
    try:
        children.start("retriever", ["cli.py", "retriever", "--config", str(config)])
        wait_healthy(cfg_port(config, "retriever_port"), "retriever", children, "retriever")
        children.start("learner", ["cli.py", "learner", "--config", str(config)])
        children.start("actor", ["cli.py", "actor", "--config", str(config)])
        t0 = time.monotonic()
        next_fault = args.fault_every * 60
        while (now := time.monotonic() - t0) < args.minutes * 60:
            children.check_alive(*ROLES)
            faults.tick(now)
            sample = sample_roles(children, run_dir, now)
            samples.append(sample)
            ledger.read(sample["worker"])
            if now >= next_fault and not faults.stopped:
                ev = faults.inject(now, ledger)
                print(f"[{now:6.0f} s] fault: {ev['fault']} {ev.get('target', '')} {ev.get('pid') or ''} "
                      f"at learner step {sample['step']}", flush=True)
                next_fault += args.fault_every * 60
            print(f"[{now:6.0f} s] step {sample['step']}  rss MB: " + " ".join(
                f"{r} {sample[r]['rss_mb']:.0f}" for r in ROLES), flush=True)
            time.sleep(10)
        faults.tick(0, release_all=True)
        all_pids = [p for role in ROLES for p in tree(children.procs[role].pid)]
        ledger.read(worker_pid(children.procs["actor"].pid))
        children.stop("actor")  # no more groups: the learner's counts settle
        time.sleep(3)
        ledger.read(None)
    finally:
        faults.tick(0, release_all=True)
        children.stop_all()
    time.sleep(2)
    return {"samples": samples, "faults": faults.events, "leaked": alive(all_pids), "steps": learner_steps(run_dir),
            "groups": ledger.balance()}


# --------------------------------------------------------------------------- the report
def recovery(ev: dict, steps: list[dict]) -> float | None:
    """Seconds from the fault until the learner trained on tokens generated after it (approximately:
    the first step whose oldest token version is newer than the last version before the fault)."""
    before = [s for s in steps if s["time"] <= ev["wall"]]
    after = [s for s in steps if s["time"] > ev["wall"]]
    if not after:
        return None
    v = before[-1]["step"] if before else 0
    fresh = [s for s in after if s.get("token_version_min", 0) > v]
    return round(fresh[0]["time"] - ev["wall"], 1) if fresh else None


def largest_gap(ev: dict, steps: list[dict], horizon_s: float) -> float | None:
    """The largest gap between two learner steps in the horizon after a fault (from the fault on)."""
    times = [ev["wall"]] + [s["time"] for s in steps if ev["wall"] < s["time"] <= ev["wall"] + horizon_s]
    return round(max(b - a for a, b in zip(times, times[1:])), 1) if len(times) > 1 else None


def window_medians_growth(samples: list[dict], role: str, warm_t: float, window_s: float = 300) -> float | None:
    """Growth from the median RSS of the first `window_s` after warm-up to that of the last
    `window_s`. The actor worker's RSS swings by ~10 % within each 30 s malloc_trim cycle
    (actor.heap_trim_s), and a worker restarted by a fault starts small, so two single 10 s
    samples cannot show a 5 % trend; the medians of 30 samples can."""
    first = [s[role]["rss_mb"] for s in samples if warm_t <= s["t"] < warm_t + window_s]
    last = [s[role]["rss_mb"] for s in samples if s["t"] > samples[-1]["t"] - window_s]
    if not first or not last:
        return None
    a, b = statistics.median(first), statistics.median(last)
    return round(100 * (b - a) / a, 2)


def summarise(res: dict, args) -> dict:
    samples, events, steps = res["samples"], res["faults"], res["steps"]
    warm = next((s for s in samples if s["t"] >= args.warmup * 60), samples[0])
    end = samples[-1]
    roles = {}
    for role in ROLES:
        after = [s[role]["rss_mb"] for s in samples if s["t"] >= warm["t"]]
        roles[role] = {"rss_mb_after_warmup": warm[role]["rss_mb"], "rss_mb_end": end[role]["rss_mb"],
                       "rss_mb_peak_after_warmup": max(after),
                       "growth_pct": round(100 * (end[role]["rss_mb"] - warm[role]["rss_mb"]) / warm[role]["rss_mb"], 2),
                       "growth_pct_5min_medians": window_medians_growth(samples, role, warm["t"]),
                       "fds_after_warmup": warm[role]["fds"], "fds_end": end[role]["fds"],
                       "fds_max_after_warmup": max(s[role]["fds"] for s in samples if s["t"] >= warm["t"])}
    edges = [0.0] + [e["t"] for e in events] + [end["t"]]
    windows = []
    for a, b in zip(edges[:-1], edges[1:]):
        inside = [s for s in samples if a <= s["t"] <= b]
        if len(inside) >= 2 and inside[-1]["t"] > inside[0]["t"]:
            windows.append(round(60 * (inside[-1]["step"] - inside[0]["step"]) / (inside[-1]["t"] - inside[0]["t"]), 1))
    faults = [{"t": e["t"], "fault": e["fault"], "target": e.get("target"), "recovery_s": recovery(e, steps),
               "largest_step_gap_s": largest_gap(e, steps, args.fault_every * 60)} for e in events]
    return {"minutes": args.minutes, "fault_every_min": args.fault_every, "seed": args.seed, "stop_s": args.stop_s,
            "steps": end["step"], "roles": roles, "faults": faults, "steps_per_min_between_faults": windows,
            "workers_seen": len({s["worker"] for s in samples if s["worker"]}), "groups": res["groups"],
            "leaked_processes": res["leaked"]}


def _interrupt(signum, _frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=60)
    p.add_argument("--fault-every", type=float, default=5, help="minutes between faults")
    p.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated, drawn from: {', '.join(FAULTS)}")
    p.add_argument("--seed", type=int, default=1, help="seed of the fault draw (recorded in the report)")
    p.add_argument("--stop-s", type=float, default=60, help="seconds a SIGSTOPped process stays stopped")
    p.add_argument("--warmup", type=float, default=5, help="minutes before RSS growth is measured")
    p.add_argument("--demo-dir", default=".scout/demo", help="demo cache (world, index, base model)")
    p.add_argument("--out", default="/tmp/scout-soak")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # so that `finally` stops the children
    res = run(args)
    summary = summarise(res, args)
    Path(args.out, "soak.json").write_text(json.dumps({"summary": summary, **res}, indent=1))
    print(json.dumps(summary, indent=2))
    lost = res["groups"]["lost_after_acceptance"]
    return 0 if not summary["leaked_processes"] and not lost else 1


if __name__ == "__main__":
    sys.exit(main())
