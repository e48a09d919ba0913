"""The demo's child processes: each role started as its own `python cli.py ROLE` process in a
session of its own, logged to a file, waited on through its /health endpoint, ended by PID.
The benches and the fault tests start their runs through the same pieces."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from common.procs import stop_processes

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

    def check_alive(self, *names: str, done_ok: tuple[str, ...] = ()) -> None:
        """Raise if one of `names` has exited; those in `done_ok` may have exited with code 0 (an
        actor whose learner's run ended)."""
        for n in names:
            p = self.procs.get(n)
            if p is not None and p.poll() is not None and not (n in done_ok and p.returncode == 0):
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


def cfg_port(config: Path, key: str) -> int:
    import tomllib

    return int(tomllib.loads(config.read_text())["metrics"][key])
