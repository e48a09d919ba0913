"""The learner process: `python cli.py learner` (one process) or under torchrun (N ranks).

    rank 0: IngestServer (thread) ─groups─▶ next_command() ─┐        WeightSender ◀─ actors join
                                                            │ CTRL_* + batch tensors (gloo)
    every rank:  ┌──────────────────────────────────────────┘
                 ▼
      loop:  command = next_command()           wait / stop / sync-now / batch
             stats = trainer.train_step(batch)  FSDP2 forward/backward, AdamW
             step += 1
             every sync_every steps: version += 1; sync_weights()  (all ranks gather, rank 0 sends)
             ingest.release(version)            credits of the trained groups come back
             log_step()                         Prometheus + <run_dir>/metrics.jsonl
             every checkpoint_every steps: save_checkpoint(), after the step's record is written
                                        (it waits for its sync's answers, bounded by the deadline)

Per-step timers in metrics.jsonl (rank 0): wait_s (since the previous step ended, until the batch
was there: the learner's idle time), assemble_s, train_s (of which forward_s and optimizer_s, by
module / optimizer hooks), gather_s (full parameters from the shards), broadcast_s (the rest of
the time the weight sync held the loop: nearly nothing with learner.sync_sends "later", where the
sender's thread sends while the next steps train), ingest_s (the ingest thread's time on groups
since the previous step). sync_s is what the sync held the loop (gather included), sync_done_s
the whole sync, until every member answered or its time was up.
With max_staleness = 0 the credits make this loop synchronous (see learner/ingest.py): every
trained token's version equals batch_version (token_version_min/max in metrics.jsonl).
"""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from common.config import ConfigError, ScoutConfig
from common.metrics import Metrics
from common.procs import HeapTrim
from learner.behaviour import behaviour_rates
from learner.status import StatusLine
from learner.checkpoint import CheckpointSaveError, find_resumable, load_checkpoint, save_checkpoint
from learner.trainer import (CTRL_BATCH, CTRL_STOP, CTRL_SYNC, CTRL_WAIT, Batch, Dist, Trainer, assemble,
                             broadcast_command, init_distributed)

log = logging.getLogger("scout.learner")

RESYNC_EVERY_S = 10.0  # at most this often, push the current version to members that lack it


class PhaseTimer:
    """Seconds per learner phase, summed until `take()`: forward passes and optimizer steps
    through module / optimizer hooks (the trainer itself is not touched), the rest by `add`."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.acc: dict[str, float] = {}
        self._t: dict[str, float] = {}
        model.register_forward_pre_hook(lambda *_: self._begin("forward"))
        model.register_forward_hook(lambda *_: self._end("forward"))
        optimizer.register_step_pre_hook(lambda *_: self._begin("optimizer"))
        optimizer.register_step_post_hook(lambda *_: self._end("optimizer"))

    def _begin(self, name: str) -> None:
        self._t[name] = time.perf_counter()

    def _end(self, name: str) -> None:
        t0 = self._t.pop(name, None)
        if t0 is not None:
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        self.acc[name] = self.acc.get(name, 0.0) + seconds

    def timed(self, name: str, items):
        """Iterate `items`, adding the time spent producing each one to `name`."""
        it = iter(items)
        while True:
            t0 = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                self.add(name, time.perf_counter() - t0)
                return
            self.add(name, time.perf_counter() - t0)
            yield item

    def take(self) -> dict[str, float]:
        out, self.acc = self.acc, {}
        return out


def _sync_done_s(report: dict) -> float:
    """A sync report's whole time, until the last answer (a failed sync's report has only `seconds`)."""
    return report.get("answers_seconds", report.get("seconds", 0.0))


def _broadcast_str(d: Dist, text: str | None) -> str:
    data = (text or "").encode()
    n = torch.tensor([len(data)], dtype=torch.int64)
    dist.broadcast(n, 0, group=d.cpu_group)
    buf = torch.tensor(list(data), dtype=torch.uint8) if d.rank == 0 else torch.empty(int(n), dtype=torch.uint8)
    if int(n):
        dist.broadcast(buf, 0, group=d.cpu_group)
    return bytes(buf.tolist()).decode()


class Learner:
    def __init__(self, cfg: ScoutConfig, d: Dist, resume: bool):
        self.cfg, self.lc, self.d = cfg, cfg.learner, d
        self.rank0 = d.rank == 0
        if not self.lc.model or not (Path(self.lc.model) / "config.json").is_file():
            raise ConfigError(f"learner.model: {self.lc.model!r} is not a local HF model folder (config.json missing)")
        if self.rank0 and not self.lc.data:
            raise ConfigError("learner.data: the QA file the dispatcher hands out is not set")
        if resume and not self.lc.checkpoint_dir:
            raise ConfigError("--resume needs learner.checkpoint_dir")
        self.trainer = Trainer(self.lc, d)
        self.timer = PhaseTimer(self.trainer.model, self.trainer.optimizer)
        self.idle_since = time.monotonic()  # end of the previous step: the wait for a batch starts
        self.heap = HeapTrim(self.lc.heap_trim_s)
        self.step, self.version, self.last_ckpt = 0, 0, -1
        self.stop_requested = False
        self.synced: tuple[int, set[tuple[str, str]]] = (-1, set())  # (version, (member, run) that loaded it)
        # a sync whose answers come later (learner.sync_answers): its report, the runs it was for, and
        # the step record that waits for its sync_ok
        self.unsettled: tuple[dict, dict[str, str]] | None = None
        self.held_rec: dict | None = None
        self.last_sync_t = 0.0
        self.batch_version = 0  # learner version when the current batch was taken
        self.ingest = self.sender = self.metrics = None
        dispatcher = None
        if self.rank0:
            from learner.ingest import Dispatcher, load_qa

            dispatcher = Dispatcher(load_qa(self.lc.data), seed=self.lc.seed)
            self.metrics = Metrics("learner", labels={"rank": "0"})
            self._make_metrics(self.metrics)
        if resume:
            self._resume(dispatcher)
        if self.rank0:
            self._start_services(dispatcher)

    # ----------------------------------------------------------------- set-up
    def _make_metrics(self, m: Metrics) -> None:
        self.m_step = m.histogram("scout_learner_step_seconds", "wall time of one learner step")
        self.m_steps = m.counter("scout_learner_steps_total", "learner steps done")
        self.m_version = m.gauge("scout_learner_policy_version", "current policy version")
        self.m_tokens = m.counter("scout_learner_tokens_total", "tokens trained on (prompt + generated)")
        self.m_tps = m.gauge("scout_learner_tokens_per_second", "tokens per second over the last step")
        self.m_groups = m.counter("scout_learner_groups_consumed_total", "groups trained on")
        self.m_gps = m.gauge("scout_learner_groups_per_second", "groups per second over the last step")
        self.m_stat = m.gauge("scout_learner_loss_stat", "loss statistics of the last step", ("stat",))
        self.m_reward = m.gauge("scout_learner_reward_mean", "mean reward of the last batch")
        self.m_latency = m.histogram("scout_learner_sample_latency_seconds",
                                     "generation start to trained, per group",
                                     buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800))
        self.m_correct = m.gauge("scout_learner_correct_fraction", "exact-match share of the last trained batch")
        self.m_idle = m.gauge("scout_learner_idle_fraction", "share of wall time between steps not spent training")
        self.m_ckpt_failed = m.counter("scout_learner_checkpoint_failures_total",
                                       "checkpoint saves that failed (training went on)", ("reason",))
        self.m_trimmed = m.counter("scout_learner_heap_trimmed_bytes_total", "RSS given back to the OS by "
                                   "malloc_trim (learner.heap_trim_s)")
        self._last_log_t: float | None = None

    def _start_services(self, dispatcher) -> None:
        from common.weightsync.sender import WeightSender
        from learner.ingest import IngestServer

        port = self.cfg.metrics.learner_port
        if port:
            from common.transport import check_host_bind

            check_host_bind(self.cfg.metrics.host, self.cfg.transport, "metrics.host")  # loopback unless allowed
            self.metrics.serve(self.cfg.metrics.host, port, health=self._health, token_file=self.cfg.metrics.token_file)
        self.sender = WeightSender(self.lc, self.cfg.transport, metrics=self.metrics)
        self.sender.answers_later, self.sender.sends_later = self.lc.sync_later()
        self.sender.start()
        self.ingest = IngestServer(self.cfg, dispatcher, self.trainer.vocab_size, version=self.version,
                                   metrics=self.metrics, sync_endpoint=self.sender.endpoint).start()
        self.m_version.set(self.version)

    def _health(self) -> dict:
        snap = self.ingest.snapshot() if self.ingest else {}
        return {"step": self.step, "version": self.version, **snap}

    def _resume(self, dispatcher) -> None:
        """Load the newest checkpoint that verifies (rank 0 checks, every rank loads). No checkpoint at
        all: start from step 0. Checkpoints that all fail to verify: refuse (ConfigError, exit 2)
        rather than train from scratch beside them, whose retention would then delete them."""
        found = {}
        if self.rank0:
            path, damaged = find_resumable(self.lc.checkpoint_dir)
            found = {"path": str(path or ""), "damaged": [f"{p.name}: {why}" for p, why in damaged]}
        found = json.loads(_broadcast_str(self.d, json.dumps(found) if self.rank0 else None))
        path = found["path"]
        if not path and found["damaged"]:
            raise ConfigError(f"--resume: no checkpoint in {self.lc.checkpoint_dir} verifies ("
                              + "; ".join(found["damaged"]) + "). Repair or move them away; to train from "
                              "step 0 instead, start without --resume (or with another learner.checkpoint_dir)")
        if not path:
            log.warning("--resume: no complete checkpoint in %s: starting from step 0", self.lc.checkpoint_dir)
            return
        meta = load_checkpoint(path, self.trainer.model, self.trainer.optimizer, self.d.rank)
        self.trainer.scheduler.load_state_dict(meta["scheduler"])
        self.step, self.version = int(meta["step"]), int(meta["version"])
        self.last_ckpt = self.step
        if dispatcher is not None and meta.get("dispatcher"):
            dispatcher.load_state_dict(meta["dispatcher"])
        log.info("resumed from %s: step %d, version %d", path, self.step, self.version)

    # ----------------------------------------------------------------- the loop
    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        log.info("learner rank %d/%d on %s: training steps %d..%d", self.d.rank, self.d.world, self.d.device,
                 self.step, self.lc.steps)
        self.status = StatusLine("learner", self.lc.steps, enabled=None if self.rank0 else False)
        while self.step < self.lc.steps:
            code, batch, groups = self._next_command()
            if code == CTRL_STOP:
                break
            if code == CTRL_SYNC:
                self._sync_weights()
            if code != CTRL_BATCH:
                continue
            t0 = time.monotonic()
            self.timer.add("wait", t0 - self.idle_since)
            stats = self.trainer.train_step(batch)
            self.timer.add("train", time.monotonic() - t0)
            self.step += 1
            sync = None
            if self.step % self.lc.sync_every == 0:
                self.version += 1
                if self.ingest is not None:  # before the sync: groups of the new version may come back at once
                    self.ingest.set_version(self.version)
                sync = self._sync_weights()
            if self.ingest is not None:
                self.ingest.release(self.version)
            if self.rank0:
                self._log_step(stats, batch, groups, time.monotonic() - t0, sync)
            if self.lc.checkpoint_dir and self.lc.checkpoint_every and self.step % self.lc.checkpoint_every == 0:
                self._settle_sync(block=True)  # the step's record is written before a checkpoint holds it
                self._checkpoint()
            self._trim_heap()
            self.idle_since = time.monotonic()
        saved = True
        self._settle_sync(block=True)  # before the final checkpoint, as in the loop
        if self.lc.checkpoint_dir and self.step != self.last_ckpt and self.step > 0:
            saved = self._checkpoint()
        log.info("learner done at step %d, version %d", self.step, self.version)
        if self.ingest is not None and self.step >= self.lc.steps:  # finished, not stopped: tell the actors
            untold = self.ingest.end_run(self.lc.end_grace_s)
            log.info("run ended: actors told%s", f" ({untold} live actor runs did not ask within "
                     f"{self.lc.end_grace_s:.0f} s)" if untold else "")
        if not saved:
            log.error("the final checkpoint failed: the steps after %d are in no checkpoint", max(self.last_ckpt, 0))
        return 0 if saved else 1

    def _trim_heap(self) -> None:
        freed = self.heap.maybe()
        if freed is not None and self.rank0:
            self.m_trimmed.inc(freed)

    def _on_signal(self, signum, _frame) -> None:
        log.info("signal %d: stopping after the current step", signum)
        self.stop_requested = True

    def _next_command(self) -> tuple[int, Batch | None, list | None]:
        """Rank 0 decides (stop / push weights / train / keep waiting) and tells every rank."""
        code, batch, groups = CTRL_WAIT, None, None
        if self.rank0:
            if self.stop_requested:
                code = CTRL_STOP
            elif self._settle_sync(block=False) and self._members_need_weights():
                code = CTRL_SYNC
            else:
                groups = self.ingest.take_groups(self.lc.groups_per_step, timeout=self.lc.batch_wait_s)
                if groups is not None:
                    t0 = time.monotonic()
                    code, batch = CTRL_BATCH, assemble(groups, self.lc.std_norm)
                    self.timer.add("assemble", time.monotonic() - t0)
                    self.batch_version = self.version
        code, batch = broadcast_command(self.d, code, batch)
        return code, batch, groups

    def _members_need_weights(self) -> bool:
        """Some weight-sync member has not loaded the current version (joined late, restarted,
        or the learner resumed): push it, at most every RESYNC_EVERY_S."""
        if self.sender is None or time.monotonic() - self.last_sync_t < RESYNC_EVERY_S:
            return False
        members = set(self.sender.member_runs().items())  # (peer, run): a restarted actor needs them again
        version, ok = self.synced
        return bool(members) and (version != self.version or not members <= ok)

    # ----------------------------------------------------------------- weights, logs, checkpoints
    def _sync_weights(self) -> dict | None:
        """Every rank gathers full parameters one by one; rank 0 feeds them to the sender."""
        self._settle_sync(block=True)
        flag = torch.tensor([int(self.rank0 and self.sender is not None and bool(self.sender.members()))])
        dist.broadcast(flag, 0, group=self.d.cpu_group)
        self.last_sync_t = time.monotonic()
        if not int(flag):
            self.synced = (self.version, set())
            return None
        owned = self.rank0 and self.sender.sends_later  # the sender's thread sends them while we train on
        params = self.timer.timed("gather", self.trainer.full_parameters(owned=owned))
        runs = self.sender.member_runs() if self.rank0 else {}  # the incarnations this sync is for
        report = None
        if self.rank0:
            try:
                report = self.sender.broadcast(self.version, params)
            except Exception as e:  # a failed sync never stops training
                log.error("weight sync of version %d failed: %s", self.version, e)
                report = {"error": str(e), "ok": [], "seconds": time.monotonic() - self.last_sync_t, "bytes": 0}
        for _ in params:  # the gathers are collectives: run them to the end on every rank
            pass
        if self.rank0 and report.get("pending"):
            self.unsettled = (report, runs)
            log.info("version %d %s in %.2fs; answers from %d/%d members to come", self.version,
                     "handed to the sender" if self.sender.sends_later and not report.get("backend") else "sent",
                     report.get("seconds", 0.0), len(report["pending"]), len(report.get("members", [])))
        elif self.rank0:
            self._settled(report, runs)
        return report

    def _settled(self, report: dict, runs: dict[str, str]) -> None:
        self.synced = (report.get("version", self.version), {(p, runs[p]) for p in report.get("ok", []) if p in runs})
        log.info("version %d sent to %d/%d members in %.2fs (%s)", self.synced[0], len(report.get("ok", [])),
                 len(report.get("members", [])), _sync_done_s(report),
                 report.get("error") or "ok")

    def _settle_sync(self, block: bool) -> bool:
        """Rank 0: once the answers of a sync that returned early are in, note who loaded it and
        write the step record that waited for them. False: they are still coming (block=False)."""
        if self.unsettled is None:
            return True
        if not self.sender.settle(None if block else 0):
            return False
        (report, runs), self.unsettled = self.unsettled, None
        self._settled(report, runs)
        if self.held_rec is not None:
            rec, self.held_rec = self.held_rec, None
            self._write_rec({**rec, "sync_ok": len(report.get("ok", [])), "sync_done_s": _sync_done_s(report)})
        return True

    def _phase_times(self, sync: dict | None) -> dict:
        """This step's timers (see the module docstring), in seconds."""
        t = self.timer.take()
        gather = t.get("gather", 0.0)
        ingest_total = self.ingest.busy_seconds() if self.ingest is not None else 0.0
        ingest, self._ingest_seen = ingest_total - getattr(self, "_ingest_seen", 0.0), ingest_total
        return {"wait_s": t.get("wait", 0.0), "assemble_s": t.get("assemble", 0.0), "train_s": t.get("train", 0.0),
                "forward_s": t.get("forward", 0.0), "optimizer_s": t.get("optimizer", 0.0), "gather_s": gather,
                "broadcast_s": max(0.0, (sync or {}).get("seconds", 0.0) - gather), "ingest_s": ingest}

    @staticmethod
    def _token_versions(groups: list) -> tuple[int, int]:
        """Oldest and newest policy version of the generated tokens of the batch."""
        v = np.concatenate([g.versions[g.loss_mask.view(bool)] for g in groups])
        return (int(v.min()), int(v.max())) if v.size else (-1, -1)

    def _log_step(self, stats: dict, batch: Batch, groups: list, seconds: float, sync: dict | None) -> None:
        if self.held_rec is not None:  # a sync of an earlier step (none this step): records stay in step order
            self._settle_sync(block=True)
        now = time.time()
        stale = [self.batch_version - g.oldest_version() for g in groups]
        tokens = int(batch.lengths.sum())
        vmin, vmax = self._token_versions(groups)
        rec = {
            "time": now, "step": self.step, "version": self.version,
            "reward_mean": float(batch.rewards.mean()), "reward_std": float(batch.rewards.std(unbiased=False)),
            "correct_frac": float(np.mean([c for g in groups for c in g.correct])),
            "searches_mean": float(np.mean([s for g in groups for s in g.num_searches])),
            "retrieval_failed_frac": float(np.mean([f for g in groups for f in g.retrieval_failed])),
            "groups": len(groups), "samples": int(len(batch.lengths)), "tokens": tokens,
            "gen_tokens_mean": float(batch.mask.sum()) / max(1, len(batch.lengths)),
            "sample_tokens_mean": tokens / max(1, len(batch.lengths)),
            "step_s": seconds, "tokens_per_s": tokens / max(seconds, 1e-9),
            "groups_per_s": len(groups) / max(seconds, 1e-9),
            "staleness_mean": float(np.mean(stale)), "staleness_max": int(max(stale)),
            "dropped_stale_total": int(self.ingest.counts.get("stale", 0)),
            "latency_mean_s": float(np.mean([now - g.created_at for g in groups if g.created_at > 0] or [0.0])),
            "sync_s": (sync or {}).get("seconds", 0.0), "sync_bytes": (sync or {}).get("bytes", 0),
            "sync_ok": len((sync or {}).get("ok", [])),
            "sync_done_s": _sync_done_s(sync or {}),
            "batch_version": self.batch_version, "token_version_min": vmin, "token_version_max": vmax,
            **self._phase_times(sync),
            **behaviour_rates(groups),
            **{k: v for k, v in stats.items()},
        }
        self.m_step.observe(seconds)
        self.m_steps.inc()
        self.m_version.set(self.version)
        self.m_tokens.inc(tokens)
        self.m_tps.set(rec["tokens_per_s"])
        self.m_groups.inc(len(groups))
        self.m_gps.set(rec["groups_per_s"])
        self.m_reward.set(rec["reward_mean"])
        self.m_correct.set(rec["correct_frac"])
        for g in groups:
            if g.created_at > 0:
                self.m_latency.observe(max(0.0, now - g.created_at))
        if self._last_log_t is not None and now > self._last_log_t:
            self.m_idle.set(max(0.0, 1.0 - seconds / (now - self._last_log_t)))
        self._last_log_t = now
        for k, v in stats.items():
            self.m_stat.labels(stat=k).set(v)
        if self.unsettled is not None and self.unsettled[0] is sync:
            self.held_rec = rec  # sync_ok is known once the answers are in: _settle_sync writes it
        else:
            self._write_rec(rec)
        log.info("step %d v%d reward %.3f loss %.4f clip %.3f isw %.3f kl %.4f grad %.3f %.0f tok/s stale %.1f",
                 self.step, self.version, rec["reward_mean"], stats.get("loss", 0.0), stats.get("clip_frac", 0.0),
                 stats.get("is_weight_mean", 0.0), stats.get("behav_kl", 0.0), stats.get("grad_norm", 0.0),
                 rec["tokens_per_s"], rec["staleness_mean"])
        self.status.update(self.step, f"v{self.version}  reward {rec['reward_mean']:.3f}  "
                                      f"{rec['tokens_per_s']:,.0f} tok/s  staleness {rec['staleness_mean']:.1f}")

    def _write_rec(self, rec: dict) -> None:
        run_dir = Path(self.cfg.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")

    def _checkpoint(self) -> bool:
        """Save; a failed save (disk full ...) is logged and counted, and training goes on."""
        meta = {"version": self.version, "scheduler": self.trainer.scheduler.state_dict(),
                "dispatcher": self.ingest.dispatcher_state() if self.ingest is not None else None}
        try:
            save_checkpoint(self.lc.checkpoint_dir, self.step, self.trainer.model, self.trainer.optimizer, meta,
                            self.lc.model, self.d.rank, keep=self.lc.keep_checkpoints, group=self.d.cpu_group)
        except CheckpointSaveError as e:
            if self.metrics is not None:
                self.m_ckpt_failed.labels(reason=e.reason).inc()
            going_on = self.step < self.lc.steps and not self.stop_requested
            log.error("checkpoint of step %d failed (%s): %s; its partial files are removed, the last good "
                      "checkpoint is %s%s", self.step, e.reason, e,
                      f"still that of step {self.last_ckpt}" if self.last_ckpt >= 0 else "none (no save worked yet)",
                      "; training goes on" if going_on else "")
            return False
        self.last_ckpt = self.step
        return True

    def close(self) -> None:
        if getattr(self, "status", None) is not None:
            self.status.close()
        if self.ingest is not None:
            self.ingest.stop()
        if self.sender is not None:
            self.sender.close()
        if self.metrics is not None:
            self.metrics.close()


def main(cfg: ScoutConfig, resume: bool = False) -> int:
    d = init_distributed()
    learner = None
    try:
        learner = Learner(cfg, d, resume)
        return learner.run()
    finally:
        if learner is not None:
            learner.close()
        if d.owns_group:
            dist.destroy_process_group()
