"""Learner rank 0's side of the actor exchange: prompts out, whole groups in.

    QA file ─▶ Dispatcher (seeded permutation + cursor, re-queue of lost prompts)
                  │ take()                                         ▲ requeue (dead / restarted run,
                  ▼                                                │          stale or refused group)
    actor DEALER ─── Hello / WorkRequest / TrajectoryGroup / Heartbeat ──▶ ROUTER (thread)
                 ◀── HelloAck / WorkAssignment / GroupAck / Heartbeat / ErrorReply
                                                   │ accepted whole groups
                                                   ▼
                          bounded buffer ──take_groups(k)──▶ trainer ──release(version)──┘

Credits: a prompt handed out is a credit for one group. Assigned + buffered + in training
never exceeds (max_staleness + 1) · groups_per_step (and the buffer size), so actors cannot
run more than `max_staleness` versions ahead. Groups in training keep their credits until the
trainer calls `release` after the step (and the weight sync that follows it), which is what
makes max_staleness = 0 truly synchronous. A group whose oldest generated token is older than
version − max_staleness is dropped and counted, on arrival and again when taken. A group whose
every sample failed retrieval, or with tokens of a version newer than the learner's (after a
resume from an older checkpoint), is refused and its prompt handed out again; an actor holding
such newer weights gets no prompts until the learner's next sync has reached it.

A group refused because the buffer is full (only an actor that ignores its credits sends one)
is answered learner.buffer_full_delay_s later, from a queue the ingest thread flushes between
messages: such an actor, one group in flight, then costs the thread one refusal per delay.

The socket lives in its own thread; the trainer only touches the lock-protected buffer. A trainer
waiting in take_groups(k) is woken once k groups are buffered, not by every group that arrives.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import zmq

from common.config import ConfigError, ScoutConfig
from common.qa import read_qa
from common.metrics import Metrics
from common.wire import MAX_STR, Message, ProtocolError, decode, encode
from common.protocol import (ErrorReply, GroupAck, Heartbeat, Hello, HelloAck, Prompt, TrajectoryGroup,
                             WorkAssignment, WorkRequest, error_frames)
from common.transport import bind, bound_endpoint

log = logging.getLogger("scout.learner.ingest")

STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 32)
BUFFER_FULL = "buffer full"  # GroupAck.reason of a group refused for a full buffer (answered late: _reply)


# --------------------------------------------------------------------------- data
def load_qa(path: str | Path) -> list[dict]:
    """Training rows, raw (`question`, `golden_answers`, `data_source`) or Search-R1's processed
    parquet (`prompt`, `reward_model`, ...); a bad row is a ConfigError naming the file and the row
    (common.qa.read_qa)."""
    return read_qa(path, "learner.data:")


class Dispatcher:
    """Prompt order: a seeded permutation per epoch and a cursor, plus prompts to hand out again.

    Each run (peer_id, run_id) holds a multiset of prompt ids until their groups come back.
    `state_dict` stores the cursor and every prompt not yet trained on (re-queued, in flight,
    buffered): after a restart those are handed out first, nothing else repeats or is skipped.
    """

    def __init__(self, rows: list[dict], seed: int = 0):
        """`rows` as common.qa.read_qa gives them; a row's prompt id is its `prompt_id` (Search-R1's
        extra_info.index), or its position when it has none."""
        self.rows, self.seed = rows, seed
        self.ids = [int(r.get("prompt_id", n)) for n, r in enumerate(rows)]
        self.position = {pid: n for n, pid in enumerate(self.ids)}
        if len(self.position) != len(rows):
            raise ValueError("prompt ids repeat in the learner's data")
        self.epoch, self.cursor = 0, 0
        self.requeue: collections.deque[int] = collections.deque()
        self.held: dict[tuple[str, str], collections.Counter] = {}
        self._n_held = 0  # sum of every run's held counts (in_flight, asked on every work request)
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))

    def knows(self, pid: int) -> bool:
        return pid in self.position

    def prompt(self, pid: int) -> Prompt:
        r = self.rows[self.position[pid]]
        return Prompt(prompt_id=pid, question=r["question"], golden_answers=r["golden_answers"],
                      data_source=r["data_source"], text=r.get("text", ""))

    def _next_id(self) -> int:
        if self.requeue:
            return self.requeue.popleft()
        if self.cursor >= len(self._order):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        pid = self.ids[int(self._order[self.cursor])]
        self.cursor += 1
        return pid

    def take(self, run: tuple[str, str], k: int) -> list[int]:
        ids = [self._next_id() for _ in range(k)]
        self.held.setdefault(run, collections.Counter()).update(ids)
        self._n_held += k
        return ids

    def returned(self, run: tuple[str, str], pid: int, accepted: bool = True) -> bool:
        """A group for `pid` came back from `run`. True when it settles a credit this run held.
        Only an accepted group takes `pid` out of the re-queue (a refused one must not lose it)."""
        held = self.held.get(run)
        if held and held[pid] > 0:
            held[pid] -= 1
            if held[pid] == 0:
                del held[pid]
            self._n_held -= 1
            return True
        if accepted and pid in self.requeue:  # handed back after a restart, but its group arrived after all
            self.requeue.remove(pid)
        return False

    def give_back(self, pids: list[int]) -> None:
        self.requeue.extend(pids)

    def release_run(self, run: tuple[str, str]) -> int:
        """A run died or restarted: everything it held goes back to the front of the queue."""
        held = self.held.pop(run, None)
        if not held:
            return 0
        ids = list(held.elements())
        self.requeue.extendleft(reversed(ids))
        self._n_held -= len(ids)
        return len(ids)

    def in_flight(self) -> int:
        return self._n_held

    def state_dict(self, pending: list[int] = ()) -> dict:
        held = [pid for c in self.held.values() for pid in c.elements()]
        return {"seed": self.seed, "epoch": self.epoch, "cursor": self.cursor, "rows": len(self.rows),
                "pending": [*list(pending), *held, *self.requeue]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("rows") != len(self.rows) or state.get("seed") != self.seed:
            log.warning("dispatcher state is for %s rows / seed %s; data has %d rows / seed %d: starting the order afresh",
                        state.get("rows"), state.get("seed"), len(self.rows), self.seed)
            return
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._permutation(self.epoch)
        self.held, self._n_held = {}, 0
        self.requeue = collections.deque(int(p) for p in state["pending"] if self.knows(int(p)))


def dump_group(directory: str, n: int, g: TrajectoryGroup, learner_version: int) -> None:
    """learner.dump_groups_dir (tests/debugging): accepted group number `n` (acceptance order), its
    arrays and ids as .npz (plain arrays, no pickle). A failed write is only logged."""
    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
        np.savez(d / f"{n:06d}.npz", group_id=np.str_(g.group_id), lengths=g.lengths, tokens=g.tokens,
                 loss_mask=g.loss_mask, logprobs=g.logprobs, versions=g.versions, rewards=g.rewards,
                 prompt_id=np.int64(g.prompt_id), peer_id=np.str_(g.peer_id), run_id=np.str_(g.run_id),
                 learner_version=np.int64(learner_version), retrieval_failed=np.asarray(g.retrieval_failed, bool),
                 num_searches=np.asarray(g.num_searches, np.int64))
    except OSError as e:
        log.warning("learner.dump_groups_dir: could not write group %s: %s", g.group_id, e)


def send_reply(sock: zmq.Socket, frames: list, what: str) -> None:
    """Answer on the ROUTER without blocking: a reply to a peer whose queue is full is dropped (logged)."""
    try:
        sock.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
    except zmq.ZMQError as e:
        log.warning("reply %s dropped: %s", what, e)


# --------------------------------------------------------------------------- server
class _Peer:
    __slots__ = ("run_id", "last_seen", "version", "info")

    def __init__(self, run_id: str, version: int, info: str):
        self.run_id, self.last_seen, self.version, self.info = run_id, time.monotonic(), version, info


class IngestServer:
    """ROUTER on `learner.ingest_endpoint` in a daemon thread, plus the bounded group buffer."""

    def __init__(self, cfg: ScoutConfig, dispatcher: Dispatcher, vocab_size: int, version: int = 0,
                 metrics: Metrics | None = None, ctx: zmq.Context | None = None, sync_endpoint: str | None = None):
        self.cfg, self.lc = cfg, cfg.learner
        self.dispatcher, self.vocab_size, self.version = dispatcher, vocab_size, version
        self.run_id = uuid.uuid4().hex
        self.cap = min((self.lc.max_staleness + 1) * self.lc.groups_per_step, self.lc.buffer_groups)
        if self.lc.buffer_groups < self.lc.groups_per_step:
            raise ConfigError("learner.buffer_groups must be >= learner.groups_per_step")
        self.buffer: collections.deque[TrajectoryGroup] = collections.deque()
        self.in_training: list[int] = []  # prompt ids of groups handed to the trainer, not yet released
        self.peers: dict[str, _Peer] = {}
        # runs a newer run of the same peer replaced: their late messages (bytes a partition held
        # back, delivered after the peer's new hello) must not make that run current again
        self.superseded: dict[str, collections.deque[str]] = {}
        self.seen_groups: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._cond = threading.Condition()
        self._wanted = 0  # groups the trainer is waiting for in take_groups (0: not waiting)
        self._stop = threading.Event()
        self._ctx = ctx or zmq.Context.instance()
        self._thread: threading.Thread | None = None
        self.endpoint = self.lc.ingest_endpoint
        self.sync_endpoint = sync_endpoint or self.lc.sync_endpoint  # told to actors in HelloAck
        self.ended = False  # the run is over: work requests are answered `ended`, groups refused
        self.told_ended: set[str] = set()  # actors (peer ids) that got an `ended` answer, under any run
        # "buffer full" answers held back: (due, frames), due times in order (one delay for all)
        self._deferred: collections.deque[tuple[float, list]] = collections.deque()
        self._metrics(metrics or Metrics("learner"))

    def _metrics(self, m: Metrics) -> None:
        self.metrics = m  # m.reject("ingest", reason) for every bad message
        self.m_groups = m.counter("scout_learner_groups_received_total", "groups received, by result", ("result",))
        self.m_dropped = m.counter("scout_learner_groups_dropped_stale_total", "groups dropped for staleness")
        self.m_bad = m.counter("scout_learner_bad_messages_total", "malformed or unexpected messages")
        self.m_assigned = m.counter("scout_learner_prompts_assigned_total", "prompts handed to actors")
        self.m_requeued = m.counter("scout_learner_prompts_requeued_total", "prompts handed back for another try")
        self.m_buffer = m.gauge("scout_learner_buffer_groups", "groups waiting in the buffer")
        self.m_inflight = m.gauge("scout_learner_inflight_prompts", "prompts assigned and not yet returned")
        self.m_requeue = m.gauge("scout_learner_requeued_prompts", "prompts handed back, waiting to go out again")
        self.m_training = m.gauge("scout_learner_training_groups", "groups in the current step, credits not yet freed")
        self.m_peers = m.gauge("scout_learner_actor_peers", "actor runs heard from within peer_timeout_s")
        self.m_staleness = m.histogram("scout_learner_group_staleness", "learner version minus the group's oldest "
                                       "token version, at training time", buckets=STALENESS_BUCKETS)
        self.m_busy = m.counter("scout_learner_ingest_seconds_total", "ingest thread time decoding, checking and "
                                "answering messages")
        self.m_deferred = m.gauge("scout_learner_deferred_refusals", "'buffer full' answers waiting out "
                                  "learner.buffer_full_delay_s")
        self._m_results: dict[str, object] = {}  # result -> its labelled child (labels() costs ~10 us)
        self._dumped = 0  # groups written to learner.dump_groups_dir
        self.counts = collections.Counter()  # plain numbers for metrics.jsonl
        self._busy_s = 0.0  # ingest thread seconds spent on messages (learner/main.py logs it per step)

    def _m_result(self, result: str):
        if result not in self._m_results:
            self._m_results[result] = self.m_groups.labels(result=result)
        return self._m_results[result]

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> "IngestServer":
        ready = threading.Event()
        errors: list[BaseException] = []

        def run():
            try:
                sock = bind(self._ctx, zmq.ROUTER, self.lc.ingest_endpoint, self.cfg.transport)
            except BaseException as e:  # reported to start()
                errors.append(e)
                ready.set()
                return
            self.endpoint = bound_endpoint(sock)
            ready.set()
            try:
                self._serve(sock)
            finally:
                sock.close(0)

        self._thread = threading.Thread(target=run, name="learner-ingest", daemon=True)
        self._thread.start()
        ready.wait(30)
        if errors:
            raise errors[0]
        log.info("ingest listening on %s (credits %d, learner run %s)", self.endpoint, self.cap, self.run_id)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        with self._cond:
            self._cond.notify_all()

    def _serve(self, sock: zmq.Socket) -> None:
        last_sweep = time.monotonic()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        ready = False  # a message was there last time: try the next one before polling
        try:
            while not self._stop.is_set():
                try:
                    if not ready:
                        poller.poll(self._poll_ms())
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        ready = True
                    except zmq.Again:
                        ready = False
                    if ready:
                        t0 = time.perf_counter()
                        self._reply(sock, frames)
                        dt = time.perf_counter() - t0
                        self._busy_s += dt
                        self.m_busy.inc(dt)
                    if self._deferred:
                        self._flush_deferred(sock, time.monotonic())
                    if time.monotonic() - last_sweep > 1.0:
                        last_sweep = time.monotonic()
                        self._sweep_dead_peers()
                except Exception:  # the ingest thread must outlive any single bad moment
                    log.exception("ingest loop error (still serving)")
                    time.sleep(0.1)
        finally:
            self._flush_deferred(sock, float("inf"))  # stopping: every group sent still gets its answer

    def _poll_ms(self) -> int:
        """Wait at most 100 ms, and no longer than the first held-back answer is due."""
        if not self._deferred:
            return 100
        return max(0, min(100, int((self._deferred[0][0] - time.monotonic()) * 1000) + 1))

    def _flush_deferred(self, sock: zmq.Socket, now: float) -> None:
        """Send the held-back "buffer full" answers that are due."""
        while self._deferred and self._deferred[0][0] <= now:
            send_reply(sock, self._deferred.popleft()[1], "GroupAck")
        self.m_deferred.set(len(self._deferred))

    def _reply(self, sock: zmq.Socket, frames: list) -> None:
        env, reply = self._handle(frames)
        if env is None:
            return
        try:
            out = encode(reply)
        except ProtocolError as e:  # e.g. an assignment too large for one header
            log.error("cannot encode %s: %s", reply.TYPE, e)
            out = error_frames("internal", f"reply could not be encoded: {e}")
        delay = self.lc.buffer_full_delay_s
        # one entry per refused sender in flight; the bound only guards against a sender that
        # does not wait for its answers (it then gets them at once)
        if delay > 0 and isinstance(reply, GroupAck) and reply.reason == BUFFER_FULL and len(self._deferred) < 65536:
            self._deferred.append((time.monotonic() + delay, [*env, *out]))
            self.m_deferred.set(len(self._deferred))
            return
        send_reply(sock, [*env, *out], reply.TYPE)

    # ----------------------------------------------------------------- messages
    def _handle(self, frames: list) -> tuple[list | None, Message | None]:
        """One request → (envelope, reply). Never raises: bad input gets an ErrorReply."""
        if not frames:
            return None, None
        env, body = frames[:1], frames[1:]
        try:
            msg = decode(body)
        except ProtocolError as e:
            self.m_bad.inc()
            self.metrics.reject("ingest", e.reason)
            return env, ErrorReply(code="bad_request", message=str(e)[:MAX_STR])
        try:
            with self._cond:
                if isinstance(msg, Hello):
                    return env, self._on_hello(msg)
                if isinstance(msg, WorkRequest):
                    return env, self._on_work(msg)
                if isinstance(msg, TrajectoryGroup):
                    return env, self._on_group(msg)
                if isinstance(msg, Heartbeat):
                    self._touch(msg.peer_id, msg.run_id, msg.version)
                    return env, Heartbeat(peer_id="learner", run_id=self.run_id, seq=msg.seq,
                                          version=self.version, time=time.time())
        except _Refuse as e:
            self.m_bad.inc()
            self.metrics.reject("ingest", "refused")
            return env, ErrorReply(code="bad_request", message=str(e)[:MAX_STR])
        except Exception as e:  # a bug in one request must not take the learner down
            log.exception("ingest failed on %s", msg.TYPE)
            return env, ErrorReply(code="internal", message=f"{type(e).__name__}: {e}")
        self.m_bad.inc()
        self.metrics.reject("ingest", "unexpected_type")
        return env, ErrorReply(code="bad_request", message=f"the learner's ingest endpoint does not take {msg.TYPE!r}")

    def _touch(self, peer_id: str, run_id: str, version: int | None, info: str = "") -> _Peer:
        """Record that (peer, run) is alive; a new run_id for a known peer releases the old run's prompts.
        A run that a newer one replaced is refused (its worker has moved on and resends what matters)."""
        if run_id in self.superseded.get(peer_id, ()):
            raise _Refuse(f"run {run_id} of actor {peer_id} was replaced by a newer run")
        peer = self.peers.get(peer_id)
        if peer is not None and peer.run_id != run_id:
            self.superseded.setdefault(peer_id, collections.deque(maxlen=64)).append(peer.run_id)
            n = self.dispatcher.release_run((peer_id, peer.run_id))
            self.m_requeued.inc(n)
            log.info("actor %s restarted (run %s -> %s): %d prompts re-queued", peer_id, peer.run_id, run_id, n)
            peer = None
        if peer is None:
            peer = self.peers[peer_id] = _Peer(run_id, -1 if version is None else version, info)
        peer.last_seen = time.monotonic()
        if version is not None:
            peer.version = version
        return peer

    def _on_hello(self, msg: Hello) -> HelloAck:
        if msg.role != "actor":
            raise _Refuse(f"only actors talk to the ingest endpoint, not {msg.role!r}")
        self._touch(msg.peer_id, msg.run_id, msg.version, f"{msg.host}:{msg.pid} worker {msg.worker} gpu {msg.gpu}")
        log.info("actor %s run %s said hello (version %d)", msg.peer_id, msg.run_id, msg.version)
        return HelloAck(learner_run_id=self.run_id, version=self.version, n_samples=self.lc.n_samples,
                        max_staleness=self.lc.max_staleness, sync_endpoint=self.sync_endpoint)

    def min_version(self) -> int:
        return max(0, self.version - self.lc.max_staleness)

    def outstanding(self) -> int:
        return self.dispatcher.in_flight() + len(self.buffer) + len(self.in_training)

    def _on_work(self, msg: WorkRequest) -> WorkAssignment:
        self._touch(msg.peer_id, msg.run_id, msg.version)
        if self.ended:
            self.told_ended.add(msg.peer_id)
            return WorkAssignment(prompts=[], version=self.version, min_version=self.min_version(),
                                  n_samples=self.lc.n_samples, retry_after_s=self.lc.retry_after_s, ended=True)
        free = self.cap - self.outstanding()
        # behind: its groups would be dropped; ahead: it holds weights of a version this learner never
        # made (the learner resumed from an older checkpoint). Either way: no prompts until a sync.
        behind = 0 <= msg.version < self.min_version() or msg.version > self.version
        k = 0 if behind else max(0, min(msg.max_prompts, free))
        ids = self.dispatcher.take((msg.peer_id, msg.run_id), k) if k else []
        self.m_assigned.inc(len(ids))
        self.m_inflight.set(self.dispatcher.in_flight())
        return WorkAssignment(prompts=[self.dispatcher.prompt(i) for i in ids], version=self.version,
                              min_version=self.min_version(), n_samples=self.lc.n_samples,
                              retry_after_s=0.0 if ids else self.lc.retry_after_s)

    def _check_group(self, g: TrajectoryGroup) -> str:
        """Why this group cannot be trained on ('' if it can)."""
        if self.ended:
            return "the learner's run has ended"
        if g.n != self.lc.n_samples:
            return f"group has {g.n} samples, the learner trains on groups of {self.lc.n_samples}"
        if not self.dispatcher.knows(g.prompt_id):
            return f"prompt_id {g.prompt_id} is not in the learner's data ({len(self.dispatcher.rows)} rows)"
        if g.tokens.size and int(g.tokens.max()) >= self.vocab_size:
            return f"token id {int(g.tokens.max())} outside the model's vocabulary of {self.vocab_size}"
        longest = max(g.lengths.tolist())
        if longest > self.lc.micro_batch_tokens:
            return f"a sample has {longest} tokens, more than learner.micro_batch_tokens"
        if g.version_span[0] < 0:  # generated tokens all carry a version >= 0 (decode checks it)
            return "no generated tokens in the group"
        if all(g.retrieval_failed):
            return "retrieval failed in every sample: nothing to learn from (the prompt is handed out again)"
        newest = g.version_span[1]
        if newest > self.version:
            return (f"tokens of policy version {newest}, newer than the learner's {self.version} (it resumed from an "
                    "older checkpoint): load the learner's current weights first")
        return ""

    def _on_group(self, g: TrajectoryGroup) -> GroupAck:
        self._touch(g.peer_id, g.run_id, None)
        if g.group_id in self.seen_groups:  # a retry of a group already accepted
            self._m_result("duplicate").inc()
            return GroupAck(group_id=g.group_id, accepted=True, reason="duplicate", version=self.version)
        problem = self._check_group(g)
        known = self.dispatcher.knows(g.prompt_id)
        result, reason = "accepted", problem
        if problem:
            result = "rejected"
            self.metrics.reject("ingest", "refused_group")
        elif g.oldest_version() < self.min_version():
            result, reason = "stale", (f"oldest token version {g.oldest_version()} is older than "
                                       f"{self.min_version()} (version {self.version}, max_staleness {self.lc.max_staleness})")
            self.m_dropped.inc()
        elif len(self.buffer) >= self.lc.buffer_groups:
            result, reason = "buffer_full", BUFFER_FULL  # its own label: back-pressure, not bad input
        held = self.dispatcher.returned((g.peer_id, g.run_id), g.prompt_id, result == "accepted") if known else False
        if result != "accepted" and held:
            self.dispatcher.give_back([g.prompt_id])
            self.m_requeued.inc()
        self.counts[result] += 1
        self._m_result(result).inc()
        if result == "accepted":
            self.buffer.append(g)
            self.seen_groups[g.group_id] = None
            while len(self.seen_groups) > 65536:
                self.seen_groups.popitem(last=False)
            self.m_buffer.set(len(self.buffer))
            if 0 < self._wanted <= len(self.buffer):  # wake the trainer once, when its k are here
                self._cond.notify_all()
            if self.lc.dump_groups_dir:
                self._dumped += 1
                dump_group(self.lc.dump_groups_dir, self._dumped, g, self.version)
        elif result == "rejected":
            log.warning("group %s from %s rejected: %s", g.group_id, g.peer_id, reason)
        return GroupAck(group_id=g.group_id, accepted=result == "accepted", reason=reason, version=self.version)

    def _sweep_dead_peers(self) -> None:
        now = time.monotonic()
        with self._cond:
            for peer_id, peer in list(self.peers.items()):
                if now - peer.last_seen > self.lc.peer_timeout_s:
                    n = self.dispatcher.release_run((peer_id, peer.run_id))
                    self.m_requeued.inc(n)
                    del self.peers[peer_id]
                    log.warning("actor %s (run %s) silent for %.0f s: %d prompts re-queued",
                                peer_id, peer.run_id, now - peer.last_seen, n)
            self.m_peers.set(len(self.peers))
            self.m_inflight.set(self.dispatcher.in_flight())
            self.m_requeue.set(len(self.dispatcher.requeue))
            self.m_training.set(len(self.in_training))

    def end_run(self, grace_s: float) -> int:
        """The learner finished: answer every work request `ended` and wait, at most `grace_s`,
        until each actor heard from within peer_timeout_s has been told. Returns how many live
        actors were never told (they stopped asking, or the grace ran out). An actor told under
        one run that comes back under a new one (`--stay`: it waits for the next learner run,
        saying hello) knows: it is not waited for."""
        with self._cond:
            self.ended = True
        deadline = time.monotonic() + grace_s
        while True:
            with self._cond:
                untold = [p for p, peer in self.peers.items()
                          if p not in self.told_ended and time.monotonic() - peer.last_seen <= self.lc.peer_timeout_s]
            if not untold or time.monotonic() >= deadline or self._stop.is_set():
                return len(untold)
            time.sleep(0.1)

    # ----------------------------------------------------------------- trainer side
    def take_groups(self, k: int, timeout: float) -> list[TrajectoryGroup] | None:
        """k whole groups, oldest first, or None if they are not there within `timeout`.
        Groups that went stale while buffered are dropped here (counted, prompts re-queued)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                self._drop_stale_buffered()
                if len(self.buffer) >= k:
                    break
                left = deadline - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    self._wanted = 0
                    return None
                self._wanted = k
                self._cond.wait(min(left, 0.5))
            self._wanted = 0
            groups = [self.buffer.popleft() for _ in range(k)]
            self.in_training.extend(g.prompt_id for g in groups)
            for g in groups:
                self.m_staleness.observe(max(0, self.version - g.oldest_version()))
            self.m_buffer.set(len(self.buffer))
            return groups

    def _drop_stale_buffered(self) -> None:
        keep = collections.deque()
        for g in self.buffer:
            if g.oldest_version() < self.min_version():
                self.m_dropped.inc()
                self.counts["stale"] += 1
                self.dispatcher.give_back([g.prompt_id])
            else:
                keep.append(g)
        self.buffer = keep

    def release(self, version: int) -> None:
        """The step that used the taken groups is done (weights synced): free their credits."""
        with self._cond:
            self.in_training.clear()
            self.version = version
            self._cond.notify_all()

    def busy_seconds(self) -> float:
        """Seconds the ingest thread has spent on messages so far (decode, checks, reply)."""
        return self._busy_s

    def set_version(self, version: int) -> None:
        with self._cond:
            self.version = version

    def dispatcher_state(self) -> dict:
        """Checkpointable prompt order: cursor + every prompt not yet trained on."""
        with self._cond:
            pending = [*self.in_training, *(g.prompt_id for g in self.buffer)]
            return self.dispatcher.state_dict(pending)

    def snapshot(self) -> dict:
        with self._cond:
            return {"buffer": len(self.buffer), "in_flight": self.dispatcher.in_flight(),
                    "peers": len(self.peers), "version": self.version, **dict(self.counts)}


class _Refuse(Exception):
    """A well-formed request the learner will not serve (answered with ErrorReply)."""
