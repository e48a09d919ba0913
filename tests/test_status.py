"""Progress for people (learner/status.py) and its use by checkpoint saves (learner/checkpoint.py).

- an Activity off a terminal logs progress lines (amount, share, seconds) and nothing on screen;
  on a terminal it draws a rich bar, and while the learner's StatusLine is on screen it joins
  that display (rich allows one live display) and leaves it when done;
- a real checkpoint save (torch.distributed gloo, one rank, DCP) ends with one log line naming
  shard files, bytes, seconds and MiB/s that match the folder on disk; with a terminal the
  save's bar appears next to the status line; the bar's expected size is close to what DCP
  writes.
"""

from __future__ import annotations

import logging
import re

import pytest
import torch
import torch.distributed as dist

from learner.status import Activity, StatusLine, human_bytes

torch.set_num_threads(1)


def test_human_bytes():
    assert human_bytes(0) == "0 B" and human_bytes(1023) == "1,023 B"
    assert human_bytes(1536) == "1.5 KiB" and human_bytes(3 * 2**30) == "3.0 GiB"
    assert human_bytes(3 * 2**30, unit=2) == "3,072.0 MiB"


def test_activity_off_a_terminal_logs_lines_and_draws_nothing(caplog, capsys):
    log = logging.getLogger("scout.test.activity")
    with caplog.at_level(logging.INFO, logger=log.name):
        with Activity("checkpoint step-7", total=2048, unit="B", logger=log, log_every_s=0, enabled=False) as a:
            assert not a.on_screen
            a.update(1024, "1 shard file(s)")
        quiet = Activity("quick", total=10, logger=log, log_every_s=3600, enabled=False)
        quiet.update(5)  # a short operation says nothing until the caller's final line
        quiet.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines
    assert re.fullmatch(r"checkpoint step-7: 1\.0/2\.0 KiB \(50%\) after \d+ s, 1 shard file\(s\)", lines[0])
    assert capsys.readouterr().err == ""


def test_activity_on_a_terminal_draws_a_bar(capsys):
    with Activity("index build", total=10, enabled=True) as a:
        assert a.on_screen
        a.update(4, "embedding")
    err = capsys.readouterr().err
    assert "index build" in err and "4/10" in err and "embedding" in err


@pytest.fixture
def terminal(monkeypatch):
    """rich treats the captured stderr as a terminal (live refreshes are drawn)."""
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("TTY_INTERACTIVE", "1")


def test_activity_joins_the_status_line_and_leaves_it(terminal, capsys):
    status = StatusLine("learner", 10, enabled=True)
    status.update(3, "reward 0.5")
    act = Activity("checkpoint step-3", total=4 * 2**20, unit="B", enabled=False)  # joins although off-TTY
    assert act.on_screen and act._progress is status._progress
    act.update(2 * 2**20, "1 shard file(s)")
    act.close()
    status.update(4, "reward 0.6")
    status.close()
    err = capsys.readouterr().err
    assert "checkpoint step-3" in err and "2.0/4.0 MiB" in err and "4/10" in err
    assert status._progress is None  # closed cleanly
    after = Activity("after", total=1, enabled=False)
    assert not after.on_screen  # the status line is gone: nothing to join


# --------------------------------------------------------------------------- checkpoint save
@pytest.fixture
def gloo_one_rank():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def small_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 64))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 256)).sum().backward()
    opt.step()  # optimizer state exists (exp_avg, exp_avg_sq)
    return model, opt


def test_checkpoint_save_ends_with_files_bytes_and_seconds(gloo_one_rank, tmp_path, caplog):
    from learner.checkpoint import _local_bytes, _state, find_latest, folder_usage, save_checkpoint

    model, opt = small_model()
    expected = _local_bytes(_state(model, opt))
    params = sum(p.numel() * 4 for p in model.parameters())
    assert expected >= 3 * params  # weights + two Adam moments
    with caplog.at_level(logging.INFO, logger="scout.learner.checkpoint"):
        final = save_checkpoint(tmp_path / "ckpt", 3, model, opt, {"version": 3}, None, rank=0)
    assert find_latest(tmp_path / "ckpt") == final
    msgs = [r.getMessage() for r in caplog.records if "written in" in r.getMessage()]
    assert len(msgs) == 1, [r.getMessage() for r in caplog.records]
    m = re.search(r"written in ([0-9.]+)s: (\d+) shard file\(s\) from 1 rank\(s\), ([0-9.,]+) (B|KiB|MiB) "
                  r"\(([0-9.]+) MiB/s\)", msgs[0])
    assert m, msgs[0]
    files, size = folder_usage(final)
    assert int(m.group(2)) == files >= 1
    assert human_bytes(size - (final / "meta.json").stat().st_size) == f"{m.group(3)} {m.group(4)}"
    assert 0.8 * expected <= size <= 1.5 * expected + 65536  # the bar's total is a fair estimate


def test_checkpoint_save_shows_its_bar_beside_the_learner_status(gloo_one_rank, terminal, tmp_path, capsys):
    from learner.checkpoint import save_checkpoint

    model, opt = small_model()
    status = StatusLine("learner", 5, enabled=True)
    status.update(5, "v5")
    save_checkpoint(tmp_path / "ckpt", 5, model, opt, {"version": 5}, None, rank=0)
    assert len(status._progress.tasks) == 1  # the save's bar is gone again
    status.close()
    err = capsys.readouterr().err
    assert "checkpoint step-00000005" in err and "shard file(s)" in err and "KiB" in err
