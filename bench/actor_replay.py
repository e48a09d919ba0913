"""Scout's rollout loop against bare vLLM on the same token work (issue #18, item 4).

    round r, A (scout): RolloutRunner over a RecordingEngine(VllmEngine) on the demo's base model,
        demo questions and sampling; real searches (a `cli.py retriever` child on the demo index),
        rewards, groups encoded and sent to a ZeroMQ sink (a child that decodes and acks each)
        ──▶ every turn recorded: its prompt ids, the engine step it was added before, tokens made
    round r, B (bare): the same vLLM engine core, nothing around it: each recorded turn re-added
        before the same engine step, same prompt ids, exactly its recorded new tokens (ignore_eos,
        max_tokens), same temperature / top_p, sampled-token logprob on, no detokenizing
    ratio = B wall / A wall for the same generated tokens (the issue's figure); cpu_ratio = B / A in
    CPU seconds of this process (a shared machine's neighbours inflate wall time, much less CPU
    time); the prefix cache is reset before each side. --engine-leg adds C: the same replay through
    scout's engine interface alone (SamplingSpec, per-step outputs, per-token bookkeeping).
    --bare-searches adds D, a diagnostic: B again, with the searches A made sent to the retriever
    before the same steps (from a pool of two threads, answers unread). Is vLLM's step slower inside
    scout's loop because of the search threads beside it? Both B and D report the main thread's
    CPU inside vLLM's step (`bare_step_cpu_s`, `bare_searching_step_cpu_s`).
    A's phases (the worker's: engine, rollout, send, search_wait) come in wall and in CPU seconds,
    vLLM's own step and add_request timed inside them; `gc` is time in Python's collector.

Why step-exact replay: a rollout's turns do not run in waves (one sample's second turn starts
while another's first is still decoding, when its search returns), so replaying "all first turns,
then all second turns" would give vLLM batches the rollout loop never had (bigger ones, a win for
bare) and barrier tails (a loss). Adding each turn before the same step number gives bare vLLM
the same batch at every step, so the engine's own work is the same on both sides and only the
time between steps differs: scout's turn handling, searches the engine had to wait for, sending.

    python bench/actor_bench.py --compare bare --demo-dir <prepared demo folder> --groups 96 \
        --in-flight 32 --warmup 1 --repeat 6 [--engine-leg] [--bare-searches] [--stops-as-text] [--json out.json]
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Scout's phases, as the worker counts them; *_cpu: CPU seconds of the engine's thread in that phase.
# vllm_step(_cpu): vLLM's own step, inside engine; vllm_add_cpu: vLLM's add_request, inside rollout;
# cpu_s - main_thread_cpu: the other threads (the retriever client, the search threads).
PHASES = ("engine", "engine_cpu", "vllm_step", "vllm_step_cpu", "vllm_add_cpu", "main_thread_cpu", "rollout",
          "rollout_cpu", "send", "send_cpu", "search_wait", "ack_wait", "gc")
ROUND_TIMEOUT_S = 900.0  # a round that has not finished by then is an error, not a hang


@dataclass
class Turn:
    prompt: list[int]  # the ids fed to the engine (the context so far)
    add_step: int  # engine steps done before the turn was added
    new: int = 0  # tokens it generated (after scout's stop cut)


class GcClock:
    """Seconds spent in Python's garbage collector (all generations), from gc.callbacks."""

    def __init__(self):
        self.total, self._t0 = 0.0, 0.0

    def install(self) -> None:
        import gc

        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, _info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.total += time.perf_counter() - self._t0


GC = GcClock()


class TimedCore:
    """The vLLM LLMEngine with its step() timed: of scout's engine step, how much is vLLM's own."""

    def __init__(self, core):
        self.core, self.step_s, self.step_cpu_s, self.add_cpu_s = core, 0.0, 0.0, 0.0

    def __getattr__(self, name):
        return getattr(self.core, name)

    def step(self):
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return self.core.step()
        finally:
            self.step_s += time.perf_counter() - t0
            self.step_cpu_s += time.thread_time() - c0

    def add_request(self, *args, **kw):
        c0 = time.thread_time()
        try:
            return self.core.add_request(*args, **kw)
        finally:
            self.add_cpu_s += time.thread_time() - c0


class RecordingEngine:
    """A scout Engine that records every turn added to it and the tokens each one generated."""

    def __init__(self, engine):
        self.inner = engine
        self.core = engine.core  # the bare LLMEngine (the replay drives it directly)
        engine.core = self.timed = TimedCore(engine.core)
        self.turns: dict[str, Turn] = {}
        self.steps = 0
        self.step_cpu_s = 0.0  # CPU seconds in step() (vLLM's step and scout's per-token work)

    def __getattr__(self, name):  # everything else (tokenizer, eos_ids, abort, ...) is the engine's
        return getattr(self.inner, name)

    def reset(self) -> None:
        self.turns, self.steps = {}, 0

    def add(self, req_id, prompt_ids, spec) -> None:
        self.inner.add(req_id, prompt_ids, spec)
        self.turns[req_id] = Turn(self.inner._reqs[req_id].prompt_ids, self.steps)  # the engine's own copy

    def has_unfinished(self) -> bool:
        return self.inner.has_unfinished()

    def step(self):
        c0 = time.thread_time()
        outs = self.inner.step()
        self.step_cpu_s += time.thread_time() - c0
        self.steps += 1
        for o in outs:
            t = self.turns.get(o.req_id)
            if t is not None:
                t.new += len(o.token_ids)
        return outs


def replay_schedule(turns: dict[str, Turn]) -> dict[int, list[tuple[str, Turn]]]:
    """Recorded turns grouped by the engine step they were added before (turns that made no
    token, e.g. aborted ones, are left out: bare vLLM cannot be asked for zero tokens)."""
    by_step: dict[int, list[tuple[str, Turn]]] = defaultdict(list)
    for rid, t in turns.items():
        if t.new > 0:
            by_step[t.add_step].append((rid, t))
    return dict(by_step)


def replay_bare(core, turns: dict[str, Turn], temperature: float, top_p: float, tag: str,
                searcher=None, searches: list | None = None) -> dict:
    """Bare vLLM (`LLMEngine.add_request` / `step`, nothing around it) on the recorded turns, each
    added before the same step as in the recording. Returns wall seconds, tokens, steps. With
    `searcher`, the recorded `searches` are also made before their steps, from two threads."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    schedule, by_step = replay_schedule(turns), defaultdict(list)
    for step, queries, topk in searches or ():
        by_step[step].append((queries, topk))
    pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="search") if searcher else None
    futures = []
    last = max(schedule, default=-1)
    core.reset_prefix_cache()
    produced = steps = k = 0
    add_cpu = step_cpu = 0.0  # of which vLLM's add_request; the main thread's CPU inside step()
    t0, cpu0, gc0 = time.perf_counter(), time.process_time(), GC.total
    while k <= last or core.has_unfinished_requests():
        if pool is not None:
            futures += [pool.submit(searcher.search, q, topk) for q, topk in by_step.get(k, ())]
        for rid, t in schedule.get(k, ()):  # sampling params made here: a caller of vLLM makes them too
            params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=t.new, ignore_eos=True,
                                    logprobs=0, detokenize=False, skip_special_tokens=False,
                                    output_kind=RequestOutputKind.FINAL_ONLY)
            c0 = time.thread_time()
            core.add_request(f"{tag}/{rid}", {"prompt_token_ids": t.prompt}, params)
            add_cpu += time.thread_time() - c0
        if core.has_unfinished_requests():
            c0 = time.thread_time()
            outs = core.step()
            step_cpu += time.thread_time() - c0
            for o in outs:
                if o.finished:
                    produced += len(o.outputs[0].token_ids)
            steps += 1
        k += 1
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    if pool is not None:
        concurrent.futures.wait(futures)
        pool.shutdown()
    return {"wall_s": wall, "cpu_s": cpu, "tokens": produced, "steps": steps, "add_cpu_s": add_cpu,
            "step_cpu_s": step_cpu, "gc_s": GC.total - gc0,
            "searches": sum(len(f.result()) for f in futures if f.exception() is None)}  # answered ones


class RecordingSearcher:
    """The rollout's searcher, recording each batch and the engine step it was made at."""

    def __init__(self, searcher, rec: RecordingEngine):
        self.inner, self.rec = searcher, rec
        self.calls: list[tuple[int, list[str], int]] = []  # (engine steps done, queries, topk)

    def search(self, queries: list[str], topk: int):
        self.calls.append((self.rec.steps, list(queries), topk))
        return self.inner.search(queries, topk)

    def close(self) -> None:
        self.inner.close()


def replay_engine(rec, turns: dict[str, Turn], temperature: float, top_p: float, tag: str) -> dict:
    """The same replay through scout's engine interface (SamplingSpec, DELTA outputs, per-token
    bookkeeping) without the rollout loop; stop strings off, since new samples would hit them
    elsewhere than the recording did. Returns wall seconds, tokens, steps, vLLM step seconds."""
    from actors.engine import SamplingSpec

    engine, schedule = rec.inner, replay_schedule(turns)
    last = max(schedule, default=-1)
    rec.core.reset_prefix_cache()
    produced = steps = k = 0
    vllm0, cpu0, t0 = rec.timed.step_s, time.process_time(), time.perf_counter()
    while k <= last or engine.has_unfinished():
        for rid, t in schedule.get(k, ()):
            engine.add(f"{tag}/{rid}", t.prompt, SamplingSpec(max_tokens=t.new, temperature=temperature,
                                                               top_p=top_p, ignore_eos=True))
        if engine.has_unfinished():
            produced += sum(len(o.token_ids) for o in engine.step())
            steps += 1
        k += 1
    return {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - cpu0, "tokens": produced,
            "steps": steps, "vllm_step_s": rec.timed.step_s - vllm0}


# --------------------------------------------------------------------------- scout's side
class Sink:
    """A child process with a ZeroMQ ROUTER that decodes every TrajectoryGroup and acks it (the
    learner's ingest, without the learner); the bench's DEALER sends and reads the acks."""

    def __init__(self, ctx, tcfg):
        import zmq

        from common.transport import connect

        self.endpoint = f"ipc://{tempfile.mkdtemp(prefix='scout-actor-sink-')}/sink"
        self.proc = subprocess.Popen([sys.executable, __file__, "sink", self.endpoint], cwd=ROOT,
                                     start_new_session=True)
        self.sock = connect(ctx, zmq.DEALER, self.endpoint, tcfg)

    def send(self, msg) -> None:
        import zmq

        from common.transport import send

        send(self.sock, msg, flags=zmq.NOBLOCK)

    def acks(self, timeout_ms: int) -> int:
        import zmq

        if timeout_ms and self.proc.poll() is not None:
            raise RuntimeError(f"the sink exited with code {self.proc.returncode}")
        n, wait = 0, timeout_ms
        while self.sock.poll(wait, zmq.POLLIN):
            self.sock.recv_multipart(copy=False)
            n, wait = n + 1, 0
        return n

    def close(self) -> None:
        self.sock.close(0)
        from common.procs import stop_processes

        stop_processes([self.proc], 5.0)


def sink_main(endpoint: str) -> int:
    """The sink child: ack every group until its parent is gone."""
    import zmq

    from common.config import TransportConfig
    from common.protocol import GroupAck
    from common.transport import bind, send
    from common.wire import decode

    parent = os.getppid()
    ctx = zmq.Context()
    sock = bind(ctx, zmq.ROUTER, endpoint, TransportConfig())
    while os.getppid() == parent:
        if not sock.poll(500, zmq.POLLIN):
            continue
        ident, *frames = sock.recv_multipart(copy=False)
        msg = decode(frames)
        send(sock, GroupAck(group_id=msg.group_id, accepted=True, version=0), envelope=[ident])
    sock.close(0)
    ctx.term()
    return 0


def scout_round(runner, rec, sink, prompts: list, first: int, groups: int, in_flight: int, n: int) -> dict:
    """Scout's rollout loop for `groups` groups of `n` samples, at most `in_flight` groups (started and
    not yet acked) at a time, as the worker's credits allow; the worker's phases timed as it does,
    each in wall seconds and in CPU seconds of this (the engine's) thread."""
    wall_cpu = lambda: (time.perf_counter(), time.thread_time())  # noqa: E731
    ph = dict.fromkeys(PHASES, 0.0)
    started = sent = acked = 0
    run_id = uuid.uuid4().hex
    rec.reset()
    if isinstance(runner.searcher, RecordingSearcher):
        runner.searcher.calls = []
    rec.core.reset_prefix_cache()
    timed0 = (rec.timed.step_s, rec.timed.step_cpu_s, rec.timed.add_cpu_s, rec.step_cpu_s)
    cpu0, gc0, (t0, main0) = time.process_time(), GC.total, wall_cpu()
    while acked < groups:
        if time.perf_counter() - t0 > ROUND_TIMEOUT_S:
            raise TimeoutError(f"scout round not done in {ROUND_TIMEOUT_S:.0f} s ({acked}/{groups} groups acked)")
        ta, ca = wall_cpu()
        while started < groups and started - acked < in_flight:
            runner.start_group(prompts[(first + started) % len(prompts)], n)
            started += 1
        steps0, engine_cpu0 = runner.stats.step_seconds, rec.step_cpu_s
        finished = runner.poll()
        tb, cb = wall_cpu()
        engine, engine_cpu = runner.stats.step_seconds - steps0, rec.step_cpu_s - engine_cpu0
        ph["engine"] += engine
        ph["rollout"] += tb - ta - engine
        ph["rollout_cpu"] += cb - ca - engine_cpu
        for g in finished:
            sink.send(g.to_message("actor-bench", run_id))
        sent += len(finished)
        acked += sink.acks(0)
        tc, cc = wall_cpu()
        ph["send"] += tc - tb
        ph["send_cpu"] += cc - cb
        if not rec.has_unfinished() and runner.in_search:
            runner.wait_searches(0.02)
            ph["search_wait"] += time.perf_counter() - tc
        elif not runner.busy() and sent > acked:
            acked += sink.acks(20)
            ph["ack_wait"] += time.perf_counter() - tc
    (t1, main1), cpu = wall_cpu(), time.process_time() - cpu0
    wall = t1 - t0
    ph["vllm_step"] = rec.timed.step_s - timed0[0]
    ph["vllm_step_cpu"] = rec.timed.step_cpu_s - timed0[1]
    ph["vllm_add_cpu"] = rec.timed.add_cpu_s - timed0[2]
    ph["engine_cpu"] = rec.step_cpu_s - timed0[3]
    ph["main_thread_cpu"] = main1 - main0
    ph["gc"] = GC.total - gc0
    return {"wall_s": wall, "cpu_s": cpu, "tokens": sum(t.new for t in rec.turns.values()), "turns": len(rec.turns),
            "steps": rec.steps, "phases_s": ph}


# --------------------------------------------------------------------------- the comparison
def demo_config(demo_dir: Path, run_dir: Path, sets: list[str], model: Path | None = None):
    """The demo's run config (DEMO_RECIPE, its prompt template, free ports, ipc paths) on a
    prepared demo folder, which is only read; `model` replaces its base model (bench/grow_model.py)."""
    from common.config import load_config
    from demo.recipe import write_run_config

    paths = {"index": demo_dir / "index", "model": model or demo_dir / "base-model", "train": demo_dir / "world" / "train.jsonl"}
    for p in paths.values():
        if not p.exists():
            raise SystemExit(f"{p} is missing: --demo-dir must be a prepared demo folder (demo/recipe.py prepare)")
    path = write_run_config(load_config(None, [f"demo.dir={demo_dir}", *sets]), paths, run_dir)
    return load_config(path, sets), path, paths


def start_retriever(config: Path, cfg, log_dir: Path, core: int | None):
    """`cli.py retriever` on the demo index, pinned to `core` (the pipeline bench's learner core)."""
    from demo.children import Children, wait_healthy

    children = Children(log_dir)
    env = {"OMP_NUM_THREADS": "1"}
    p = children.start("retriever", ["cli.py", "retriever", "--config", str(config)], env=env)
    if core is not None:
        os.sched_setaffinity(p.pid, {core})
    wait_healthy(cfg.metrics.retriever_port, "retriever", children, "retriever", timeout=300.0)
    return children


def _summary(ratios: list[float]) -> dict:
    s = sorted(ratios)
    return {"median": round(s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2, 3),
            "min": round(s[0], 3), "max": round(s[-1], 3)}


def rounds(runner, rec, sink, prompts, args, acfg) -> list[dict]:
    """A (scout) then B (bare replay of A's turns), `args.repeat` times after `args.warmup` pairs."""
    out = []
    for r in range(args.warmup + args.repeat):
        load0, searches0 = os.getloadavg()[0], runner.stats.searches
        a = scout_round(runner, rec, sink, prompts, r * args.groups, args.groups, args.in_flight, acfg.n_samples)
        b = replay_bare(rec.core, rec.turns, acfg.temperature, acfg.top_p, f"bare{r}")
        c = replay_engine(rec, rec.turns, acfg.temperature, acfg.top_p, f"eng{r}") if args.engine_leg else None
        d = replay_bare(rec.core, rec.turns, acfg.temperature, acfg.top_p, f"bares{r}", runner.searcher,
                        runner.searcher.calls) if args.bare_searches else None
        for leg, x in (("bare vLLM", b), ("the engine interface", c or b), ("bare vLLM with searches", d or b)):
            if x["tokens"] != a["tokens"]:
                raise RuntimeError(f"round {r}: {leg} made {x['tokens']} tokens, the rollout loop {a['tokens']}")
        row = {"round": r, "warmup": r < args.warmup, "tokens": a["tokens"], "turns": a["turns"],
               "steps_scout": a["steps"], "steps_bare": b["steps"], "scout_s": round(a["wall_s"], 3),
               "bare_s": round(b["wall_s"], 3), "ratio": round(b["wall_s"] / a["wall_s"], 3),
               "scout_cpu_s": round(a["cpu_s"], 3), "bare_cpu_s": round(b["cpu_s"], 3),
               "cpu_ratio": round(b["cpu_s"] / a["cpu_s"], 3), "bare_add_cpu_s": round(b["add_cpu_s"], 3),
               "bare_gc_s": round(b["gc_s"], 3), "bare_step_cpu_s": round(b["step_cpu_s"], 3),
               **({"bare_searching_s": round(d["wall_s"], 3), "bare_searching_cpu_s": round(d["cpu_s"], 3),
                   "bare_searching_step_cpu_s": round(d["step_cpu_s"], 3), "bare_searches": d["searches"]}
                  if d else {}),
               "phases_s": {k: round(v, 3) for k, v in a["phases_s"].items()},
               **({"engine_s": round(c["wall_s"], 3), "engine_cpu_s": round(c["cpu_s"], 3),
                   "engine_vllm_step_s": round(c["vllm_step_s"], 3)} if c else {}),
               "searches": runner.stats.searches - searches0, "load_1m": [round(load0, 2), round(os.getloadavg()[0], 2)]}
        print(row, flush=True)
        out.append(row)
    return out


def compare_bare(args) -> dict:
    """The whole comparison: config, retriever, sink, engine, rounds; children ended by PID."""
    import zmq

    from actors.engine import make_engine
    from actors.rollout import RolloutRunner, make_searcher
    from common.qa import read_qa
    from common.protocol import Prompt

    if args.core is not None:
        os.sched_setaffinity(0, {args.core})
    GC.install()
    run_dir = Path(tempfile.mkdtemp(prefix="scout-actor-compare-"))
    cfg, config, paths = demo_config(Path(args.demo_dir), run_dir, args.set,
                                      Path(args.model) if args.model else None)
    acfg = cfg.actor
    prompts = [Prompt(prompt_id=r["prompt_id"], question=r["question"], golden_answers=r["golden_answers"],
                      data_source=r["data_source"], text=r["text"]) for r in read_qa(paths["train"], "train")]
    children = start_retriever(config, cfg, run_dir / "logs", args.retriever_core)
    ctx = zmq.Context()
    sink = Sink(ctx, cfg.transport)
    searcher = runner = engine = None
    try:
        engine = make_engine(acfg)
        if args.stops_as_text:  # as a tokenizer that spells each stop in several tokens
            engine.single_token_stops = lambda stops: {}
        rec = RecordingEngine(engine)
        searcher = make_searcher(cfg)
        if args.bare_searches:
            searcher = RecordingSearcher(searcher, rec)
        runner = RolloutRunner(rec, searcher, acfg)
        rows = rounds(runner, rec, sink, prompts, args, acfg)
    finally:
        for close in (lambda: runner.close(), lambda: searcher.close(), lambda: engine.close(), sink.close):
            try:
                close()
            except Exception:  # closing is best effort; the children are still ended below
                pass
        children.stop_all()
        ctx.term()
    measured = [r for r in rows if not r["warmup"]]
    phases = {k: round(sum(r["phases_s"][k] for r in measured) / len(measured), 3) for k in PHASES}
    return {"compare": "bare", "model": str(paths["model"]), "groups": args.groups, "in_flight": args.in_flight,
            "stops": "text" if args.stops_as_text else "token ids where one token",
            "n_samples": acfg.n_samples, "max_turns": acfg.max_turns, "max_new_tokens": acfg.max_new_tokens,
            "temperature": acfg.temperature, "top_p": acfg.top_p, "core": args.core,
            "ratio": _summary([r["ratio"] for r in measured]),
            "cpu_ratio": _summary([r["cpu_ratio"] for r in measured]), "scout_phases_s_mean": phases,
            "bare_s_mean": round(sum(r["bare_s"] for r in measured) / len(measured), 3),
            "scout_s_mean": round(sum(r["scout_s"] for r in measured) / len(measured), 3), "rounds": rows}


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "sink":
    raise SystemExit(sink_main(sys.argv[2]))
