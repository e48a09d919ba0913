"""`python cli.py report RUN_DIR` on synthetic metrics.jsonl files shaped like the learner's
(learner/main.py _log_step): plots and summary from a full log, from lines missing fields or
holding junk, from a log whose last line is still being written, from a resumed run; clear
errors without a run dir or a metrics file. (The report of a real run is made in
tests/test_deploy_prometheus.py.)"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from learner.report import (ReportError, _fraction_axis, _time_axis, main, make_report, read_records, step_lines,
                           summary_text, wall_rate)

ROOT = Path(__file__).resolve().parent.parent
PLOTS = ("reward.png", "em.png", "throughput.png", "staleness.png", "latency.png", "loss.png", "behaviour.png",
         "overview.png")


def step_record(step: int, t0: float = 1_800_000_000.0) -> dict:
    """One line as the learner writes it: 2 s per step, 1000 tokens per step, 4 groups."""
    return {"time": t0 + 2.0 * step, "step": step, "version": step, "reward_mean": step / 100,
            "reward_std": 0.1, "correct_frac": step / 200, "searches_mean": 1.5, "retrieval_failed_frac": 0.0,
            "groups": 4, "samples": 20, "tokens": 1000, "gen_tokens_mean": 30.0, "sample_tokens_mean": 50.0,
            "step_s": 0.5, "tokens_per_s": 2000.0, "groups_per_s": 8.0, "staleness_mean": 1.0 + (step % 3),
            "staleness_max": 3, "dropped_stale_total": step // 10, "latency_mean_s": 4.0, "sync_s": 0.05,
            "sync_bytes": 1 << 20, "sync_ok": 2, "loss": 0.01, "clip_frac": 0.02, "is_weight_mean": 1.0,
            "behav_kl": 0.001, "entropy": 3.0, "grad_norm": 0.5, "lr": 1e-6,
            "valid_format_rate": step / 40, "answer_rate": 1.0, "think_before_search_rate": 0.5,
            "search_hit_rate": None, "bad_searches_mean": 0.25, "response_tokens_mean": 30.0,
            "groups_rewarded_frac": 0.75}


def write_log(run: Path, lines: list, tail: str = "") -> Path:
    run.mkdir(parents=True, exist_ok=True)
    text = "".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines) + tail
    (run / "metrics.jsonl").write_text(text)
    return run


def assert_png(path: Path) -> None:
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    img = mpimg.imread(str(path))
    assert img.shape[0] >= 300 and img.shape[1] >= 600 and img.std() > 0, path  # drawn, not blank


def test_full_log_gives_every_plot_and_a_summary(tmp_path, capsys):
    run = write_log(tmp_path / "run", [step_record(s) for s in range(1, 41)])
    assert main(run) == 0
    out = run / "report"
    for name in PLOTS:
        assert_png(out / name)
    text = (out / "summary.txt").read_text()
    assert text in capsys.readouterr().out
    assert "steps: 40 (step 1 .. 40), policy version 40" in text
    assert "tokens trained: 40,000" in text
    # 39 steps after the first one, trained over 78 s of wall time: 500 tokens/s, 2 groups/s
    assert "(500 tokens/s over wall time" in text and "(2.00 groups/s over wall time)" in text
    assert "reward: 0.025 (first 10% of steps) -> 0.385 (last 10%)" in text
    assert "exact match (correct fraction): 0.013 -> 0.193" in text
    assert "groups dropped as stale: 4" in text and "max 3" in text
    assert "p90 of the step means 4.00 s" in text
    # 0.5 s in each of 39 steps over 78 s of wall time
    assert "learner busy: 25% of the wall time in steps" in text
    # the first 4 steps' valid-format rates average 2.5/40, the last 4 average 38.5/40; a rate the
    # run never had (search_hit_rate: no sample searched) is left out
    assert ("behaviour: valid format 0.06 -> 0.96; answer 1.00 -> 1.00; think before search 0.50 -> 0.50; "
            "invalid or empty searches per sample 0.25 -> 0.25; response tokens 30.0 -> 30.0; groups with any "
            "reward 0.75 -> 0.75") in text
    assert "read notes" not in text


def test_missing_fields_and_junk_values_still_report(tmp_path):
    lines = [{"step": 1, "time": 100.0, "tokens": 10},
             {"step": 2, "time": 101.0, "tokens": 30, "reward_mean": "high", "staleness_mean": None},
             {"step": 3, "time": 102.0, "reward_mean": float("nan")},
             {"step": 4, "time": 103.0, "reward_mean": 0.5, "groups": 2}]
    run = write_log(tmp_path / "run", lines)
    out, files, text = make_report(run)
    for name in PLOTS:
        assert_png(out / name)  # plots without data say so instead of failing
    assert "steps: 4" in text and "tokens trained: 40" in text
    assert "exact match (correct fraction): n/a -> n/a" in text
    assert "reward: 0.500 (first 10% of steps) -> 0.500" in text


def test_partial_last_line_and_unreadable_lines_are_skipped(tmp_path):
    recs = [step_record(s) for s in range(1, 6)]
    partial = json.dumps(step_record(6))[:57]  # the learner is writing this line right now
    run = write_log(tmp_path / "run", [recs[0], "{not json", recs[1], "[1, 2]", *recs[2:]], tail=partial)
    log = read_records(run / "metrics.jsonl")
    assert [r["step"] for r in log.records] == [1, 2, 3, 4, 5]
    assert log.bad_lines == 2 and log.partial_last_line
    text = summary_text(log)
    assert "2 unreadable line(s) skipped" in text and "the last line was partial" in text


def test_complete_last_line_without_newline_counts(tmp_path):
    run = write_log(tmp_path / "run", [step_record(1)], tail=json.dumps(step_record(2)))
    log = read_records(run / "metrics.jsonl")
    assert [r["step"] for r in log.records] == [1, 2] and not log.partial_last_line


def test_resumed_run_keeps_the_later_lines(tmp_path):
    first = [step_record(s) for s in range(1, 11)]
    again = [{**step_record(s), "reward_mean": 9.0} for s in range(6, 16)]  # resumed from the step-5 checkpoint
    log = read_records(write_log(tmp_path / "run", first + again) / "metrics.jsonl")
    assert [r["step"] for r in log.records] == list(range(1, 16))
    assert log.resumes == 1
    assert [r["reward_mean"] for r in log.records][4:6] == [0.05, 9.0]


def test_wall_rate_counts_waiting_time():
    times = [0.0, 1.0, 2.0, 10.0]
    assert math.isnan(wall_rate(times, [5, 5, 5, 5])[0])
    assert wall_rate(times, [5, 5, 5, 5], window=1)[1:] == [5.0, 5.0, 5 / 8]
    assert wall_rate(times, [5, 5, 5, 5], window=10)[3] == pytest.approx(15 / 10)


def test_plots_read_over_steps_and_wall_time():
    """Every plot's x axis is the learner step; a top axis gives the wall time since the first step
    (extrapolated at the run's pace past the last step), unless the log's clock goes backwards.
    Shares (reward, exact match) get a 0..1 scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, times = [1.0, 2.0, 3.0, 4.0], [100.0, 102.0, 104.0, 106.0]
    fig, ax = plt.subplots()
    ax.plot(steps, [0.0, 0.0, 0.0, 0.0])
    _fraction_axis(ax)
    assert ax.get_ylim() == (-0.03, 1.03)
    _time_axis(ax, steps, times)
    (top,) = ax.child_axes
    fwd = top._functions[0]
    assert list(fwd([1.0, 2.5, 4.0, 6.0])) == [0.0, 3.0, 6.0, 10.0]  # seconds since step 1
    fig2, ax2 = plt.subplots()
    ax2.plot(steps, [0.0, 2.0, 5.0, 1.0])  # not a share: left alone
    lim = ax2.get_ylim()
    _fraction_axis(ax2)
    assert ax2.get_ylim() == lim
    _time_axis(ax2, steps, [100.0, 99.0, 104.0, 106.0])  # clock went backwards: no time axis
    assert not ax2.child_axes
    plt.close("all")


def test_errors_name_what_is_missing(tmp_path, capsys):
    assert main(tmp_path / "nope") == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty_run").mkdir()
    assert main(tmp_path / "empty_run") == 2
    err = capsys.readouterr().err
    assert "no metrics file" in err and "metrics.jsonl" in err
    write_log(tmp_path / "junk_run", ["garbage", "{"])
    with pytest.raises(ReportError, match="no readable step"):
        make_report(tmp_path / "junk_run")
    assert not (tmp_path / "junk_run" / "report").exists()


@pytest.mark.slow
def test_cli_report_command(tmp_path):
    run = write_log(tmp_path / "run", [step_record(s) for s in range(1, 8)])
    r = subprocess.run([sys.executable, "cli.py", "report", str(run)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "report written to" in r.stdout and (run / "report" / "overview.png").is_file()
    r = subprocess.run([sys.executable, "cli.py", "report", str(tmp_path / "missing")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_step_lines_skips_the_line_being_written(tmp_path):
    assert step_lines(tmp_path) == []  # before the learner's first step
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 1}\n{"step": 3, "rew')
    assert step_lines(tmp_path) == [{"step": 1}, {"step": 2}, {"step": 1}]  # as written: resumed steps kept
