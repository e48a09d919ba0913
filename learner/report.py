"""`python cli.py report RUN_DIR`: plots and a text summary of a run, without Prometheus.

    <run_dir>/metrics.jsonl          one JSON object per learner step (learner/main.py _log_step)
          │ read_records: bad lines skipped and counted (a partial last line is normal while
          │               the learner is writing); a resumed run's repeated steps: last one wins
          ▼
    Series (per field: step -> value, NaN where a line lacks the field)
          ├─ plot_*   → <run_dir>/report/{reward,em,throughput,staleness,latency,loss,overview}.png  (matplotlib Agg;
          │              x = learner step, top axis = wall time since the first step)
          └─ summary  → <run_dir>/report/summary.txt (also printed)

Exit codes: 0 report written, 2 no run dir / no metrics file / no readable step in it.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
REPORT_DIR = "report"


class ReportError(Exception):
    """The run cannot be reported on; the message says why."""


@dataclass
class RunLog:
    path: Path
    records: list[dict[str, Any]]  # one per step, sorted by step
    bad_lines: int = 0
    partial_last_line: bool = False
    resumes: int = 0  # times the step counter went backwards (a resumed run appending)
    notes: list[str] = field(default_factory=list)

    def column(self, key: str) -> list[float]:
        return [_num(r.get(key)) for r in self.records]

    def has(self, key: str) -> bool:
        return any(not math.isnan(v) for v in self.column(key))


def _num(v: Any) -> float:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)) and math.isfinite(v):
        return float(v)
    return math.nan


# --------------------------------------------------------------------------- reading
def step_lines(run_dir: Path) -> list[dict]:
    """Every readable line of <run_dir>/metrics.jsonl as written, in order ([] before the first
    step); a line still being written is skipped. For watching a run; read_records is the report's."""
    path = Path(run_dir) / METRICS_FILE
    out = []
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # the line being written
                pass
    return out


def find_metrics_file(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    if run_dir.is_file():
        return run_dir
    if not run_dir.exists():
        raise ReportError(f"run dir {run_dir} does not exist")
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise ReportError(f"no metrics file in {run_dir}: expected {path} (the learner appends one JSON line "
                          "per step there; pass the run_dir the learner was started with)")
    return path


def read_records(path: Path) -> RunLog:
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    partial = bool(lines) and lines[-1].strip() != b""  # no newline after the last line: still being written
    by_step: dict[int, dict[str, Any]] = {}
    order: list[int] = []
    bad, resumes, last_step = 0, 0, None
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            if not (partial and i == len(lines) - 1):
                bad += 1
            continue
        if not isinstance(rec, dict):
            bad += 1
            continue
        step = _num(rec.get("step"))
        step_i = int(step) if not math.isnan(step) else (last_step + 1 if last_step is not None else 1)
        if last_step is not None and step_i <= last_step:
            resumes += 1
        last_step = step_i
        if step_i not in by_step:
            order.append(step_i)
        by_step[step_i] = {**rec, "step": step_i}
    records = [by_step[s] for s in sorted(order)]
    if partial:
        try:
            json.loads(lines[-1])
            partial = False  # complete JSON, only the newline is missing
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
    return RunLog(path, records, bad, partial, resumes)


# --------------------------------------------------------------------------- statistics
def _finite(xs: list[float]) -> list[float]:
    return [x for x in xs if not math.isnan(x)]


def _mean(xs: list[float]) -> float:
    xs = _finite(xs)
    return sum(xs) / len(xs) if xs else math.nan


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(_finite(xs))
    if not xs:
        return math.nan
    pos = q * (len(xs) - 1)
    lo, hi = int(math.floor(pos)), int(math.ceil(pos))
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _ends(xs: list[float], frac: float = 0.1) -> tuple[float, float]:
    """Mean of the first and of the last `frac` of the finite values (at least one each)."""
    xs = _finite(xs)
    if not xs:
        return math.nan, math.nan
    k = max(1, int(len(xs) * frac))
    return _mean(xs[:k]), _mean(xs[-k:])


def wall_rate(times: list[float], amounts: list[float], window: int = 10) -> list[float]:
    """Amount per second of wall time over the last `window` steps (the first steps use what
    they have): throughput that counts the time the learner waited for data, unlike a step's
    own tokens_per_s."""
    out = []
    for i in range(len(times)):
        j = max(0, i - window)
        dt = times[i] - times[j]
        amount = sum(a for a in amounts[j + 1:i + 1] if not math.isnan(a))
        out.append(amount / dt if j < i and dt > 0 and not math.isnan(dt) else math.nan)
    return out


def _fmt(v: float, spec: str = ".3f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


# --------------------------------------------------------------------------- summary
def _busy_share(run: RunLog, wall: float) -> float:
    """Share of the wall time between the first and the last logged step spent in steps."""
    busy = _finite(run.column("step_s")[1:])
    return min(1.0, sum(busy) / wall) if busy and wall > 0 else math.nan


def summary_text(run: RunLog) -> str:
    steps, times = run.column("step"), run.column("time")
    tokens, groups = run.column("tokens"), run.column("groups")
    t0, t1 = (_finite(times) or [math.nan])[0], (_finite(times) or [math.nan])[-1]
    wall = t1 - t0
    tok_sum, grp_sum = sum(_finite(tokens)), sum(_finite(groups))
    # tokens after the first step over the wall time between the first and the last step
    tok_rate = (tok_sum - (_finite(tokens) or [0.0])[0]) / wall if wall > 0 else math.nan
    grp_rate = (grp_sum - (_finite(groups) or [0.0])[0]) / wall if wall > 0 else math.nan
    r0, r1 = _ends(run.column("reward_mean"))
    e0, e1 = _ends(run.column("correct_frac"))
    s0, s1 = _ends(run.column("searches_mean"))
    lines = [
        f"scout run report: {run.path.parent}",
        f"steps: {len(run.records)} (step {int(steps[0])} .. {int(steps[-1])}), policy version "
        f"{_fmt(run.column('version')[-1], '.0f')}",
        f"wall time: {_fmt(wall, '.1f')} s between the first and the last logged step",
        f"tokens trained: {tok_sum:,.0f} ({_fmt(tok_rate, ',.0f')} tokens/s over wall time; median step "
        f"{_fmt(_quantile(run.column('tokens_per_s'), 0.5), ',.0f')} tokens/s while training)",
        f"groups trained: {grp_sum:,.0f} ({_fmt(grp_rate, '.2f')} groups/s over wall time)",
        f"reward: {_fmt(r0)} (first 10% of steps) -> {_fmt(r1)} (last 10%); best step "
        f"{_fmt(max(_finite(run.column('reward_mean')) or [math.nan]))}",
        f"exact match (correct fraction): {_fmt(e0)} -> {_fmt(e1)}",
        f"searches per sample: {_fmt(s0, '.2f')} -> {_fmt(s1, '.2f')}; retrieval failures "
        f"{_fmt(_mean(run.column('retrieval_failed_frac')), '.1%')} of samples",
        f"staleness (versions): mean {_fmt(_mean(run.column('staleness_mean')), '.2f')}, max "
        f"{_fmt(max(_finite(run.column('staleness_max')) or [math.nan]), '.0f')}; groups dropped as stale: "
        f"{_fmt(max(_finite(run.column('dropped_stale_total')) or [math.nan]), '.0f')}",
        f"end-to-end latency (generation start -> trained): mean {_fmt(_mean(run.column('latency_mean_s')), '.2f')} s, "
        f"p90 of the step means {_fmt(_quantile(run.column('latency_mean_s'), 0.9), '.2f')} s",
        f"learner busy: {_fmt(_busy_share(run, wall), '.0%')} of the wall time in steps (train + weight sync), "
        f"the rest waiting for groups",
        f"step time: median {_fmt(_quantile(run.column('step_s'), 0.5))} s, p90 "
        f"{_fmt(_quantile(run.column('step_s'), 0.9))} s; weight sync median "
        f"{_fmt(_quantile(run.column('sync_s'), 0.5))} s held the learner, "
        f"{_fmt(_quantile(run.column('sync_done_s'), 0.5))} s from start to last answer, "
        f"{sum(_finite(run.column('sync_bytes'))) / 2**20:,.1f} MiB sent",
    ]
    lines += _behaviour_lines(run)
    last = run.records[-1]
    stats = [f"{k} {_fmt(_num(last.get(k)), '.4g')}" for k in
             ("loss", "clip_frac", "is_weight_mean", "behav_kl", "entropy", "grad_norm", "lr") if k in last]
    if stats:
        lines.append("last step: " + ", ".join(stats))
    if run.bad_lines or run.partial_last_line or run.resumes:
        lines.append(f"read notes: {run.bad_lines} unreadable line(s) skipped"
                     + ("; the last line was partial (still being written?) and was skipped"
                        if run.partial_last_line else "")
                     + (f"; the run was resumed {run.resumes} time(s): repeated steps use the later line"
                        if run.resumes else ""))
    lines += run.notes
    return "\n".join(lines) + "\n"


def _behaviour_lines(run: RunLog) -> list[str]:
    """First 10% of steps -> last 10%, for the behaviour rates the run logged (none: no line)."""
    parts = []
    for key, label, spec in (("valid_format_rate", "valid format", ".2f"), ("answer_rate", "answer", ".2f"),
                             ("think_before_search_rate", "think before search", ".2f"),
                             ("search_hit_rate", "search found the answer", ".2f"),
                             ("bad_searches_mean", "invalid or empty searches per sample", ".2f"),
                             ("response_tokens_mean", "response tokens", ".1f"),
                             ("groups_rewarded_frac", "groups with any reward", ".2f")):
        if run.has(key):
            a, b = _ends(run.column(key))
            parts.append(f"{label} {_fmt(a, spec)} -> {_fmt(b, spec)}")
    return ["behaviour: " + "; ".join(parts)] if parts else []


# --------------------------------------------------------------------------- plots
# (file name, title, y label, [(field or computed key, legend label)], second axis or None)
def _plot_specs(run: RunLog) -> list[tuple]:
    tokens_wall = wall_rate(run.column("time"), run.column("tokens"))
    groups_wall = wall_rate(run.column("time"), run.column("groups"))
    return [
        ("reward.png", "Reward", "reward", [("reward_mean", "mean reward per step")], None),
        ("em.png", "Exact match and search", "fraction of samples",
         [("correct_frac", "exact match (correct fraction)"), ("retrieval_failed_frac", "retrieval failed (fraction)")],
         ("searches per sample", [("searches_mean", "searches per sample")])),
        ("throughput.png", "Trained throughput", "tokens / s",
         [("tokens_per_s", "tokens/s while training (per step)"), (tokens_wall, "tokens/s over wall time (10 steps)")],
         ("groups / s", [(groups_wall, "groups/s over wall time (10 steps)")])),
        ("staleness.png", "Staleness", "versions behind",
         [("staleness_mean", "mean staleness"), ("staleness_max", "max staleness")],
         ("groups dropped (total)", [("dropped_stale_total", "dropped as stale (cumulative)")])),
        ("latency.png", "Latency and step time", "seconds",
         [("latency_mean_s", "end-to-end sample latency (mean)"), ("step_s", "learner step"),
          ("sync_s", "weight sync (held the learner)"), ("sync_done_s", "weight sync (start to last answer)")], None),
        ("loss.png", "Objective", "value",
         [("loss", "loss"), ("clip_frac", "clip fraction"), ("behav_kl", "behaviour KL"),
          ("is_weight_mean", "IS weight (mean)")], None),
        ("behaviour.png", "Behaviour (the Search-R1 paper's metrics)", "fraction of samples",
         [("valid_format_rate", "valid format"), ("think_before_search_rate", "think before search"),
          ("answer_rate", "ends in <answer>"), ("search_hit_rate", "a search found the answer"),
          ("groups_rewarded_frac", "groups with any reward")],
         ("per sample", [("bad_searches_mean", "invalid or empty searches")])),
    ]


def _values(run: RunLog, key) -> list[float]:
    return run.column(key) if isinstance(key, str) else list(key)


def _draw(ax, steps: list[float], run: RunLog, series: list[tuple], styles: list[str]) -> int:
    drawn = 0
    for (key, label), style in zip(series, styles):
        ys = _values(run, key)
        pts = [(s, y) for s, y in zip(steps, ys) if not math.isnan(y)]
        if not pts:
            continue
        xs, vs = zip(*pts)
        ax.plot(xs, vs, style, label=label, linewidth=1.4, markersize=3)
        drawn += 1
    return drawn


def _fraction_axis(ax) -> None:
    """A 0..1 y range for shares (reward, exact match) whose plotted values all lie in it, so a flat
    line at 0 does not fill the plot with a meaningless ±0.04 scale."""
    ys = [y for line in ax.get_lines() for y in line.get_ydata()]
    if ys and all(0.0 <= y <= 1.0 for y in ys):
        ax.set_ylim(-0.03, 1.03)


def _time_axis(ax, steps: list[float], times: list[float]) -> None:
    """A second x axis on top: wall time since the first logged step (only while the log's times
    increase with the steps; a resumed run's restart gap would make the mapping ambiguous)."""
    import numpy as np

    pts = [(s, t) for s, t in zip(steps, times) if not (math.isnan(s) or math.isnan(t))]
    if len(pts) < 2 or any(b[1] <= a[1] or b[0] <= a[0] for a, b in zip(pts, pts[1:])):
        return
    xs = np.array([p[0] for p in pts])
    ts = np.array([p[1] - pts[0][1] for p in pts])
    scale, unit = (60.0, "min") if ts[-1] >= 300 else (1.0, "s")
    far, slope = 1e9, ts[-1] / (xs[-1] - xs[0])  # beyond the logged steps: the run's average pace
    xs = np.concatenate([[xs[0] - far], xs, [xs[-1] + far]])
    ts = np.concatenate([[-far * slope], ts, [ts[-1] + far * slope]])
    sec = ax.secondary_xaxis("top", functions=(lambda x: np.interp(x, xs, ts) / scale,
                                               lambda t: np.interp(np.asarray(t) * scale, ts, xs)))
    sec.set_xlabel(f"wall time since the first step ({unit})", fontsize=8)
    sec.tick_params(labelsize=8)


def plot_all(run: RunLog, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    steps = run.column("step")
    written = []
    for name, title, ylabel, series, second in _plot_specs(run):
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
        drawn = _draw(ax, steps, run, series, ["-o", "-s", "-^", "-d", "-v"])
        if name == "reward.png" and run.has("reward_std"):
            mean, std = run.column("reward_mean"), run.column("reward_std")
            band = [(s, m - d, m + d) for s, m, d in zip(steps, mean, std) if not (math.isnan(m) or math.isnan(d))]
            if band:
                xs, lo, hi = zip(*band)
                ax.fill_between(xs, lo, hi, alpha=0.2, label="± std within the batch")
        if second is not None:
            ax2 = ax.twinx()
            drawn += _draw(ax2, steps, run, second[1], ["C3--", "C4:"])
            ax2.set_ylabel(second[0])
            top = max((y for line in ax2.get_lines() for y in line.get_ydata()), default=0.0)
            ax2.set_ylim(0, max(1.0, 1.1 * top))  # counts and rates: from 0, a flat 0 at the bottom
            lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        else:
            lines = ax.get_legend_handles_labels()[0]
        if drawn:
            ax.legend(lines, [h.get_label() for h in lines], loc="best", fontsize=8)
        else:
            ax.text(0.5, 0.5, f"no data for this plot in {METRICS_FILE}", ha="center", va="center",
                    transform=ax.transAxes, color="gray")
        if name in ("reward.png", "em.png", "behaviour.png"):
            _fraction_axis(ax)
        _time_axis(ax, steps, run.column("time"))
        ax.set_title(title)
        ax.set_xlabel("learner step")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        path = out / name
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    written.append(_overview(plt, run, steps, out))
    return written


def _overview(plt, run: RunLog, steps: list[float], out: Path) -> Path:
    """overview.png: reward, exact match, throughput and staleness on one page."""
    tokens_wall = wall_rate(run.column("time"), run.column("tokens"))
    panels = [("Reward", [("reward_mean", "mean reward")]),
              ("Exact match", [("correct_frac", "correct fraction")]),
              ("Throughput (tokens/s)", [("tokens_per_s", "while training"), (tokens_wall, "over wall time")]),
              ("Staleness (versions)", [("staleness_mean", "mean"), ("staleness_max", "max")])]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), dpi=100)
    for ax, (title, series) in zip(axes.flat, panels):
        if _draw(ax, steps, run, series, ["-o", "-s"]):
            ax.legend(loc="best", fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
        if title in ("Reward", "Exact match"):
            _fraction_axis(ax)
        _time_axis(ax, steps, run.column("time"))
        ax.set_title(title)
        ax.set_xlabel("learner step")
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"scout: {run.path.parent.resolve().name}")
    fig.tight_layout()
    path = out / "overview.png"
    fig.savefig(path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- entry point
def make_report(run_dir: Path, out: Path | None = None) -> tuple[Path, list[Path], str]:
    """Read the run's metrics file, write the plots and summary.txt; returns (out dir, files, summary)."""
    path = find_metrics_file(Path(run_dir))
    run = read_records(path)
    if not run.records:
        raise ReportError(f"{path} holds no readable step ({run.bad_lines} unreadable line(s))")
    out = Path(out) if out is not None else path.parent / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    text = summary_text(run)
    files = plot_all(run, out)
    (out / "summary.txt").write_text(text)
    return out, [*files, out / "summary.txt"], text


def main(run_dir: Path) -> int:
    try:
        out, files, text = make_report(Path(run_dir))
    except (ReportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text, end="")
    print(f"report written to {out}: " + ", ".join(p.name for p in files))
    return 0
