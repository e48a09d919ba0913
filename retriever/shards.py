"""Supervision of the shard processes: start, watch (by PID), restart with backoff, stop.

The router calls `poll()` from its loop; a shard whose process has exited is reported once
(metrics, log, callers of the batches it held get ErrorReply "unavailable") and restarted after
`retriever.shard_restart_s` (doubling on repeated deaths, at most 60 s; 0 = never restart).

A shard that is alive but did not answer a batch within `retriever.shard_timeout_s` (SIGSTOPped,
swapping, wedged) is "not answering" (`stall`): it is not `up`, so the router fails requests at
once instead of sending it more work, until the answer to the one probe the fan-out sends it
comes back (`answered`). The probe queues behind everything the shard already holds, so its
answer also means the shard has worked off its backlog.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from common.procs import stop_processes
from common.protocol import ShardHello

log = logging.getLogger("scout.retriever.shards")

REPO_ROOT = Path(__file__).resolve().parent.parent
MAX_BACKOFF_S = 60.0


@dataclass
class ShardProc:
    idx: int
    entry: dict
    gpu: str | None
    proc: subprocess.Popen | None = None
    ready: bool = False
    deaths: int = 0
    restart_at: float | None = None
    backoff: float = 0.0
    started_at: float = 0.0
    last_exit: int | None = None
    device: str = "cpu"
    history: list = field(default_factory=list)
    stalled_since: float | None = None  # monotonic time it was found not answering; None = answering
    probe_seq: int | None = None  # the probe search sent while stalled (its answer ends the stall)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def alive(self) -> bool:
        """As the router thread last saw it: only ShardSet.poll() reaps the process. (A poll() from
        the /health thread would show a death before its exit code, metrics and restart plan are
        recorded.)"""
        return self.proc is not None and self.proc.returncode is None

    @property
    def up(self) -> bool:
        return self.ready and self.alive and self.stalled_since is None

    def clear_stall(self) -> None:
        self.stalled_since = self.probe_seq = None


class ShardSet:
    def __init__(self, rcfg, index_dir: str, manifest: dict, endpoint: str, gpus: list[str],
                 log_level: str = "INFO", metrics=None):
        self.rcfg, self.index_dir, self.endpoint = rcfg, index_dir, endpoint
        self.log_level = log_level
        n = len(manifest["shards"])
        self.threads = rcfg.shard_threads or max(1, (os.cpu_count() or 1) // n)
        self.shards = [ShardProc(i, e, gpus[i % len(gpus)] if gpus else None) for i, e in enumerate(manifest["shards"])]
        self.m_up = metrics.gauge("scout_retriever_shard_up", "1 while the shard process is alive, ready and "
                                  "answering", ("shard",)) if metrics else None
        self.m_stalls = metrics.counter("scout_retriever_shard_stalls_total", "times the shard was found not "
                                        "answering (a batch timed out at it)", ("shard",)) if metrics else None
        self.m_deaths = metrics.counter("scout_retriever_shard_deaths_total",
                                        "shard processes that exited unexpectedly", ("shard",)) if metrics else None
        self.stopping = False
        for s in self.shards:
            self._gauge(s)

    def _gauge(self, s: ShardProc, up: bool | None = None) -> None:
        if self.m_up is not None:
            self.m_up.labels(shard=str(s.idx)).set(1 if (s.up if up is None else up) else 0)

    def _spawn(self, s: ShardProc) -> None:
        args = [sys.executable, "-m", "retriever.shard", "--index", str(self.index_dir), "--shard", str(s.idx),
                "--endpoint", self.endpoint, "--threads", str(self.threads), "--params", self.rcfg.search_params,
                "--parent-pid", str(os.getpid()), "--log-level", self.log_level]
        if s.gpu is not None:
            args += ["--gpu", s.gpu]
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["OMP_NUM_THREADS"] = str(self.threads)
        s.proc = subprocess.Popen(args, cwd=REPO_ROOT, env=env)
        s.ready, s.restart_at, s.started_at = False, None, time.monotonic()
        s.clear_stall()
        log.info("shard %d started (pid %d, rows %d..%d%s)", s.idx, s.proc.pid, s.entry["start"], s.entry["end"],
                 f", gpu {s.gpu}" if s.gpu is not None else "")

    def start_all(self) -> None:
        for s in self.shards:
            self._spawn(s)

    def on_hello(self, hello: ShardHello) -> None:
        if not 0 <= hello.shard < len(self.shards):
            log.warning("hello from unknown shard %d ignored", hello.shard)
            return
        s = self.shards[hello.shard]
        if s.pid != hello.pid:
            log.warning("hello from shard %d pid %d, expected pid %s: ignored", hello.shard, hello.pid, s.pid)
            return
        if hello.count != s.entry["count"]:
            log.error("shard %d reports %d vectors, manifest says %d", hello.shard, hello.count, s.entry["count"])
            return
        s.ready, s.device = True, hello.device
        log.info("shard %d ready (pid %d, %d vectors, %s) after %.1f s", s.idx, hello.pid, hello.count, hello.device,
                 time.monotonic() - s.started_at)
        self._gauge(s)

    def poll(self, now: float) -> list[int]:
        """Detect exited shards (returns the newly dead ones) and restart those that are due.
        Router thread only. Everything about a death is recorded before `ready` drops, so /health
        (another thread) never shows a dead shard without its exit code, counters and gauge."""
        dead = []
        for s in self.shards:
            if s.proc is not None and s.restart_at is None and s.proc.poll() is not None:
                if self.m_deaths is not None:
                    self.m_deaths.labels(shard=str(s.idx)).inc()
                self._gauge(s, up=False)
                s.last_exit = s.proc.returncode
                s.history.append(time.time())
                s.deaths += 1
                s.ready = False
                s.clear_stall()  # dead, not frozen: the restart plan below takes over
                dead.append(s.idx)
                if self.rcfg.shard_restart_s > 0 and not self.stopping:
                    recent = now - s.started_at < MAX_BACKOFF_S
                    base = self.rcfg.shard_restart_s
                    s.backoff = min(MAX_BACKOFF_S, s.backoff * 2 if (recent and s.backoff) else base)
                    s.restart_at = now + s.backoff
                    log.error("shard %d (pid %d) exited with code %s; restarting in %.1f s", s.idx, s.proc.pid,
                              s.last_exit, s.backoff)
                else:
                    s.restart_at = float("inf")
                    log.error("shard %d (pid %d) exited with code %s; not restarting (retriever.shard_restart_s = 0)",
                              s.idx, s.proc.pid, s.last_exit)
            elif s.restart_at is not None and now >= s.restart_at and not self.stopping:
                self._spawn(s)
        return dead

    def stall(self, idx: int, now: float) -> bool:
        """A batch timed out at shard `idx`: it is not answering (True when that is news)."""
        s = self.shards[idx]
        if s.stalled_since is not None or not s.alive:
            return False
        s.stalled_since = now
        if self.m_stalls is not None:
            self.m_stalls.labels(shard=str(idx)).inc()
        self._gauge(s)
        log.error("shard %d (pid %s) is not answering: requests fail until it answers a probe", idx, s.pid)
        return True

    def answered(self, idx: int, seq: int, now: float) -> bool:
        """Shard `idx` answered search `seq`: the answer to its probe ends a stall. True when
        `seq` was that probe."""
        if not 0 <= idx < len(self.shards):
            return False
        s = self.shards[idx]
        if s.stalled_since is None or s.probe_seq != seq:
            return False
        log.warning("shard %d answers again after %.1f s", idx, now - s.stalled_since)
        s.clear_stall()
        self._gauge(s)
        return True

    def stalled(self) -> list[ShardProc]:
        return [s for s in self.shards if s.stalled_since is not None]

    def all_up(self) -> bool:
        return all(s.up for s in self.shards)

    def down(self) -> list[int]:
        return [s.idx for s in self.shards if not s.up]

    def describe_down(self) -> str:
        parts = []
        now = time.monotonic()
        for s in self.shards:
            if s.up:
                continue
            if s.stalled_since is not None:
                parts.append(f"shard {s.idx} is not answering (a search got no answer within "
                             f"{self.rcfg.shard_timeout_s:g} s, {now - s.stalled_since:.1f} s ago)")
            elif s.restart_at is None:
                parts.append(f"shard {s.idx} is starting")
            elif s.restart_at == float("inf"):
                parts.append(f"shard {s.idx} is down (exit code {s.last_exit})")
            else:
                wait = max(0.0, s.restart_at - now)
                parts.append(f"shard {s.idx} is down (exit code {s.last_exit}, restart in {wait:.1f} s)")
        return f"{'; '.join(parts)}; {len(self.shards) - len(parts)} of {len(self.shards)} shards up"

    def health(self) -> list[dict]:
        return [{"shard": s.idx, "pid": s.pid, "up": s.up, "alive": s.alive, "ready": s.ready,
                 "answering": s.stalled_since is None, "deaths": s.deaths,
                 "count": s.entry["count"], "rows": [s.entry["start"], s.entry["end"]], "device": s.device,
                 "last_exit": s.last_exit} for s in self.shards]

    def stop_all(self, timeout: float = 10.0) -> None:
        self.stopping = True
        stop_processes([s.proc for s in self.shards if s.proc is not None], timeout, group=False, log=log)
        for s in self.shards:
            s.ready = False
            self._gauge(s)
