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

    colocated member (learner.colocated_ipc; same host + GPU UUID; NOT YET RUN ON A GPU):
       ◀──── SyncColocated(host, gpu_uuid)  (after SyncJoin)
       per bucket: pack into kept CUDA buffer k%2 (once the members released bucket k-2)
       ── WeightIpcBucket(TensorMeta…, IpcHandle) ──────────▶  map the buffer (CUDA IPC), load
       ◀──────────────────────── WeightIpcAck(bucket, ok)      GPU to GPU, synchronize, release
       a failure → this member gets the broadcast from the next sync on

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
import os
import socket
import tempfile
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

from common.protocol import ErrorReply, Heartbeat
from common.weightsync.messages import (IpcHandle, SyncAbort, SyncColocated, SyncDone, SyncJoin, SyncPlan, TensorMeta,
                                        WeightIpcAck, WeightIpcBucket, WeightUpdateHeader)
from common.wire import DTYPES, MAX_ARRAY_BYTES, Message, ProtocolError, decode, encode
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
RAMP_DIVISOR = 16  # with a ramp (bench variant): first bucket bucket_mb / 16 (at least 1 MiB), then doubling
# a member keeps the CPU buffers it received a sync into, up to this many bytes, until release():
# freeing a 256 MB buffer takes 15-18 ms on the 2-core VM (munmap of its pages), time in which
# the next bucket's receives are not posted yet and SyncDone is not sent
HOLD_BYTES = 1 << 30


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


def plan_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int,
                 first_bytes: int | None = None) -> list[Bucket]:
    """Group tensors by dtype into buckets of at most `bucket_bytes` (a larger tensor gets a bucket
    of its own). Order is kept within a dtype; nothing is copied here.

    first_bytes (ramp): the first bucket closed holds at most first_bytes, the next twice that,
    and so on up to bucket_bytes. The sender packs bucket k+1 while bucket k is on the wire, but
    nothing is on the wire while it packs the first one; a small first bucket keeps that idle
    time short (packing is ~4x faster than a loopback broadcast, so each doubling is packed
    before its predecessor has left)."""
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
        limit = bucket_bytes if not first_bytes else min(bucket_bytes, max(1, first_bytes) << min(len(out), 40))
        if b is not None and b.items and (b.nbytes + n > limit or len(b.items) >= MAX_TENSORS_PER_BUCKET
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


def _pack_range(items: list[tuple[str, torch.Tensor, int]], i: int, flat: torch.Tensor, start: int, end: int) -> int:
    """Copy the tensors of `items` (sorted by offset) that lie in bytes [start, end) into `flat`,
    starting the scan at index i; returns the index after the last one inside. Linear in the
    bucket over all its segments (pack_bucket with start/end rescans every item)."""
    while i < len(items) and items[i][2] < start:
        i += 1
    with torch.no_grad():
        while i < len(items) and items[i][2] < end:
            _, t, off = items[i]
            n = t.numel() * t.element_size()
            if n:
                _copy_bytes(flat[off:off + n], t.detach().reshape(-1).view(torch.uint8))
            i += 1
    return i


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
    """The segments that carry one bucket, as (start, end, direct) byte ranges; both sides derive
    them from the header. chunk_bytes 0: the whole packed bucket in one. Otherwise a tensor of
    at least chunk_bytes goes alone, straight from its own memory (direct: no packing copy), and
    runs of smaller tensors are packed into segments of about chunk_bytes, each sent as soon as
    it is packed. Default learner.sync_chunk_mb = 4 with point-to-point sends on gloo; as gloo
    broadcasts (sync_gloo_op "broadcast") each segment costs ~0.4 ms more, which is why one
    packed segment per bucket was the default before (`bench/gloo_ops.py`,
    `bench/weightsync_bench.py --variants default,bc-whole`)."""
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


def segment_tag(bucket: int, segment: int) -> int:
    """The point-to-point tag of a bucket's segment (SyncPlan.op "send"), 32-bit as gloo wants.
    At most two buckets are in flight, and a bucket has fewer than MAX_TENSORS_PER_BUCKET (< 2**20)
    segments, so tags of ops in flight together never collide."""
    return ((bucket % (1 << 11)) << 20) | (segment % (1 << 20))


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


def _first_line(e: BaseException) -> str:
    """An error's first line, cut to 300 characters (torch's gloo errors carry long traces);
    its type's name when it has no message."""
    lines = str(e).splitlines()
    return lines[0][:300] if lines else type(e).__name__


def _failed(e: BaseException) -> SyncError:
    return SyncError(f"collective failed: {_first_line(e)}")


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
                    raise _failed(e2) from None
            if "timed out" not in str(e).lower():
                raise _failed(e) from None
        if should_abort is not None and time.monotonic() >= next_check:
            next_check = time.monotonic() + ABORT_CHECK_S
            if should_abort():
                raise SyncAborted("the learner aborted this transfer")


def _wait_p2p(works: list, deadline: float, should_abort: Callable[[], bool] | None = None) -> None:
    """Wait for gloo point-to-point ops (SyncPlan.op "send") until `deadline`; raise SyncError on
    failure or timeout. Unlike a broadcast's, a timed wait on a send or receive that expires
    closes every connection of the group (gloo's UnboundBuffer), so _wait_work's short slices
    cannot be used: without should_abort the ops are waited on here with what is left of the
    deadline; with it, a helper thread waits while this one checks the abort flag every
    ABORT_CHECK_S (the caller then closes the group, which ends the helper's wait)."""
    def wait_all() -> None:
        for w in works:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SyncError("point-to-point transfer timed out")
            try:
                w.wait(_td(left))
            except RuntimeError as e:
                raise _failed(e) from None

    if should_abort is None:
        return wait_all()
    done, errors = threading.Event(), []

    def run() -> None:
        try:
            wait_all()
        except SyncError as e:
            errors.append(e)
        finally:
            done.set()

    threading.Thread(target=run, name="weightsync-recv", daemon=True).start()
    while not done.wait(ABORT_CHECK_S):
        if time.monotonic() >= deadline:
            raise SyncError("point-to-point transfer timed out")
        if should_abort():
            raise SyncAborted("the learner aborted this transfer")
    if errors:
        raise errors[0]


# --------------------------------------------------------------------------- colocated path
class CudaIpc:
    """Share a flat uint8 CUDA buffer with another process on the same physical GPU (torch's
    CUDA IPC). The learner packs a bucket into a kept buffer and exports it; the fields of the
    export travel as a typed IpcHandle inside WeightIpcBucket on the sync control channel; the
    member rebuilds a tensor over the same device memory with torch's own rebuild function, its
    own storage class and its own device index (CUDA_VISIBLE_DEVICES may number the GPU
    differently there), so nothing from the wire is called or unpickled. The member loads from
    that memory (device to device, no host copy), synchronizes, and acknowledges; only then is
    the buffer packed again. Same GPU = same host name and same GPU UUID.

    NOT YET RUN ON A GPU: no GPU was lent while this was written. The CPU tests run the whole
    control flow with ShmIpcStandIn; test_cuda_ipc_colocated_for_real (gpu mark) runs this class."""

    name = "cuda"

    def location(self, device: Any) -> tuple[str, str] | None:
        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            return None
        return socket.gethostname(), str(torch.cuda.get_device_properties(device).uuid)

    def alloc(self, nbytes: int, device: Any) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=device)

    def free(self, buf: torch.Tensor) -> None:
        pass  # the caching allocator keeps it

    def export(self, buf: torch.Tensor) -> IpcHandle:
        from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

        torch.cuda.current_stream(buf.device).synchronize()  # packed before anyone maps it
        fn, args = reduce_tensor(buf)
        if fn is not rebuild_cuda_tensor or len(args) != 15:
            raise SyncError(f"unexpected CUDA IPC export ({getattr(fn, '__name__', fn)}, {len(args)} fields)")
        (_cls, _size, _stride, offset, _storage_cls, _dtype, device, handle, size_bytes, offset_bytes, _grad,
         rc_handle, rc_offset, ev_handle, ev_sync) = args
        return IpcHandle(device=int(device), handle=bytes(handle), storage_size_bytes=int(size_bytes),
                         storage_offset_bytes=int(offset_bytes), tensor_offset=int(offset),
                         ref_counter_handle=bytes(rc_handle or b""), ref_counter_offset=int(rc_offset or 0),
                         event_handle=bytes(ev_handle or b""), event_sync_required=bool(ev_sync))

    def open(self, ipc: IpcHandle, nbytes: int, device: Any) -> torch.Tensor:
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        device = torch.device(device if device is not None else "cuda")
        if device.type != "cuda" or not torch.cuda.is_available():
            raise SyncError(f"a CUDA IPC bucket needs a CUDA receiver, this one is on {device}")
        index = device.index if device.index is not None else torch.cuda.current_device()
        return rebuild_cuda_tensor(torch.Tensor, (nbytes,), (1,), ipc.tensor_offset, torch.storage.TypedStorage,
                                   torch.uint8, index, ipc.handle, ipc.storage_size_bytes, ipc.storage_offset_bytes,
                                   False, ipc.ref_counter_handle, ipc.ref_counter_offset, ipc.event_handle or None,
                                   ipc.event_sync_required)

    def done_reading(self, device: Any = None) -> None:
        """Loads from a mapped bucket are queued on the GPU: finish them before acknowledging."""
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize(device if device is not None and torch.device(device).type == "cuda" else None)

    def after_sync(self) -> None:
        """Producer side: let torch free the bookkeeping of exports the members have released."""
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.ipc_collect()


class ShmIpcStandIn(CudaIpc):
    """TEST STAND-IN for CudaIpc on machines without a GPU (named so wherever it is used): the
    same export / open / acknowledge flow over shared-memory files on the CPU, so the colocated
    path's control flow (selection, per-bucket messages, acknowledgements, buffer reuse,
    fallback) runs in CPU tests. Used only when a test installs it with set_ipc_impl()."""

    name = "cpu-shm-standin"

    def __init__(self):
        self._dir: str | None = None  # made at the first alloc, removed when its last file is freed
        self._paths: dict[int, str] = {}

    def location(self, device: Any) -> tuple[str, str] | None:
        if torch.device(device).type != "cpu":
            return None
        try:
            boot = open("/proc/sys/kernel/random/boot_id").read().strip()
        except OSError:
            boot = "unknown"
        return socket.gethostname(), f"standin-{boot}"

    def alloc(self, nbytes: int, device: Any) -> torch.Tensor:
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="scout-ipc-standin-",
                                         dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        path = os.path.join(self._dir, uuid.uuid4().hex)
        buf = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
        self._paths[buf.data_ptr()] = path
        return buf

    def free(self, buf: torch.Tensor) -> None:
        path = self._paths.pop(buf.data_ptr(), None)
        try:
            if path:
                os.unlink(path)
            if self._dir and not self._paths:
                os.rmdir(self._dir)
                self._dir = None
        except OSError:
            pass

    def export(self, buf: torch.Tensor) -> IpcHandle:
        base = buf.untyped_storage().data_ptr()
        path = self._paths.get(base)
        if path is None:
            raise SyncError("stand-in export of a buffer it did not allocate")
        return IpcHandle(device=0, handle=path.encode(), storage_size_bytes=buf.untyped_storage().nbytes(),
                         storage_offset_bytes=0, tensor_offset=buf.data_ptr() - base)

    def open(self, ipc: IpcHandle, nbytes: int, device: Any) -> torch.Tensor:
        path = ipc.handle.decode(errors="replace")
        if not path.startswith(tempfile.gettempdir()) and not path.startswith("/dev/shm/"):
            raise SyncError(f"stand-in handle {path!r} is not a shared-memory file")
        try:
            whole = torch.from_file(path, shared=True, size=ipc.storage_size_bytes, dtype=torch.uint8)
        except Exception as e:
            raise SyncError(f"stand-in cannot map {path}: {e}") from None
        return whole[ipc.tensor_offset:ipc.tensor_offset + nbytes]

    def done_reading(self, device: Any = None) -> None:
        pass

    def after_sync(self) -> None:
        pass


_IPC: CudaIpc = CudaIpc()


def set_ipc_impl(impl: CudaIpc) -> CudaIpc:
    """Install the colocated-path implementation (tests: ShmIpcStandIn); returns the previous one."""
    global _IPC
    old, _IPC = _IPC, impl
    return old


def gpu_location(device: Any) -> tuple[str, str] | None:
    """(host, GPU UUID) of a device for SyncClient(colocated=...); None when not on a GPU."""
    return _IPC.location(device)


def use_ipc(enabled: bool, learner_where: tuple[str, str] | None, member_where: tuple[str, str] | None,
            member_ipc_ok: bool) -> bool:
    """The colocated path is used for a member when it is switched on (learner.colocated_ipc),
    the learner's weights are on a GPU (learner_where), the member announced the very same host
    and GPU, and IPC has not failed for it before. Everyone else gets the broadcast."""
    return bool(enabled and learner_where is not None and member_where == learner_where and member_ipc_ok)


# --------------------------------------------------------------------------- learner side
@dataclasses.dataclass
class _Member:
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
class _SyncState:
    version: int
    expect: dict[str, str]  # peer_id -> run_id of everyone this sync is for
    ok: set[str] = dataclasses.field(default_factory=set)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)
    dropped: dict[str, str] = dataclasses.field(default_factory=dict)
    ipc_acked: dict[str, int] = dataclasses.field(default_factory=dict)  # peer -> last bucket released

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
        self.gloo_op = getattr(learner_cfg, "sync_gloo_op", "send")  # read at each group formation
        self._op = "broadcast"  # the formed group's op (SyncPlan.op)
        # ramp (plan_buckets first_bytes): off. Measured on the loaded 2-core VM it lost wall time
        # (more buckets, more wake-ups per sync); bench/weightsync_bench.py --variants ramp tries it
        self.first_bucket_bytes: int | None = None
        self.run_id = uuid.uuid4().hex
        self.endpoint: str | None = None
        self.store_port: int | None = None
        self.generation = 0
        self._members: dict[str, _Member] = {}
        self._dirty = True  # re-form the group at the next sync
        self._changes = 0  # membership events seen; a re-formation that saw one after its plans stays dirty
        self._group = None
        self._group_key: tuple | None = None
        self._group_store = None
        self._between_drops: dict[str, str] = {}
        self._sync: _SyncState | None = None
        self._planned: list[_Member] = []
        self._cpu_bufs: list[torch.Tensor] = []
        self.colocated_ipc = bool(getattr(learner_cfg, "colocated_ipc", False))
        self._ipc_where: tuple[str, str] | None = None  # set per sync from the weights' device
        self._ipc_bufs: list[torch.Tensor] = []
        self._ipc_impl: CudaIpc | None = None  # the implementation that allocated _ipc_bufs
        self._disposing: list[threading.Thread] = []
        self._lock = threading.RLock()  # public methods may be called from several threads
        self._ctx = self._sock = self._store = None
        self._probe_seq = 0
        self._metrics(metrics)

    def _metrics(self, m) -> None:
        self._m = None
        reject = getattr(m, "reject", None)  # bad input on the sync control socket, by reason
        self._reject = (lambda reason: reject("sync", reason)) if reject else (lambda reason: None)
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
        log.info("weight sync: endpoint %s, store %s:%d, bucket %.3g MiB, segments %.3g MiB, timeout %.1fs, "
                 "colocated CUDA IPC %s", self.endpoint, self.store_host, self.store_port, self.bucket_bytes / 2**20,
                 self.chunk_bytes / 2**20, self.timeout_s, "on" if self.colocated_ipc else "off")

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        self._close_group()
        _join_all(self._disposing, min(5.0, self.timeout_s))
        self._cpu_bufs = []
        self._free_ipc_buffers()
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

    def member_runs(self) -> dict[str, str]:
        """peer id -> run id of every member (a restarted actor keeps its id, not its run)."""
        with self._lock:
            self._drain()
            return {m.peer_id: m.run_id for m in self._members.values()}

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

    def _drain(self, timeout_ms: int = 0, budget: int = 1000) -> None:
        """Handle the messages waiting on the socket (joins, dones, garbage): at most `budget` per
        call, so a flood of messages cannot keep the caller (the training loop) in here."""
        if self._sock is None:
            raise SyncError("WeightSender.start() was not called")
        for i in range(budget):
            if not self._sock.poll(timeout_ms if i == 0 else 0, zmq.POLLIN):
                return
            frames = self._sock.recv_multipart(copy=False)
            try:
                envelope, body = split_envelope(frames)
                msg = decode(body, expect=(SyncJoin, SyncDone, SyncColocated, WeightIpcAck))
            except ProtocolError as e:
                self._reject(e.reason)
                if len(frames) >= 2:
                    self._reply_raw(frames[:1], ErrorReply(code="bad_request", message=str(e)[:4096]))
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
        old = self._members.get(msg.peer_id)
        self._mark_dirty()  # whoever joins gets a fresh plan at the next sync
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
            s.failed.setdefault(msg.peer_id, msg.message or "member reported failure")  # the first cause
            self._mark_dirty()  # its group may be broken: re-form next time
            self._ipc_failed(m)

    def _on_colocated(self, msg: SyncColocated) -> None:
        m = self._members.get(msg.peer_id)
        if m is None or m.run_id != msg.run_id:
            return  # it comes right after the member's SyncJoin; anything else is stale
        where = (msg.host, msg.gpu_uuid)
        if m.where != where:
            m.where, m.ipc_ok = where, True
            self._mark_dirty()

    def _on_ipc_ack(self, msg: WeightIpcAck) -> None:
        m, s = self._members.get(msg.peer_id), self._sync
        if m is None or m.run_id != msg.run_id or s is None or msg.version != s.version:
            return
        if msg.ok:
            s.ipc_acked[msg.peer_id] = max(s.ipc_acked.get(msg.peer_id, -1), msg.bucket)
            return
        s.failed.setdefault(msg.peer_id, f"colocated bucket {msg.bucket}: {msg.message or 'failed'}")
        self._ipc_failed(m)

    def _ipc_failed(self, m: _Member) -> None:
        if m.transport == "cuda_ipc" and m.ipc_ok:
            log.warning("weight sync: the colocated path failed for %s; it gets the broadcast from now on", m.peer_id)
            m.ipc_ok = False
            self._mark_dirty()

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
        self._mark_dirty()
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
    def _mark_dirty(self) -> None:
        self._dirty = True
        self._changes += 1

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

    def _assign(self, backend: str) -> tuple[list[_Member], list[_Member], list[_Member]]:
        group, zmq_only, ipc = [], [], []
        for m in self._members.values():
            if use_ipc(self.colocated_ipc, self._ipc_where, m.where, m.ipc_ok):
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
        for m in [m for m in self._members.values() if not m.transport]:
            reason = f"no common transport: the learner uses {backend} or zmq, the member offers {list(m.transports)}"
            self._drop(m.peer_id, reason, tell=False)
            self._reply_raw([m.identity], SyncAbort(version=self._sync.version if self._sync else 0,
                                                    generation=self.generation, reason=reason))
        return group, zmq_only, ipc

    def _op_for(self, backend: str) -> str:
        return "send" if backend == "gloo" and self.gloo_op == "send" else "broadcast"

    def _reform(self, version: int, backend: str, deadline: float) -> None:
        """New generation: plan every member, rendezvous the group members, build the group."""
        self._close_group()
        self._op = self._op_for(backend)
        for _attempt in range(3):
            self.generation += 1
            group, zmq_only, ipc = self._assign(backend)
            world = len(group) + 1
            for m in group + zmq_only + ipc:
                # colocated members get a plan without a group: their buckets come on this channel
                in_group = m.transport in ("gloo", "nccl")
                plan = SyncPlan(version=version, generation=self.generation,
                                transport=m.transport if in_group else "zmq", store_host=self.store_host,
                                store_port=self.store_port, rank=m.rank, world_size=world if in_group else 1,
                                timeout_s=self.timeout_s, op=self._op if in_group else "broadcast")
                if not self._send(m, plan, deadline):
                    self._drop(m.peer_id, "plan could not be delivered", tell=False)
            group = [m for m in group if self._members.get(m.peer_id) is m]
            self._planned = group + [m for m in zmq_only + ipc if self._members.get(m.peer_id) is m]
            if not group:  # zmq members only: nothing to rendezvous
                self._group_key = (self.generation, backend, ())
                self._dirty = False
                return
            seen = self._changes  # a join handled during the rendezvous is not in this group
            missing = self._rendezvous(group, deadline)
            if not missing:
                if self._build_group(group, backend, deadline):
                    self._dirty = self._changes != seen  # ... so it re-forms the group next time
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

    def _build_group(self, group: list[_Member], backend: str, deadline: float) -> bool:
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
            self._mark_dirty()
            return False
        if hasattr(pg, "set_timeout"):  # built with what was left of this sync; later syncs get the full time
            pg.set_timeout(_td(self.timeout_s))
        self._group = pg
        self._group_key = (self.generation, backend, tuple((m.peer_id, m.run_id) for m in group))
        log.info("weight sync: generation %d formed (%s, %d members)", self.generation, backend, len(group))
        return True

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
        buckets = plan_buckets(tensors, self.bucket_bytes, self.first_bucket_bytes)
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
                where = _IPC.location(device) if self.colocated_ipc else None
                if where != self._ipc_where:
                    self._ipc_where, self._dirty = where, True
                if (self._dirty or self._group_key is None or self._group_key[1] != backend
                        or self._op != self._op_for(backend)):
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
        (see bucket_segments), each sent (SyncPlan.op) as soon as it is ready; bucket k+1 is prepared in
        the other buffer while bucket k may still be in flight. Colocated members get the packed
        bucket's IPC handle instead, and its buffer is packed again only once they released it.
        Returns the group's error."""
        group = [m for m in live if m.transport in ("gloo", "nccl")] if self._group is not None else []
        zmq_m = [m for m in live if m.transport == "zmq"]
        ipc_m = [m for m in live if m.transport == "cuda_ipc"]
        dev = buckets[0].items[0][1].device if backend == "nccl" else torch.device("cpu")
        size, nbuf = max(b.nbytes for b in buckets), min(2, len(buckets))
        reuse = not zmq_m and not ipc_m  # zmq sends are zero-copy: their buffers must stay untouched
        bufs = self._buffers(size, nbuf, dev) if reuse else []
        ipc_bufs = self._ipc_buffers(size, nbuf, buckets[0].items[0][1].device) if ipc_m else []
        inflight: list[list] = [[], []]
        error = None
        for k, b in enumerate(buckets):
            if group and inflight[k % 2]:
                error = self._finish(inflight[k % 2], deadline, group)
                group = group if error is None else []
            inflight[k % 2] = []
            zmq_m = [m for m in zmq_m if self._members.get(m.peer_id) is m]
            ipc_m = self._await_ipc(ipc_m, k - nbuf, deadline) if ipc_m else []
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
                self._send_ipc(header, flat, ipc_m, deadline)
                self._send_data(header, flat.clone() if ipc_m and flat.device.type == "cpu" else flat, zmq_m, deadline)
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
            self._ipc_impl.after_sync()
        return error

    # ------------------------------------------------------------------ colocated members
    def _ipc_buffers(self, size: int, n: int, dev: torch.device) -> list[torch.Tensor]:
        """Colocated-path buffers on the weights' device, kept between syncs."""
        keep = [b for b in self._ipc_bufs if b.numel() >= size and b.device == dev and self._ipc_impl is _IPC][:n]
        for b in self._ipc_bufs:
            if not any(b is x for x in keep):
                self._ipc_impl.free(b)
        self._ipc_impl = _IPC
        while len(keep) < n:
            keep.append(_IPC.alloc(size, dev))
        self._ipc_bufs = keep
        return keep

    def _free_ipc_buffers(self) -> None:
        for b in self._ipc_bufs:
            self._ipc_impl.free(b)
        self._ipc_bufs = []

    def _send_ipc(self, header: WeightUpdateHeader, flat: torch.Tensor, members: list[_Member],
                  deadline: float) -> None:
        """Bucket k's handle to every colocated member (one export each: torch counts references
        per export). An empty bucket goes as an empty data frame and counts as released."""
        for m in members:
            if self._members.get(m.peer_id) is not m:
                continue
            if header.nbytes == 0:
                self._send_data(header, flat, [m], deadline)
                self._sync.ipc_acked[m.peer_id] = header.bucket
                continue
            try:
                ipc = self._ipc_impl.export(flat)
                msg = WeightIpcBucket(version=header.version, generation=header.generation, bucket=header.bucket,
                                      num_buckets=header.num_buckets, dtype=header.dtype, nbytes=header.nbytes,
                                      tensors=header.tensors, ipc=ipc)
            except Exception as e:  # not shareable after all: this member falls back to the broadcast
                reason = f"colocated bucket {header.bucket} could not be exported: {e}"
                self._sync.failed[m.peer_id] = reason
                self._ipc_failed(m)
                self._reply_raw([m.identity], SyncAbort(version=header.version, generation=self.generation,
                                                        reason=reason))
                continue
            if not self._send(m, msg, deadline):
                self._drop(m.peer_id, "could not take the colocated bucket in time")

    def _await_ipc(self, members: list[_Member], bucket: int, deadline: float) -> list[_Member]:
        """Wait until every colocated member released `bucket` (its buffer is packed next); drop
        whoever stays past the deadline. Returns the members still on the path."""
        s = self._sync
        while True:
            members = [m for m in members if self._members.get(m.peer_id) is m and m.peer_id not in s.failed]
            waiting = [m for m in members if s.ipc_acked.get(m.peer_id, -1) < bucket]
            if not waiting:
                return members
            if time.monotonic() >= deadline:
                for m in waiting:
                    self._drop(m.peer_id, f"did not release colocated bucket {bucket} in time")
                return [m for m in members if m not in waiting]
            self._drain(5)

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
        """Send the header to the group, then the bucket's segments (SyncPlan.op). With `bucket`, large
        tensors go straight from their own memory and small ones are packed into `flat` just
        before their segment; without, `flat` is already packed. None: a member is gone."""
        for m in group:
            if self._members.get(m.peer_id) is not m or not self._send(m, header, deadline):
                self._drop(m.peer_id, "header could not be delivered")
                self._abort_group("a member's connection was lost", group)
                return None
        works: list = []
        opts = _broadcast_opts()
        ranks = [m.rank for m in group]
        items = bucket.items if bucket is not None else []  # in offset order (plan_buckets)
        by_offset = {off: t for _, t, off in items}
        i = 0  # first item not yet packed or sent
        for seg, (s, e, direct) in enumerate(bucket_segments(header.tensors, header.nbytes, header.chunk_bytes)):
            if bucket is None:
                src = flat[s:e]
            elif direct:
                src = as_bytes(by_offset[s], flat.device)
            else:
                i = _pack_range(items, i, flat, s, e)
                src = flat[s:e]
            if self._op == "send":  # keep src alive until done
                tag = segment_tag(header.bucket, seg)
                works.extend((self._group.send([src], r, tag), src) for r in ranks)
            else:
                works.append((self._group.broadcast([src], opts), src))
        return works

    def _finish(self, works: list, deadline: float, group: list[_Member]) -> str | None:
        try:
            if self._op == "send":
                _wait_p2p([w for w, _src in works], deadline)
            else:
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
        self._mark_dirty()

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
                 transports: Iterable[str] = ("gloo", "zmq"), colocated: Any = "auto"):
        """colocated: (host, GPU UUID) of the device this member loads into, announced after every
        join so that a learner on that same GPU can use the CUDA-IPC path; None: never; "auto":
        the current CUDA device when "nccl" is offered and CUDA is already initialised in this
        process (the weights live here), else None."""
        self.transports = tuple(dict.fromkeys(transports))
        bad = [t for t in self.transports if t not in _TRANSPORTS]
        if not self.transports or bad:
            raise ValueError(f"transports must be a non-empty subset of {_TRANSPORTS}, got {tuple(transports)}")
        self.endpoint, self.peer_id, self.run_id = endpoint, peer_id, run_id
        self.version = -1  # last version loaded
        self.rejoins = 0
        self._answered = -1
        if colocated == "auto":
            colocated = None
            if "nccl" in self.transports and torch.cuda.is_available() and torch.cuda.is_initialized():
                colocated = gpu_location(torch.device("cuda", torch.cuda.current_device()))
        self.colocated: tuple[str, str] | None = tuple(colocated) if colocated else None
        self._ctx = zmq.Context()
        self._sock = connect(self._ctx, zmq.DEALER, endpoint, transport_cfg)

    def join(self, version: int) -> None:
        self.version = max(-1, int(version))
        send(self._sock, SyncJoin(peer_id=self.peer_id, run_id=self.run_id, version=self.version,
                                  transports=list(self.transports)))
        if self.colocated:
            send(self._sock, SyncColocated(peer_id=self.peer_id, run_id=self.run_id, host=self.colocated[0],
                                           gpu_uuid=self.colocated[1]))

    def poll(self, timeout_ms: int = 0) -> SyncPlan | WeightUpdateHeader | WeightIpcBucket | SyncAbort | None:
        end = time.monotonic() + max(0, timeout_ms) / 1000
        while True:
            try:
                frames = recv_frames(self._sock, max(0, int((end - time.monotonic()) * 1000)))
            except TransportTimeout:
                return None
            try:
                msg = decode(frames, expect=(SyncPlan, WeightUpdateHeader, WeightIpcBucket, SyncAbort, Heartbeat,
                                             ErrorReply))
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

    def ack_ipc(self, version: int, bucket: int, ok: bool, message: str = "") -> None:
        """Release a colocated bucket's buffer to the learner (after the loads from it finished)."""
        send(self._sock, WeightIpcAck(peer_id=self.peer_id, run_id=self.run_id, version=int(version),
                                      bucket=int(bucket), ok=bool(ok), message=message[:4096]))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None
            self._ctx.term()


def header_dict(header: WeightUpdateHeader | WeightIpcBucket) -> tuple[dict, np.ndarray | None]:
    """A header as (plain dict, data frame or None): what crosses collective_rpc to an engine worker.
    A colocated bucket's dict carries its "ipc" handle fields and no data."""
    if isinstance(header, WeightIpcBucket):
        return header.model_dump(mode="python"), None
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
        elif isinstance(msg, (WeightUpdateHeader, WeightIpcBucket)):
            if version is None:
                version = msg.version
            if msg.version != version or msg.bucket != expect:
                error = f"expected bucket {expect} of version {version}, got {msg.bucket} of {msg.version}"
                break
            error = _receive_one(client, msg, receive)
            if error:
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


def _receive_one(client: SyncClient, msg: WeightUpdateHeader | WeightIpcBucket,
                 receive: Callable[[dict, np.ndarray | None], Any]) -> str:
    """receive() one bucket; a colocated one is then released (after the GPU finished reading it)
    or reported failed. Returns the error text, "" when fine."""
    ipc = isinstance(msg, WeightIpcBucket)
    try:
        receive(*header_dict(msg))
        if ipc:
            _IPC.done_reading()
    except Exception as e:
        error = f"bucket {msg.bucket} of version {msg.version}: {e}"
        if ipc:
            client.ack_ipc(msg.version, msg.bucket, False, error)
        return error
    if ipc:
        client.ack_ipc(msg.version, msg.bucket, True)
    return ""


class BucketReceiver:
    """Receives buckets for one member. May live in a different process than the SyncClient
    (e.g. a vLLM worker reached through collective_rpc): it takes plain dicts.

    The tensors returned by receive() are views into that bucket's buffer (read-only for zmq
    data); load or copy them before the buffer is dropped. The receiver holds fresh CPU buffers
    (up to HOLD_BYTES) until release(), which the member calls after its SyncDone so that freeing
    them costs the learner nothing; the first bucket of the next update releases them otherwise."""

    def __init__(self, device: Any = None, reuse_buffer: bool = False):
        self.device = device  # NCCL only: the CUDA device to receive on (default: the current one)
        # reuse_buffer: receive every gloo bucket into one kept buffer (no fresh pages to fault in);
        # the views receive() returns are then valid only until the next receive()
        self.reuse_buffer = reuse_buffer
        self._buf: torch.Tensor | None = None
        self._held: list[torch.Tensor] = []
        self._held_bytes = 0
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
            raise SyncError(f"generation {plan.generation}: group did not form: {_first_line(e)}") from None
        self._prefix = prefix

    def _aborted(self) -> bool:
        try:
            return bool(self._prefix.check(["abort"]))
        except Exception:  # the learner's store is gone: so is the learner's side of the collective
            return True

    def receive(self, header: dict | WeightUpdateHeader | WeightIpcBucket, data: np.ndarray | None = None
                ) -> list[tuple[str, torch.Tensor]]:
        if isinstance(header, WeightIpcBucket) or (isinstance(header, dict) and "ipc" in header):
            return self._receive_ipc(header)
        if not isinstance(header, WeightUpdateHeader):
            header = WeightUpdateHeader.model_validate({**header, "data": None})
        if header.bucket == 0:
            self.release()  # the previous update's buffers, if nobody released them
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
                segs = bucket_segments(header.tensors, header.nbytes, header.chunk_bytes)
                if plan.op == "send":
                    works = [self._group.recv([flat[s:e]], 0, segment_tag(header.bucket, k))
                             for k, (s, e, _) in enumerate(segs)]
                    _wait_p2p(works, deadline, self._aborted)
                else:
                    works = [self._group.broadcast([flat[s:e]], opts) for s, e, _ in segs]
                    for work in works:
                        _wait_work(work, deadline, self._aborted, poll=plan.transport == "nccl")
            except Exception as e:
                self._close_group()
                raise e if isinstance(e, SyncError) else SyncError(_first_line(e)) from None
        return unpack_bucket(flat, header.tensors)

    def _receive_ipc(self, header: dict | WeightIpcBucket) -> list[tuple[str, torch.Tensor]]:
        """Views of a colocated bucket, straight in the learner's buffer on this GPU (no copy);
        they are valid until this member acknowledges the bucket."""
        if not isinstance(header, WeightIpcBucket):
            header = WeightIpcBucket.model_validate(header)
        dev = self.device
        if dev is None:
            dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        flat = _IPC.open(header.ipc, header.nbytes, dev)
        return unpack_bucket(flat, header.tensors)

    def _buffer(self, nbytes: int, dev: torch.device) -> torch.Tensor:
        if dev.type != "cpu":
            return torch.empty(nbytes, dtype=torch.uint8, device=dev)
        if not self.reuse_buffer:
            buf = torch.empty(nbytes, dtype=torch.uint8)
            self._held.append(buf)
            self._held_bytes += nbytes
            while self._held_bytes > HOLD_BYTES and len(self._held) > 1:
                self._held_bytes -= self._held.pop(0).numel()
            return buf
        if self._buf is None or self._buf.numel() < nbytes:
            self._buf = torch.empty(nbytes, dtype=torch.uint8)
        return self._buf[:nbytes]

    def release(self) -> None:
        """Drop this receiver's hold on the buffers received so far (their memory goes once the
        loaded views are gone too)."""
        self._held.clear()
        self._held_bytes = 0

    def _close_group(self) -> None:
        if self._group is not None:
            box, self._group = [self._group], None
            self._disposing = [t for t in self._disposing if t.is_alive()] + [_dispose(box)]
        self._prefix = None

    def close(self) -> None:
        self.release()
        self._close_group()
        _join_all(self._disposing, min(5.0, self.plan.timeout_s if self.plan else 5.0))
        self.plan = None
        self._buf = None
