"""Frozen processes (issue #21, cases 1 and 3): SIGSTOP a role for a while, then SIGCONT. The
harness the tests (tests/test_faults_frozen.py) and the bench (`bench/faults.py --scenario
frozen-actor | frozen-learner`) share; Stack, build_world and the measures are bench/faults.py's.

    frozen_actor(stack)    two workers; SIGSTOP worker 1 for freeze_s, right after a weight sync
                           ("between") or while the learner is in one ("sync"), SIGCONT: the
                           learner's step gaps and syncs meanwhile, the time from SIGCONT to the
                           learner's current weights, and what became of the frozen run's groups
    frozen_learner(stack)  one worker; SIGSTOP the learner for freeze_s, SIGCONT: the worker's
                           in-flight groups and CPU use while it waits, and its group accounts

A stopped process keeps its sockets: peers see silence, not a broken connection. SIGCONT is
always sent (finally), even when a wait fails.
"""

from __future__ import annotations

import os
import re
import signal
import time
import urllib.request
from typing import Callable

from bench.faults import Stack, step_gaps

ACK_RESULTS = ("accepted", "duplicate", "stale", "rejected", "buffer_full", "error")  # worker verdict labels


# --------------------------------------------------------------------------- observation
def scrape(port: int) -> dict[str, float]:
    """A process's /metrics as {'name{label=value,...}': value}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def metric(values: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    want = [f"{k}={v}" for k, v in labels.items()]
    total = 0.0
    for key, v in values.items():
        base, _, rest = key.partition("{")
        if base == name and all(w in rest.rstrip("}").split(",") for w in want):
            total += v
    return total


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker_groups(stack: Stack, slot: int, timeout: float = 20.0) -> dict:
    """A worker's group accounts: sent, each learner verdict, resent, and sent but not yet answered.
    The two reads (/metrics, /health) are not one snapshot: read again until they agree (a group
    between its send and its counter), at most `timeout`; the last reading is returned either way."""
    port = stack.ports["actor_metrics"] + 1 + slot
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(port)
        unacked = int(stack.health("actor", slot).get("groups_unacked", -1))
        out = {"sent": metric(m, "scout_actor_groups_sent_total"), "unacked": unacked,
               "resent": metric(m, "scout_actor_groups_total", result="resent"),
               **{r: metric(m, "scout_actor_groups_total", result=r) for r in ACK_RESULTS}}
        out["answered"] = sum(out[r] for r in ACK_RESULTS)
        if out["sent"] == out["answered"] + unacked or time.monotonic() > deadline:
            return out
        time.sleep(0.3)


def learner_groups(stack: Stack) -> dict:
    """The learner's verdicts on every group that reached it (copies sent again included)."""
    m = scrape(stack.ports["learner_metrics"])
    out = {r: metric(m, "scout_learner_groups_received_total", result=r)
           for r in ("accepted", "duplicate", "stale", "rejected")}
    out["dropped_stale"] = metric(m, "scout_learner_groups_dropped_stale_total")
    return out


def log_size(stack: Stack, role: str) -> int:
    p = stack.log(role)
    return p.stat().st_size if p.is_file() else 0


def log_lines(stack: Stack, role: str, start: int = 0, end: int | None = None) -> list[str]:
    """A role's log lines between two byte offsets (log_size at two moments)."""
    with open(stack.log(role), "rb") as f:
        f.seek(start)
        data = f.read() if end is None else f.read(max(0, end - start))
    return data.decode(errors="replace").splitlines()


def sync_lines(lines: list[str]) -> list[dict]:
    """The learner's "version N sent to k/m members in S s (result)" lines."""
    out = []
    for line in lines:
        m = re.search(r"version (\d+) sent to (\d+)/(\d+) members in ([\d.]+)s \((.*)\)$", line)
        if m:
            out.append({"version": int(m[1]), "ok": int(m[2]), "members": int(m[3]), "seconds": float(m[4]),
                        "result": m[5]})
    return out


class Frozen:
    """SIGSTOP a process now; `cont()` (idempotent; also on exit of a with-block) sends SIGCONT."""

    def __init__(self, pid: int):
        self.pid, self.t_stop, self.t_cont = pid, time.time(), None
        os.kill(pid, signal.SIGSTOP)

    def cont(self) -> float:
        if self.t_cont is None:
            self.t_cont = time.time()
            try:
                os.kill(self.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        return self.t_cont

    def __enter__(self) -> "Frozen":
        return self

    def __exit__(self, *exc) -> None:
        self.cont()


# --------------------------------------------------------------------------- case 1: a frozen worker
def _wait_freeze_point(stack: Stack, when: str, timeout: float) -> None:
    """"between": a step's line just appeared (its weight sync is over, the next is a step away);
    "sync": the learner counted a step it has not logged yet, i.e. it is in that step's sync."""
    watch = ("learner", "actor")
    n = len(stack.steps())
    if when == "between":
        stack.wait(lambda: len(stack.steps()) > n, timeout, "a step's end", watch, poll_s=0.02)
    else:
        stack.wait(lambda: int(stack.health("learner")["step"]) > len(stack.steps()), timeout,
                   "the learner inside a weight sync", watch, poll_s=0.01)


def frozen_actor(stack: Stack, freeze_s: float, whens: tuple[str, ...] = ("sync", "between"), workers: int = 2,
                 warm_steps: int = 3, after_steps: int = 3, timeout: float = 300.0,
                 during: Callable[[Frozen], None] | None = None) -> dict:
    """Start learner + `workers` workers; for each of `whens`, SIGSTOP the last worker for
    `freeze_s` under load, SIGCONT, follow it back to the learner's weights (freeze_worker).
    `during(frozen)` (tests) runs once the worker is stopped, before the freeze ends."""
    slot, watch = workers - 1, ("learner", "actor")
    stack.start("learner")
    stack.start("actor")
    stack.wait(lambda: len(stack.steps()) >= warm_steps and all(
        stack.health("actor", i)["version"] >= 1 for i in range(workers)), timeout,
        f"{warm_steps} steps with every worker holding broadcast weights", watch)
    freezes = []
    for when in whens:  # each freeze's "normal" step gaps are those since the previous one's recovery
        since = freezes[-1]["t_weights"] if freezes else 0.0
        freezes.append(freeze_worker(stack, slot, freeze_s, when, after_steps, timeout, during, since))
    return {"scenario": "frozen_actor", "freezes": freezes, "learner": learner_groups(stack)}


def freeze_worker(stack: Stack, slot: int, freeze_s: float, when: str, after_steps: int = 3,
                  timeout: float = 300.0, during: Callable[[Frozen], None] | None = None, since: float = 0.0) -> dict:
    """One freeze of worker `slot` (see frozen_actor); `since`: where its "before" step gaps start."""
    watch = ("learner", "actor")
    old = stack.health("actor", slot)
    stack.wait(lambda: any(str(g["run_id"]) == old["run_id"] for g in stack.groups()), timeout,
               f"a group from worker {slot} accepted", watch)
    _wait_freeze_point(stack, when, timeout)
    off_stop, off_actor = log_size(stack, "learner"), log_size(stack, "actor")
    with Frozen(int(old["pid"])) as fz:
        v_stop, n_stop = int(stack.health("learner")["version"]), len(stack.steps())
        if during is not None:
            during(fz)
        time.sleep(max(0.0, fz.t_stop + freeze_s - time.time()))
        v_cont, n_cont = int(stack.health("learner")["version"]), len(stack.steps())
        frozen_log = log_lines(stack, "learner", off_stop)
        t_cont = fz.cont()
    new = stack.wait(lambda: (h := stack.health("actor", slot))["version"] >= v_cont and h, timeout,
                     f"the continued worker holding version >= {v_cont}", watch, poll_s=0.05)
    t_weights = time.time()
    noticed = [line.split(": ", 1)[-1] for line in log_lines(stack, "actor", off_actor)
               if f"actor-w{slot}[" in line and "link lost" in line]
    stack.wait(lambda: any(str(g["run_id"]) == new["run_id"] for g in stack.groups()), timeout,
               "a group from the continued worker accepted", watch)
    n = len(stack.steps())
    stack.wait(lambda: len(stack.steps()) >= n + after_steps, timeout, f"{after_steps} more steps", watch)
    steps = stack.steps()
    return {"when": when, "freeze_s": t_cont - fz.t_stop, "pid": int(old["pid"]), "pid_after": int(new["pid"]),
            "run_id": old["run_id"], "run_id_after": new["run_id"], "noticed": noticed, "version_at_stop": v_stop,
            "version_at_cont": v_cont, "cont_to_weights_s": t_weights - t_cont,
            "max_step_gap_before_s": step_gaps(steps, since, fz.t_stop)[0],
            "max_step_gap_frozen_s": step_gaps(steps, fz.t_stop, t_cont)[0],
            "max_step_gap_after_s": step_gaps(steps, t_weights, time.time())[0],
            "steps_frozen": n_cont - n_stop, "steps_per_s_frozen": (n_cont - n_stop) / max(t_cont - fz.t_stop, 1e-9),
            "syncs_frozen": sync_lines(frozen_log),
            "dropped_from_sync": [line.split("weight sync: ", 1)[1] for line in frozen_log
                                  if re.search(rf"weight sync: dropped actor-\S+-{slot}:", line)],
            "groups": worker_groups(stack, slot), "t_stop": fz.t_stop, "t_cont": t_cont, "t_weights": t_weights}


# --------------------------------------------------------------------------- case 3: a frozen learner
def frozen_learner(stack: Stack, freeze_s: float, warm_steps: int = 3, after_steps: int = 3,
                   timeout: float = 300.0) -> dict:
    """SIGSTOP the learner (rank 0: `cli.py learner` is one process here) for `freeze_s` while one
    worker streams groups, at a moment the worker holds its whole in-flight cap; its groups and CPU
    time meanwhile; SIGCONT, then its accounts once it is answered again."""
    watch = ("learner", "actor")
    stack.start("learner")
    stack.start("actor")
    cap = _actor_setting(stack, "max_groups_in_flight")
    stack.wait(lambda: len(stack.steps()) >= warm_steps and stack.health("actor", 0)["version"] >= 1, timeout,
               f"{warm_steps} steps and a worker holding broadcast weights", watch)
    wpid = int(stack.health("actor", 0)["pid"])
    fz, n_stop, tries = _freeze_at_cap(stack, cap, freeze_s, timeout)
    with fz:
        t_full, cpu0 = time.time(), cpu_seconds(wpid)
        samples = []  # (seconds since the stop, groups in flight, groups sent and not answered)
        while time.time() < fz.t_stop + freeze_s:
            h = stack.health("actor", 0)
            samples.append((round(time.time() - fz.t_stop, 1), h["groups_in_flight"], h["groups_unacked"]))
            time.sleep(min(1.0, max(0.0, fz.t_stop + freeze_s - time.time())))
        cpu = (cpu_seconds(wpid) - cpu0) / max(time.time() - t_full, 1e-9)
        steps_frozen = len(stack.steps()) - n_stop
        during = worker_groups(stack, 0)
        t_cont = fz.cont()
    n = len(stack.steps())
    stack.wait(lambda: len(stack.steps()) >= n + after_steps, timeout, f"{after_steps} steps after SIGCONT", watch)
    t_steps = time.time()
    first = stack.steps()[n]["time"]
    return {"scenario": "frozen_learner", "freeze_s": t_cont - fz.t_stop, "cap": cap, "freeze_tries": tries,
            "stop_to_all_sent_s": t_full - fz.t_stop, "worker_cpu_frozen": cpu, "samples": samples,
            "steps_while_frozen": steps_frozen, "worker_pid_same": int(stack.health("actor", 0)["pid"]) == wpid,
            "cont_to_first_step_s": first - t_cont, "cont_to_after_steps_s": t_steps - t_cont,
            "groups_frozen": during, "accounts": accounts(stack, 0, 30.0), "t_stop": fz.t_stop, "t_cont": t_cont}


def _freeze_at_cap(stack: Stack, cap: int, freeze_s: float, timeout: float, tries: int = 5) -> tuple[Frozen, int, int]:
    """SIGSTOP the learner at a moment worker 0 holds its `cap` groups in flight, and wait until it
    has sent all of them. An answer the learner sent just before the stop (a "stale" refusal) can
    still reach the worker afterwards: it frees a slot whose WorkRequest the stopped learner never
    answers, so the worker would never hold `cap` sent groups. Then SIGCONT at once and try again
    (up to `tries` times). Returns the freeze that held, the learner's step count at its stop and
    the number of tries it took."""
    watch = ("learner", "actor")
    for attempt in range(1, tries + 1):
        stack.wait(lambda: stack.health("actor", 0)["groups_in_flight"] >= cap, timeout,
                   f"the worker holding its {cap} groups in flight", watch, poll_s=0.01)
        n_stop = len(stack.steps())
        fz = Frozen(stack.procs["learner"].pid)
        while time.time() < fz.t_stop + freeze_s:
            h = stack.health("actor", 0)
            if h["groups_unacked"] >= cap:
                return fz, n_stop, attempt
            if h["groups_in_flight"] < cap:
                break  # an answer from before the stop freed a slot: this freeze cannot hold the cap
            time.sleep(0.05)
        else:
            fz.cont()
            raise TimeoutError(f"the worker did not send all {cap} groups within {freeze_s} s of the stop")
        fz.cont()
    raise TimeoutError(f"the worker never sent all {cap} groups while the learner was stopped ({tries} tries)")


def accounts(stack: Stack, slot: int, timeout: float) -> dict:
    """The worker's and the learner's group counts, read as worker, learner, worker (each read
    while groups keep flowing). Nothing is lost when the worker's sent = answered + unacked and the
    learner's accepted lies between the worker's accepted (+ duplicate: its copy was accepted
    first) before and after, plus what was unacked then. Read again until it holds, up to `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        a1 = worker_groups(stack, slot)
        lg = learner_groups(stack)
        a2 = worker_groups(stack, slot)
        ok = (a1["sent"] == a1["answered"] + a1["unacked"] and a2["sent"] == a2["answered"] + a2["unacked"]
              and a1["accepted"] + a1["duplicate"] <= lg["accepted"] <= a2["accepted"] + a2["duplicate"] + a2["unacked"])
        if ok or time.monotonic() > deadline:
            return {"worker": a2, "learner": lg, "agree": ok}
        time.sleep(0.5)


def _actor_setting(stack: Stack, key: str) -> int:
    m = re.search(rf"^{key} = (\d+)$", stack.config.read_text(), re.M)
    return int(m[1]) if m else 8

