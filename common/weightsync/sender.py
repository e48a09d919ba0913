"""The learner's half of weight sync: WeightSender (learner rank 0) broadcasts each new version
to the actor workers that joined.

    learner rank 0 (WeightSender)                      actor worker (SyncClient + BucketReceiver)
    ROUTER  learner.sync_endpoint  <──── SyncJoin(peer_id, run_id, version, transports)  DEALER
      (membership.py: the member table and every message the members send)
    TCPStore (is_master, group.py) <───┐
                                       │
    broadcast(version, tensors):       │
     1 membership changed? group.py re-forms: generation += 1
       ── SyncPlan(generation, rank, world_size, store) ──▶  setup(plan):
       wait "ready/<rank>" keys  ◀─────┴──────────────────    set ready/<rank>, wait "go"
       set "go" (or "abort": re-plan without the absent) ─▶   ProcessGroupGloo(PrefixStore(
       ProcessGroupGloo(PrefixStore("scout/<gen>"), 0, N)        "scout/<gen>"), rank, N)
     2 per dtype-grouped bucket (buckets.py; learner.bucket_mb), packed while the previous one flows
       (op "chain": to rank 1 only, which relays to rank 2 and so on; collective.py):
       ── WeightUpdateHeader(bucket k of n, TensorMeta…) ─▶  receive(header):
       segments over the group (collective.py) ══════════▶     into one buffer; returns views
         (sync_chunk_mb > 0: big tensors straight           named with the HF names
          from their own memory)
       zmq members: the packed bucket rides as the header's data frame (zmq_path.py)
       colocated members: the bucket's CUDA IPC handle, released per bucket (cuda_ipc.py)
     3 ◀──────────────────────── SyncDone(version, ok, seconds)   after the last bucket is loaded
       no answer in time / dead (probe fails) → dropped; the group re-forms at the next sync
       (answers_later, learner.sync_answers "later": broadcast returns after step 2 and a thread
        collects these answers; settle() and the next broadcast wait for it. sends_later,
        learner.sync_sends "later": it returns before step 1, once it holds the tensors, and that
        thread runs steps 1-3)

Failure handling: every wait has a deadline. A sync's transfers end by `sync_timeout_s` after
it started, and answers are collected for a short grace after that, so `broadcast` returns
within about 1.25 × sync_timeout_s whatever the members do (with answers_later or sends_later,
that bound holds for the sender's thread, and a broadcast also waits for what is left of the
previous one's). A member whose socket is gone
(ROUTER_MANDATORY send fails), that does not arrive at the rendezvous, or that does not answer
in time is dropped and told so (SyncAbort rejoin=True; a SyncClient then joins again by
itself). When a collective fails the learner sets "abort" in the generation's store prefix
(members blocked in the collective see it) and sends SyncAbort to the others.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable

import torch

from common.transport import check_host_bind
from common.weightsync.buckets import Bucket, pack_bucket, plan_buckets
from common.weightsync.collective import post_segments, wait_segments
from common.weightsync.cuda_ipc import IpcSender, gpu_location
from common.weightsync.errors import SyncError
from common.weightsync.group import SyncGroup
from common.weightsync.membership import PROBE_INTERVAL_S, Member, Membership
from common.weightsync.messages import WeightUpdateHeader
from common.weightsync.zmq_path import send_data
from common.wire import MAX_ARRAY_BYTES

log = logging.getLogger("scout.weightsync")


class WeightSender:
    """Learner rank 0: keeps the membership and broadcasts versions (public methods take a lock;
    members() from another thread waits while a broadcast runs). Its parts: `membership`
    (membership.py), `group` (group.py), `ipc` (cuda_ipc.IpcSender)."""

    def __init__(self, learner_cfg, transport_cfg, metrics=None):
        self.cfg = learner_cfg
        self.tcfg = transport_cfg
        self.timeout_s = float(learner_cfg.sync_timeout_s)
        self.grace_s = min(5.0, 0.25 * self.timeout_s)
        # a bucket is also one zmq data frame: keep it under the protocol's array cap
        self.bucket_bytes = max(1, min(int(learner_cfg.bucket_mb * (1 << 20)), MAX_ARRAY_BYTES))
        self.chunk_bytes = int(getattr(learner_cfg, "sync_chunk_mb", 0.0) * (1 << 20))
        self.gloo_op = getattr(learner_cfg, "sync_gloo_op", "chain")  # read at each group formation
        # ramp (plan_buckets first_bytes): off. Measured on the loaded 2-core VM it lost wall time
        # (more buckets, more wake-ups per sync); bench/weightsync_bench.py --variants ramp tries it
        self.first_bucket_bytes: int | None = None
        self.run_id = uuid.uuid4().hex
        self.endpoint: str | None = None
        self.store_host: str | None = None
        self.store_port: int | None = None
        self._cpu_bufs: list[torch.Tensor] = []
        self._lock = threading.RLock()  # public methods may be called from several threads
        # "later": broadcast() returns once the learner's sends are done, and a thread collects the
        # members' SyncDone answers (settle() waits for it; the next broadcast does so first)
        self.answers_later = False
        # "later" sends (learner.sync_sends; with answers_later, CPU tensors only): broadcast() returns
        # once it holds the tensors, and the same thread also sends them
        self.sends_later = False
        self._collector: threading.Thread | None = None
        self._metrics(metrics)
        self.membership = Membership(transport_cfg, self.run_id, self._reject,
                                     self._m["dropped"] if self._m else None)
        self.group = SyncGroup(learner_cfg, self.membership, self.timeout_s)
        self.ipc = IpcSender(self.membership)

    def _metrics(self, m) -> None:
        self._m = None
        reject = getattr(m, "reject", None)  # bad input on the sync control socket, by reason
        self._reject = (lambda reason: reject("sync", reason)) if reject else (lambda reason: None)
        if m is None:
            return
        r = m.role
        self._m = {
            "seconds": m.histogram(f"scout_{r}_weight_sync_seconds", "time one weight sync held the learner "
                                   "(learner.sync_answers 'later': until its own sends were done; sync_sends "
                                   "'later': until the sender held the weights)"),
            "done": m.histogram(f"scout_{r}_weight_sync_done_seconds", "one weight sync from its start until every "
                                "member answered or its time was up (the whole sync, whatever held the learner)"),
            "bytes": m.counter(f"scout_{r}_weight_sync_bytes_total", "weight bytes broadcast (payload, once per sync)"),
            "members": m.gauge(f"scout_{r}_weight_sync_members", "actor workers in the weight-sync group"),
            "dropped": m.counter(f"scout_{r}_weight_sync_dropped_total", "members dropped (dead, slow or failed)"),
            "generation": m.gauge(f"scout_{r}_weight_sync_generation", "weight-sync group incarnation"),
        }

    @property
    def generation(self) -> int:
        """The group incarnation (bumped at every re-formation)."""
        return self.membership.generation

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        check_host_bind(self.cfg.store_host, self.tcfg, "learner.store_host")
        self.endpoint = self.membership.open(self.cfg.sync_endpoint)
        try:
            self.group.start()
        except SyncError:
            self.membership.sock.close(0)
            raise
        self.store_host, self.store_port = self.group.store_host, self.group.store_port
        log.info("weight sync: endpoint %s, store %s:%d, bucket %.3g MiB, segments %.3g MiB, timeout %.1fs, "
                 "colocated CUDA IPC %s", self.endpoint, self.store_host, self.store_port, self.bucket_bytes / 2**20,
                 self.chunk_bytes / 2**20, self.timeout_s, "on" if self.group.colocated_ipc else "off")

    def close(self) -> None:
        self.settle()
        with self._lock:
            self._close()

    def _close(self) -> None:
        self.group.close()
        self._cpu_bufs = []
        self.ipc.free()
        self.membership.close()
        self.group.store = None

    def members(self) -> list[str]:
        with self._lock:
            self.membership.drain()
            return sorted(self.membership.members)

    def member_runs(self) -> dict[str, str]:
        """peer id -> run id of every member (a restarted actor keeps its id, not its run)."""
        with self._lock:
            self.membership.drain()
            return {m.peer_id: m.run_id for m in self.membership.members.values()}

    def wait_members(self, n: int, timeout_s: float, ready: Callable[[Member], bool] | None = None) -> bool:
        """Wait until at least `n` members have joined (for tests and start-up); with `ready`, until
        `n` of them pass it (e.g. their SyncColocated, which follows SyncJoin, has arrived)."""
        end = time.monotonic() + timeout_s
        while True:
            with self._lock:
                self.membership.drain()
                if sum(ready is None or ready(m) for m in self.membership.members.values()) >= n:
                    return True
            if time.monotonic() >= end:
                return False
            with self._lock:
                self.membership.drain(50)

    # ------------------------------------------------------------------ one sync
    def broadcast(self, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict:
        """Send `version` to every member. The iterable is consumed exactly once, even without
        members (it may drive collectives on the other training ranks), and all of it is held
        while the sync runs. Returns {version, generation, backend, members, ok, failed, dropped,
        reasons, bytes, buckets, seconds, transfer_seconds, answers_seconds, pending, error}.

        With `answers_later`, it returns once the learner's own sends are done (`seconds`: what
        the caller was held), with the members still to answer in `pending`; a thread collects
        their answers within the same deadline and then completes this same dict (`pending`
        empty, `answers_seconds` set). With `sends_later` as well (CPU tensors, members present),
        it returns once it holds the tensors, and that thread also runs the sends: the caller
        must leave the tensors unchanged until settle(). settle() waits for the thread; the next
        broadcast does so first."""
        self.settle()
        with self._lock:
            t0 = time.monotonic()
            tensors = [(n, t) for n, t in named_tensors]
            buckets = plan_buckets(tensors, self.bucket_bytes, self.first_bucket_bytes)
            if not buckets:
                raise SyncError("broadcast needs at least one tensor")
            self.membership.drain()
            if self.sends_later and self.answers_later and self.membership.members \
                    and tensors[0][1].device.type == "cpu":
                report = self._handed_over(version, buckets, time.monotonic() - t0)
                self._start_thread(f"sync-v{version}", lambda: self._sync_behind(report, version, buckets, t0))
                return report
            report, until = self._sync(version, buckets, t0)
            if until is not None:
                sync = self.membership.sync
                self._start_thread(f"sync-answers-v{version}", lambda: self._collect(report, until, t0, sync))
            return report

    def settle(self, timeout: float | None = None) -> bool:
        """Wait until the last sync's answers are in (see broadcast); False if `timeout` ran out.
        The collector ends by the sync's deadline plus its grace, whatever the members do."""
        c = self._collector
        if c is not None:
            c.join(timeout)
            if c.is_alive():
                return False
            self._collector = None
        return True

    def _sync(self, version: int, buckets: list[Bucket], t0: float,
              seconds: float | None = None) -> tuple[dict, float | None]:
        """Steps 1 and 2 of the diagram, and the answers unless they come later. Returns (report,
        until): `until` is None when the report is final, else the answers' deadline (the sync
        stays open; _collect completes the report and closes it). `seconds`: what the caller was
        held, when it was not held by this (sends_later)."""
        deadline = t0 + self.timeout_s
        ms, group = self.membership, self.group
        sync = ms.begin_sync(version)
        backend, error, t_transfer, until = "", None, 0.0, None
        try:
            if ms.members:
                backend = group.choose_backend(buckets[0].items[0][1].device)
                where = gpu_location(buckets[0].items[0][1].device) if group.colocated_ipc else None
                if where != group.ipc_where:
                    group.ipc_where, ms.dirty = where, True
                if group.stale(backend, self.gloo_op):
                    group.reform(version, backend, self.gloo_op, deadline)
                live = [m for m in group.planned if ms.members.get(m.peer_id) is m]
                sync.expect = {m.peer_id: m.run_id for m in live}
                t1 = time.monotonic()
                error = self._transfer(version, buckets, backend, live, deadline)
                t_transfer = time.monotonic() - t1
                # answers get grace_s after the transfer, but never past deadline + grace_s: a transfer
                # that ran into the deadline (a frozen member) must not add its overshoot to the bound
                grace_until = max(deadline, min(time.monotonic(), deadline) + self.grace_s)
                if self.answers_later and error is None and sync.unresolved():
                    held = time.monotonic() - t0 if seconds is None else seconds
                    report = self._report(buckets, backend, error, held, t_transfer, final=False)
                    until = grace_until
                    return report, until
                ms.collect(grace_until)
                group.end_sync()  # op "chain": free who still waits behind a failed member
            held = time.monotonic() - t0 if seconds is None else seconds
            return self._report(buckets, backend, error, held, t_transfer, answers=time.monotonic() - t0), None
        finally:
            if until is None:
                ms.sync = None

    def _handed_over(self, version: int, buckets: list[Bucket], seconds: float) -> dict:
        """The report broadcast returns with sends_later: every member still to be sent to."""
        members = sorted(self.membership.members)
        return {"version": version, "generation": self.generation, "backend": "", "members": members,
                "bytes": sum(b.nbytes for b in buckets), "buckets": len(buckets), "seconds": seconds,
                "transfer_seconds": 0.0, "error": None, "ok": [], "failed": [], "dropped": [], "reasons": {},
                "pending": members}

    def _sync_behind(self, report: dict, version: int, buckets: list[Bucket], t0: float) -> None:
        """sends_later: the whole sync in the sender's thread; completes `report` in place."""
        try:
            with self._lock:
                done, until = self._sync(version, buckets, t0, seconds=report["seconds"])
                sync = self.membership.sync
            if until is not None:
                self._collect(done, until, t0, sync)
            report.update(done)
        except Exception as e:  # a failed sync never stops training, nor the next sync
            log.exception("weight sync v%d failed in the sender's thread", version)
            report.update(error=report.get("error") or f"the sync failed in the sender's thread: {e}", pending=[])

    def _start_thread(self, name: str, run) -> None:
        self._collector = threading.Thread(target=run, name=name, daemon=True)
        self._collector.start()

    def _collect(self, report: dict, until: float, t0: float, sync) -> None:
        """The answers of the open sync `sync`, taking the lock one slice at a time (so members()
        and friends wait at most a slice); then completes `report` in place and closes the sync."""
        ms = self.membership
        probe_at = [time.monotonic() + PROBE_INTERVAL_S]
        try:
            while True:
                with self._lock:
                    if not ms.collect_some(until, probe_at):
                        ms.end_collect()
                        self.group.end_sync()
                        report.update(self._final(report, sync, time.monotonic() - t0))
                        return
                time.sleep(0.001)  # let a waiting caller have the lock
        except Exception as e:  # never leave the sync open: the next one must be able to start
            log.exception("weight sync v%d: collecting the answers failed", sync.version)
            report.update(error=report.get("error") or f"collecting the answers failed: {e}", pending=[])
        finally:
            with self._lock:
                if ms.sync is sync:
                    ms.sync = None

    def _report(self, buckets: list[Bucket], backend: str, error: str | None, seconds: float,
                t_transfer: float, final: bool = True, answers: float | None = None) -> dict:
        """The sync's report; final=False: the answers are still to come (see _collect).
        `answers`: the time until they were in (default `seconds`)."""
        s = self.membership.sync
        nbytes = sum(b.nbytes for b in buckets)
        report = {
            "version": s.version, "generation": self.generation, "backend": backend, "members": sorted(s.expect),
            "bytes": nbytes, "buckets": len(buckets), "seconds": seconds, "transfer_seconds": t_transfer,
            "error": error,
        }
        if self._m:
            self._m["seconds"].observe(seconds)
            self._m["bytes"].inc(nbytes)
        return {**report, **(self._final(report, s, seconds if answers is None else answers) if final
                             else self._outcome(s))}

    def _outcome(self, s) -> dict:
        dropped = {**s.earlier, **s.dropped}
        return {"ok": sorted(s.ok), "failed": sorted(s.failed), "dropped": sorted(dropped),
                "reasons": {**s.failed, **dropped}, "pending": sorted(s.unresolved())}

    def _final(self, report: dict, s, answers_seconds: float) -> dict:
        """The outcome once every answer is in (or its time is up): metrics and the log line."""
        out = {**self._outcome(s), "answers_seconds": answers_seconds}
        if self._m:
            self._m["done"].observe(answers_seconds)
            self._m["members"].set(len(self.membership.members))
            self._m["generation"].set(self.generation)
        error = report["error"]
        level = logging.INFO if not (s.failed or out["dropped"] or error) else logging.WARNING
        held = "" if answers_seconds == report["seconds"] else f", the learner held {report['seconds']:.3f}s"
        log.log(level, "weight sync v%d: %d/%d ok, %.1f MB in %.3fs (%s%s), dropped %s, failed %s%s", s.version,
                len(s.ok), len(s.expect), report["bytes"] / 1e6, answers_seconds, report["backend"] or "no members",
                held, out["dropped"], out["failed"], f", error: {error}" if error else "")
        return out

    # ------------------------------------------------------------------ the transfer loop
    def _transfer(self, version: int, buckets: list[Bucket], backend: str, live: list[Member],
                  deadline: float) -> str | None:
        """Per bucket: the header to every member, then the bytes over the group in segments
        (see bucket_segments), each sent (SyncPlan.op) as soon as it is ready; bucket k+1 is prepared in
        the other buffer while bucket k may still be in flight. Colocated members get the packed
        bucket's IPC handle instead, and its buffer is packed again only once they released it.
        Returns the group's error."""
        ms = self.membership
        group = [m for m in live if m.transport in ("gloo", "nccl")] if self.group.pg is not None else []
        zmq_m = [m for m in live if m.transport == "zmq"]
        ipc_m = [m for m in live if m.transport == "cuda_ipc"]
        dev = buckets[0].items[0][1].device if backend == "nccl" else torch.device("cpu")
        size, nbuf = max(b.nbytes for b in buckets), min(2, len(buckets))
        reuse = not zmq_m and not ipc_m  # zmq sends are zero-copy: their buffers must stay untouched
        bufs = self._buffers(size, nbuf, dev) if reuse else []
        ipc_bufs = self.ipc.buffers(size, nbuf, buckets[0].items[0][1].device) if ipc_m else []
        inflight: list[list] = [[], []]
        error = None
        for k, b in enumerate(buckets):
            if group and inflight[k % 2]:
                error = self._finish(inflight[k % 2], deadline, group)
                group = group if error is None else []
            inflight[k % 2] = []
            zmq_m = [m for m in zmq_m if ms.members.get(m.peer_id) is m]
            ipc_m = self.ipc.await_release(ipc_m, k - nbuf, deadline) if ipc_m else []
            if not group and not zmq_m and not ipc_m:
                break  # nobody left to send to
            header = WeightUpdateHeader(version=version, generation=self.generation, bucket=k,
                                        num_buckets=len(buckets), dtype=b.dtype, nbytes=b.nbytes,
                                        tensors=b.metas(), chunk_bytes=self.chunk_bytes)
            if ipc_m:
                out = ipc_bufs[k % nbuf][:b.nbytes]
            else:
                out = bufs[k % 2][:b.nbytes] if reuse else torch.empty(b.nbytes, dtype=torch.uint8, device=dev)
            if zmq_m or ipc_m or not group:
                flat = pack_bucket(b, out=out)  # zmq and colocated members need the whole bucket packed
                self.ipc.send(header, flat, ipc_m, deadline)
                send_data(ms, header, flat.clone() if ipc_m and flat.device.type == "cpu" else flat, zmq_m, deadline)
                works = self._start_bucket(header, flat, group, deadline) if group else []
            else:
                works = self._start_bucket(header, out, group, deadline, bucket=b)
            if works is None:
                error, group = "a member's connection was lost", []
            else:
                inflight[k % 2] = works
        for works in inflight:
            if group and works:
                error = self._finish(works, deadline, group)
                group = group if error is None else []
        if ipc_bufs:
            self.ipc.after_sync()
        return error

    def _buffers(self, size: int, n: int, dev: torch.device) -> list[torch.Tensor]:
        """Pack buffers. On CPU they are kept between syncs (fresh pages cost a page fault each,
        which is a good part of a sync's time); CUDA's caching allocator already reuses memory."""
        if dev.type != "cpu":
            return [torch.empty(size, dtype=torch.uint8, device=dev) for _ in range(n)]
        keep = [b for b in self._cpu_bufs if b.numel() >= size][:n]
        while len(keep) < n:
            keep.append(torch.empty(size, dtype=torch.uint8))
        self._cpu_bufs = keep
        return keep

    def _start_bucket(self, header: WeightUpdateHeader, flat: torch.Tensor, group: list[Member],
                      deadline: float, bucket: Bucket | None = None) -> list | None:
        """Send the header to the group, then start the bucket's segments (collective.post_segments:
        with `bucket`, large tensors go straight from their own memory and small ones are packed
        into `flat` just before their segment; without, `flat` is already packed). None: a member
        is gone."""
        ms = self.membership
        for m in group:
            if ms.members.get(m.peer_id) is not m or not ms.send(m, header, deadline):
                ms.drop(m.peer_id, "header could not be delivered")
                self.group.abort_transfer("a member's connection was lost", group)
                return None
        return post_segments(self.group.pg, self.group.op, header, flat, [m.rank for m in group], bucket)

    def _finish(self, works: list, deadline: float, group: list[Member]) -> str | None:
        key = self.group.key
        try:
            wait_segments(works, self.group.op, deadline, poll=key is not None and key[1] == "nccl")
            return None
        except SyncError as e:
            self.group.abort_transfer(str(e), group)
            return str(e)
