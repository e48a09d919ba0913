"""The colocated path: a member on the learner's own GPU maps the packed buckets (CUDA IPC)
instead of receiving them. NOT YET RUN ON A GPU (see CudaIpc).

    member (SyncClient) ── SyncColocated(host, gpu_uuid) ──▶ learner (after SyncJoin)
    learner: use_ipc(on, learner's (host, GPU), member's, ipc_ok)? ─▶ transport "cuda_ipc"
    per bucket (IpcSender, learner):
       pack into kept CUDA buffer k%2 (once the members released bucket k-2: await_release)
       ── WeightIpcBucket(TensorMeta…, IpcHandle) ──────────▶  open_bucket: map the buffer, load
       ◀──────────────────────── WeightIpcAck(bucket, ok)      GPU to GPU, synchronize, release
       a failure → this member gets the broadcast from the next sync on

The implementation in use (CudaIpc, or the CPU tests' ShmIpcStandIn) is this module's _IPC:
set_ipc_impl() installs one, ipc_impl() returns it.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import uuid
from typing import TYPE_CHECKING, Any

import torch

from common.weightsync.buckets import unpack_bucket
from common.weightsync.errors import SyncError
from common.weightsync.messages import IpcHandle, SyncAbort, WeightIpcBucket, WeightUpdateHeader
from common.weightsync.zmq_path import send_data

if TYPE_CHECKING:
    from common.weightsync.membership import Member, Membership


# --------------------------------------------------------------------------- the mechanism
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


def ipc_impl() -> CudaIpc:
    """The colocated-path implementation in use (set_ipc_impl changes it)."""
    return _IPC


def use_ipc(enabled: bool, learner_where: tuple[str, str] | None, member_where: tuple[str, str] | None,
            member_ipc_ok: bool) -> bool:
    """The colocated path is used for a member when it is switched on (learner.colocated_ipc),
    the learner's weights are on a GPU (learner_where), the member announced the very same host
    and GPU, and IPC has not failed for it before. Everyone else gets the broadcast."""
    return bool(enabled and learner_where is not None and member_where == learner_where and member_ipc_ok)


# --------------------------------------------------------------------------- learner side
class IpcSender:
    """The learner's colocated members: buffers on the weights' device, kept between syncs, and
    the per-bucket handle / release exchange."""

    def __init__(self, membership: Membership):
        self.ms = membership
        self.bufs: list[torch.Tensor] = []
        self.impl: CudaIpc | None = None  # the implementation that allocated bufs

    def buffers(self, size: int, n: int, dev: torch.device) -> list[torch.Tensor]:
        """Colocated-path buffers on the weights' device, kept between syncs."""
        keep = [b for b in self.bufs if b.numel() >= size and b.device == dev and self.impl is _IPC][:n]
        for b in self.bufs:
            if not any(b is x for x in keep):
                self.impl.free(b)
        self.impl = _IPC
        while len(keep) < n:
            keep.append(_IPC.alloc(size, dev))
        self.bufs = keep
        return keep

    def free(self) -> None:
        for b in self.bufs:
            self.impl.free(b)
        self.bufs = []

    def after_sync(self) -> None:
        self.impl.after_sync()

    def send(self, header: WeightUpdateHeader, flat: torch.Tensor, members: list[Member], deadline: float) -> None:
        """Bucket k's handle to every colocated member (one export each: torch counts references
        per export). An empty bucket goes as an empty data frame and counts as released."""
        ms = self.ms
        for m in members:
            if ms.members.get(m.peer_id) is not m:
                continue
            if header.nbytes == 0:
                send_data(ms, header, flat, [m], deadline)
                ms.sync.ipc_acked[m.peer_id] = header.bucket
                continue
            try:
                ipc = self.impl.export(flat)
                msg = WeightIpcBucket(version=header.version, generation=header.generation, bucket=header.bucket,
                                      num_buckets=header.num_buckets, dtype=header.dtype, nbytes=header.nbytes,
                                      tensors=header.tensors, ipc=ipc)
            except Exception as e:  # not shareable after all: this member falls back to the broadcast
                reason = f"colocated bucket {header.bucket} could not be exported: {e}"
                ms.sync.failed[m.peer_id] = reason
                ms.ipc_failed(m)
                ms.reply_raw([m.identity], SyncAbort(version=header.version, generation=ms.generation,
                                                     reason=reason))
                continue
            if not ms.send(m, msg, deadline):
                ms.drop(m.peer_id, "could not take the colocated bucket in time")

    def await_release(self, members: list[Member], bucket: int, deadline: float) -> list[Member]:
        """Wait until every colocated member released `bucket` (its buffer is packed next); drop
        whoever stays past the deadline. Returns the members still on the path."""
        ms = self.ms
        s = ms.sync
        while True:
            members = [m for m in members if ms.members.get(m.peer_id) is m and m.peer_id not in s.failed]
            waiting = [m for m in members if s.ipc_acked.get(m.peer_id, -1) < bucket]
            if not waiting:
                return members
            if time.monotonic() >= deadline:
                for m in waiting:
                    ms.drop(m.peer_id, f"did not release colocated bucket {bucket} in time")
                return [m for m in members if m not in waiting]
            ms.drain(5)


# --------------------------------------------------------------------------- member side
def open_bucket(header: WeightIpcBucket, device: Any) -> list[tuple[str, torch.Tensor]]:
    """Views of a colocated bucket, straight in the learner's buffer on this GPU (no copy);
    they are valid until this member acknowledges the bucket."""
    dev = device
    if dev is None:
        dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    flat = _IPC.open(header.ipc, header.nbytes, dev)
    return unpack_bucket(flat, header.tensors)
