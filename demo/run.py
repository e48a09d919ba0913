"""`python cli.py demo`: the embedded default, end to end on this machine.

    build_world ──▶ index build ──▶ pretrain base model          (cached under demo.dir)
         │
         ▼
    retriever ◀── actor worker(s) ──groups──▶ learner            (separate processes, as in a
         ▲             ▲                          │               multi-node deployment)
         │             └──── weights (gloo) ──────┘
    eval(before) on held-out questions (starts beside the retriever) ... live progress from <run>/metrics.jsonl ...
    learner ends ─▶ export final checkpoint ─┬▶ eval(after)                  ─┬▶ plot PNG + summary.json
                                             └▶ eval(after, swapped corpus)  ─┘   (both at once)

Ctrl-C (or SIGTERM) stops every child process group and exits.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from pathlib import Path

from common.config import ScoutConfig, load_config, log_config
from common.transport import free_tcp_port
from demo.children import Children, cfg_port, wait_healthy
from demo.recipe import demo_steps, prepare, write_run_config

log = logging.getLogger("scout.demo")


def start_swapped_retriever(children: Children, config: Path, paths: dict[str, Path]) -> tuple[str, int]:
    """A second retriever over the swapped corpus (same questions, other values): (endpoint, metrics port)."""
    import tomllib

    endpoint = tomllib.loads(config.read_text())["retriever"]["endpoint"] + "-swapped"
    port = free_tcp_port()
    children.start("retriever-swapped", ["cli.py", "retriever", "--config", str(config), "--set",
                                         f"retriever.index_dir='{paths['index_swapped']}'", "--set",
                                         f"retriever.endpoint='{endpoint}'", "--set", f"metrics.retriever_port={port}"])
    return endpoint, port


def start_eval(children: Children, config: Path, model: Path, data: Path, run_dir: Path, tag: str,
               extra: list[str] = ()) -> tuple[str, Path, Path]:
    """`cli.py eval` as a child process: (its name, its output folder, the QA file)."""
    out_dir = run_dir / f"eval-{tag}"
    sets = [a for x in [f"run_dir='{out_dir}'", *extra] for a in ("--set", x)]
    children.start(f"eval-{tag}", ["cli.py", "eval", "--model", str(model), "--data", str(data),
                                   "--config", str(config), *sets])
    return f"eval-{tag}", out_dir, data


def finish_eval(children: Children, started: tuple[str, Path, Path]) -> dict:
    name, out_dir, data = started
    rc = children.procs[name].wait()
    children.procs.pop(name, None)
    if rc != 0:
        raise RuntimeError(f"{name} failed (code {rc}); see {children.log_dir / (name + '.log')}")
    return json.loads((out_dir / "eval" / f"{data.stem}.json").read_text())


def follow_progress(children: Children, run_dir: Path, steps: int) -> list[dict]:
    """Print one status line per learner step until the learner exits."""
    path, records, offset = run_dir / "metrics.jsonl", [], 0
    learner = children.procs["learner"]
    while True:
        if path.is_file():
            with open(path) as f:
                f.seek(offset)
                for line in f:
                    if not line.endswith("\n"):
                        break
                    offset += len(line.encode())
                    r = json.loads(line)
                    records.append(r)
                    print(f"step {r['step']:>4}/{steps}  reward {r['reward_mean']:.3f}  "
                          f"correct {r.get('correct_frac', 0):.3f}  searches {r.get('searches_mean', 0):.2f}  "
                          f"staleness {r.get('staleness_mean', 0):.2f}  {r.get('tokens_per_s', 0):,.0f} tok/s",
                          flush=True)
        if learner.poll() is not None:
            if learner.returncode != 0:
                raise RuntimeError(f"learner exited with code {learner.returncode}")
            return records
        children.check_alive("retriever", "actor", done_ok=("actor",))  # it exits 0 once told the run ended
        time.sleep(1.0)


def plot(records: list[dict], before: dict, after: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(1, 4, figsize=(17, 3.6))
    ax[0].plot(steps, [r["reward_mean"] for r in records])
    ax[0].set_title("reward (train groups)")
    ax[1].plot(steps, [r.get("correct_frac", 0) for r in records], label="train EM")
    ax[1].axhline(before["em"], color="grey", ls="--", label=f"held-out EM before {before['em']:.2f}")
    ax[1].axhline(after["em"], color="green", ls="--", label=f"held-out EM after {after['em']:.2f}")
    ax[1].legend(fontsize=7)
    ax[1].set_title("exact match")
    ax[2].plot(steps, [r.get("searches_mean", 0) for r in records])
    ax[2].set_title("searches per rollout")
    for key, label in (("valid_format_rate", "valid format"), ("think_before_search_rate", "think before search"),
                       ("answer_rate", "ends in <answer>"), ("groups_rewarded_frac", "groups with any reward")):
        pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if pts:
            ax[3].plot(*zip(*pts), label=label)
    ax[3].set_ylim(-0.02, 1.02)
    ax[3].legend(fontsize=7)
    ax[3].set_title("behaviour (Search-R1 paper)")
    for a in ax:
        a.set_xlabel("learner step")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(cfg: ScoutConfig, prepare_only: bool = False) -> int:
    if prepare_only:
        return prepare_and_exit(cfg)
    t_start = time.monotonic()
    run_dir = Path(cfg.run_dir if cfg.run_dir != "runs/default" else f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.mkdir(parents=True, exist_ok=True)
    children = Children(run_dir / "logs")

    _interrupt_on_signals()
    try:
        paths = prepare(cfg)
        config = write_run_config(cfg, paths, run_dir)
        run_cfg = load_config(config)  # with the demo recipe and the run's ports applied
        log_config(run_cfg, "demo")
        print(f"demo: run dir {run_dir}, config {config}", flush=True)
        children.start("retriever", ["cli.py", "retriever", "--config", str(config)])
        swapped = None if cfg.demo.no_search else start_swapped_retriever(children, config, paths)
        # the eval starts while the retriever loads: its own start-up (imports, engine) takes longer,
        # and its retriever client waits for a late retriever (deadlines and retries)
        started = start_eval(children, config, paths["model"], paths["heldout"], run_dir, "before")
        wait_healthy(cfg_port(config, "retriever_port"), "retriever", children, "retriever")
        before = finish_eval(children, started)
        print(f"held-out EM before RL: {before['em']:.3f} (search rate {before['search_rate']:.2f})", flush=True)
        children.start("learner", ["cli.py", "learner", "--config", str(config)])
        children.start("actor", ["cli.py", "actor", "--config", str(config)])
        records = follow_progress(children, run_dir, demo_steps(cfg))
        children.stop("actor")
        final = export_final(run_dir)
        # both evals of the final model at once: the learner and the actor are gone, and most of an
        # eval's time is its process starting (imports, engine), on one core
        runs = {"after": start_eval(children, config, final, paths["heldout"], run_dir, "after")}
        if swapped is not None:  # the same held-out questions over passages whose values were swapped
            wait_healthy(swapped[1], "retriever-swapped", children, "retriever-swapped")
            runs["swapped"] = start_eval(children, config, final, paths["heldout_swapped"], run_dir, "after-swapped",
                                         extra=[f"actor.retriever_endpoint='{swapped[0]}'"])
        after = finish_eval(children, runs["after"])
        summary = {"em_before": before["em"], "em_after": after["em"], "search_rate_before": before["search_rate"],
                   "search_rate_after": after["search_rate"], "right_search_before": before.get("right_search_rate"),
                   "right_search_after": after.get("right_search_rate"),
                   "searches_per_question_before": before.get("searches_per_question"),
                   "searches_per_question_after": after.get("searches_per_question"), "steps": len(records),
                   "no_search": cfg.demo.no_search, "world": cfg.demo.world,
                   "max_turns": run_cfg.actor.max_turns}
        if swapped is not None:
            sw = finish_eval(children, runs["swapped"])
            children.stop("retriever-swapped")
            summary.update(em_swapped_after=sw["em"], right_search_swapped_after=sw.get("right_search_rate"))
            print(f"held-out EM on swapped passages after RL: {sw['em']:.3f} (gold = the swapped value)", flush=True)
        summary["wall_s"] = round(time.monotonic() - t_start, 1)
        plot(records, before, after, run_dir / "demo.png")
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"held-out EM: before {before['em']:.3f} -> after {after['em']:.3f}; search rate "
              f"{before['search_rate']:.2f} -> {after['search_rate']:.2f}; searches per question "
              f"{before.get('searches_per_question', 0):.2f} -> {after.get('searches_per_question', 0):.2f}; "
              f"wall {summary['wall_s']:.0f} s; "
              f"plot {run_dir / 'demo.png'}", flush=True)
        return 0
    except KeyboardInterrupt:
        print("demo: interrupted, stopping", flush=True)
        return 130
    except (RuntimeError, TimeoutError) as e:
        print(f"demo: error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        children.stop_all()


def _interrupt_on_signals() -> None:
    """SIGTERM and SIGINT raise KeyboardInterrupt: the demo stops what it started and exits 130."""
    def on_signal(signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    # explicitly: a process started in the background by a non-interactive shell (`cmd &` in a
    # script, CI) inherits SIGINT ignored, and Python then leaves it ignored
    signal.signal(signal.SIGINT, on_signal)


def prepare_and_exit(cfg: ScoutConfig) -> int:
    """`demo --prepare-only`: the cached world, indexes and base model, built where missing; no run.
    Signals and errors end it as they end the demo (main)."""
    _interrupt_on_signals()
    try:
        paths = prepare(cfg)
    except KeyboardInterrupt:
        print("demo: interrupted, stopping", flush=True)
        return 130
    except (RuntimeError, TimeoutError) as e:
        print(f"demo: error: {e}", file=sys.stderr, flush=True)
        return 1
    print("demo: prepared " + ", ".join(f"{k} {v}" for k, v in paths.items()), flush=True)
    return 0


def export_final(run_dir: Path) -> Path:
    from learner.checkpoint import export_hf, find_latest

    ckpt = find_latest(run_dir / "checkpoints")
    if ckpt is None:
        raise RuntimeError("the learner left no checkpoint to export")
    return export_hf(ckpt, run_dir / "final-model")
