"""Re-forming the learner's process group when the membership changed (learner rank 0).

    sender.py: group.stale(backend, op)? ─▶ reform(version, backend, op, deadline):
      close the old group; generation += 1 (up to 3 tries within the deadline)
      assign(): each member gets a transport: cuda_ipc (colocated, cuda_ipc.use_ipc), the
        group's backend (rank 1..N), zmq, or none (dropped: no common transport)
      ── SyncPlan(generation, transport, rank, world_size, store, op) ──▶ every member
      rendezvous(): wait "ready/<rank>" in PrefixStore("scout/<gen>") ◀── collective.join_group
        (probing the missing), then set "go", or "abort" and drop who did not arrive
      build(): collective.make_group(backend, prefix store, 0, N)
    abort_transfer(): set "abort" (members blocked in the collective see it), SyncAbort to the
      group, close the group; the next sync re-forms it
    end_sync() (after the answers were collected): op "chain" and a group member did not answer
      ok (a member up the chain died or froze) → abort_transfer, so that whoever still waits
      behind it gives up now rather than at its own deadline, and rejoins for the next sync

Rank 0 is the learner, members are ranks 1..N; the TCPStore (is_master) lives here.
"""

from __future__ import annotations

import logging
import threading
import time

import torch
import torch.distributed as dist

from common.transport import is_loopback
from common.weightsync.collective import dispose, join_all, make_group, timeout_td
from common.weightsync.cuda_ipc import use_ipc
from common.weightsync.errors import SyncError
from common.weightsync.membership import PROBE_INTERVAL_S, Member, Membership
from common.weightsync.messages import SyncAbort, SyncPlan

log = logging.getLogger("scout.weightsync")


class SyncGroup:
    """The learner's TCPStore and its current process group with the members, re-formed on demand."""

    def __init__(self, learner_cfg, membership: Membership, timeout_s: float):
        self.cfg = learner_cfg
        self.ms = membership
        self.timeout_s = timeout_s
        self.colocated_ipc = bool(getattr(learner_cfg, "colocated_ipc", False))
        self.ipc_where: tuple[str, str] | None = None  # set per sync from the weights' device
        self.store = None
        self.store_host: str | None = None
        self.store_port: int | None = None
        self.pg = None  # the formed process group
        self.key: tuple | None = None  # (generation, backend, members) of the formed group
        self.prefix = None  # the generation's PrefixStore ("go", "abort")
        self.op = "broadcast"  # the formed group's op (SyncPlan.op)
        self.planned: list[Member] = []  # everyone the last plans went to
        self.disposing: list[threading.Thread] = []

    def start(self) -> None:
        """The TCPStore the members' groups rendezvous on."""
        try:
            self.store = dist.TCPStore(self.cfg.store_host, self.cfg.store_port, is_master=True,
                                       wait_for_workers=False, timeout=timeout_td(self.timeout_s))
        except Exception as e:
            raise SyncError(f"cannot start the weight-sync TCPStore on {self.cfg.store_host}:{self.cfg.store_port}: {e}") from None
        self.store_port = int(self.store.port)
        self.store_host = self.cfg.store_advertise_host or self.cfg.store_host

    def close_group(self) -> None:
        if self.pg is not None:
            box, self.pg = [self.pg], None
            self.disposing = [t for t in self.disposing if t.is_alive()] + [dispose(box)]
        self.key = None
        self.prefix = None

    def close(self) -> None:
        """Close the group and let its teardown finish (bounded)."""
        self.close_group()
        join_all(self.disposing, min(5.0, self.timeout_s))

    # ------------------------------------------------------------------ forming
    def choose_backend(self, device: torch.device) -> str:
        if device.type == "cuda" and any("nccl" in m.transports for m in self.ms.members.values()):
            return "nccl"
        return "gloo"

    @staticmethod
    def op_for(backend: str, gloo_op: str) -> str:
        """SyncPlan.op: learner.sync_gloo_op on gloo; NCCL always broadcasts (its broadcast is
        already a pipelined ring, what "chain" builds on gloo)."""
        return gloo_op if backend == "gloo" and gloo_op in ("send", "chain") else "broadcast"

    def stale(self, backend: str, gloo_op: str) -> bool:
        """Re-form before this sync: membership changed, no group yet, or another backend or op."""
        return self.ms.dirty or self.key is None or self.key[1] != backend or self.op != self.op_for(backend, gloo_op)

    def assign(self, backend: str) -> tuple[list[Member], list[Member], list[Member]]:
        ms = self.ms
        group, zmq_only, ipc = [], [], []
        for m in ms.members.values():
            if use_ipc(self.colocated_ipc, self.ipc_where, m.where, m.ipc_ok):
                m.transport, m.rank = "cuda_ipc", 0
                ipc.append(m)
            elif backend in m.transports:
                m.transport, m.rank = backend, len(group) + 1
                group.append(m)
            elif "zmq" in m.transports:
                m.transport, m.rank = "zmq", 0
                zmq_only.append(m)
            else:
                m.transport = ""
        for m in [m for m in ms.members.values() if not m.transport]:
            reason = f"no common transport: the learner uses {backend} or zmq, the member offers {list(m.transports)}"
            ms.drop(m.peer_id, reason, tell=False)
            ms.reply_raw([m.identity], SyncAbort(version=ms.sync.version if ms.sync else 0,
                                                 generation=ms.generation, reason=reason))
        return group, zmq_only, ipc

    def reform(self, version: int, backend: str, gloo_op: str, deadline: float) -> None:
        """New generation: plan every member, rendezvous the group members, build the group."""
        ms = self.ms
        self.close_group()
        self.op = self.op_for(backend, gloo_op)
        for _attempt in range(3):
            ms.generation += 1
            group, zmq_only, ipc = self.assign(backend)
            world = len(group) + 1
            for m in group + zmq_only + ipc:
                # colocated members get a plan without a group: their buckets come on this channel
                in_group = m.transport in ("gloo", "nccl")
                plan = SyncPlan(version=version, generation=ms.generation,
                                transport=m.transport if in_group else "zmq", store_host=self.store_host,
                                store_port=self.store_port, rank=m.rank, world_size=world if in_group else 1,
                                timeout_s=self.timeout_s, op=self.op if in_group else "broadcast")
                if not ms.send(m, plan, deadline):
                    ms.drop(m.peer_id, "plan could not be delivered", tell=False)
            group = [m for m in group if ms.members.get(m.peer_id) is m]
            self.planned = group + [m for m in zmq_only + ipc if ms.members.get(m.peer_id) is m]
            if not group:  # zmq members only: nothing to rendezvous
                self.key = (ms.generation, backend, ())
                ms.dirty = False
                return
            seen = ms.changes  # a join handled during the rendezvous is not in this group
            missing = self.rendezvous(group, deadline)
            if not missing:
                if self.build(group, backend, deadline):
                    ms.dirty = ms.changes != seen  # ... so it re-forms the group next time
                return
            for p in missing:
                if p in ms.members:
                    ms.drop(p, "did not reach the group rendezvous in time")
            if time.monotonic() >= deadline:
                break
        ms.dirty = True  # no group this time; zmq members are still served

    def rendezvous(self, group: list[Member], deadline: float) -> list[str]:
        """Wait for every member's ready key; set go (all there) or abort. Returns the missing."""
        ms = self.ms
        store = dist.PrefixStore(f"scout/{ms.generation}", self.store)
        ready_by = min(deadline, time.monotonic() + 0.5 * max(0.0, deadline - time.monotonic()))
        keys = {m.peer_id: f"ready/{m.rank}" for m in group}
        next_probe = 0.0
        while True:
            missing = [p for p, k in keys.items() if p not in ms.members or not store.check([k])]
            if not missing or time.monotonic() >= ready_by:
                break
            if time.monotonic() >= next_probe:
                next_probe = time.monotonic() + PROBE_INTERVAL_S
                ms.probe(missing)
            ms.drain(5)
        store.set("go", b"go" if not missing else b"abort")
        self.prefix = store
        return missing

    def build(self, group: list[Member], backend: str, deadline: float) -> bool:
        ms = self.ms
        left = deadline - time.monotonic()
        try:
            if left <= 0:
                raise SyncError("no time left to build the group")
            pg = make_group(backend, self.prefix, 0, len(group) + 1, min(left, self.timeout_s),
                            is_loopback(self.cfg.store_host))
        except Exception as e:
            log.warning("weight sync: group generation %d failed to form: %s", ms.generation, e)
            self.prefix.set("abort", b"1")
            for m in group:
                if ms.sync is not None:
                    ms.sync.failed.setdefault(m.peer_id, f"group did not form: {e}")
            ms.mark_dirty()
            return False
        if hasattr(pg, "set_timeout"):  # built with what was left of this sync; later syncs get the full time
            pg.set_timeout(timeout_td(self.timeout_s))
        self.pg = pg
        self.key = (ms.generation, backend, tuple((m.peer_id, m.run_id) for m in group))
        log.info("weight sync: generation %d formed (%s, %d members)", ms.generation, backend, len(group))
        return True

    def end_sync(self) -> None:
        """Op "chain": the learner's sends only reach rank 1, so its own waits never see a member
        fail further down. Once the answers are in, free whoever still waits behind a member
        that failed or went silent (see abort_transfer); the next sync re-plans."""
        s = self.ms.sync
        if self.op != "chain" or self.pg is None or s is None:
            return
        group = [m for m in self.planned if m.transport == self.key[1] and m.peer_id in s.expect]
        if any(m.peer_id not in s.ok for m in group):
            self.abort_transfer("a member up the chain failed", group)

    # ------------------------------------------------------------------ a failed transfer
    def abort_transfer(self, reason: str, group: list[Member]) -> None:
        """Tell everyone in the group to give up this transfer; the group re-forms next sync."""
        ms = self.ms
        log.warning("weight sync: generation %d transfer failed: %s", ms.generation, reason)
        try:
            if self.prefix is not None:
                self.prefix.set("abort", b"1")
        except Exception:  # the store is ours; a failure here only slows the members down
            pass
        abort = SyncAbort(version=ms.sync.version, generation=ms.generation, reason=reason)
        for m in group:
            if ms.members.get(m.peer_id) is m and not ms.send(m, abort, time.monotonic() + 0.1):
                ms.drop(m.peer_id, "connection lost", tell=False)
        self.close_group()
        ms.mark_dirty()
