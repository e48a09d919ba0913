"""Stopping child processes: everything that starts others (the actor supervisor, the retriever
service and its shards, the demo, the benches and the tests) ends them the same way."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time


def stop_processes(procs: list[subprocess.Popen], timeout: float = 20.0, group: bool = True,
                   log: logging.Logger | None = None) -> None:
    """SIGTERM to every live process at once (to its whole process group with `group`), then one
    shared deadline before SIGKILL; a straggler is logged when `log` is given."""
    live = [p for p in procs if p.poll() is None]

    def send(p: subprocess.Popen, sig: int) -> None:
        try:
            if group:
                os.killpg(p.pid, sig)
            else:
                p.send_signal(sig)
        except ProcessLookupError:
            pass

    for p in live:
        send(p, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in live:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            if log is not None:
                log.warning("pid %d did not stop in %.0fs: killing it", p.pid, timeout)
            send(p, signal.SIGKILL)
            p.wait()
