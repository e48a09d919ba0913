"""The gloo/NCCL transport: standalone process groups and the segments that travel over them.

    learner (rank 0)                                       member (rank 1..N)
    group.py sets "go" in PrefixStore("scout/<gen>") ─▶   join_group(plan): set ready/<rank>,
      make_group(backend, prefix store, 0, N)               wait "go", make_group(…, rank, N)
    post_segments(): per bucket_segments() range           receive_segments(): the same ranges,
      op "send": to every rank (segment_tag)  ═════════▶     recv from 0 (op "send"),
      op "broadcast": broadcast from root 0   ═════════▶     broadcast,
      op "chain": to rank 1 only              ═════════▶     or recv from rank-1 and forward:
    wait_segments(): wait_p2p / wait_work, deadline        wait_p2p / wait_work, deadline, and
                                                             the learner's "abort" key

The chain (SyncPlan.op "chain", gloo only; learner.sync_gloo_op) is a pipelined relay: the
learner sends each segment once, to rank 1, whatever the number of members; rank k receives
segment s from rank k-1 and, as soon as it has arrived, posts its send to rank k+1 (unless k is
the last rank) while segment s+1 is still arriving:

    learner 0 ══s0,s1,s2…══▶ rank 1 ══s0,s1…══▶ rank 2 ══s0…══▶ … ══▶ rank N
                              recv s1 ∥ forward s0   (same tags, same standalone group)

A member waits for its own receives only (deadline, "abort" key): a dead or frozen member
downstream never holds it up, and whoever is behind a failed member times out or sees "abort"
(group.py sets it once the sync ends with members unanswered) and reports failure; the
learner re-plans at the next sync. The forwards are left in flight when receive_segments
returns (the BucketReceiver keeps them, and never writes into a buffer they still read).

A group is built directly from a PrefixStore over the learner's own TCPStore and never touches
torch.distributed's default group (the learner's FSDP group). Gloo on CPU; NCCL when the
learner's tensors are on CUDA and the member offers "nccl" (NCCL's own broadcast is already a
pipelined ring, so an NCCL group always broadcasts). Every wait has a deadline; a group with a
collective stuck on a dead peer is torn down off the calling thread (dispose).
"""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from common.transport import gloo_bind_address, is_loopback
from common.weightsync.buckets import Bucket, as_bytes, bucket_segments, pack_range, segment_tag
from common.weightsync.errors import SyncAborted, SyncError
from common.weightsync.messages import SyncPlan, WeightUpdateHeader

ABORT_CHECK_S = 0.05


def timeout_td(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=max(0.001, seconds))


def make_group(backend: str, store: Any, rank: int, world_size: int, timeout_s: float, loopback: bool):
    """A standalone process group on `store` (never the default group)."""
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout_td(timeout_s)
        return dist.ProcessGroupNCCL(store, rank, world_size, opts)
    address = gloo_bind_address(store, loopback)  # from the configured store host (common/transport.py)
    if address is None:  # torch's default device: GLOO_SOCKET_IFNAME, else the host name's address
        return dist.ProcessGroupGloo(store, rank, world_size, timeout_td(timeout_s))
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = timeout_td(timeout_s)
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=address)]
    return dist.ProcessGroupGloo(store, rank, world_size, opts)


def dispose(box: list) -> threading.Thread:
    """Destroy a process group off the calling thread: a group with a collective stuck on a dead
    peer can take until its own timeout to tear down, and nobody should wait for that."""
    def run():
        pg = box.pop() if box else None
        try:
            if pg is not None and hasattr(pg, "abort") and isinstance(pg, getattr(dist, "ProcessGroupNCCL", ())):
                pg.abort()
        except Exception:  # best effort: it is being thrown away
            pass
        del pg
    th = threading.Thread(target=run, name="weightsync-dispose", daemon=True)
    th.start()
    return th


def join_all(threads: list[threading.Thread], timeout_s: float) -> None:
    """At close: let group teardown finish (bounded) so the process does not exit under it."""
    end = time.monotonic() + timeout_s
    for th in threads:
        th.join(max(0.0, end - time.monotonic()))
    threads.clear()


def broadcast_opts() -> Any:
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    return opts


def first_line(e: BaseException) -> str:
    """An error's first line, cut to 300 characters (torch's gloo errors carry long traces);
    its type's name when it has no message."""
    lines = str(e).splitlines()
    return lines[0][:300] if lines else type(e).__name__


def _failed(e: BaseException) -> SyncError:
    return SyncError(f"collective failed: {first_line(e)}")


def watch_abort(should_abort: Callable[[], bool], wake: threading.Event | None = None
                ) -> tuple[threading.Event, threading.Event]:
    """A thread that asks should_abort() every ABORT_CHECK_S until the returned `over` is set;
    `aborted` (and `wake`) are set when it answers True. should_abort() reads the learner's
    store, which blocks while the learner is stopped (SIGSTOP, a stalled VM): a member whose
    transfer is done must not wait for that (with learner.sync_answers "later" the learner may
    stop right after its sends), so the waits below never call it themselves."""
    aborted, over = threading.Event(), threading.Event()

    def run() -> None:
        while not over.wait(ABORT_CHECK_S):
            if should_abort():
                aborted.set()
                if wake is not None:
                    wake.set()
                return

    threading.Thread(target=run, name="weightsync-abort", daemon=True).start()
    return aborted, over


def wait_work(work: Any, deadline: float, should_abort: Callable[[], bool] | None = None,
              poll: bool = False) -> None:
    """Wait for a collective until `deadline` (monotonic); raise SyncError on failure or timeout,
    SyncAborted once should_abort() says so (asked by watch_abort's thread).
    poll=True (NCCL, whose wait() only orders streams): spin on is_completed() instead."""
    aborted, over = watch_abort(should_abort) if should_abort is not None else (threading.Event(), None)
    try:
        _wait_work(work, deadline, aborted, poll)
    finally:
        if over is not None:
            over.set()


def _wait_work(work: Any, deadline: float, aborted: threading.Event, poll: bool) -> None:
    while poll:
        if work.is_completed():
            work.wait()  # raises if it failed
            return
        if time.monotonic() >= deadline:
            raise SyncError("collective timed out")
        if aborted.is_set():
            raise SyncAborted("the learner aborted this transfer")
        time.sleep(0.0005)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise SyncError("collective timed out")
        try:
            work.wait(timeout_td(min(left, ABORT_CHECK_S)))
            return
        except RuntimeError as e:
            if work.is_completed():
                try:
                    work.wait()
                    return
                except RuntimeError as e2:
                    raise _failed(e2) from None
            if "timed out" not in str(e).lower():
                raise _failed(e) from None
        if aborted.is_set():
            raise SyncAborted("the learner aborted this transfer")


def wait_p2p(works: list, deadline: float, should_abort: Callable[[], bool] | None = None,
             on_done: Callable[[int], None] | None = None) -> None:
    """Wait for gloo point-to-point ops (SyncPlan.op "send" / "chain") until `deadline`; raise
    SyncError on failure or timeout. Unlike a broadcast's, a timed wait on a send or receive that
    expires closes every connection of the group (gloo's UnboundBuffer), so wait_work's short
    slices cannot be used: without should_abort the ops are waited on here with what is left of
    the deadline; with it, a helper thread waits, watch_abort's thread asks should_abort(), and
    this one returns as soon as either is done (after an abort the caller closes the group,
    which ends the helper's wait).
    on_done(i) runs (on the waiting thread) as soon as works[i] is done, in order: the chain
    forwards a segment there while the next one is still arriving."""
    def wait_all() -> None:
        for i, w in enumerate(works):
            left = deadline - time.monotonic()
            if left <= 0:
                raise SyncError("point-to-point transfer timed out")
            try:
                w.wait(timeout_td(left))
            except RuntimeError as e:
                raise _failed(e) from None
            if on_done is not None:
                on_done(i)

    if should_abort is None:
        return wait_all()
    done, wake = threading.Event(), threading.Event()
    errors: list[SyncError] = []

    def run() -> None:
        try:
            wait_all()
        except SyncError as e:
            errors.append(e)
        finally:
            done.set()
            wake.set()

    threading.Thread(target=run, name="weightsync-recv", daemon=True).start()
    _, over = watch_abort(should_abort, wake)
    try:
        while not wake.wait(max(0.0, min(ABORT_CHECK_S, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                raise SyncError("point-to-point transfer timed out")
    finally:
        over.set()
    if done.is_set():
        if errors:
            raise errors[0]
        return
    raise SyncAborted("the learner aborted this transfer")


# --------------------------------------------------------------------------- learner side
def post_segments(pg: Any, op: str, header: WeightUpdateHeader, flat: torch.Tensor, ranks: list[int],
                  bucket: Bucket | None = None) -> list:
    """Start a bucket's segments (SyncPlan.op) on the learner's group; returns [(work, source)]
    (each source must stay alive until its work is done). With `bucket`, large tensors go
    straight from their own memory and small ones are packed into `flat` just before their
    segment; without, `flat` is already packed. op "chain": only to the first rank of the
    chain (rank 1), which passes them on."""
    works: list = []
    if op == "chain":
        ranks = sorted(ranks)[:1]
    opts = broadcast_opts()
    items = bucket.items if bucket is not None else []  # in offset order (plan_buckets)
    by_offset = {off: t for _, t, off in items}
    i = 0  # first item not yet packed or sent
    for seg, (s, e, direct) in enumerate(bucket_segments(header.tensors, header.nbytes, header.chunk_bytes)):
        if bucket is None:
            src = flat[s:e]
        elif direct:
            src = as_bytes(by_offset[s], flat.device)
        else:
            i = pack_range(items, i, flat, s, e)
            src = flat[s:e]
        if op in ("send", "chain"):  # keep src alive until done
            tag = segment_tag(header.bucket, seg)
            works.extend((pg.send([src], r, tag), src) for r in ranks)
        else:
            works.append((pg.broadcast([src], opts), src))
    return works


def wait_segments(works: list, op: str, deadline: float, poll: bool) -> None:
    """Wait for the [(work, source)] of post_segments until `deadline`; raise SyncError on failure
    or timeout. poll: an NCCL group (see wait_work)."""
    if op in ("send", "chain"):
        wait_p2p([w for w, _src in works], deadline)
    else:
        for w, _src in works:
            wait_work(w, deadline, poll=poll)


# --------------------------------------------------------------------------- member side
def join_group(plan: SyncPlan) -> tuple[Any, Any]:
    """Join the group a (gloo/nccl) plan describes: mark this rank ready in the generation's
    prefix store, wait for the learner's "go", build the group. Returns (group, prefix store)."""
    deadline = time.monotonic() + plan.timeout_s
    try:
        store = dist.TCPStore(plan.store_host, plan.store_port, is_master=False, wait_for_workers=False,
                              timeout=timeout_td(plan.timeout_s))
    except Exception as e:
        raise SyncError(f"cannot reach the weight-sync store {plan.store_host}:{plan.store_port}: {e}") from None
    prefix = dist.PrefixStore(f"scout/{plan.generation}", store)
    prefix.set(f"ready/{plan.rank}", b"1")
    try:
        prefix.wait(["go"], timeout_td(deadline - time.monotonic()))
        go = prefix.get("go")
    except Exception:
        raise SyncError(f"generation {plan.generation}: no go from the learner within {plan.timeout_s}s") from None
    if go != b"go":
        raise SyncAborted(f"generation {plan.generation} abandoned by the learner (a member did not arrive)")
    try:
        pg = make_group(plan.transport, prefix, plan.rank, plan.world_size, plan.timeout_s,
                        is_loopback(plan.store_host))
    except Exception as e:
        raise SyncError(f"generation {plan.generation}: group did not form: {first_line(e)}") from None
    return pg, prefix


def receive_segments(pg: Any, plan: SyncPlan, header: WeightUpdateHeader, flat: torch.Tensor, deadline: float,
                     should_abort: Callable[[], bool]) -> list:
    """Receive a bucket's segments into `flat` as the plan's op says, until `deadline`, giving up
    when should_abort() (the learner set "abort"). Returns the chain's forwards still in flight
    (op "chain"; [] otherwise): they read `flat`, which must not be written until they are done."""
    opts = broadcast_opts()
    segs = bucket_segments(header.tensors, header.nbytes, header.chunk_bytes)
    if plan.op == "chain":
        return receive_chain(pg, plan, header, flat, segs, deadline, should_abort)
    if plan.op == "send":
        works = [pg.recv([flat[s:e]], 0, segment_tag(header.bucket, k)) for k, (s, e, _) in enumerate(segs)]
        wait_p2p(works, deadline, should_abort)
    else:
        works = [pg.broadcast([flat[s:e]], opts) for s, e, _ in segs]
        for work in works:
            wait_work(work, deadline, should_abort, poll=plan.transport == "nccl")
    return []


def receive_chain(pg: Any, plan: SyncPlan, header: WeightUpdateHeader, flat: torch.Tensor,
                  segs: list[tuple[int, int, bool]], deadline: float, should_abort: Callable[[], bool]) -> list:
    """A chain member: every segment's receive from rank-1 is posted up front; as each one
    completes, its send to rank+1 is posted (not for the last rank) while the next keeps
    arriving. Only the receives are waited for (deadline, abort key). A forward that cannot
    be posted (the next member is gone) stops the forwarding, not this member's update: the
    learner finds out from the next member's silence or failure. Returns the forwards."""
    nxt = plan.rank + 1 if plan.rank + 1 < plan.world_size else None
    tags = [segment_tag(header.bucket, k) for k in range(len(segs))]
    works = [pg.recv([flat[s:e]], plan.rank - 1, tags[k]) for k, (s, e, _) in enumerate(segs)]
    forwards: list = []

    def forward(k: int) -> None:
        if nxt is None or (forwards and forwards[-1] is None):
            return
        s, e, _ = segs[k]
        try:
            forwards.append(pg.send([flat[s:e]], nxt, tags[k]))
        except RuntimeError:  # the pair to the next member is broken: it fails on its own
            forwards.append(None)

    wait_p2p(works, deadline, should_abort, on_done=forward)
    return [w for w in forwards if w is not None]


def watch_forwards(works: list, timeout_s: float) -> threading.Event:
    """An event set once the chain forwards `works` are over (sent, failed, or given up after
    timeout_s). A gloo send's is_completed() stays False until someone waits on it, and a timed
    wait that expires closes the group's connections, so a helper thread waits with a bound
    (2 x the sync timeout: by then the next member was dropped and the group re-formed)."""
    over = threading.Event()

    def run() -> None:
        end = time.monotonic() + timeout_s
        try:
            for w in works:
                w.wait(timeout_td(end - time.monotonic()))
        except Exception:  # the next member is gone or frozen: nothing is read from the buffer now
            pass
        finally:
            over.set()

    threading.Thread(target=run, name="weightsync-forward", daemon=True).start()
    return over
