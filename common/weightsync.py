"""Weight broadcast from learner rank 0 to the actor workers.

    learner rank 0 (WeightSender)                      actor worker (SyncClient + BucketReceiver)
    ROUTER  learner.sync_endpoint  <──── SyncJoin(peer_id, run_id, version, transports)  DEALER
    TCPStore (is_master)           <───┐
                                       │
    broadcast(version, tensors):       │
     1 membership changed? generation += 1
       ── SyncPlan(generation, rank, world_size, store) ──▶  setup(plan):
       wait "ready/<rank>" keys  ◀─────┴──────────────────    set ready/<rank>, wait "go"
       set "go" (or "abort": re-plan without the absent) ─▶   ProcessGroupGloo(PrefixStore(
       ProcessGroupGloo(PrefixStore("scout/<gen>"), 0, N)        "scout/<gen>"), rank, N)
     2 per dtype-grouped bucket (learner.bucket_mb), packed while the previous one flows:
       ── WeightUpdateHeader(bucket k of n, TensorMeta…) ─▶  receive(header):
       broadcast(flat uint8 bucket, root 0) ═════════════▶     into one buffer; returns views
         (sync_chunk_mb > 0: as segments, big tensors           named with the HF names
          straight from their own memory)
       (zmq members: the packed bucket rides as the header's data frame)
     3 ◀──────────────────────── SyncDone(version, ok, seconds)   after the last bucket is loaded
       no answer in time / dead (probe fails) → dropped; the group re-forms at the next sync

The process group is standalone: it is built directly from a PrefixStore over this module's own
TCPStore and never touches torch.distributed's default group (the learner's FSDP group).
Rank 0 is the learner, members are ranks 1..N. Gloo on CPU; NCCL when the learner's tensors are
on CUDA and the member offers "nccl". Members that offer only "zmq" get every bucket as the
`data` frame of its header. Bytes travel as uint8, so bfloat16 arrives as its exact bit pattern.
With learner.sync_chunk_mb > 0 both sides derive a bucket's broadcast segments from its header
(`bucket_segments`): big tensors are sent without the packing copy, small ones in packed runs.

Failure handling: every wait has a deadline. A sync's transfers end by `sync_timeout_s` after
it started, and answers are collected for a short grace after that, so `broadcast` returns
within about 1.25 × sync_timeout_s whatever the members do. A member whose socket is gone
(ROUTER_MANDATORY send fails), that does not arrive at the rendezvous, or that does not answer
in time is dropped and told so (SyncAbort rejoin=True; a SyncClient then joins again by
itself). When a collective fails the learner sets "abort" in the generation's store prefix
(members blocked in the collective see it and give up) and sends SyncAbort to the others.

Actor side, in one process (a vLLM engine worker would run setup/receive via collective_rpc):

    client = SyncClient(sync_endpoint, peer_id, run_id, cfg.transport); client.join(version)
    receiver = BucketReceiver()
    ...between engine steps:
    result = follow_sync(client, client.poll(0), receiver.setup,
                         lambda header, data: model.load_weights(receiver.receive(header, data)))
    # result: None (nothing arrived) or {version, ok, seconds, message, buckets}; SyncDone is sent
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import zmq

from common.protocol import (DTYPES, MAX_ARRAY_BYTES, ErrorReply, Heartbeat, Message, ProtocolError, SyncAbort, SyncDone,
                             SyncJoin, SyncPlan, TensorMeta, WeightUpdateHeader, decode, encode)
from common.transport import (bind, bound_endpoint, check_host_bind, connect, is_loopback, recv_frames,
                              send, split_envelope, TransportTimeout)

log = logging.getLogger("scout.weightsync")

TORCH_DTYPES: dict[str, torch.dtype] = {
    "uint8": torch.uint8, "bool": torch.bool, "int32": torch.int32, "int64": torch.int64,
    "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64,
}
_DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}
assert set(TORCH_DTYPES) == set(DTYPES)

MAX_HEADER_ESTIMATE = 2 << 20  # close a bucket before its TensorMeta list nears the header cap
MAX_TENSORS_PER_BUCKET = 1 << 16
PROBE_INTERVAL_S = 0.2
DIRECT_DIVISOR = 1  # with chunking, tensors of at least chunk/DIRECT_DIVISOR bytes go from their own memory
ABORT_CHECK_S = 0.05


class SyncError(RuntimeError):
    """A weight sync could not be completed on this side; the message says why."""


class SyncAborted(SyncError):
    """The learner abandoned the rendezvous or the transfer this member was part of."""


# --------------------------------------------------------------------------- packing
@dataclasses.dataclass
class Bucket:
    """One dtype-homogeneous bucket: tensors and their byte offsets inside the flat buffer."""

    dtype: str
    items: list[tuple[str, torch.Tensor, int]]
    nbytes: int = 0
    header_estimate: int = 0

    def metas(self) -> list[TensorMeta]:
        return [TensorMeta(name=n, dtype=self.dtype, shape=list(t.shape), offset=o) for n, t, o in self.items]


def dtype_name(dtype: torch.dtype) -> str:
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        raise SyncError(f"tensors of dtype {dtype} cannot be synced (supported: {sorted(TORCH_DTYPES)})")
    return name


def _check_tensor(name: Any, t: Any) -> None:
    if not isinstance(name, str) or not 1 <= len(name) <= 1024:
        raise SyncError(f"tensor name {name!r} must be a string of 1..1024 characters")
    if not isinstance(t, torch.Tensor):
        raise SyncError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if hasattr(t, "full_tensor") or t.layout != torch.strided:
        raise SyncError(f"{name}: pass plain full tensors (gather DTensors with full_tensor() on every rank first)")
    if t.dim() > 8:
        raise SyncError(f"{name}: {t.dim()} dimensions, at most 8 travel")


def plan_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> list[Bucket]:
    """Group tensors by dtype into buckets of at most `bucket_bytes` (a larger tensor gets a bucket
    of its own). Order is kept within a dtype; nothing is copied here."""
    if bucket_bytes < 1:
        raise SyncError(f"bucket size must be positive, got {bucket_bytes}")
    out: list[Bucket] = []
    open_: dict[str, Bucket] = {}
    seen: set[str] = set()
    for name, t in named_tensors:
        _check_tensor(name, t)
        if name in seen:
            raise SyncError(f"tensor {name!r} appears twice")
        seen.add(name)
        dt = dtype_name(t.dtype)
        n = t.numel() * t.element_size()
        b = open_.get(dt)
        if b is not None and b.items and (b.nbytes + n > bucket_bytes or len(b.items) >= MAX_TENSORS_PER_BUCKET
                                          or b.header_estimate > MAX_HEADER_ESTIMATE):
            out.append(open_.pop(dt))
            b = None
        if b is None:
            b = open_[dt] = Bucket(dt, [])
        b.items.append((name, t, b.nbytes))
        b.nbytes += n
        b.header_estimate += len(name.encode()) + 64
    out.extend(b for b in open_.values() if b.items)
    return out


def pack_bucket(bucket: Bucket, out: torch.Tensor | None = None, device: Any = None,
                start: int = 0, end: int | None = None) -> torch.Tensor:
    """Copy a bucket's tensors (those inside bytes [start, end) when given) into one flat uint8
    tensor at their offsets; `out` is used when large enough."""
    if out is not None and out.numel() >= bucket.nbytes:
        flat = out[:bucket.nbytes]
    else:
        flat = torch.empty(bucket.nbytes, dtype=torch.uint8, device=device)
    end = bucket.nbytes if end is None else end
    with torch.no_grad():
        for _, t, off in bucket.items:
            n = t.numel() * t.element_size()
            if n and start <= off and off + n <= end:
                _copy_bytes(flat[off:off + n], t.detach().reshape(-1).view(torch.uint8))
    return flat


def _copy_bytes(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst <- src (uint8). On CPU through numpy: torch's copy_ fans out to OpenMP threads, which
    on a busy host (gloo threads, the training loop) is up to 50x slower than one memcpy."""
    if dst.device.type == "cpu" and src.device.type == "cpu":
        np.copyto(dst.numpy(), src.numpy())
    else:
        dst.copy_(src)


def as_bytes(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A tensor's bytes as a flat uint8 tensor on `device` (no copy when already contiguous there)."""
    t = t.detach()
    if t.device != device:
        t = t.to(device)
    return t.reshape(-1).view(torch.uint8)


def bucket_segments(metas: Iterable[TensorMeta], nbytes: int, chunk_bytes: int) -> list[tuple[int, int, bool]]:
    """The broadcasts that carry one bucket, as (start, end, direct) byte ranges; both sides derive
    them from the header. chunk_bytes 0: one broadcast of the whole bucket. Otherwise a tensor of
    at least chunk_bytes goes alone, straight from its own memory (direct: no packing copy), and
    runs of smaller tensors are packed into broadcasts of about chunk_bytes, each sent as soon as
    it is packed. The default (learner.sync_chunk_mb = 0) is one broadcast per bucket: on gloo,
    splitting 200 MB into 25 broadcasts cost the receiver ~40% more CPU and wall time than one
    (measured on the 2-core VM), more than the packing copy it saves.
    `bench/weightsync_bench.py --chunk-mb 0,64` compares both."""
    if nbytes == 0:
        return []
    if chunk_bytes <= 0:
        return [(0, nbytes, False)]
    segs: list[tuple[int, int, bool]] = []
    run: list[int] | None = None
    for m in sorted(metas, key=lambda m: m.offset):
        n = m.nbytes
        if n == 0:
            continue
        if n >= max(1, chunk_bytes // DIRECT_DIVISOR):
            if run is not None:
                segs.append((run[0], run[1], False))
                run = None
            segs.append((m.offset, m.offset + n, True))
            continue
        run = [m.offset, m.offset + n] if run is None else [run[0], max(run[1], m.offset + n)]
        if run[1] - run[0] >= chunk_bytes:
            segs.append((run[0], run[1], False))
            run = None
    if run is not None:
        segs.append((run[0], run[1], False))
    return segs


def unpack_bucket(flat: torch.Tensor, metas: Iterable[TensorMeta | dict]) -> list[tuple[str, torch.Tensor]]:
    """Views into `flat` (uint8) for every tensor of a bucket, with their names, dtypes and shapes."""
    out = []
    for m in metas:
        m = m if isinstance(m, TensorMeta) else TensorMeta.model_validate(m)
        n = m.nbytes
        if m.offset + n > flat.numel():
            raise SyncError(f"tensor {m.name} runs past the end of a {flat.numel()}-byte bucket")
        view = flat[m.offset:m.offset + n]
        dt = TORCH_DTYPES[m.dtype]
        if m.offset % torch.empty((), dtype=dt).element_size():
            view = view.clone()  # misaligned offset from a foreign sender: copy once
        out.append((m.name, view.view(dt).view(m.shape)))
    return out


def iter_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
                 ) -> Iterator[tuple[str, list[tuple[str, torch.Tensor]], torch.Tensor]]:
    """Yield (dtype name, [(name, tensor)], packed flat uint8 tensor) per dtype-grouped bucket."""
    for b in plan_buckets(named_tensors, bucket_bytes):
        yield b.dtype, [(n, t) for n, t, _ in b.items], pack_bucket(b, device=b.items[0][1].device)


# --------------------------------------------------------------------------- process groups
def _td(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=max(0.001, seconds))


def _make_group(backend: str, store: Any, rank: int, world_size: int, timeout_s: float, loopback: bool):
    """A standalone process group on `store` (never the default group)."""
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = _td(timeout_s)
        return dist.ProcessGroupNCCL(store, rank, world_size, opts)
    if not loopback:  # default device: honours GLOO_SOCKET_IFNAME, else the host name
        return dist.ProcessGroupGloo(store, rank, world_size, _td(timeout_s))
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = _td(timeout_s)
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    return dist.ProcessGroupGloo(store, rank, world_size, opts)


def _dispose(box: list) -> threading.Thread:
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


def _join_all(threads: list[threading.Thread], timeout_s: float) -> None:
    """At close: let group teardown finish (bounded) so the process does not exit under it."""
    end = time.monotonic() + timeout_s
    for th in threads:
        th.join(max(0.0, end - time.monotonic()))
    threads.clear()


def _broadcast_opts() -> Any:
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    return opts


def _wait_work(work: Any, deadline: float, should_abort: Callable[[], bool] | None = None,
               poll: bool = False) -> None:
    """Wait for a collective until `deadline` (monotonic); raise SyncError on failure or timeout.
    poll=True (NCCL, whose wait() only orders streams): spin on is_completed() instead."""
    next_check = time.monotonic() + ABORT_CHECK_S
    while poll:
        if work.is_completed():
            work.wait()  # raises if it failed
            return
        if time.monotonic() >= deadline:
            raise SyncError("collective timed out")
        if should_abort is not None and time.monotonic() >= next_check:
            next_check = time.monotonic() + ABORT_CHECK_S
            if should_abort():
                raise SyncAborted("the learner aborted this transfer")
        time.sleep(0.0005)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise SyncError("collective timed out")
        try:
            work.wait(_td(min(left, ABORT_CHECK_S)))
            return
        except RuntimeError as e:
            if work.is_completed():
                try:
                    work.wait()
                    return
                except RuntimeError as e2:
                    raise SyncError(f"collective failed: {str(e2).splitlines()[0][:300]}") from None
            if "timed out" not in str(e).lower():
                raise SyncError(f"collective failed: {str(e).splitlines()[0][:300]}") from None
        if should_abort is not None and time.monotonic() >= next_check:
            next_check = time.monotonic() + ABORT_CHECK_S
            if should_abort():
                raise SyncAborted("the learner aborted this transfer")


# --------------------------------------------------------------------------- learner side
@dataclasses.dataclass
class _Member:
    peer_id: str
    run_id: str
    identity: bytes
    transports: tuple[str, ...]
    version: int
    transport: str = ""  # assigned at the last plan: gloo / nccl / zmq
    rank: int = 0


@dataclasses.dataclass
class _SyncState:
    version: int
    expect: dict[str, str]  # peer_id -> run_id of everyone this sync is for
    ok: set[str] = dataclasses.field(default_factory=set)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)
    dropped: dict[str, str] = dataclasses.field(default_factory=dict)

    def unresolved(self) -> list[str]:
        return [p for p in self.expect if p not in self.ok and p not in self.failed and p not in self.dropped]


class WeightSender:
    """Learner rank 0: keeps the membership and broadcasts versions (public methods take a lock;
    members() from another thread waits while a broadcast runs)."""

    def __init__(self, learner_cfg, transport_cfg, metrics=None):
        self.cfg = learner_cfg
        self.tcfg = transport_cfg
        self.timeout_s = float(learner_cfg.sync_timeout_s)
        self.grace_s = min(5.0, 0.25 * self.timeout_s)
        # a bucket is also one zmq data frame: keep it under the protocol's array cap
        self.bucket_bytes = max(1, min(int(learner_cfg.bucket_mb * (1 << 20)), MAX_ARRAY_BYTES))
        self.chunk_bytes = int(getattr(learner_cfg, "sync_chunk_mb", 0.0) * (1 << 20))
        self.run_id = uuid.uuid4().hex
        self.endpoint: str | None = None
        self.store_port: int | None = None
        self.generation = 0
        self._members: dict[str, _Member] = {}
        self._dirty = True
        self._group = None
        self._group_key: tuple | None = None
        self._group_store = None
        self._between_drops: dict[str, str] = {}
        self._sync: _SyncState | None = None
        self._planned: list[_Member] = []
        self._cpu_bufs: list[torch.Tensor] = []
        self._disposing: list[threading.Thread] = []
        self._lock = threading.RLock()  # public methods may be called from several threads
        self._ctx = self._sock = self._store = None
        self._probe_seq = 0
        self._metrics(metrics)

    def _metrics(self, m) -> None:
        self._m = None
        if m is None:
            return
        r = m.role
        self._m = {
            "seconds": m.histogram(f"scout_{r}_weight_sync_seconds", "wall time of one weight broadcast"),
            "bytes": m.counter(f"scout_{r}_weight_sync_bytes_total", "weight bytes broadcast (payload, once per sync)"),
            "members": m.gauge(f"scout_{r}_weight_sync_members", "actor workers in the weight-sync group"),
            "dropped": m.counter(f"scout_{r}_weight_sync_dropped_total", "members dropped (dead, slow or failed)"),
            "generation": m.gauge(f"scout_{r}_weight_sync_generation", "weight-sync group incarnation"),
        }

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        check_host_bind(self.cfg.store_host, self.tcfg, "learner.store_host")
        self._ctx = zmq.Context()
        self._sock = bind(self._ctx, zmq.ROUTER, self.cfg.sync_endpoint, self.tcfg)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.endpoint = bound_endpoint(self._sock)
        try:
            self._store = dist.TCPStore(self.cfg.store_host, self.cfg.store_port, is_master=True,
                                        wait_for_workers=False, timeout=_td(self.timeout_s))
        except Exception as e:
            self._sock.close(0)
            raise SyncError(f"cannot start the weight-sync TCPStore on {self.cfg.store_host}:{self.cfg.store_port}: {e}") from None
        self.store_port = int(self._store.port)
        self.store_host = self.cfg.store_advertise_host or self.cfg.store_host
        log.info("weight sync: endpoint %s, store %s:%d, bucket %.3g MiB, timeout %.1fs",
                 self.endpoint, self.store_host, self.store_port, self.bucket_bytes / 2**20, self.timeout_s)

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        self._close_group()
        _join_all(self._disposing, min(5.0, self.timeout_s))
        self._cpu_bufs = []
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        self._store = None

    def members(self) -> list[str]:
        with self._lock:
            self._drain()
            return sorted(self._members)

    def wait_members(self, n: int, timeout_s: float) -> bool:
        """Wait until at least `n` members have joined (for tests and start-up)."""
        end = time.monotonic() + timeout_s
        while len(self.members()) < n:
            if time.monotonic() >= end:
                return False
            with self._lock:
                self._drain(50)
        return True

    # ------------------------------------------------------------------ messages
    def _send(self, member: _Member, msg: Message, deadline: float | None = None) -> bool:
        """Send to one member; False when its connection is gone or it stays full past the deadline."""
        frames = encode(msg)
        end = deadline if deadline is not None else time.monotonic() + self.tcfg.send_timeout_ms / 1000
        while True:
            try:
                self._sock.send_multipart([member.identity, *frames], flags=zmq.NOBLOCK, copy=False)
                return True
            except zmq.Again:
                if time.monotonic() >= end:
                    return False
                time.sleep(0.001)
            except zmq.ZMQError as e:
                if e.errno == zmq.EHOSTUNREACH:
                    return False
                raise

    def _reply_raw(self, envelope: list, msg: Message) -> None:
        try:
            self._sock.send_multipart([*envelope, *encode(msg)], flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the asker is gone or full: nothing else to do

    def _drain(self, timeout_ms: int = 0) -> None:
        """Handle every message waiting on the socket (joins, dones, garbage)."""
        if self._sock is None:
            raise SyncError("WeightSender.start() was not called")
        first = True
        while self._sock.poll(timeout_ms if first else 0, zmq.POLLIN):
            first = False
            frames = self._sock.recv_multipart(copy=False)
            try:
                envelope, body = split_envelope(frames)
                msg = decode(body, expect=(SyncJoin, SyncDone))
            except ProtocolError as e:
                if len(frames) >= 2:
                    self._reply_raw(frames[:1], ErrorReply(code="bad_request", message=str(e)[:4096]))
                continue
            identity = bytes(envelope[0].bytes if hasattr(envelope[0], "bytes") else envelope[0])
            if isinstance(msg, SyncJoin):
                self._on_join(identity, msg)
            else:
                self._on_done(identity, msg)

    def _on_join(self, identity: bytes, msg: SyncJoin) -> None:
        old = self._members.get(msg.peer_id)
        self._dirty = True  # whoever joins gets a fresh plan at the next sync
        if old is not None and old.run_id == msg.run_id:
            # the same process asks again (it lost its receiver, or was told it had been dropped
            # and the news crossed): keep its record, which a sync in progress may be using
            old.identity, old.transports, old.version = identity, tuple(msg.transports), msg.version
            return
        if old is not None:
            log.info("weight sync: %s restarted (run %s -> %s)", msg.peer_id, old.run_id[:8], msg.run_id[:8])
            self._note_dropped(msg.peer_id, "restarted with a new run_id")
        self._members[msg.peer_id] = _Member(msg.peer_id, msg.run_id, identity, tuple(msg.transports), msg.version)
        log.info("weight sync: %s joined (run %s, version %d, transports %s)", msg.peer_id, msg.run_id[:8],
                 msg.version, ",".join(msg.transports))

    def _on_done(self, identity: bytes, msg: SyncDone) -> None:
        m = self._members.get(msg.peer_id)
        if m is None or m.run_id != msg.run_id:
            # a dropped member is told to join again; an older incarnation of a member is not
            rejoin = m is None
            reason = ("not a member of the weight-sync group (dropped); send SyncJoin again" if rejoin
                      else f"run {msg.run_id[:8]} of {msg.peer_id} was replaced by run {m.run_id[:8]}")
            self._reply_raw([identity], SyncAbort(version=msg.version, generation=self.generation,
                                                  reason=reason, rejoin=rejoin))
            return
        m.identity = identity
        s = self._sync
        if s is None or msg.version != s.version or msg.peer_id not in s.expect:
            return  # a late answer for a sync that is over
        if msg.ok:
            s.ok.add(msg.peer_id)
            m.version = msg.version
        else:
            s.failed[msg.peer_id] = msg.message or "member reported failure"
            self._dirty = True  # its group may be broken: re-form next time

    def _note_dropped(self, peer_id: str, reason: str) -> None:
        if self._sync is not None:
            self._sync.dropped[peer_id] = reason
        else:
            self._between_drops[peer_id] = reason
        if self._m:
            self._m["dropped"].inc()

    def _drop(self, peer_id: str, reason: str, tell: bool = True) -> None:
        m = self._members.pop(peer_id, None)
        if m is None:
            return
        self._dirty = True
        self._note_dropped(peer_id, reason)
        log.warning("weight sync: dropped %s: %s", peer_id, reason)
        if tell:
            self._reply_raw([m.identity], SyncAbort(version=self._sync.version if self._sync else 0,
                                                    generation=self.generation, reason=reason, rejoin=True))

    def _probe(self, peer_ids: Iterable[str]) -> None:
        """Drop members whose connection is gone (ROUTER_MANDATORY refuses to route to them)."""
        self._probe_seq += 1
        hb = Heartbeat(peer_id="learner", run_id=self.run_id, seq=self._probe_seq, time=time.time())
        frames = encode(hb)
        for p in list(peer_ids):
            m = self._members.get(p)
            if m is None:
                continue
            try:
                self._sock.send_multipart([m.identity, *frames], flags=zmq.NOBLOCK)
            except zmq.Again:
                continue  # a full pipe is a busy peer, not a dead one
            except zmq.ZMQError as e:
                if e.errno == zmq.EHOSTUNREACH:
                    self._drop(p, "connection lost", tell=False)

    # ------------------------------------------------------------------ group formation
    def _close_group(self) -> None:
        if self._group is not None:
            box, self._group = [self._group], None
            self._disposing = [t for t in self._disposing if t.is_alive()] + [_dispose(box)]
        self._group_key = None
        self._group_store = None

    def _choose_backend(self, device: torch.device) -> str:
        if device.type == "cuda" and any("nccl" in m.transports for m in self._members.values()):
            return "nccl"
        return "gloo"

    def _assign(self, backend: str) -> tuple[list[_Member], list[_Member]]:
        group, zmq_only = [], []
        for m in self._members.values():
            if backend in m.transports:
                m.transport, m.rank = backend, len(group) + 1
                group.append(m)
            elif "zmq" in m.transports:
                m.transport, m.rank = "zmq", 0
                zmq_only.append(m)
            else:
                m.transport = ""
        for m in [m for m in self._members.values() if not m.transport]:
            reason = f"no common transport: the learner uses {backend} or zmq, the member offers {list(m.transports)}"
            self._drop(m.peer_id, reason, tell=False)
            self._reply_raw([m.identity], SyncAbort(version=self._sync.version if self._sync else 0,
                                                    generation=self.generation, reason=reason))
        return group, zmq_only

    def _reform(self, version: int, backend: str, deadline: float) -> None:
        """New generation: plan every member, rendezvous the group members, build the group."""
        self._close_group()
        for _attempt in range(3):
            self.generation += 1
            group, zmq_only = self._assign(backend)
            world = len(group) + 1
            for m in group + zmq_only:
                plan = SyncPlan(version=version, generation=self.generation, transport=m.transport,
                                store_host=self.store_host, store_port=self.store_port, rank=m.rank,
                                world_size=world if m.transport != "zmq" else 1, timeout_s=self.timeout_s)
                if not self._send(m, plan, deadline):
                    self._drop(m.peer_id, "plan could not be delivered", tell=False)
            group = [m for m in group if self._members.get(m.peer_id) is m]
            self._planned = group + [m for m in zmq_only if self._members.get(m.peer_id) is m]
            if not group:  # zmq members only: nothing to rendezvous
                self._group_key = (self.generation, backend, ())
                self._dirty = False
                return
            missing = self._rendezvous(group, deadline)
            if not missing:
                self._build_group(group, backend, deadline)
                return
            for p in missing:
                if p in self._members:
                    self._drop(p, "did not reach the group rendezvous in time")
            if time.monotonic() >= deadline:
                break
        self._dirty = True  # no group this time; zmq members are still served

    def _rendezvous(self, group: list[_Member], deadline: float) -> list[str]:
        """Wait for every member's ready key; set go (all there) or abort. Returns the missing."""
        store = dist.PrefixStore(f"scout/{self.generation}", self._store)
        ready_by = min(deadline, time.monotonic() + 0.5 * max(0.0, deadline - time.monotonic()))
        keys = {m.peer_id: f"ready/{m.rank}" for m in group}
        next_probe = 0.0
        while True:
            missing = [p for p, k in keys.items() if p not in self._members or not store.check([k])]
            if not missing or time.monotonic() >= ready_by:
                break
            if time.monotonic() >= next_probe:
                next_probe = time.monotonic() + PROBE_INTERVAL_S
                self._probe(missing)
            self._drain(5)
        store.set("go", b"go" if not missing else b"abort")
        self._group_store = store
        return missing

    def _build_group(self, group: list[_Member], backend: str, deadline: float) -> None:
        left = deadline - time.monotonic()
        try:
            if left <= 0:
                raise SyncError("no time left to build the group")
            pg = _make_group(backend, self._group_store, 0, len(group) + 1, min(left, self.timeout_s),
                             is_loopback(self.cfg.store_host))
        except Exception as e:
            log.warning("weight sync: group generation %d failed to form: %s", self.generation, e)
            self._group_store.set("abort", b"1")
            for m in group:
                if self._sync is not None:
                    self._sync.failed.setdefault(m.peer_id, f"group did not form: {e}")
            self._dirty = True
            return
        if hasattr(pg, "set_timeout"):  # built with what was left of this sync; later syncs get the full time
            pg.set_timeout(_td(self.timeout_s))
        self._group = pg
        self._group_key = (self.generation, backend, tuple((m.peer_id, m.run_id) for m in group))
        self._dirty = False
        log.info("weight sync: generation %d formed (%s, %d members)", self.generation, backend, len(group))

    # ------------------------------------------------------------------ one sync
    def broadcast(self, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict:
        """Send `version` to every member. The iterable is consumed exactly once, even without
        members (it may drive collectives on the other training ranks), and all of it is held
        while the sync runs. Returns {version, generation, backend, members, ok, failed, dropped,
        reasons, bytes, buckets, seconds, transfer_seconds, error}."""
        with self._lock:
            return self._broadcast(version, named_tensors)

    def _broadcast(self, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict:
        t0 = time.monotonic()
        deadline = t0 + self.timeout_s
        tensors = [(n, t) for n, t in named_tensors]
        buckets = plan_buckets(tensors, self.bucket_bytes)
        if not buckets:
            raise SyncError("broadcast needs at least one tensor")
        device = tensors[0][1].device
        self._drain()
        self._sync = _SyncState(version, {})
        self._sync.dropped.update(self._between_drops)
        self._between_drops = {}
        backend, error, t_transfer = "", None, 0.0
        try:
            if self._members:
                backend = self._choose_backend(device)
                if self._dirty or self._group_key is None or self._group_key[1] != backend:
                    self._reform(version, backend, deadline)
                live = [m for m in self._planned if self._members.get(m.peer_id) is m]
                self._sync.expect = {m.peer_id: m.run_id for m in live}
                t1 = time.monotonic()
                error = self._transfer(version, buckets, backend, live, deadline)
                t_transfer = time.monotonic() - t1
                self._collect(max(deadline, time.monotonic() + self.grace_s))
            return self._report(buckets, backend, error, time.monotonic() - t0, t_transfer)
        finally:
            self._sync = None

    def _report(self, buckets: list[Bucket], backend: str, error: str | None, seconds: float,
                t_transfer: float) -> dict:
        s = self._sync
        nbytes = sum(b.nbytes for b in buckets)
        report = {
            "version": s.version, "generation": self.generation, "backend": backend,
            "members": sorted(s.expect), "ok": sorted(s.ok), "failed": sorted(s.failed),
            "dropped": sorted(s.dropped), "reasons": {**s.failed, **s.dropped},
            "bytes": nbytes, "buckets": len(buckets), "seconds": seconds,
            "transfer_seconds": t_transfer, "error": error,
        }
        if self._m:
            self._m["seconds"].observe(seconds)
            self._m["bytes"].inc(nbytes)
            self._m["members"].set(len(self._members))
            self._m["generation"].set(self.generation)
        level = logging.INFO if not (s.failed or s.dropped or error) else logging.WARNING
        log.log(level, "weight sync v%d: %d/%d ok, %.1f MB in %.3fs (%s), dropped %s, failed %s%s", s.version,
                len(s.ok), len(s.expect), nbytes / 1e6, seconds, backend or "no members", report["dropped"],
                report["failed"], f", error: {error}" if error else "")
        return report

    def _transfer(self, version: int, buckets: list[Bucket], backend: str, live: list[_Member],
                  deadline: float) -> str | None:
        """Per bucket: the header to every member, then the bytes over the group in segments
        (see bucket_segments), each broadcast as soon as it is ready; bucket k+1 is prepared in
        the other buffer while bucket k may still be in flight. Returns the group's error."""
        group = [m for m in live if m.transport in ("gloo", "nccl")] if self._group is not None else []
        zmq_m = [m for m in live if m.transport == "zmq"]
        dev = buckets[0].items[0][1].device if backend == "nccl" else torch.device("cpu")
        reuse = not zmq_m  # zmq sends are zero-copy: their buffers must stay untouched
        bufs = self._buffers(max(b.nbytes for b in buckets), min(2, len(buckets)), dev) if reuse else []
        inflight: list[list] = [[], []]
        error = None
        for k, b in enumerate(buckets):
            if group and inflight[k % 2]:
                error = self._finish(inflight[k % 2], deadline, group)
                group = group if error is None else []
            inflight[k % 2] = []
            zmq_m = [m for m in zmq_m if self._members.get(m.peer_id) is m]
            if not group and not zmq_m:
                break  # nobody left to send to
            header = WeightUpdateHeader(version=version, generation=self.generation, bucket=k,
                                        num_buckets=len(buckets), dtype=b.dtype, nbytes=b.nbytes,
                                        tensors=b.metas(), chunk_bytes=self.chunk_bytes)
            out = bufs[k % 2][:b.nbytes] if reuse else torch.empty(b.nbytes, dtype=torch.uint8, device=dev)
            if zmq_m or not group:
                flat = pack_bucket(b, out=out)  # the zmq members need the whole bucket packed
                self._send_data(header, flat, zmq_m, deadline)
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
        return error

    def _send_data(self, header: WeightUpdateHeader, flat: torch.Tensor, zmq_m: list[_Member],
                   deadline: float) -> None:
        if not zmq_m:
            return
        data = (flat if flat.device.type == "cpu" else flat.cpu()).numpy()
        msg = header.model_copy(update={"data": data, "chunk_bytes": 0})
        for m in zmq_m:
            if self._members.get(m.peer_id) is m and not self._send(m, msg, deadline):
                self._drop(m.peer_id, "could not take the bucket in time")

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

    def _start_bucket(self, header: WeightUpdateHeader, flat: torch.Tensor, group: list[_Member],
                      deadline: float, bucket: Bucket | None = None) -> list | None:
        """Send the header to the group, then broadcast the bucket's segments. With `bucket`, large
        tensors go straight from their own memory and small ones are packed into `flat` just
        before their segment; without, `flat` is already packed. None: a member is gone."""
        for m in group:
            if self._members.get(m.peer_id) is not m or not self._send(m, header, deadline):
                self._drop(m.peer_id, "header could not be delivered")
                self._abort_group("a member's connection was lost", group)
                return None
        works: list = []
        opts = _broadcast_opts()
        by_offset = {off: t for _, t, off in bucket.items} if bucket is not None else {}
        for s, e, direct in bucket_segments(header.tensors, header.nbytes, header.chunk_bytes):
            if bucket is None:
                src = flat[s:e]
            elif direct:
                src = as_bytes(by_offset[s], flat.device)
            else:
                pack_bucket(bucket, out=flat, start=s, end=e)
                src = flat[s:e]
            works.append((self._group.broadcast([src], opts), src))  # keep src alive until done
        return works

    def _finish(self, works: list, deadline: float, group: list[_Member]) -> str | None:
        try:
            for w, _src in works:
                _wait_work(w, deadline, poll=self._group_key is not None and self._group_key[1] == "nccl")
            return None
        except SyncError as e:
            self._abort_group(str(e), group)
            return str(e)

    def _abort_group(self, reason: str, group: list[_Member]) -> None:
        """Tell everyone in the group to give up this transfer; the group re-forms next sync."""
        log.warning("weight sync: generation %d transfer failed: %s", self.generation, reason)
        try:
            if self._group_store is not None:
                self._group_store.set("abort", b"1")
        except Exception:  # the store is ours; a failure here only slows the members down
            pass
        abort = SyncAbort(version=self._sync.version, generation=self.generation, reason=reason)
        for m in group:
            if self._members.get(m.peer_id) is m and not self._send(m, abort, time.monotonic() + 0.1):
                self._drop(m.peer_id, "connection lost", tell=False)
        self._close_group()
        self._dirty = True

    def _collect(self, until: float) -> None:
        """Wait for SyncDone from every member; probe the silent ones; drop who is gone or late."""
        s = self._sync
        next_probe = time.monotonic() + PROBE_INTERVAL_S
        while True:
            waiting = [p for p in s.unresolved() if p in self._members]
            now = time.monotonic()
            if not waiting or now >= until:
                break
            if now >= next_probe:
                next_probe = now + PROBE_INTERVAL_S
                self._probe(waiting)
            self._drain(int(min(20, max(1, (until - now) * 1000))))
        for p in s.unresolved():
            if p in self._members:
                self._drop(p, "no SyncDone within the timeout")
            else:
                s.dropped.setdefault(p, "left during the sync")


# --------------------------------------------------------------------------- actor side
_TRANSPORTS = ("gloo", "nccl", "zmq")


class SyncClient:
    """The actor worker's line to the learner's sync endpoint (one DEALER socket).

    poll() returns SyncPlan, WeightUpdateHeader, SyncAbort or None (timeout). It answers nothing
    by itself except one thing: a SyncAbort with rejoin=True (the learner dropped us) makes it send
    SyncJoin again with the last version it loaded. Heartbeat probes are swallowed, and so is a
    SyncAbort for a version this client already answered. `follow_sync` drives a whole update."""

    def __init__(self, endpoint: str, peer_id: str, run_id: str, transport_cfg,
                 transports: Iterable[str] = ("gloo", "zmq")):
        self.transports = tuple(dict.fromkeys(transports))
        bad = [t for t in self.transports if t not in _TRANSPORTS]
        if not self.transports or bad:
            raise ValueError(f"transports must be a non-empty subset of {_TRANSPORTS}, got {tuple(transports)}")
        self.endpoint, self.peer_id, self.run_id = endpoint, peer_id, run_id
        self.version = -1  # last version loaded
        self.rejoins = 0
        self._answered = -1
        self._ctx = zmq.Context()
        self._sock = connect(self._ctx, zmq.DEALER, endpoint, transport_cfg)

    def join(self, version: int) -> None:
        self.version = max(-1, int(version))
        send(self._sock, SyncJoin(peer_id=self.peer_id, run_id=self.run_id, version=self.version,
                                  transports=list(self.transports)))

    def poll(self, timeout_ms: int = 0) -> SyncPlan | WeightUpdateHeader | SyncAbort | None:
        end = time.monotonic() + max(0, timeout_ms) / 1000
        while True:
            try:
                frames = recv_frames(self._sock, max(0, int((end - time.monotonic()) * 1000)))
            except TransportTimeout:
                return None
            try:
                msg = decode(frames, expect=(SyncPlan, WeightUpdateHeader, SyncAbort, Heartbeat, ErrorReply))
            except ProtocolError as e:
                log.warning("weight sync: ignoring a malformed message from the learner: %s", e)
                continue
            if isinstance(msg, Heartbeat):
                continue
            if isinstance(msg, ErrorReply):
                raise SyncError(f"the learner refused our message: {msg.code}: {msg.message}")
            if isinstance(msg, SyncAbort):
                if msg.rejoin:
                    log.warning("weight sync: dropped by the learner (%s); joining again", msg.reason)
                    self.rejoins += 1
                    self.join(self.version)
                elif msg.version <= self._answered:
                    continue
            return msg

    def done(self, version: int, ok: bool, seconds: float, message: str = "") -> None:
        self._answered = max(self._answered, int(version))
        if ok:
            self.version = int(version)
        send(self._sock, SyncDone(peer_id=self.peer_id, run_id=self.run_id, version=int(version), ok=bool(ok),
                                  seconds=max(0.0, float(seconds)), message=message[:4096]))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None
            self._ctx.term()


def header_dict(header: WeightUpdateHeader) -> tuple[dict, np.ndarray | None]:
    """A header as (plain dict, data frame or None): what crosses collective_rpc to an engine worker."""
    return header.model_dump(mode="python", exclude={"data"}), header.data


def follow_sync(client: SyncClient, first: Message | None, setup: Callable[[dict], Any],
                receive: Callable[[dict, np.ndarray | None], Any], timeout_s: float | None = None) -> dict | None:
    """Drive one update from the message poll() returned to the SyncDone answer.

    setup(plan_dict) and receive(header_dict, data) run a BucketReceiver (here or, through
    collective_rpc, inside an engine worker) and load the tensors. Returns {version, ok, seconds,
    message, buckets} or None when `first` starts no update."""
    if first is None or isinstance(first, SyncAbort):
        return None
    t0 = time.monotonic()
    msg, version, expect, error = first, None, 0, ""
    wait_s = timeout_s or 30.0
    while True:
        if isinstance(msg, SyncPlan):
            wait_s = timeout_s or msg.timeout_s
            version = msg.version if version is None else version
            try:
                setup(msg.model_dump(mode="python"))
                error = ""
            except Exception as e:  # the learner re-plans or aborts; keep listening
                error = f"setup of generation {msg.generation} failed: {e}"
                log.warning("weight sync: %s", error)
        elif isinstance(msg, WeightUpdateHeader):
            if version is None:
                version = msg.version
            if msg.version != version or msg.bucket != expect:
                error = f"expected bucket {expect} of version {version}, got {msg.bucket} of {msg.version}"
                break
            try:
                receive(*header_dict(msg))
            except Exception as e:
                error = f"bucket {msg.bucket} of version {version}: {e}"
                break
            expect += 1
            if expect == msg.num_buckets:
                break
        elif isinstance(msg, SyncAbort):
            version = msg.version if version is None else version
            error = f"learner aborted version {msg.version}: {msg.reason}"
            break
        msg = client.poll(int(wait_s * 1000))
        if msg is None:
            error = f"no message from the learner within {wait_s:.1f}s"
            break
    seconds = time.monotonic() - t0
    ok = not error
    if version is not None:
        client.done(version, ok, seconds, error)
    return {"version": version, "ok": ok, "seconds": seconds, "message": error, "buckets": expect}


class BucketReceiver:
    """Receives buckets for one member. May live in a different process than the SyncClient
    (e.g. a vLLM worker reached through collective_rpc): it takes plain dicts.

    The tensors returned by receive() are views into that bucket's buffer (read-only for zmq
    data); load or copy them before the buffer is dropped."""

    def __init__(self, device: Any = None, reuse_buffer: bool = False):
        self.device = device  # NCCL only: the CUDA device to receive on (default: the current one)
        # reuse_buffer: receive every gloo bucket into one kept buffer (no fresh pages to fault in);
        # the views receive() returns are then valid only until the next receive()
        self.reuse_buffer = reuse_buffer
        self._buf: torch.Tensor | None = None
        self.plan: SyncPlan | None = None
        self._group = None
        self._prefix = None
        self._disposing: list[threading.Thread] = []

    def setup(self, plan: dict | SyncPlan) -> None:
        plan = plan if isinstance(plan, SyncPlan) else SyncPlan.model_validate(plan)
        self._close_group()
        self.plan = plan
        if plan.transport == "zmq":
            return
        deadline = time.monotonic() + plan.timeout_s
        try:
            store = dist.TCPStore(plan.store_host, plan.store_port, is_master=False, wait_for_workers=False,
                                  timeout=_td(plan.timeout_s))
        except Exception as e:
            raise SyncError(f"cannot reach the weight-sync store {plan.store_host}:{plan.store_port}: {e}") from None
        prefix = dist.PrefixStore(f"scout/{plan.generation}", store)
        prefix.set(f"ready/{plan.rank}", b"1")
        try:
            prefix.wait(["go"], _td(deadline - time.monotonic()))
            go = prefix.get("go")
        except Exception:
            raise SyncError(f"generation {plan.generation}: no go from the learner within {plan.timeout_s}s") from None
        if go != b"go":
            raise SyncAborted(f"generation {plan.generation} abandoned by the learner (a member did not arrive)")
        try:
            self._group = _make_group(plan.transport, prefix, plan.rank, plan.world_size,
                                      plan.timeout_s, is_loopback(plan.store_host))
        except Exception as e:
            raise SyncError(f"generation {plan.generation}: group did not form: {str(e).splitlines()[0][:300]}") from None
        self._prefix = prefix

    def _aborted(self) -> bool:
        try:
            return bool(self._prefix.check(["abort"]))
        except Exception:  # the learner's store is gone: so is the learner's side of the collective
            return True

    def receive(self, header: dict | WeightUpdateHeader, data: np.ndarray | None = None
                ) -> list[tuple[str, torch.Tensor]]:
        if not isinstance(header, WeightUpdateHeader):
            header = WeightUpdateHeader.model_validate({**header, "data": None})
        data = header.data if data is None else data
        if data is not None:
            arr = np.asarray(data)
            if arr.dtype != np.uint8 or arr.nbytes != header.nbytes:
                raise SyncError(f"data frame is {arr.nbytes} bytes of {arr.dtype}, header says {header.nbytes} uint8")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # zmq frames are read-only buffers
                flat = torch.from_numpy(arr.reshape(-1))
            return unpack_bucket(flat, header.tensors)
        plan = self.plan
        if plan is None or plan.transport == "zmq" or self._group is None:
            raise SyncError("no weight-sync group: setup() with a gloo/nccl plan first")
        if header.generation != plan.generation:
            raise SyncError(f"header of generation {header.generation}, group of generation {plan.generation}")
        dev = torch.device("cpu")
        if plan.transport == "nccl":
            dev = torch.device(self.device) if self.device is not None else torch.device("cuda", torch.cuda.current_device())
        flat = self._buffer(header.nbytes, dev)
        if header.nbytes:
            deadline = time.monotonic() + plan.timeout_s
            try:
                opts = _broadcast_opts()
                works = [self._group.broadcast([flat[s:e]], opts)
                         for s, e, _ in bucket_segments(header.tensors, header.nbytes, header.chunk_bytes)]
                for work in works:
                    _wait_work(work, deadline, self._aborted, poll=plan.transport == "nccl")
            except Exception as e:
                self._close_group()
                raise e if isinstance(e, SyncError) else SyncError(str(e).splitlines()[0][:300]) from None
        return unpack_bucket(flat, header.tensors)

    def _buffer(self, nbytes: int, dev: torch.device) -> torch.Tensor:
        if not self.reuse_buffer or dev.type != "cpu":
            return torch.empty(nbytes, dtype=torch.uint8, device=dev)
        if self._buf is None or self._buf.numel() < nbytes:
            self._buf = torch.empty(nbytes, dtype=torch.uint8)
        return self._buf[:nbytes]

    def _close_group(self) -> None:
        if self._group is not None:
            box, self._group = [self._group], None
            self._disposing = [t for t in self._disposing if t.is_alive()] + [_dispose(box)]
        self._prefix = None

    def close(self) -> None:
        self._close_group()
        _join_all(self._disposing, min(5.0, self.plan.timeout_s if self.plan else 5.0))
        self.plan = None
        self._buf = None
