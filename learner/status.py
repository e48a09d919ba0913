"""Live progress for people: a one-line status for long-running roles and a bar for long
operations (rich on a terminal, log lines otherwise).

    status = StatusLine("learner", total=500)     # a bar only when stderr is a TTY
    status.update(step, "reward 0.41  1,920 tok/s  staleness 0.8")
    status.close()

    with Activity("checkpoint step-00000040", total=nbytes, unit="B", logger=log) as act:
        act.update(written, "3 files")            # from any thread

An Activity started while a StatusLine is on screen joins it as a second line (rich allows one
live display per terminal). Off a terminal (logs to files, CI) a StatusLine is silent: the
role's log line per step already carries the same figures. An Activity off a terminal logs a
line every `log_every_s` while it runs, so a short one stays quiet and a long one shows it is
moving; the caller logs the final figures.
"""

from __future__ import annotations

import logging
import sys
import threading
import time

_lock = threading.Lock()
_live: "StatusLine | None" = None  # the status line on screen, if any: activities join it


_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def _byte_unit(n: float) -> int:
    i = 0
    while abs(n) >= 1024 and i < len(_UNITS) - 1:
        n, i = n / 1024, i + 1
    return i


def human_bytes(n: float, unit: int | None = None) -> str:
    i = _byte_unit(n) if unit is None else unit
    v = n / 1024 ** i
    return f"{v:,.0f} B" if i == 0 else f"{v:,.1f} {_UNITS[i]}"


def _amount(done: float, total: float | None, unit: str) -> str:
    """'7/10', '1.2/2.0 GiB' (both in the total's unit), or the done part alone without a total."""
    if unit != "B":
        return f"{done:,.0f}" if total is None else f"{done:,.0f}/{total:,.0f}"
    if total is None:
        return human_bytes(done)
    i = _byte_unit(total)
    return f"{human_bytes(done, i).rsplit(' ', 1)[0]}/{human_bytes(total, i)}"


def _make_progress():
    from rich.console import Console
    from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
    from rich.text import Text

    class Amount(ProgressColumn):  # M/N for counts, sizes for bytes (per task)
        def render(self, task):
            return Text(_amount(task.completed, task.total, task.fields.get("unit", "")))

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), Amount(), TimeElapsedColumn(),
                    TextColumn("{task.fields[info]}"), console=Console(file=sys.stderr), transient=False)


class StatusLine:
    def __init__(self, label: str, total: int | None, enabled: bool | None = None):
        global _live
        self._progress = None
        if enabled is None:
            enabled = sys.stderr.isatty()
        if not enabled:
            return
        self._progress = _make_progress()
        self._task = self._progress.add_task(label, total=total, info="", unit="")
        self._progress.start()
        with _lock:
            _live = self

    def update(self, completed: int, info: str = "") -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=completed, info=info)

    def close(self) -> None:
        global _live
        with _lock:
            if _live is self:
                _live = None
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class Activity:
    """Progress of one long operation. `update` and `close` may be called from any thread."""

    def __init__(self, label: str, total: float | None = None, unit: str = "", logger: logging.Logger | None = None,
                 log_every_s: float = 10.0, enabled: bool | None = None):
        self.label, self.total, self.unit = label, total, unit
        self.log = logger or logging.getLogger("scout")
        self.log_every_s = log_every_s
        self.t0 = self._last_log = time.monotonic()
        self.completed = 0.0
        self._progress = self._task = None
        self._own = False  # True: our own rich display (no status line was on screen)
        with _lock:
            host = _live._progress if _live is not None else None
        if host is None and (sys.stderr.isatty() if enabled is None else enabled):
            host, self._own = _make_progress(), True
            host.start()
        if host is not None:
            self._progress = host
            self._task = host.add_task(label, total=total, info="", unit=unit)

    @property
    def on_screen(self) -> bool:
        return self._progress is not None

    def update(self, completed: float, info: str = "") -> None:
        self.completed = completed
        if self._progress is not None:
            self._progress.update(self._task, completed=completed, info=info)
            return
        now = time.monotonic()
        if now - self._last_log >= self.log_every_s:
            self._last_log = now
            pct = f" ({100 * completed / self.total:.0f}%)" if self.total else ""
            extra = f", {info}" if info else ""
            self.log.info("%s: %s%s after %.0f s%s", self.label, _amount(completed, self.total, self.unit), pct,
                          now - self.t0, extra)

    def close(self) -> None:
        progress, self._progress = self._progress, None
        if progress is None:
            return
        if self._own:
            progress.stop()
        else:  # draw the final state once, then hand the display back to the status line
            progress.refresh()
            progress.remove_task(self._task)

    def __enter__(self) -> "Activity":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
