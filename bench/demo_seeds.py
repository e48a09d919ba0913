"""The demo's result as a spread: N fresh demos, one per seed, each from an empty demo folder.

    python bench/demo_seeds.py --seeds 5 [--first-seed 0] [--out runs/demo-seeds] [--write-docs]
                               [--keep] [--world multihop] [--set section.key=value ...]
                               (--world and --set are passed to every demo)

    for each seed:  `cli.py demo --seed S` with demo.dir and run_dir empty folders under --out
                    (world, index and base model are built anew: pretraining counts in the wall time)
                    ──▶ <run>/summary.json
    table: per seed EM before / after, swapped EM, right-search rate, wall time; median, min, max;
           the commit, the machine's cores and load average before and after

--write-docs puts the table into docs/DEMO_DESIGN.md between the markers
<!-- demo-seeds:begin --> and <!-- demo-seeds:end --> (appended with them if absent); the
multi-hop world's table goes between <!-- demo-seeds-multihop:begin/end --> and has a column
for the greedy searches per question.
Runs are sequential: two demos at once would share the 2 cores and change each other's result.
--keep reuses a seed's finished run found under --out (its summary.json) instead of running it
again, so a spread can be extended by more seeds; the table marks reused rows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "DEMO_DESIGN.md"
COLUMNS = [("em_before", "EM before"), ("em_after", "EM after"), ("em_swapped_after", "swapped EM"),
           ("right_search_after", "right-search"), ("wall_s", "wall s")]
MULTIHOP_COLUMNS = COLUMNS[:4] + [("searches_per_question_after", "searches per question"), COLUMNS[4]]


def markers(world: str) -> tuple[str, str]:
    tag = "demo-seeds" if world == "single" else f"demo-seeds-{world}"
    return f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"


def run_seed(seed: int, out: Path, sets: list[str], keep: bool = False) -> dict:
    base = out / f"seed-{seed}"
    if keep and (base / "run" / "summary.json").is_file():
        return {"seed": seed, "reused": True, **json.loads((base / "run" / "summary.json").read_text())}
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    cmd = [sys.executable, "cli.py", "demo", "--seed", str(seed), "--set", f"demo.dir='{base / 'demo'}'",
           "--set", f"run_dir='{base / 'run'}'", *[a for s in sets for a in ("--set", s)]]
    t0 = time.monotonic()
    with open(base / "demo.log", "wb") as log:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    summary_path = base / "run" / "summary.json"
    if rc != 0 or not summary_path.is_file():
        return {"seed": seed, "error": f"demo exited {rc}; see {base / 'demo.log'}",
                "wall_s": round(time.monotonic() - t0, 1)}
    return {"seed": seed, **json.loads(summary_path.read_text())}


def _fmt(v, key: str) -> str:
    if v is None:
        return "—"
    return f"{v:.0f}" if key == "wall_s" else f"{v:.3f}"


def table(rows: list[dict], header: str, columns: list[tuple[str, str]] = COLUMNS) -> str:
    lines = [header, "", "| seed | " + " | ".join(name for _, name in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['seed']} | {r['error']} |" + " |" * (len(columns) - 1))
        else:
            seed = f"{r['seed']} (kept from an earlier run)" if r.get("reused") else str(r["seed"])
            lines.append(f"| {seed} | " + " | ".join(_fmt(r.get(k), k) for k, _ in columns) + " |")
    ok = [r for r in rows if "error" not in r]
    for name, fn in (("median", statistics.median), ("min", min), ("max", max)):
        cells = []
        for key, _ in columns:
            vals = [r[key] for r in ok if r.get(key) is not None]
            cells.append(f"**{_fmt(fn(vals), key)}**" if vals else "—")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_docs(text: str, world: str = "single") -> None:
    doc = DOC.read_text()
    BEGIN, END = markers(world)
    block = f"{BEGIN}\n{text}{END}"
    if BEGIN in doc and END in doc:
        doc = doc[:doc.index(BEGIN)] + block + doc[doc.index(END) + len(END):]
    else:
        doc = doc.rstrip("\n") + "\n\n" + block + "\n"
    DOC.write_text(doc)


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except OSError:
        return "unknown"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=5, help="how many seeds (demos)")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "demo-seeds")
    p.add_argument("--set", dest="sets", action="append", default=[], help="section.key=value for every demo")
    p.add_argument("--write-docs", action="store_true", help="put the table into docs/DEMO_DESIGN.md")
    p.add_argument("--keep", action="store_true", help="reuse seeds already finished under --out")
    p.add_argument("--world", choices=["single", "multihop"], default="single", help="the demo world")
    args = p.parse_args()
    if args.world != "single":
        args.sets = [f"demo.world='{args.world}'", *args.sets]
    load0, t0 = os.getloadavg(), time.strftime("%Y-%m-%d %H:%M")
    rows = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        rows.append(run_seed(seed, args.out, args.sets, args.keep))
        print(json.dumps(rows[-1]), flush=True)
    load1 = os.getloadavg()
    extra = (" --keep" if args.keep else "") + (f" --world {args.world}" if args.world != "single" else "")
    sets = args.sets[1:] if args.world != "single" else args.sets
    extra += (f" --set {' --set '.join(sets)}" if sets else "")
    header = (f"`python bench/demo_seeds.py --seeds {args.seeds} --first-seed {args.first_seed}{extra}` on {t0}, "
              f"commit {commit()}, {os.cpu_count()} cores, load average {load0[0]:.2f} before and {load1[0]:.2f} "
              f"after; each demo from an empty demo folder (world, index and pretraining included in the wall time).")
    text = table(rows, header, MULTIHOP_COLUMNS if args.world == "multihop" else COLUMNS)
    print(text)
    if args.write_docs:
        write_docs(text, args.world)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
