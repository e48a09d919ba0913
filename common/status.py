"""A live one-line status for long-running roles (rich), falling back to nothing off a terminal.

    status = StatusLine("learner", total=500)     # shows a bar only when stderr is a TTY
    status.update(step, "reward 0.41  1,920 tok/s  staleness 0.8")
    status.close()

Off a terminal (logs to files, CI), every update is a no-op: the role's log line per step
already carries the same figures.
"""

from __future__ import annotations

import sys


class StatusLine:
    def __init__(self, label: str, total: int | None, enabled: bool | None = None):
        self._progress = None
        if enabled is None:
            enabled = sys.stderr.isatty()
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), TextColumn("{task.fields[info]}"),
                                  console=Console(file=sys.stderr), transient=False)
        self._task = self._progress.add_task(label, total=total, info="")
        self._progress.start()

    def update(self, completed: int, info: str = "") -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=completed, info=info)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
