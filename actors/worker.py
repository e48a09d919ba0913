"""One actor worker process: one engine, many rollouts, a line to the learner and to weight sync.

    learner ingest ROUTER ◀──DEALER── LearnerLink: Hello → HelloAck, WorkRequest → WorkAssignment,
         │                                          TrajectoryGroup → GroupAck, Heartbeat → Heartbeat
         │ prompts (= credits)                      (replies in request order; each has a deadline)
         ▼
    RolloutRunner.poll()  ── one engine step ── searches batched through the retriever client
         │ finished group (n samples, per-token mask / logprob / version)
         ▼
    TrajectoryGroup ──▶ learner;  GroupAck frees the credit

    learner sync ROUTER ◀──DEALER── SyncClient: SyncJoin; SyncPlan / WeightUpdateHeader → the
    engine's BucketReceiver → load_weights, applied only between two engine steps → SyncDone

Credits: the worker never holds more groups (generating + sent but unacked) than
`actor.max_groups_in_flight`, and it only generates prompts the learner handed out, so the
learner's credit window bounds how far ahead it can run. A lost learner link (no reply within
`actor.request_timeout_s`, or a learner that restarted) ends this *run*: the worker drops the
rollouts it is generating, takes a fresh run_id (the learner re-queues the old run's prompts), opens
a new socket (a silent partition never breaks TCP, so the old one would wait forever) and says
hello again. Groups it had sent without an ack are sent again under the new run_id when the same
learner run answers (the learner accepts each group_id once and answers "duplicate" to a copy);
a restarted learner gets none of them. A failed weight load exits with code 3 (the engine may
hold half-loaded weights); the supervisor restarts the process. A WorkAssignment marked `ended`
(the learner finished its steps) exits with EXIT_RUN_ENDED, which the supervisor does not
restart; with `actor.stay` (`--stay`) the worker instead waits for a learner run other than the
one that ended.

Where the worker's time goes (`scout_actor_phase_seconds_total{phase}`, and `phases` in the
stats line): engine (decode steps), rollout (turn handling, search dispatch, rewards), send
(encoding + sending groups), link (learner requests and replies), weight_load, search_wait
(nothing to decode, searches outstanding), no_work (nothing to decode, no prompts: waiting for
credits). After a weight load the worker asks for prompts again at once and, while the learner
has not freed credits yet, every FAST_RETRY_S for FAST_RETRY_WINDOW_S (in synchronous mode the
learner frees them right after the sync).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from typing import Any

import zmq

from actors.engine import make_engine
from actors.main import EXIT_CONFIG, EXIT_RUN_ENDED
from actors.rollout import GroupState, RolloutRunner, Trajectory, make_searcher
from actors.worker_metrics import WorkerMetrics, count_behaviour
from common.config import ScoutConfig
from common.procs import HeapTrim
from common.wire import Message, ProtocolError, decode
from common.protocol import ErrorReply, GroupAck, Heartbeat, Hello, HelloAck, WorkAssignment, WorkRequest
from common.weightsync.messages import SyncAbort
from common.transport import TransportTimeout, connect, send, term_context

log = logging.getLogger("scout.actors.worker")

EXIT_WEIGHT_LOAD_FAILED = 3
EXIT_NO_LEARNER = 4
FAST_RETRY_S = 0.01  # after a weight load: how soon to ask again when no credit is free yet
FAST_RETRY_WINDOW_S = 2.0  # ... and for how long after the load
SYNC_REJOIN_S = 30.0  # behind the learner's version this long without an update: join the weight sync again


class LinkLost(RuntimeError):
    """The learner stopped answering (or restarted): this run's in-flight work is void."""


class RunEnded(Exception):
    """The learner said its run is over (WorkAssignment.ended)."""


class LearnerLink:
    """DEALER to the learner's ingest endpoint. Requests are pipelined; the learner answers each
    one, in order, so replies are matched first-in first-out; every request has a deadline."""

    def __init__(self, cfg: ScoutConfig, ctx: zmq.Context, stop: threading.Event):
        self.cfg, self.ctx, self.stop = cfg, ctx, stop
        self.timeout_s = cfg.actor.request_timeout_s
        self.sock: zmq.Socket | None = None
        self.pending: collections.deque[tuple[str, Any, float]] = collections.deque()
        self.last_sent = 0.0

    def open(self) -> None:
        self.close()
        self.sock = connect(self.ctx, zmq.DEALER, self.cfg.actor.learner_endpoint, self.cfg.transport)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None
        self.pending.clear()

    def request(self, msg: Message, kind: str, key: Any = None) -> None:
        try:
            send(self.sock, msg, flags=zmq.NOBLOCK)
        except (TransportTimeout, zmq.Again):
            raise LinkLost(f"cannot send {msg.TYPE} to the learner (queue full)") from None
        self.last_sent = time.monotonic()
        self.pending.append((kind, key, self.last_sent))

    def overdue(self) -> bool:
        return bool(self.pending) and time.monotonic() - self.pending[0][2] > self.timeout_s

    def replies(self, timeout_ms: int) -> list[tuple[str, Any, Message]]:
        """Every reply that arrives within `timeout_ms` (first one) / already waiting (rest)."""
        out = []
        wait = timeout_ms
        while self.sock is not None and self.sock.poll(wait, zmq.POLLIN):
            wait = 0
            frames = self.sock.recv_multipart(copy=False)
            try:
                msg = decode(frames)
            except ProtocolError as e:
                log.warning("unreadable message from the learner: %s", e)
                continue
            if not self.pending:
                log.warning("unexpected %s from the learner (nothing pending)", msg.TYPE)
                continue
            kind, key, _ = self.pending.popleft()
            out.append((kind, key, msg))
        return out

    def call(self, msg: Message, timeout_s: float) -> Message:
        """Blocking request (used for Hello)."""
        self.request(msg, "call")
        end = time.monotonic() + timeout_s
        while time.monotonic() < end and not self.stop.is_set():
            for _, _, reply in self.replies(int(min(200, (end - time.monotonic()) * 1000)) or 1):
                return reply
        self.pending.clear()
        raise LinkLost(f"no answer to {msg.TYPE} from {self.cfg.actor.learner_endpoint} within {timeout_s:.0f}s")


class ActorWorker:
    def __init__(self, cfg: ScoutConfig, worker: int = 0, gpu: str = "cpu"):
        self.cfg, self.acfg = cfg, cfg.actor
        self.worker, self.gpu = worker, gpu
        self.peer_id = f"actor-{socket.gethostname()}-{worker}"
        self.run_id = uuid.uuid4().hex
        self.stop = threading.Event()
        self.ctx = zmq.Context()
        self.link = LearnerLink(cfg, self.ctx, self.stop)
        self.metrics = WorkerMetrics(worker, gpu)
        self.engine = self.runner = self.sync = self.searcher = None
        self.learner_run_id = ""
        self.ended_run_id = ""  # a learner run that told us it ended (--stay: wait for another)
        self.learner_version = self.min_version = 0
        self.n_samples = 1
        self.sync_endpoint = ""
        self.unacked: dict[str, GroupState] = {}  # group_id -> the group sent, until its ack (kept across a link loss)
        self.work_pending = False
        self.retry_at = 0.0
        self.fast_retry_until = 0.0
        self.parent = os.getppid()
        self.continued = threading.Event()  # set by SIGCONT: this process was stopped (SIGSTOP) until now
        self._tick_t = time.monotonic()  # when the last tick began
        self.heap = HeapTrim(self.acfg.heap_trim_s)

    # ------------------------------------------------------------------ lifecycle
    def run(self) -> int:
        acfg = self.acfg
        t0 = time.monotonic()
        try:
            self._serve_metrics()  # before the engine: a taken port fails in a second, not after the load
        except OSError as e:
            log.error("worker %d: cannot serve metrics on %s:%d: %s (metrics.actor_port + 1 + worker index "
                      "must be free)", self.worker, self.cfg.metrics.host, self._metrics_port(), e)
            return EXIT_CONFIG
        self.engine = make_engine(acfg)
        self.searcher = make_searcher(self.cfg)
        self.runner = RolloutRunner(self.engine, self.searcher, acfg, on_finished=self._on_rollout)
        log.info("worker %d (gpu %s) ready in %.1fs: engine %s, model %s", self.worker, self.gpu,
                 time.monotonic() - t0, self.engine.name, acfg.model)
        self.metrics.window_t = time.monotonic()  # rates count from here, not from engine load
        try:
            return self._loop()
        finally:
            self._shutdown()

    def _metrics_port(self) -> int:
        return self.cfg.metrics.actor_port + 1 + self.worker

    def _serve_metrics(self) -> None:
        mc = self.cfg.metrics
        if mc.actor_port:
            port = self.metrics.m.serve(mc.host, self._metrics_port(), health=self._health, token_file=mc.token_file)
            log.info("worker %d metrics on http://%s:%d/metrics", self.worker, mc.host, port)

    def _health(self) -> dict:
        return {"pid": os.getpid(), "run_id": self.run_id, "version": self.engine.version if self.engine else -1,
                "learner_run_id": self.learner_run_id, "groups_in_flight": self._in_flight(),
                "groups_unacked": len(self.unacked)}  # sent, no answer yet (sent = answered + unacked)

    def _shutdown(self) -> None:
        for closer in (lambda: self.runner.close(), lambda: self.searcher.close(), lambda: self.sync.close(),
                       lambda: self.link.close(), lambda: self.engine.close(), lambda: self.metrics.m.close()):
            try:
                closer()
            except Exception:  # shutting down: keep closing the rest
                pass
        term_context(self.ctx)

    # ------------------------------------------------------------------ main loop
    def _loop(self) -> int:
        while not self.stop.is_set():
            try:
                self._connect()
                self._tick_t = time.monotonic()  # a stop while saying hello needs no second new run
                while not self.stop.is_set():
                    self._tick()
                    if os.getppid() != self.parent:
                        log.error("supervisor is gone: stopping")
                        return 1
            except LinkLost as e:
                if self.stop.is_set():
                    break
                log.warning("learner link lost (%s): dropping in-flight work, new run", e)
                self._new_run()
                self.stop.wait(1.0)
            except RunEnded:
                if not self.acfg.stay:
                    log.info("learner run %s ended: exiting", self.learner_run_id[:8])
                    return EXIT_RUN_ENDED
                log.info("learner run %s ended: waiting for a new learner run (actor.stay)", self.learner_run_id[:8])
                self.ended_run_id = self.learner_run_id
                self._new_run()
        return 0

    def _tick(self) -> None:
        self._check_stopped()
        if self.link.overdue():
            raise LinkLost(f"no reply within {self.acfg.request_timeout_s:.0f}s")
        mm, clock = self.metrics, time.perf_counter
        busy = self.runner.busy()
        t0 = clock()
        for kind, key, reply in self.link.replies(0 if busy else 20):
            self._on_reply(kind, key, reply)
        t1 = clock()
        mm.add_phase("link" if busy else "no_work", t1 - t0)
        self._maybe_request_work()
        self._maybe_heartbeat()
        loaded = self._sync_between_steps()
        t2 = clock()
        mm.add_phase("weight_load" if loaded else "link", t2 - t1)
        steps0 = self.runner.stats.step_seconds
        finished = self.runner.poll()
        t3 = clock()
        engine = self.runner.stats.step_seconds - steps0
        mm.add_phase("engine", engine)
        mm.add_phase("rollout", t3 - t2 - engine)
        mm.searched(self.runner.stats.search_seconds)
        for g in finished:
            self._send_group(g)
        t4 = clock()
        mm.add_phase("send", t4 - t3)
        mm.window["step_us"] += int(engine * 1e6)
        if not self.engine.has_unfinished() and self.runner.in_search:
            self.runner.wait_searches(0.02)
            mm.add_phase("search_wait", clock() - t4)
        freed = self.heap.maybe()
        if freed is not None:
            mm.heap_trimmed.inc(freed)
        self._roll_metrics()

    def _check_stopped(self) -> None:
        """After a SIGSTOP longer than request_timeout_s the learner has written this run off: its
        prompts re-queued (learner.peer_timeout_s), its weight-sync membership dropped. Replies
        that were pending would show that only if a request was in flight, so SIGCONT tells it
        instead: start a new run (fresh sockets, hello, sync join; unacked groups are sent again
        and the learner refuses the stale ones)."""
        now, last = time.monotonic(), self._tick_t
        self._tick_t = now
        if self.continued.is_set():
            self.continued.clear()
            if now - last > self.acfg.request_timeout_s:
                raise LinkLost(f"this worker was stopped for {now - last:.0f}s (SIGSTOP until SIGCONT)")

    def _connect(self) -> None:
        """(Re)open the link and say hello until the learner answers or we are stopped."""
        while not self.stop.is_set():
            self.link.open()
            hello = Hello(role="actor", peer_id=self.peer_id, run_id=self.run_id, worker=self.worker, gpu=self.gpu,
                          host=socket.gethostname(), pid=os.getpid(), version=self.engine.version)
            try:
                ack = self.link.call(hello, self.acfg.request_timeout_s)
            except LinkLost as e:
                log.warning("%s; retrying", e)
                continue
            if isinstance(ack, HelloAck) and ack.learner_run_id == self.ended_run_id:
                self.stop.wait(2.0)  # the ended run still answers for a moment: wait for a new one
                continue
            if isinstance(ack, HelloAck):
                return self._on_hello(ack)
            log.error("learner refused hello: %s", getattr(ack, "message", ack.TYPE))
            self.stop.wait(5.0)

    def _on_hello(self, ack: HelloAck) -> None:
        restarted = bool(self.learner_run_id) and ack.learner_run_id != self.learner_run_id
        if restarted:
            log.warning("learner restarted (run %s -> %s)", self.learner_run_id[:8], ack.learner_run_id[:8])
        self.learner_run_id = ack.learner_run_id
        self._resend_unacked(same_learner=not restarted)
        self.learner_version, self.n_samples = ack.version, ack.n_samples
        self.min_version = max(0, ack.version - ack.max_staleness)
        log.info("learner run %s: version %d, n_samples %d, max_staleness %d, sync %s", ack.learner_run_id[:8],
                 ack.version, ack.n_samples, ack.max_staleness, ack.sync_endpoint or "-")
        if ack.sync_endpoint and (self.sync is None or ack.sync_endpoint != self.sync_endpoint):
            self._open_sync(ack.sync_endpoint)

    def _open_sync(self, endpoint: str) -> None:
        from common.weightsync.client import SyncClient

        if self.sync is not None:
            self.sync.close()
        transports = ("nccl", "gloo", "zmq") if self.gpu != "cpu" else ("gloo", "zmq")
        self.sync = SyncClient(endpoint, self.peer_id, self.run_id, self.cfg.transport, transports=transports)
        self.sync.join(self.engine.version)
        self.sync_endpoint = endpoint

    def _new_run(self) -> None:
        """Void this run: abort rollouts, fresh run_id (and sync join). Unacked groups are kept:
        _resend_unacked sends them again once the learner answers."""
        self.metrics.links.inc()
        self.runner.abort_all()
        self.work_pending = False
        self.link.close()
        self.run_id = uuid.uuid4().hex
        if self.sync is not None:
            self.sync.close()
            self.sync = None

    def _resend_unacked(self, same_learner: bool) -> None:
        """Groups sent before a link loss and never acknowledged go again, under the new run_id,
        before any WorkRequest: the learner has re-queued the old run's prompts at our hello, and an
        accepted copy takes its prompt back out of the queue. A group the learner had accepted (only
        its ack was lost) is answered "duplicate" and trained once (learner/ingest.py seen_groups).
        A restarted learner gets none of them (its version and data position are its own)."""
        if not self.unacked:
            return
        if not same_learner:
            log.warning("dropping %d unacked groups: the learner restarted", len(self.unacked))
            # counted, so that sent = answered + abandoned + unacked still holds
            self.metrics.groups.labels(result="abandoned").inc(len(self.unacked))
            self.unacked.clear()
            return
        log.info("resending %d unacked groups after the link loss (run %s)", len(self.unacked), self.run_id[:8])
        for g in list(self.unacked.values()):
            self._send_group(g, resend=True)

    # ------------------------------------------------------------------ learner messages
    def _in_flight(self) -> int:
        return (self.runner.active_groups() if self.runner else 0) + len(self.unacked)

    def _maybe_request_work(self) -> None:
        if self.work_pending or time.monotonic() < self.retry_at:
            return
        room = min(self.acfg.prompts_per_request, self.acfg.max_groups_in_flight - self._in_flight())
        if room <= 0 or self.engine.version < self.min_version:
            return
        self.link.request(WorkRequest(peer_id=self.peer_id, run_id=self.run_id, max_prompts=room,
                                      version=self.engine.version), "work")
        self.work_pending = True

    def _maybe_heartbeat(self) -> None:
        if time.monotonic() - self.link.last_sent >= self.acfg.heartbeat_s:
            self._hb_seq = getattr(self, "_hb_seq", 0) + 1
            self.link.request(Heartbeat(peer_id=self.peer_id, run_id=self.run_id, seq=self._hb_seq,
                                        version=self.engine.version, time=time.time()), "heartbeat")

    def _on_reply(self, kind: str, key: Any, reply: Message) -> None:
        if isinstance(reply, ErrorReply):
            log.error("learner answered %s with %s: %s", kind, reply.code, reply.message)
            if kind == "work":
                self.work_pending = False
                self.retry_at = time.monotonic() + 1.0
            elif kind == "group":
                self.unacked.pop(key, None)
                self.metrics.groups.labels(result="error").inc()
            return
        if kind == "work" and isinstance(reply, WorkAssignment):
            self._on_assignment(reply)
        elif kind == "group" and isinstance(reply, GroupAck):
            self._on_ack(key, reply)
        elif kind == "heartbeat" and isinstance(reply, Heartbeat):
            if self.learner_run_id and reply.run_id != self.learner_run_id:
                raise LinkLost(f"learner restarted (run {reply.run_id[:8]})")
            self.learner_version = max(self.learner_version, reply.version)
        else:
            log.warning("learner answered %s with %s", kind, reply.TYPE)

    def _on_assignment(self, a: WorkAssignment) -> None:
        self.work_pending = False
        if a.ended:
            raise RunEnded()
        self.learner_version, self.min_version, self.n_samples = a.version, a.min_version, a.n_samples
        if not a.prompts:
            now = time.monotonic()
            fast = now < self.fast_retry_until  # a version just loaded: credits are about to be freed
            self.retry_at = now + (FAST_RETRY_S if fast else max(0.05, a.retry_after_s))
            return
        self.fast_retry_until = 0.0  # the freed credits arrived: back to the learner's pace
        for p in a.prompts:
            self.runner.start_group(p, a.n_samples)

    def _on_ack(self, group_id: str, ack: GroupAck) -> None:
        self.unacked.pop(group_id, None)
        self.learner_version = max(self.learner_version, ack.version)
        result = "accepted" if ack.accepted else ("stale" if "older than" in ack.reason else
                                                  "buffer_full" if ack.reason == "buffer full" else "rejected")
        if ack.accepted and ack.reason == "duplicate":  # a resent group the learner already had
            result = "duplicate"
        self.metrics.groups.labels(result=result).inc()
        if not ack.accepted:
            log.warning("group %s not accepted: %s", group_id, ack.reason)

    def _send_group(self, g: GroupState, resend: bool = False) -> None:
        msg = g.to_message(self.peer_id, self.run_id)
        self.link.request(msg, "group", g.group_id)
        self.unacked[g.group_id] = g
        if resend:
            self.metrics.groups.labels(result="resent").inc()
            return
        self.metrics.window["groups"] += 1
        self.metrics.groups_sent.inc()
        if float(msg.rewards.max()) > 0:
            self.metrics.groups_rewarded.inc()

    def _on_rollout(self, t: Trajectory) -> None:
        mm = self.metrics
        gen = sum(t.mask)
        mm.tokens.inc(gen)
        mm.window["tokens"] += gen
        mm.window["rollouts"] += 1
        mm.window["searches"] += t.num_searches
        mm.rollouts.labels(finish=t.finish).inc()
        mm.searches.inc(t.num_searches)
        mm.searches_per.observe(t.num_searches)
        if t.retrieval_failed:
            mm.retrieval_failed.inc()
        count_behaviour(mm, t)
        if t.result is not None:
            if t.result.correct:
                mm.correct.inc()
            mm.reward.observe(t.result.reward)
            mm.rewards.append(t.result.reward)

    # ------------------------------------------------------------------ weights
    def _sync_between_steps(self) -> bool:
        """Apply a weight update if one is announced; the engine is between two steps here.
        True when a sync was followed (loaded or failed)."""
        if self.sync is None:
            return False
        self._rejoin_if_forgotten()
        report = poll_sync(self.sync, self.engine)
        if report is None:
            return False
        if not report["ok"]:
            log.error("weight update to version %s failed: %s", report["version"], report["message"])
            if report["begun"]:
                raise SystemExit(EXIT_WEIGHT_LOAD_FAILED)  # half-loaded engine: restart the process
            return True
        self.metrics.load_s.observe(report["seconds"])
        # the learner frees the trained groups' credits right after this sync: ask again now
        self.retry_at, self.fast_retry_until = 0.0, time.monotonic() + FAST_RETRY_WINDOW_S
        log.info("policy version %d loaded in %.3fs (%d buckets)", report["version"], report["seconds"],
                 report["buckets"])
        return True

    def _rejoin_if_forgotten(self) -> None:
        """The learner re-sends its version to members that lack it every step and every 10 s; an
        engine left behind for SYNC_REJOIN_S anyway is not being served (its join or the
        learner's answer was lost somewhere): join again. A safety net: a join handled while the
        learner re-forms the group is planned at the next sync (common/weightsync/group.py, SyncGroup.reform)."""
        now = time.monotonic()
        if self.learner_version <= self.engine.version:
            self._behind_since = None
            return
        since = getattr(self, "_behind_since", None)
        if since is None:
            self._behind_since = now
        elif now - since > SYNC_REJOIN_S:
            log.warning("weights at version %d, the learner at %d for %.0f s: joining the weight sync again",
                        self.engine.version, self.learner_version, now - since)
            self.sync.join(self.engine.version)
            self._behind_since = now

    def _roll_metrics(self) -> None:
        mm = self.metrics
        mm.version.set(self.engine.version)
        mm.lag.set(max(0, self.learner_version - self.engine.version))
        mm.inflight.set(self._in_flight())
        if mm.roll():
            self._log_snapshot(mm.snapshot)

    def _log_snapshot(self, snap: dict) -> None:
        line = {"time": time.time(), "role": "actor", "host": socket.gethostname(), "worker": self.worker, "gpu": self.gpu,
                "version": self.engine.version, "learner_version": self.learner_version,
                **{k: round(v, 4) if isinstance(v, float) else v for k, v in snap.items()}}
        log.info("stats %s", json.dumps(line))
        path = self.cfg.metrics.log_file
        if path:
            try:
                with open(path, "a") as f:
                    f.write(json.dumps(line) + "\n")
            except OSError as e:
                log.warning("cannot append to metrics.log_file %s: %s", path, e)


def poll_sync(sync, engine) -> dict | None:
    """If the learner announced an update, receive all of it into `engine` and answer SyncDone.

    Returns None when nothing was announced, else follow_sync's report plus `begun` (True when
    the engine's weights may be half-loaded after a failure: `engine.weights_dirty`; a transfer
    that failed before any tensor was loaded, e.g. because another member of the sync group died,
    leaves the current weights intact and the worker keeps going)."""
    from common.weightsync.client import follow_sync
    from common.weightsync.errors import SyncError

    try:
        first = sync.poll(0)
    except SyncError as e:
        log.error("weight sync: %s", e)
        return None
    if first is None or isinstance(first, SyncAbort):
        return None

    def receive(header: dict, data: Any) -> None:
        if header["bucket"] == 0:
            engine.begin_update()  # armed by the engine only once the bucket's bytes are in
        engine.load_bucket(header, data)
        if header["bucket"] == header["num_buckets"] - 1:
            engine.finish_update(header["version"])

    report = follow_sync(sync, first, engine.sync_setup, receive)
    if report is not None:
        report["begun"] = bool(engine.weights_dirty)
        try:  # SyncDone is sent: freeing the receive buffers no longer delays the learner
            engine.release_sync_buffers()
        except Exception as e:  # the next update's first bucket releases them anyway
            log.warning("weight sync: could not release the receive buffers: %s", e)
    return report


def worker_main(cfg: ScoutConfig, worker: int, gpu: str) -> int:
    w = ActorWorker(cfg, worker, gpu)

    def on_signal(signum, _frame):
        log.info("worker %d: signal %d, stopping", worker, signum)
        w.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGCONT, lambda _s, _f: w.continued.set())  # see ActorWorker._check_stopped
    try:
        return w.run()
    except SystemExit as e:
        return int(e.code or 0)


def _main() -> int:
    """Entry point of a worker process started by the supervisor (actors/main.py)."""
    from common.config import log_config
    from common.log import setup_logging

    cfg = ScoutConfig.model_validate_json(os.environ["SCOUT_WORKER_CONFIG"])
    worker = int(os.environ["SCOUT_WORKER_INDEX"])
    gpu = os.environ.get("SCOUT_WORKER_GPU", "cpu")
    setup_logging(f"actor-w{worker}", cfg.log_level)
    log_config(cfg, f"actor worker {worker} (gpu {gpu})")
    return worker_main(cfg, worker, gpu)


if __name__ == "__main__":
    try:
        raise SystemExit(_main())
    finally:
        from common.procs import skip_final_collections

        skip_final_collections()
