"""Damaged checkpoints: what the checksums cost, and how long --resume takes past a damaged latest.

    python bench/checkpoint_damage.py [--layers 24] [--hidden 1024] [--reps 3] [--out /tmp/scout-ckpt-damage]

1. In process (gloo group of one rank), for a checkpoint of the demo's size (its model: Qwen2,
   2 layers × 64, vocab 1024, with AdamW state: 2.1 MiB) and a bigger one (`layers` Linear(hidden,
   hidden) layers, about 12 bytes per parameter on disk): the save as it is next to the same save
   with hashing stubbed out (alternating, medians), a full verify (every file re-hashed; the files
   are in the page cache, as right after a save or on a warm host), and `find_resumable` past a
   latest checkpoint with one flipped byte (it re-hashes the damaged one, then the previous one).
2. Real processes (bench/faults.py Stack: `cli.py learner` checkpointing every 2 steps + `cli.py
   actor`, one transformers worker): SIGKILL the learner after its step-4 checkpoint, flip a byte
   in the shard of the checkpoint `latest` names, restart with --resume. Times (the learner's log
   polled every 0.05 s, steps from metrics.jsonl): restart → the damaged checkpoint reported,
   → resumed from the previous one, → first step trained.

Prints one JSON line per part.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import learner.checkpoint as ck  # noqa: E402


def flip_byte(f: Path) -> None:
    with open(f, "r+b") as fh:
        fh.seek(f.stat().st_size // 2)
        b = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([b[0] ^ 0x40]))


def _models(base: Path, layers: int, hidden: int) -> dict[str, torch.nn.Module]:
    from transformers import AutoModelForCausalLM

    from demo.pretrain import PretrainSpec
    from demo.tinymodel import build_tiny_model

    spec = PretrainSpec()
    demo = build_tiny_model(base / "demo-model", layers=spec.layers, hidden=spec.hidden, heads=spec.heads,
                            intermediate=spec.intermediate, vocab_size=spec.vocab_size)
    big = torch.nn.Sequential(*[torch.nn.Linear(hidden, hidden, bias=False) for _ in range(layers)])
    return {"demo": AutoModelForCausalLM.from_pretrained(str(demo)), f"{layers}x{hidden}": big}


def _with_state(model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW with its moments filled (one step), as a learner's checkpoint holds them."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    return opt


def _stub_entry(path: Path, sync: bool = False) -> dict:
    return {"bytes": path.stat().st_size, "sha256": ""}


def _resume_past_damage(model, opt, root: Path) -> dict:
    """Two checkpoints, the newest with a flipped byte: find_resumable re-hashes it, then the previous one."""
    for step in (1, 2):
        ck.save_checkpoint(root, step, model, opt, {"version": step}, None, rank=0, keep=2)
    flip_byte(root / ck.step_name(2) / "__0_0.distcp")
    t0 = time.perf_counter()
    found, skipped = ck.find_resumable(root)
    seconds = time.perf_counter() - t0
    assert found == root / ck.step_name(1) and [p for p, _ in skipped] == [root / ck.step_name(2)]
    return {"find_resumable_past_damaged_s": round(seconds, 4), "damage_reported": skipped[0][1]}


def in_process(base: Path, layers: int, hidden: int, reps: int) -> dict:
    """Save with / without hashing (separate folders), full verify, find_resumable past a flipped byte."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    out = {}
    real_entry = ck.file_entry
    try:
        for name, model in _models(base, layers, hidden).items():
            opt = _with_state(model)
            times: dict[str, list[float]] = {"save_s": [], "save_unhashed_s": [], "verify_s": []}
            for r in range(reps):
                for hashed in (True, False):
                    ck.file_entry = real_entry if hashed else _stub_entry
                    t0 = time.perf_counter()
                    path = ck.save_checkpoint(base / f"{name}-{hashed}", r + 1, model, opt, {"version": r}, None,
                                              rank=0, keep=2)
                    times["save_s" if hashed else "save_unhashed_s"].append(time.perf_counter() - t0)
                    ck.file_entry = real_entry
                    if hashed:
                        t0 = time.perf_counter()
                        assert ck.check_checkpoint(path) is None
                        times["verify_s"].append(time.perf_counter() - t0)
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            out[name] = {"bytes": size, **{k: round(statistics.median(v), 4) for k, v in times.items()},
                         **_resume_past_damage(model, opt, base / f"{name}-damaged")}
            for d in base.glob(f"{name}-*"):
                shutil.rmtree(d)
    finally:
        ck.file_entry = real_entry
        dist.destroy_process_group()
    return out


def _first_seen(log: Path, text: str, after: int) -> bool:
    return text in log.read_text(errors="replace")[after:]


def real_process(base: Path) -> dict:
    """Learner + actor; kill -9 after checkpoint 4, damage the latest, --resume; time the way back."""
    from bench.faults import Stack, build_world

    world = build_world(base / "world", questions=60, coin=True)
    stack = Stack(base, world)
    stack.write_config(actor={"no_search": True},
                       learner={"checkpoint_dir": str(stack.ckpt), "checkpoint_every": 2, "keep_checkpoints": 3})
    watch = ("learner", "actor")
    try:
        stack.start("learner")
        stack.start("actor")
        latest = stack.ckpt / "latest"
        stack.wait(lambda: latest.is_file() and latest.read_text() >= "step-00000004", 600, "checkpoint 4", watch)
        stack.kill9(stack.procs["learner"].pid)
        stack.procs["learner"].wait(30)
        damaged = stack.ckpt / latest.read_text().strip()
        flip_byte(damaged / "__0_0.distcp")
        lines, log = len(stack.steps()), stack.log("learner")
        offset = log.stat().st_size
        t0 = time.time()
        stack.start("learner", "--resume")
        marks = {}
        for key, text in (("reported", "is damaged"), ("resumed", "resumed from")):
            stack.wait(lambda: _first_seen(log, text, offset), 600, text, watch, poll_s=0.05)
            marks[key] = time.time() - t0
        stack.wait(lambda: len(stack.steps()) > lines, 600, "a step after the resume", watch, poll_s=0.05)
        first = stack.steps()[lines]
        text = log.read_text(errors="replace")[offset:]
        resumed = text.split("resumed from ")[1].split(":")[0]
        return {"damaged": damaged.name, "resumed_from": Path(resumed).name, "first_step_after": first["step"],
                "restart_to_damage_reported_s": round(marks["reported"], 2),
                "restart_to_resumed_s": round(marks["resumed"], 2),
                "restart_to_first_step_s": round(first["time"] - t0, 2),
                "reported_to_first_step_s": round(first["time"] - t0 - marks["reported"], 2),
                "error_line": next(ln for ln in text.splitlines() if "is damaged" in ln)}
    finally:
        stack.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: a temp folder, removed)")
    ap.add_argument("--skip-real", action="store_true", help="only the in-process part")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    base = args.out or Path(tempfile.mkdtemp(prefix="scout-ckpt-damage-"))
    base.mkdir(parents=True, exist_ok=True)
    try:
        print(json.dumps({"part": "in_process", **in_process(base / "inproc", args.layers, args.hidden, args.reps)}),
              flush=True)
        if not args.skip_real:
            print(json.dumps({"part": "real_process", **real_process(base / "real")}), flush=True)
    finally:
        if args.out is None:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
