"""The learner's member table: who is in the weight sync, and the control socket they talk on.

    actor worker (SyncClient, DEALER)              Membership (learner.sync_endpoint, ROUTER)
    SyncJoin(peer_id, run_id, version, transports) ─▶ _on_join: members[peer_id], dirty
    SyncColocated(host, gpu_uuid)                  ─▶ _on_colocated: where (CUDA IPC candidate)
    SyncDone(version, ok, …)                       ─▶ _on_done: sync.ok / sync.failed
    WeightIpcAck(bucket, ok)                       ─▶ _on_ipc_ack: sync.ipc_acked / failed
    anything else                                  ─▶ ErrorReply(bad_request), counted as rejected
    ◀─ Heartbeat probes (probe): ROUTER_MANDATORY refuses a gone peer → drop
    ◀─ SyncAbort(rejoin=True) to whoever is dropped (no answer in time, lost, replaced)

Any change of membership marks the group dirty: group.py re-forms it at the next sync and bumps
the generation kept here (every SyncAbort names it). sender.py drives the calls; nothing here
blocks beyond the timeout it is given.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import zmq

from common.protocol import ErrorReply, Heartbeat
from common.transport import bind, bound_endpoint, split_envelope, term_context
from common.weightsync.errors import SyncError
from common.weightsync.messages import SyncAbort, SyncColocated, SyncDone, SyncJoin, WeightIpcAck
from common.wire import Message, ProtocolError, decode, encode

log = logging.getLogger("scout.weightsync")

PROBE_INTERVAL_S = 0.2


@dataclasses.dataclass
class Member:
    peer_id: str
    run_id: str
    identity: bytes
    transports: tuple[str, ...]
    version: int
    transport: str = ""  # assigned at the last plan: gloo / nccl / zmq / cuda_ipc
    rank: int = 0
    where: tuple[str, str] | None = None  # (host, GPU UUID) from SyncColocated
    ipc_ok: bool = True  # False once the colocated path failed for it: broadcast from then on


@dataclasses.dataclass
class SyncState:
    version: int
    expect: dict[str, str]  # peer_id -> run_id of everyone this sync is for
    ok: set[str] = dataclasses.field(default_factory=set)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)
    dropped: dict[str, str] = dataclasses.field(default_factory=dict)
    # drops since the last sync, reported with this one; not this sync's business (a member that
    # restarted under the same peer id is dropped as its old run and expected as its new one)
    earlier: dict[str, str] = dataclasses.field(default_factory=dict)
    ipc_acked: dict[str, int] = dataclasses.field(default_factory=dict)  # peer -> last bucket released

    def unresolved(self) -> list[str]:
        return [p for p in self.expect if p not in self.ok and p not in self.failed and p not in self.dropped]


class Membership:
    """The member table and the ROUTER socket of the sync endpoint (the WeightSender's lock
    guards every call)."""

    def __init__(self, transport_cfg, run_id: str, reject: Callable[[str], None], dropped_counter: Any = None):
        self.tcfg = transport_cfg
        self.run_id = run_id  # the learner's, in its Heartbeat probes
        self.reject = reject  # bad input on the socket, by reason (metrics)
        self.dropped_counter = dropped_counter
        self.members: dict[str, Member] = {}
        self.generation = 0  # the group incarnation of the last plans (group.py bumps it)
        self.dirty = True  # re-form the group at the next sync
        self.changes = 0  # membership events seen; a re-formation that saw one after its plans stays dirty
        self.sync: SyncState | None = None  # the sync in progress
        self.between_drops: dict[str, str] = {}  # drops outside a sync, reported with the next one
        self.probe_seq = 0
        self.ctx = self.sock = None

    def open(self, endpoint: str) -> str:
        """Bind the sync endpoint; returns the bound address."""
        self.ctx = zmq.Context()
        self.sock = bind(self.ctx, zmq.ROUTER, endpoint, self.tcfg)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        return bound_endpoint(self.sock)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None
        if self.ctx is not None:
            term_context(self.ctx)
            self.ctx = None

    def mark_dirty(self) -> None:
        self.dirty = True
        self.changes += 1

    def begin_sync(self, version: int) -> SyncState:
        """The state of a new sync; the drops since the last one are reported with it."""
        self.sync = SyncState(version, {})
        self.sync.earlier.update(self.between_drops)
        self.between_drops = {}
        return self.sync

    def send(self, member: Member, msg: Message, deadline: float | None = None) -> bool:
        """Send to one member; False when its connection is gone or it stays full past the deadline."""
        frames = encode(msg)
        end = deadline if deadline is not None else time.monotonic() + self.tcfg.send_timeout_ms / 1000
        while True:
            try:
                self.sock.send_multipart([member.identity, *frames], flags=zmq.NOBLOCK, copy=False)
                return True
            except zmq.Again:
                if time.monotonic() >= end:
                    return False
                time.sleep(0.001)
            except zmq.ZMQError as e:
                if e.errno == zmq.EHOSTUNREACH:
                    return False
                raise

    def reply_raw(self, envelope: list, msg: Message) -> None:
        try:
            self.sock.send_multipart([*envelope, *encode(msg)], flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the asker is gone or full: nothing else to do

    def drain(self, timeout_ms: int = 0, budget: int = 1000) -> None:
        """Handle the messages waiting on the socket (joins, dones, garbage): at most `budget` per
        call, so a flood of messages cannot keep the caller (the training loop) in here."""
        if self.sock is None:
            raise SyncError("WeightSender.start() was not called")
        for i in range(budget):
            if not self.sock.poll(timeout_ms if i == 0 else 0, zmq.POLLIN):
                return
            frames = self.sock.recv_multipart(copy=False)
            try:
                envelope, body = split_envelope(frames)
                msg = decode(body, expect=(SyncJoin, SyncDone, SyncColocated, WeightIpcAck))
            except ProtocolError as e:
                self.reject(e.reason)
                if len(frames) >= 2:
                    self.reply_raw(frames[:1], ErrorReply(code="bad_request", message=str(e)[:4096]))
                continue
            identity = bytes(envelope[0].bytes if hasattr(envelope[0], "bytes") else envelope[0])
            if isinstance(msg, SyncJoin):
                self._on_join(identity, msg)
            elif isinstance(msg, SyncDone):
                self._on_done(identity, msg)
            elif isinstance(msg, SyncColocated):
                self._on_colocated(msg)
            else:
                self._on_ipc_ack(msg)

    def _on_join(self, identity: bytes, msg: SyncJoin) -> None:
        old = self.members.get(msg.peer_id)
        self.mark_dirty()  # whoever joins gets a fresh plan at the next sync
        if old is not None and old.run_id == msg.run_id:
            # the same process asks again (it lost its receiver, or was told it had been dropped
            # and the news crossed): keep its record, which a sync in progress may be using
            old.identity, old.transports, old.version = identity, tuple(msg.transports), msg.version
            return
        if old is not None:
            log.info("weight sync: %s restarted (run %s -> %s)", msg.peer_id, old.run_id[:8], msg.run_id[:8])
            self._note_dropped(msg.peer_id, "restarted with a new run_id")
        self.members[msg.peer_id] = Member(msg.peer_id, msg.run_id, identity, tuple(msg.transports), msg.version)
        log.info("weight sync: %s joined (run %s, version %d, transports %s)", msg.peer_id, msg.run_id[:8],
                 msg.version, ",".join(msg.transports))

    def _on_done(self, identity: bytes, msg: SyncDone) -> None:
        m = self.members.get(msg.peer_id)
        if m is None or m.run_id != msg.run_id:
            # a dropped member is told to join again; an older incarnation of a member is not
            rejoin = m is None
            reason = ("not a member of the weight-sync group (dropped); send SyncJoin again" if rejoin
                      else f"run {msg.run_id[:8]} of {msg.peer_id} was replaced by run {m.run_id[:8]}")
            self.reply_raw([identity], SyncAbort(version=msg.version, generation=self.generation,
                                                 reason=reason, rejoin=rejoin))
            return
        m.identity = identity
        s = self.sync
        if s is None or msg.version != s.version or msg.peer_id not in s.expect:
            return  # a late answer for a sync that is over
        if msg.ok:
            s.ok.add(msg.peer_id)
            m.version = msg.version
        else:
            s.failed.setdefault(msg.peer_id, msg.message or "member reported failure")  # the first cause
            self.mark_dirty()  # its group may be broken: re-form next time
            self.ipc_failed(m)

    def _on_colocated(self, msg: SyncColocated) -> None:
        m = self.members.get(msg.peer_id)
        if m is None or m.run_id != msg.run_id:
            return  # it comes right after the member's SyncJoin; anything else is stale
        where = (msg.host, msg.gpu_uuid)
        if m.where != where:
            m.where, m.ipc_ok = where, True
            self.mark_dirty()

    def _on_ipc_ack(self, msg: WeightIpcAck) -> None:
        m, s = self.members.get(msg.peer_id), self.sync
        if m is None or m.run_id != msg.run_id or s is None or msg.version != s.version:
            return
        if msg.ok:
            s.ipc_acked[msg.peer_id] = max(s.ipc_acked.get(msg.peer_id, -1), msg.bucket)
            return
        s.failed.setdefault(msg.peer_id, f"colocated bucket {msg.bucket}: {msg.message or 'failed'}")
        self.ipc_failed(m)

    def ipc_failed(self, m: Member) -> None:
        if m.transport == "cuda_ipc" and m.ipc_ok:
            log.warning("weight sync: the colocated path failed for %s; it gets the broadcast from now on", m.peer_id)
            m.ipc_ok = False
            self.mark_dirty()

    def _note_dropped(self, peer_id: str, reason: str) -> None:
        if self.sync is not None:
            self.sync.dropped[peer_id] = reason
        else:
            self.between_drops[peer_id] = reason
        if self.dropped_counter is not None:
            self.dropped_counter.inc()

    def drop(self, peer_id: str, reason: str, tell: bool = True) -> None:
        m = self.members.pop(peer_id, None)
        if m is None:
            return
        self.mark_dirty()
        self._note_dropped(peer_id, reason)
        log.warning("weight sync: dropped %s: %s", peer_id, reason)
        if tell:
            self.reply_raw([m.identity], SyncAbort(version=self.sync.version if self.sync else 0,
                                                   generation=self.generation, reason=reason, rejoin=True))

    def probe(self, peer_ids: Iterable[str]) -> None:
        """Drop members whose connection is gone (ROUTER_MANDATORY refuses to route to them)."""
        self.probe_seq += 1
        hb = Heartbeat(peer_id="learner", run_id=self.run_id, seq=self.probe_seq, time=time.time())
        frames = encode(hb)
        for p in list(peer_ids):
            m = self.members.get(p)
            if m is None:
                continue
            try:
                self.sock.send_multipart([m.identity, *frames], flags=zmq.NOBLOCK)
            except zmq.Again:
                continue  # a full pipe is a busy peer, not a dead one
            except zmq.ZMQError as e:
                if e.errno == zmq.EHOSTUNREACH:
                    self.drop(p, "connection lost", tell=False)

    def collect(self, until: float) -> None:
        """Wait for SyncDone from every member; probe the silent ones; drop who is gone or late."""
        probe_at = [time.monotonic() + PROBE_INTERVAL_S]
        while self.collect_some(until, probe_at):
            pass
        self.end_collect()

    def collect_some(self, until: float, probe_at: list[float], slice_ms: int = 20) -> bool:
        """One slice (at most `slice_ms`) of collect(): True while answers are still due before
        `until`. `probe_at` holds the time of the next probe of the silent members."""
        waiting = [p for p in self.sync.unresolved() if p in self.members]
        now = time.monotonic()
        if not waiting or now >= until:
            return False
        if now >= probe_at[0]:
            probe_at[0] = now + PROBE_INTERVAL_S
            self.probe(waiting)
        self.drain(int(min(slice_ms, max(1, (until - now) * 1000))))
        return True

    def end_collect(self) -> None:
        """The answers are in or their time is up: drop whoever has not answered."""
        s = self.sync
        for p in s.unresolved():
            if p in self.members:
                self.drop(p, "no SyncDone within the timeout")
            else:
                s.dropped.setdefault(p, "left during the sync")
