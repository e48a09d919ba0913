"""Pipeline benchmark: the demo configuration run synchronously and asynchronously, one invocation.

    demo.recipe.prepare(cfg) ──▶ world, index, base model (cached under demo.dir)
    for mode in (sync, async):
        demo.recipe.write_run_config(cfg) (the demo recipe) + this mode's keys:
            sync : learner.max_staleness = 0   (one step's prompts out, trained, synced, then the next)
            async: learner.max_staleness = the demo's value (at least 1)
        retriever (on the learner's core) ──▶ learner (pinned to core 0) + actor (pinned to core 1)
              ... until the learner has done --steps steps
        <run>/metrics.jsonl: per step samples, tokens, staleness, reward, wait_s / train_s / ... timers
        actor worker /metrics scraped when the measured window opens and when it closes
    ──▶ per mode: samples/s, tokens/s, learner idle, actor idle, staleness, reward at the end
    ──▶ async / sync ratio, and the profile of one async step (where the time goes)
    ──▶ the ratio against two bounds from the sync run (the learner's busy time against the rest
        of the period; against the actor's own work), and the async actor's work as a share of
        its period: the pipeline's fraction of the bound its slowest stage sets

The first --warmup steps (engine compilation, first weight syncs) are left out of every figure.

    python bench/pipeline.py --steps 40 --warmup 5 --out runs/pipeline [--set learner.groups_per_step=8 ...]
    python bench/pipeline.py --modes async --steps 20      # one mode only (no ratio)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from demo.children import Children, wait_healthy  # noqa: E402
from demo.recipe import prepare, write_run_config  # noqa: E402
from learner.report import step_lines  # noqa: E402

log = logging.getLogger("scout.bench.pipeline")

LEARNER_CORES, ACTOR_CORES = {0}, {1}
LEARNER_PHASES = ("wait_s", "assemble_s", "forward_s", "backward_s", "optimizer_s", "gather_s", "broadcast_s")
ACTOR_PHASES = ("engine", "rollout", "send", "link", "weight_load", "search_wait", "no_work")
ACTOR_WORK = tuple(p for p in ACTOR_PHASES if p not in ("search_wait", "no_work"))  # less the waits


class PinnedChildren(Children):
    """demo.children.Children whose processes can be pinned to CPU cores (sched_setaffinity)."""

    def start(self, name: str, args: list[str], env: dict | None = None, cores: set[int] | None = None):
        self.log_dir.mkdir(parents=True, exist_ok=True)
        out = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 (open for the child's life)
        pin = (lambda: os.sched_setaffinity(0, cores)) if cores else None
        p = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                             env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, start_new_session=True,
                             preexec_fn=pin)
        self.procs[name] = p
        log.info("started %s (pid %d, cores %s)", name, p.pid, sorted(cores) if cores else "all")
        return p


# --------------------------------------------------------------------------- one run
def mode_config(path: Path, mode: str, steps: int, async_staleness: int | None) -> dict:
    """Patch the demo's run TOML for one mode: staleness, step count, no checkpoints, actor log."""
    import tomli_w

    tree = tomllib.loads(path.read_text())
    lc = tree["learner"]
    demo_staleness = int(lc.get("max_staleness", 1))
    lc["max_staleness"] = 0 if mode == "sync" else (async_staleness or max(1, demo_staleness))
    lc["steps"] = steps
    tree["actor"]["stay"] = True  # the actor outlives the learner's run until the bench stops it (end snapshot)
    lc.pop("checkpoint_dir", None)
    lc["checkpoint_every"] = 0
    tree["metrics"]["log_file"] = str(Path(tree["run_dir"]) / "actor-stats.jsonl")
    path.write_bytes(tomli_w.dumps(tree).encode())
    return tree


def scrape_actor(port: int) -> dict[str, float]:
    """Worker 0's phase / search seconds and token counters from its Prometheus /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {"t": time.monotonic()}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "scout_actor_phase_seconds_total":
                out[s.labels["phase"]] = s.value
            elif s.name in ("scout_actor_search_seconds_total", "scout_actor_generated_tokens_total"):
                out[s.name] = s.value
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads) from /proc; 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def snapshot(actor_port: int, pids: dict[str, int]) -> dict:
    """The actor's counters plus the CPU seconds of learner, actor worker and retriever, now."""
    out = scrape_actor(actor_port)
    out["cpu"] = {name: cpu_seconds(pid) for name, pid in pids.items()}
    return out


def worker_pid(supervisor_port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{supervisor_port}/health", timeout=5) as r:
        return int(json.loads(r.read())["workers"][0]["pid"])


def run_mode(cfg, paths: dict, out: Path, mode: str, args) -> dict:
    """Retriever + pinned learner and actor for `args.steps` steps; the window's records and scrapes."""
    run_dir = out / mode
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    config = write_run_config(cfg, paths, run_dir)
    tree = mode_config(config, mode, args.steps, args.async_staleness)
    children = PinnedChildren(run_dir / "logs")
    env = {"OMP_NUM_THREADS": "1"}
    try:
        rcores = {"all": None, "learner": LEARNER_CORES, "actor": ACTOR_CORES}[args.retriever_cores]
        children.start("retriever", ["cli.py", "retriever", "--config", str(config)], env=env, cores=rcores)
        wait_healthy(tree["metrics"]["retriever_port"], "retriever", children, "retriever")
        children.start("learner", ["cli.py", "learner", "--config", str(config)], env=env, cores=LEARNER_CORES)
        children.start("actor", ["cli.py", "actor", "--config", str(config)], env=env, cores=ACTOR_CORES)
        return follow(children, run_dir, tree["metrics"]["actor_port"], args)
    finally:
        children.stop_all()


def follow(children: PinnedChildren, run_dir: Path, supervisor_port: int, args) -> dict:
    """Snapshot the actor (and CPU times) when step `warmup` and the last step are logged."""
    scrapes: dict[str, dict] = {}
    pids: dict[str, int] = {}
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        children.check_alive("retriever", "actor")
        steps = step_lines(run_dir)
        if len(steps) >= args.warmup and "start" not in scrapes:
            pids = {"learner": children.procs["learner"].pid, "actor": worker_pid(supervisor_port),
                    "retriever": children.procs["retriever"].pid}
            scrapes["start"] = snapshot(supervisor_port + 1, pids)
        if len(steps) >= args.steps:
            scrapes["end"] = snapshot(supervisor_port + 1, pids)
            return {"steps": steps, "scrapes": scrapes}
        learner = children.procs["learner"]
        if learner.poll() is not None:
            raise RuntimeError(f"learner exited with code {learner.returncode} after {len(steps)} steps; "
                               f"see {children.log_dir / 'learner.log'}")
        time.sleep(0.1)
    raise TimeoutError(f"{run_dir.name}: {args.steps} steps not done within {args.timeout:.0f} s")


# --------------------------------------------------------------------------- figures
def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def _sem(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    m = _mean(xs)
    return (sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs)) ** 0.5


def summarize(res: dict, warmup: int, final: int) -> dict:
    steps, sc = res["steps"], res["scrapes"]
    win = [s for s in steps if s["step"] > warmup]
    t0 = next(s["time"] for s in steps if s["step"] == warmup) if warmup else steps[0]["time"] - steps[0]["step_s"]
    wall = steps[-1]["time"] - t0
    a, b = sc["start"], sc["end"]
    awall = b["t"] - a["t"]
    gen_tokens = sum(s["gen_tokens_mean"] * s["samples"] for s in win)
    last = [s["reward_mean"] for s in steps[-final:]]
    learner = {k: _mean([s.get(k, 0.0) for s in win]) for k in LEARNER_PHASES if k != "backward_s"}
    learner["backward_s"] = _mean([s["train_s"] - s["forward_s"] - s["optimizer_s"] for s in win])
    learner.update(step_period_s=wall / len(win), busy_s=_mean([s["step_s"] for s in win]),
                   train_s=_mean([s["train_s"] for s in win]),
                   sync_s=_mean([s["sync_s"] for s in win]), ingest_s=_mean([s.get("ingest_s", 0.0) for s in win]),
                   sync_done_s=_mean([s.get("sync_done_s", s["sync_s"]) for s in win]))  # from its start to the last answer
    actor = {k: (b.get(k, 0.0) - a.get(k, 0.0)) / len(win) for k in ACTOR_PHASES}
    search = "scout_actor_search_seconds_total"
    actor["retrieval_s"] = (b.get(search, 0.0) - a.get(search, 0.0)) / len(win)
    cpu = {k: (b["cpu"][k] - a["cpu"][k]) / len(win) for k in a["cpu"]}
    return {
        "steps": len(win), "wall_s": wall, "cpu_s_per_step": cpu,
        "samples_per_s": sum(s["samples"] for s in win) / wall,
        "tokens_per_s": sum(s["tokens"] for s in win) / wall,
        "gen_tokens_per_s": gen_tokens / wall,
        "learner_idle": sum(s["wait_s"] for s in win) / wall,
        "actor_idle": 1.0 - (b.get("engine", 0.0) - a.get("engine", 0.0)) / awall,
        "staleness_mean": _mean([s["staleness_mean"] for s in win]),
        "staleness_max": max(s["staleness_max"] for s in win),
        "token_version_lag_max": max(s["batch_version"] - s["token_version_min"] for s in win),
        "dropped_stale": steps[-1].get("dropped_stale_total", 0),
        "reward_final": _mean(last), "reward_final_sem": _sem(last),
        "reward_mean": _mean([s["reward_mean"] for s in win]),
        "learner_phases_s": learner, "actor_phases_s": actor,
    }


def report(results: dict[str, dict], args) -> str:
    rows = [("samples/s", "samples_per_s", ".2f"), ("tokens/s (trained)", "tokens_per_s", ",.0f"),
            ("generated tokens/s", "gen_tokens_per_s", ",.0f"), ("learner idle fraction", "learner_idle", ".2f"),
            ("actor idle fraction", "actor_idle", ".2f"), ("mean staleness", "staleness_mean", ".2f"),
            ("max token version lag", "token_version_lag_max", "d"), ("groups dropped stale", "dropped_stale", "d"),
            ("step period (s)", None, ".2f")]
    modes = list(results)
    lines = ["| | " + " | ".join(modes) + (" | async/sync |" if len(modes) == 2 else " |"),
             "|---" * (len(modes) + 1 + (len(modes) == 2)) + "|"]
    for label, key, fmt in rows:
        vals = [results[m]["learner_phases_s"]["step_period_s"] if key is None else results[m][key] for m in modes]
        ratio = f" {vals[1] / vals[0]:.2f}x |" if len(modes) == 2 and key in ("samples_per_s", "tokens_per_s",
                                                                              "gen_tokens_per_s") and vals[0] else \
            (" |" if len(modes) == 2 else "")
        lines.append(f"| {label} | " + " | ".join(format(v, fmt) for v in vals) + " |" + ratio)
    rw = [f"{results[m]['reward_final']:.3f} ± {results[m]['reward_final_sem']:.3f}" for m in modes]
    lines.append(f"| reward, last {args.final} steps (mean ± s.e.) | " + " | ".join(rw) + " |" +
                 (" |" if len(modes) == 2 else ""))
    for m in modes:
        c = results[m]["cpu_s_per_step"]
        period = results[m]["learner_phases_s"]["step_period_s"]
        lines.append(f"\n{m}: CPU seconds per step: learner {c['learner']:.2f}, actor worker {c['actor']:.2f}, "
                     f"retriever {c['retriever']:.2f} (step period {period:.2f} s)")
    if "sync" in results:
        lp = results["sync"]["learner_phases_s"]
        busy, period = lp["busy_s"], lp["step_period_s"]
        bound = period / max(busy, period - busy, 1e-9)
        lines.append(f"\nsync step: learner busy {busy:.2f} s (train + sync), the rest {period - busy:.2f} s "
                     f"(generation and hand-offs): with perfect overlap async/sync <= {bound:.2f}x")
        if "async" in results and results["sync"]["samples_per_s"]:
            got = results["async"]["samples_per_s"] / results["sync"]["samples_per_s"]
            lines.append(f"async/sync {got:.2f}x = {got / bound:.0%} of that bound (both from this invocation)")
            work = actor_work_s(results["sync"])
            tight = period / max(busy, work, 1e-9)
            lines.append(f"sync step: the actor's own work {work:.2f} s (not waiting for prompts or retrieval): "
                         f"async/sync <= {tight:.2f}x; async/sync {got:.2f}x = {got / tight:.0%} of it")
    if "async" in results:
        r = results["async"]
        period, work = r["learner_phases_s"]["step_period_s"], actor_work_s(r)
        lines.append(f"async step: the actor worked {work:.3f} s of the {period:.3f} s period = {work / period:.0%} "
                     "(the pipeline at that share of the bound its slowest stage sets, when the actor is that stage)")
    return "\n".join(lines)


def actor_work_s(r: dict) -> float:
    """Seconds per step the actor worker spent working (engine steps, rollout logic, sending,
    the learner link, loading weights), not waiting for prompts (credits) or for retrieval."""
    return sum(r["actor_phases_s"][k] for k in ACTOR_WORK)


def profile_table(r: dict) -> str:
    """One step of a run: learner phases and actor phases, seconds per step and share of the period."""
    period = r["learner_phases_s"]["step_period_s"]
    lp, ap = r["learner_phases_s"], r["actor_phases_s"]
    rows = [("learner: waiting for groups", lp["wait_s"]), ("learner: assemble batch", lp["assemble_s"]),
            ("learner: forward", lp["forward_s"]), ("learner: backward + loss + clip", lp["backward_s"]),
            ("learner: optimizer", lp["optimizer_s"]), ("learner: weight gather", lp["gather_s"]),
            ("learner: broadcast (what the sync held it)", lp["broadcast_s"]),
            ("learner: the whole sync, gather to last answer (overlaps)", lp.get("sync_done_s", lp["sync_s"])),
            ("learner ingest thread (decode, checks; overlaps)", lp["ingest_s"]),
            ("actor: generation (engine steps)", ap["engine"]),
            ("actor: rollout logic (turns, rewards)", ap["rollout"]),
            ("actor: waiting on retrieval", ap["search_wait"]), ("actor: retrieval calls (threads; overlaps)",
                                                                 ap["retrieval_s"]),
            ("actor: transport (encode + send groups)", ap["send"]), ("actor: learner link", ap["link"]),
            ("actor: engine weight load", ap["weight_load"]),
            ("actor: no prompts (waiting for credits)", ap["no_work"])]
    lines = [f"step period {period:.3f} s", "| phase | s / step | share of period |", "|---|---|---|"]
    lines += [f"| {name} | {v:.3f} | {v / period:.0%} |" for name, v in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main
def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40, help="learner steps per mode")
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the figures")
    p.add_argument("--final", type=int, default=10, help="steps averaged for the reward at the end")
    p.add_argument("--modes", default="sync,async")
    p.add_argument("--async-staleness", type=int, default=None, help="async max_staleness (default: the demo's, >=1)")
    p.add_argument("--retriever-cores", choices=("all", "learner", "actor"), default="learner",
                   help="where the retriever (and its shards) may run: the learner's core (default: it idles "
                        "while the actor generates), the actor's, or any")
    p.add_argument("--out", default="runs/pipeline-bench",
                   help="run folders (configs, logs, metrics); the world, index and base model stay cached "
                        "under demo.dir (default .scout/demo; --set demo.dir=... to move them)")
    p.add_argument("--timeout", type=float, default=1800.0, help="per mode")
    p.add_argument("--config", default=None, help="TOML config (the demo reads the same)")
    p.add_argument("--set", action="append", default=[], help="config override section.key=value")
    p.add_argument("--json", default=None, help="also write the figures here")
    a = p.parse_args(argv)
    if not 1 <= a.warmup < a.steps:
        p.error("need 1 <= --warmup < --steps")
    return a


def _interrupt(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> dict:
    from common.config import load_config, log_config
    from common.log import setup_logging

    args = _args(argv)
    cfg = load_config(args.config, args.set)
    setup_logging("bench", cfg.log_level)
    log_config(cfg, "bench pipeline")
    signal.signal(signal.SIGTERM, _interrupt)  # children are stopped by run_mode's finally
    out = Path(args.out)
    paths = prepare(cfg)
    results, load = {}, {}
    for mode in args.modes.split(","):
        load[mode] = os.getloadavg()
        results[mode] = summarize(run_mode(cfg, paths, out, mode, args), args.warmup, args.final)
        load[mode] = (load[mode], os.getloadavg())
        print(f"{mode}: {json.dumps({k: v for k, v in results[mode].items() if not k.endswith('_s')})}", flush=True)
    text = report(results, args)
    print("\n" + text)
    if "async" in results:
        print("\nprofile of one async step\n" + profile_table(results["async"]))
    if "sync" in results:
        print("\nprofile of one sync step\n" + profile_table(results["sync"]))
    print(f"\nload average (1/5/15 min) before / after each mode: {load}")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "load": load, "argv": sys.argv[1:]}, indent=2))
    return results


if __name__ == "__main__":
    main()
