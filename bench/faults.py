"""Fault scenarios of issue #8 (actor crash, retriever outage, learner preemption): one harness
that the tests (tests/test_faults_*.py, small sizes, assertions) and this bench (bigger sizes,
timings for docs/RELIABILITY.md) share.

    build_world(dir)  tiny Qwen2 taught to search then answer · QA file · corpus + index (retriever)
         │
    Stack(dir, start=…) ── write_config(**overrides) ── start("learner" | "actor" | "retriever")
         │                   every role is `python cli.py <role> --config stack.toml` (log per role)
         │                   /health of learner, supervisor, workers, retriever; metrics.jsonl steps;
         │                   accepted groups as .npz (learner.dump_groups_dir)
         ▼
    actor_crash(stack)         SIGKILL one worker under load → new pid/run_id, weights, step gaps
    retriever_outage(stack)    SIGKILL the retriever, restart after outage_s → failures flagged,
                               groups/s before / during / after
    learner_preemption(stack)  SIGKILL the learner, restart with --resume → step/version continue,
                               the actor reconnects and gets the new weights
    frozen_actor / frozen_learner (bench/faults_frozen.py)  SIGSTOP a worker / the learner, SIGCONT

    python bench/faults.py --scenario all --workers 2 --outage-s 30 --kills 3 --out /tmp/faults

Each scenario returns a dict of figures (seconds are wall clock on the machine it ran on) and
prints it as one JSON line. Processes are ended by PID (process group) when the stack closes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from learner.report import step_lines  # noqa: E402

QUESTION = "what is the capital of zorland ?"
ANSWER = "mirabel"
QUERY = "capital of zorland"


# --------------------------------------------------------------------------- world
def build_world(base: Path, questions: int = 200, corpus: bool = False, coin: bool = False) -> dict[str, Path]:
    """Tiny model taught the scripted search rollout, a QA file, optionally corpus + index.
    coin=True: the model is instead taught to answer at once, right or wrong about equally often,
    so groups have reward variance and every step moves the weights and the optimizer state."""
    from actors.engine import TransformersEngine
    from actors.rollout import RolloutRunner
    from demo.teach import script_example, script_texts, teach
    from common.config import ActorConfig
    from common.protocol import Passage
    from demo.tinymodel import build_tiny_model

    base.mkdir(parents=True, exist_ok=True)
    model = build_tiny_model(base / "tiny", texts=script_texts([f"<answer> {ANSWER} </answer>"]), layers=2, hidden=64)
    eng = TransformersEngine(model, dtype="float32")
    obs = RolloutRunner(eng, None, ActorConfig(max_obs_tokens=64)).observation_ids(
        [Passage(id="0", title="zorland", text=f"the capital of zorland is {ANSWER} .", score=1.0)])
    if coin:
        teach(model, [_direct_answer(eng.tokenizer, a) for a in (ANSWER, "paris")], steps=150, until_loss=0.0)
    else:
        teach(model, [script_example(eng.tokenizer, QUESTION, QUERY, obs, ANSWER)], until_loss=0.05)
    eng.close()
    qa = base / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": QUESTION, "golden_answers": [ANSWER]}) + "\n"
                          for _ in range(questions)))
    out = {"model": model, "qa": qa}
    if corpus:
        out["index"] = build_index(base)
    return out


def _direct_answer(tok, answer: str) -> tuple[list[int], list[int]]:
    from actors.rollout import build_prompt_ids

    prompt = build_prompt_ids(tok, QUESTION)
    out = list(tok(f"<answer> {answer} </answer>", add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]
    return prompt + out, [0] * len(prompt) + [1] * len(out)


def build_index(base: Path, passages: int = 40) -> Path:
    rows = [{"id": "0", "contents": f'"zorland"\nthe capital of zorland is {ANSWER} .'}]
    rows += [{"id": str(i), "contents": f'"land {i}"\nland {i} has a capital called town {i} by the river {i}.'}
             for i in range(1, passages)]
    corpus = base / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return build_index_here(corpus, base / "index")


def build_index_here(corpus: Path, out: Path, *, shards: int = 1, factory: str = "Flat", batch_size: int = 64) -> Path:
    """A dense index of a small corpus, built in this process: what `cli.py index build` does with
    the default config, without a new interpreter importing torch and transformers again (~8 s on
    the 2-core VM). The tests' worlds use it; the command itself is tested in test_retriever_index."""
    from common.config import load_config
    from retriever.index import build_index

    build_index(load_config(None, environ={}).retriever, corpus=corpus, out=out, shards=shards, factory=factory,
                batch_size=batch_size)
    return out


# --------------------------------------------------------------------------- processes
def default_start(args: list[str], env: dict | None = None, **kw) -> subprocess.Popen:
    """Start `python <args>` in the repo in its own session (ended with its group by Stack.close)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=full_env, start_new_session=True, **kw)


def get_json(url: str, timeout: float = 3.0) -> dict:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:  # /health answers 503 with a body while starting
        return json.loads(e.read())


class StackError(AssertionError):
    """A scenario could not go on (a process died, a wait ran out); the text carries log tails."""


class Stack:
    """The processes of one scenario, their config, logs and observation points."""

    def __init__(self, base: Path, world: dict[str, Path], start: Callable[..., subprocess.Popen] = default_start,
                 env: dict | None = None):
        from common.transport import free_tcp_port

        self.base, self.world, self._start = base, world, start
        self.env = {"OMP_NUM_THREADS": "1", **(env or {})}
        self.ports = {n: free_tcp_port() for n in ("ingest", "sync", "store", "learner_metrics", "retriever",
                                                  "retriever_metrics")}
        self.ports["actor_metrics"] = free_tcp_port(count=9)  # workers serve on actor_metrics + 1 + i
        self.procs: dict[str, subprocess.Popen] = {}
        self.all_procs: list[subprocess.Popen] = []
        self.run_dir, self.groups_dir, self.ckpt = base / "run", base / "groups", base / "ckpt"
        self.config: Path | None = None

    # ------------------------------------------------------------------ config
    def write_config(self, learner: dict | None = None, actor: dict | None = None, retriever: dict | None = None,
                     workers: int = 1) -> Path:
        p, w = self.ports, self.world
        sections = {
            "metrics": {"learner_port": p["learner_metrics"], "actor_port": p["actor_metrics"],
                        "retriever_port": p["retriever_metrics"]},
            "retriever": {"index_dir": str(w.get("index", "")), "endpoint": f"tcp://127.0.0.1:{p['retriever']}",
                          "http_port": 0, "encoder_threads": 1, **(retriever or {})},
            "learner": {"model": str(w["model"]), "data": str(w["qa"]),
                        "ingest_endpoint": f"tcp://127.0.0.1:{p['ingest']}",
                        "sync_endpoint": f"tcp://127.0.0.1:{p['sync']}", "store_port": p["store"], "n_samples": 2,
                        "groups_per_step": 2, "micro_batch_tokens": 1024, "max_staleness": 2, "steps": 1_000_000,
                        "lr": 1e-3, "batch_wait_s": 0.5, "cpu_threads": 1, "sync_timeout_s": 10.0,
                        "dump_groups_dir": str(self.groups_dir), **(learner or {})},
            "actor": {"model": str(w["model"]), "engine": "transformers", "dtype": "float32", "workers": workers,
                      "learner_endpoint": f"tcp://127.0.0.1:{p['ingest']}",
                      "retriever_endpoint": f"tcp://127.0.0.1:{p['retriever']}", "n_samples": 2, "max_turns": 1,
                      "max_new_tokens": 24, "max_obs_tokens": 64, "max_total_tokens": 512, "prompts_per_request": 2,
                      "max_groups_in_flight": 4, "heartbeat_s": 1.0, "restart_backoff_s": 0.5,
                      "request_timeout_s": 10.0, **(actor or {})},
        }
        lines = [f'run_dir = "{self.run_dir}"']
        for name, kv in sections.items():
            lines.append(f"[{name}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in kv.items()]
        self.config = self.base / "stack.toml"
        self.config.write_text("\n".join(lines) + "\n")
        return self.config

    # ------------------------------------------------------------------ processes
    def log(self, role: str) -> Path:
        return self.base / f"{role}.log"

    def start(self, role: str, *extra: str) -> subprocess.Popen:
        f = open(self.log(role), "ab")  # noqa: SIM115 (kept open for the process's life)
        f.write(f"\n===== start {role} {' '.join(extra)} at {time.time():.3f}\n".encode())
        f.flush()
        p = self._start(["cli.py", role, "--config", str(self.config), *extra], env=self.env, stdout=f,
                        stderr=subprocess.STDOUT)
        self.procs[role] = p
        self.all_procs.append(p)
        return p

    def kill9(self, pid: int) -> float:
        """SIGKILL one process (not its group); returns the wall time of the kill."""
        t = time.time()
        os.kill(pid, signal.SIGKILL)
        return t

    def close(self) -> None:
        for p in self.all_procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in self.all_procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(5)

    def tails(self, n: int = 30) -> str:
        out = []
        for role in ("learner", "actor", "retriever"):
            if self.log(role).is_file():
                lines = self.log(role).read_text(errors="replace").splitlines()[-n:]
                out.append(f"--- {role}.log\n" + "\n".join(lines))
        return "\n".join(out)

    def wait(self, pred: Callable[[], Any], timeout: float, what: str, watch: tuple[str, ...] = (),
             poll_s: float = 0.2) -> Any:
        """Poll `pred` until it returns something truthy; fail when a watched role exits or time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            for role in watch:
                p = self.procs.get(role)
                if p is not None and p.poll() is not None:
                    raise StackError(f"{what}: {role} exited with code {p.returncode}\n{self.tails()}")
            try:
                value = pred()
                if value:
                    return value
            except (OSError, ValueError, KeyError, IndexError, TypeError):
                pass
            if time.monotonic() >= deadline:
                raise StackError(f"timed out after {timeout:.0f}s waiting for {what}\n{self.tails()}")
            time.sleep(poll_s)

    # ------------------------------------------------------------------ observation
    def health(self, role: str, worker: int | None = None) -> dict:
        port = {"learner": self.ports["learner_metrics"], "actor": self.ports["actor_metrics"],
                "retriever": self.ports["retriever_metrics"]}[role]
        if worker is not None:
            port += 1 + worker
        return get_json(f"http://127.0.0.1:{port}/health")

    def steps(self) -> list[dict]:
        return step_lines(self.run_dir)

    def groups(self, since: int = 0) -> list[dict]:
        """Accepted groups the learner dumped (in acceptance order), each with its file's mtime."""
        out = []
        for f in sorted(self.groups_dir.glob("*.npz"))[since:]:
            try:
                with np.load(f, allow_pickle=False) as z:
                    g = {k: z[k] for k in z.files}
                g["mtime"] = f.stat().st_mtime
                out.append(g)
            except (OSError, ValueError, EOFError, zipfile.BadZipFile):  # being written
                break
        return out


# --------------------------------------------------------------------------- measures
def step_gaps(steps: list[dict], t0: float, t1: float) -> tuple[float, float]:
    """(largest gap between consecutive learner steps that ends inside [t0, t1], longest step_s)."""
    times = [s["time"] for s in steps]
    gaps = [b - a for a, b in zip(times, times[1:]) if t0 <= b <= t1]
    return (max(gaps) if gaps else float("nan")), max((s.get("step_s", 0.0) for s in steps), default=0.0)


def rate(events: list[float], t0: float, t1: float) -> float:
    """Events per second inside [t0, t1]."""
    return sum(t0 <= t < t1 for t in events) / max(t1 - t0, 1e-9)


def sample_slices(g: dict) -> list[slice]:
    ends = np.cumsum(g["lengths"].astype(np.int64))
    return [slice(int(a), int(b)) for a, b in zip(ends - g["lengths"], ends)]


def check_group_whole(g: dict, n_samples: int) -> None:
    """A dumped group is a whole group: n samples, arrays consistent with the lengths."""
    total = int(g["lengths"].sum())
    assert len(g["lengths"]) == n_samples, f"group {g['group_id']} has {len(g['lengths'])} samples"
    for k in ("tokens", "loss_mask", "logprobs", "versions"):
        assert g[k].shape == (total,), f"group {g['group_id']}: {k} has {g[k].shape}, lengths sum to {total}"
    assert g["rewards"].shape == (n_samples,) and g["loss_mask"].any()


# --------------------------------------------------------------------------- 1. actor crash
def actor_crash(stack: Stack, workers: int = 2, warm_steps: int = 4, after_steps: int = 6,
                slot: int | None = None, timeout: float = 300.0) -> dict:
    """Kill -9 one worker while the learner trains on every worker's groups; see it come back."""
    slot = workers - 1 if slot is None else slot
    watch = ("learner", "actor")
    stack.start("learner")
    stack.start("actor")
    lv = lambda: int(stack.health("learner")["version"])  # noqa: E731
    stack.wait(lambda: len(stack.steps()) >= warm_steps and all(
        stack.health("actor", i)["version"] >= 1 for i in range(workers)), timeout,
        f"{warm_steps} steps with every worker holding broadcast weights", watch)
    old = stack.health("actor", slot)
    # the victim's run must have had a group accepted (a fast peer can fill the first steps alone)
    stack.wait(lambda: any(str(g["run_id"]) == old["run_id"] for g in stack.groups()), timeout,
               f"a group from worker {slot} accepted", watch)
    t_kill = stack.kill9(int(old["pid"]))
    steps_at_kill = len(stack.steps())
    new = stack.wait(lambda: (h := stack.health("actor", slot))["pid"] != old["pid"] and h, timeout,
                     "the supervisor's new worker", watch, poll_s=0.05)
    t_up = time.time()
    v_up = lv()
    stack.wait(lambda: stack.health("actor", slot)["learner_run_id"], timeout, "the new worker's hello", watch)
    t_hello = time.time()
    stack.wait(lambda: stack.health("actor", slot)["version"] >= v_up, timeout,
               f"the new worker loading version >= {v_up}", watch, poll_s=0.05)
    t_weights = time.time()
    stack.wait(lambda: any(str(g["run_id"]) == new["run_id"] for g in stack.groups()), timeout,
               "a group from the new worker accepted", watch)
    n_back = len(stack.steps())
    stack.wait(lambda: len(stack.steps()) >= max(steps_at_kill, n_back) + after_steps, timeout,
               f"{after_steps} more steps with the worker back", watch)
    t_end = time.time()
    steps = stack.steps()
    gap_after, step_max = step_gaps(steps, t_kill, t_end)
    gap_before, _ = step_gaps(steps, 0.0, t_kill)
    gap_recovered, _ = step_gaps(steps, t_weights + 1e-3, t_end)
    step_t = [s["time"] for s in steps]
    warm_t0 = step_t[min(1, len(step_t) - 1)]
    return {"scenario": "actor_crash", "workers": workers, "killed_pid": int(old["pid"]), "new_pid": int(new["pid"]),
            "old_run_id": old["run_id"], "new_run_id": new["run_id"], "kill_to_process_s": t_up - t_kill,
            "kill_to_hello_s": t_hello - t_kill, "kill_to_weights_s": t_weights - t_kill,
            "process_to_weights_s": t_weights - t_up, "version_at_restart": v_up,
            "max_step_gap_before_s": gap_before, "max_step_gap_after_kill_s": gap_after,
            "max_step_gap_after_recovery_s": gap_recovered, "max_step_s": step_max,
            "steps_per_s_before": rate(step_t, warm_t0, t_kill), "steps_per_s_after": rate(step_t, t_weights, t_end),
            "steps_during_restart": sum(t_kill <= t < t_weights for t in step_t), "t_kill": t_kill}


# --------------------------------------------------------------------------- 2. retriever outage
def _phase_counts(groups: list[dict], t0: float, t1: float) -> dict:
    sel = [g for g in groups if t0 <= g["mtime"] < t1]
    failed = sum(int(g["retrieval_failed"].sum()) for g in sel)
    samples = sum(len(g["lengths"]) for g in sel)
    return {"groups": len(sel), "groups_per_s": len(sel) / max(t1 - t0, 1e-9),
            "failed_frac": failed / samples if samples else 0.0}


def retriever_outage(stack: Stack, outage_s: float = 30.0, warm_groups: int = 6, after_s: float = 30.0,
                     timeout: float = 300.0, hooks: dict[str, Callable[[], None]] | None = None) -> dict:
    """Kill -9 the retriever for `outage_s`, restart it; groups/s and failure share per phase.
    hooks (tests): "up" runs before the kill, "down" once a rollout has failed, "back" once the
    restarted retriever is ready."""
    hook = lambda name: (hooks or {}).get(name, lambda: None)()  # noqa: E731
    watch = ("learner", "actor")
    stack.start("retriever")
    stack.wait(lambda: stack.health("retriever")["status"] == "ok", timeout, "retriever ready", ("retriever",))
    stack.start("learner")
    stack.start("actor")
    ok = lambda g: int(g["num_searches"].sum()) > 0 and not g["retrieval_failed"].any()  # noqa: E731
    stack.wait(lambda: sum(ok(g) for g in stack.groups()) >= warm_groups, timeout,
               f"{warm_groups} groups with successful searches", watch)
    t_first = stack.groups()[0]["mtime"]
    hook("up")
    failures = lambda: stack.log("actor").read_text(errors="replace").count("retrieval failed for")  # noqa: E731
    seen = failures()
    t_kill = stack.kill9(stack.procs["retriever"].pid)
    stack.procs["retriever"].wait(30)
    stack.wait(lambda: failures() > seen, timeout, "a rollout ended by a failed retrieval", watch)
    t_first_fail = time.time()
    hook("down")
    time.sleep(max(0.0, t_kill + outage_s - time.time()))
    t_restart = time.time()
    stack.start("retriever")
    stack.wait(lambda: stack.health("retriever")["status"] == "ok", timeout, "retriever ready again",
               ("retriever", *watch))
    t_ready = time.time()
    hook("back")
    stack.wait(lambda: any(ok(g) and g["mtime"] >= t_ready for g in stack.groups()), timeout,
               "a group with successful searches after the restart", watch)
    t_recovered = time.time()
    time.sleep(max(0.0, t_recovered + after_s - time.time()))
    t_end = time.time()
    groups = stack.groups()
    attempts = failures() - seen
    return {"scenario": "retriever_outage", "outage_s": t_restart - t_kill,
            "kill_to_first_failure_s": t_first_fail - t_kill,
            "restart_to_ready_s": t_ready - t_restart,
            "ready_to_first_ok_group_s": t_recovered - t_ready,
            "before": _phase_counts(groups, t_first, t_kill), "outage": _phase_counts(groups, t_kill, t_ready),
            "after": _phase_counts(groups, t_recovered, t_end), "failed_search_batches": attempts,
            "t_kill": t_kill, "t_ready": t_ready, "t_recovered": t_recovered}


# --------------------------------------------------------------------------- 3. learner preemption
def checkpoint_state(ckpt: Path) -> dict:
    """What the latest complete checkpoint holds (meta.json), plus whether every step-* folder is complete."""
    from learner.checkpoint import LATEST, find_latest, is_complete

    latest = find_latest(ckpt)
    marker = (ckpt / LATEST).read_text().strip() if (ckpt / LATEST).is_file() else ""
    meta = json.loads((latest / "meta.json").read_text()) if latest else {}
    return {"path": latest, "marker": marker, "marker_complete": bool(marker) and is_complete(ckpt / marker),
            "incomplete_step_dirs": [p.name for p in ckpt.glob("step-*") if not is_complete(p)],
            "step": meta.get("step", 0), "version": meta.get("version", 0), "dispatcher": meta.get("dispatcher")}


def _learner_phase(log: Path) -> str:
    """What the learner last logged before it died (best effort: a step, sync or checkpoint line)."""
    import re

    found = re.findall(r"\] (scout[\w.]*): (.*)", log.read_text(errors="replace"))
    return f"{found[-1][0]}: {found[-1][1][:100]}" if found else ""


def kill_and_resume(stack: Stack, timeout: float = 300.0, before_restart: Callable[[dict], None] | None = None) -> dict:
    """One preemption: SIGKILL the learner now, restart it with --resume, follow the actor back."""
    watch = ("learner", "actor")
    prev_run = stack.health("actor", 0)["learner_run_id"]
    logged = stack.steps()
    lines_before, last_step = len(logged), int(logged[-1]["step"]) if logged else 0
    t_kill = stack.kill9(stack.procs["learner"].pid)
    stack.procs["learner"].wait(30)
    phase = _learner_phase(stack.log("learner"))
    state = checkpoint_state(stack.ckpt)
    if before_restart is not None:
        before_restart(state)
    t_restart = time.time()
    stack.start("learner", "--resume")
    stack.wait(lambda: stack.health("learner")["status"] == "ok", timeout, "the resumed learner's /health", watch)
    t_up = time.time()
    new_run = stack.wait(lambda: (r := stack.health("actor", 0)["learner_run_id"]) not in ("", prev_run) and r,
                         timeout, "the worker's hello to the resumed learner", watch)
    t_hello = time.time()
    stack.wait(lambda: len(stack.steps()) > lines_before, timeout, "a step of the resumed learner", watch)
    first = stack.steps()[lines_before]
    v_first = int(first["version"])
    stack.wait(lambda: stack.health("actor", 0)["version"] >= v_first, timeout,
               f"the worker loading the resumed learner's version {v_first}", watch, poll_s=0.1)
    t_weights = time.time()
    return {"t_kill": t_kill, "killed_during": phase, "checkpoint": {k: v for k, v in state.items() if k != "path"},
            "first_step_after": int(first["step"]), "first_version_after": v_first,
            "steps_lost": last_step - int(state["step"]),
            "restart_to_up_s": t_up - t_restart, "restart_to_hello_s": t_hello - t_restart,
            "restart_to_weights_s": t_weights - t_restart, "worker_learner_run": new_run}


def learner_preemption(stack: Stack, kills: int = 2, warm_steps: int = 4, between_steps: int = 3,
                       timeout: float = 300.0, before_restart: Callable[[dict], None] | None = None) -> dict:
    """Run learner + one actor worker; `kills` times: SIGKILL the learner, --resume it, check it continues."""
    watch = ("learner", "actor")
    stack.start("learner")
    stack.start("actor")
    stack.wait(lambda: len(stack.steps()) >= warm_steps and stack.health("actor", 0)["version"] >= 1, timeout,
               f"{warm_steps} steps and a worker with broadcast weights", watch)
    rounds = []
    for _ in range(kills):
        rounds.append(kill_and_resume(stack, timeout, before_restart))
        n = len(stack.steps())
        stack.wait(lambda: len(stack.steps()) >= n + between_steps, timeout, f"{between_steps} more steps", watch)
    return {"scenario": "learner_preemption", "kills": rounds, "steps": stack.steps()}


# --------------------------------------------------------------------------- bench
def _bench_actor(base: Path, workers: int) -> dict:
    world = build_world(base)
    stack = Stack(base, world)
    stack.write_config(workers=workers, actor={"no_search": True}, learner={"groups_per_step": 2 * workers})
    try:
        return actor_crash(stack, workers=workers, warm_steps=6, after_steps=12)
    finally:
        stack.close()


def _bench_retriever(base: Path, outage_s: float) -> dict:
    world = build_world(base, corpus=True)
    stack = Stack(base, world)
    stack.write_config(actor={"retrieval_timeout_s": 2.0, "retrieval_retries": 3}, learner={"lr": 1e-7})
    try:
        return retriever_outage(stack, outage_s=outage_s, warm_groups=10, after_s=outage_s)
    finally:
        stack.close()


def _bench_learner(base: Path, kills: int) -> dict:
    world = build_world(base)
    stack = Stack(base, world)
    stack.write_config(actor={"no_search": True}, learner={"checkpoint_dir": str(stack.ckpt), "checkpoint_every": 1,
                                                           "keep_checkpoints": 3})
    try:
        out = learner_preemption(stack, kills=kills, between_steps=4)
        steps = out.pop("steps")
        out["steps_total"] = len(steps)
        out["steps_monotonic_after_each_resume"] = all(r["first_step_after"] == r["checkpoint"]["step"] + 1
                                                        for r in out["kills"])
        return out
    finally:
        stack.close()


def _bench_frozen(role: str, base: Path, freeze_s: float) -> dict:
    """A worker (2 workers) or the learner (1 worker) SIGSTOPped for freeze_s (bench/faults_frozen.py)."""
    from bench.faults_frozen import frozen_actor, frozen_learner  # it imports this module

    world = build_world(base)
    stack = Stack(base, world)
    workers = 2 if role == "actor" else 1
    stack.write_config(workers=workers, actor={"no_search": True}, learner={"max_staleness": 2})
    try:
        if role == "actor":
            return frozen_actor(stack, freeze_s, whens=("sync", "between"), workers=workers, after_steps=6)
        return frozen_learner(stack, freeze_s, after_steps=6)
    finally:
        stack.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", choices=("actor", "retriever", "learner", "frozen-actor", "frozen-learner", "all"),
                    default="all", help="all: the first three; frozen-*: bench/faults_frozen.py")
    ap.add_argument("--workers", type=int, default=2, help="actor workers (actor crash)")
    ap.add_argument("--outage-s", type=float, default=30.0, help="retriever down for this long")
    ap.add_argument("--kills", type=int, default=3, help="learner preemptions in a row")
    ap.add_argument("--freeze-s", type=float, default=60.0, help="frozen-*: SIGSTOP for this long")
    ap.add_argument("--out", type=Path, default=Path("/tmp/scout-faults"))
    a = ap.parse_args(argv)
    runs = {"actor": lambda: _bench_actor(a.out / f"actor-{time.time():.0f}", a.workers),
            "retriever": lambda: _bench_retriever(a.out / f"retriever-{time.time():.0f}", a.outage_s),
            "learner": lambda: _bench_learner(a.out / f"learner-{time.time():.0f}", a.kills),
            "frozen-actor": lambda: _bench_frozen("actor", a.out / f"frozen-actor-{time.time():.0f}", a.freeze_s),
            "frozen-learner": lambda: _bench_frozen("learner", a.out / f"frozen-learner-{time.time():.0f}", a.freeze_s)}
    for name in (["actor", "retriever", "learner"] if a.scenario == "all" else [a.scenario]):
        res = runs[name]()
        print(json.dumps(res, default=str), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
