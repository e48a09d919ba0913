"""Buckets: how a version's tensors are grouped, packed into flat uint8 buffers and cut into
the segments that travel; the same header lets the member derive the segments and unpack views.

    named tensors ─plan_buckets─▶ [Bucket(dtype, (name, tensor, offset)…)]   nothing copied yet
    Bucket ─pack_bucket / pack_range─▶ flat uint8 buffer                      the packing copy
    header (TensorMeta…, nbytes, chunk_bytes) ─bucket_segments─▶ [(start, end, direct)…]
        direct: a big tensor sent from its own memory (as_bytes); else a packed run of small ones
    flat buffer + TensorMeta… ─unpack_bucket─▶ [(name, view)]                 on the member

Bytes travel as uint8, so bfloat16 arrives as its exact bit pattern.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from common.weightsync.errors import SyncError
from common.weightsync.messages import TensorMeta
from common.wire import DTYPES

TORCH_DTYPES: dict[str, torch.dtype] = {
    "uint8": torch.uint8, "bool": torch.bool, "int32": torch.int32, "int64": torch.int64,
    "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64,
}
_DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}
assert set(TORCH_DTYPES) == set(DTYPES)

MAX_HEADER_ESTIMATE = 2 << 20  # close a bucket before its TensorMeta list nears the header cap
MAX_TENSORS_PER_BUCKET = 1 << 16
DIRECT_DIVISOR = 1  # with chunking, tensors of at least chunk/DIRECT_DIVISOR bytes go from their own memory
RAMP_DIVISOR = 16  # with a ramp (bench variant): first bucket bucket_mb / 16 (at least 1 MiB), then doubling


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


def pack_range(items: list[tuple[str, torch.Tensor, int]], i: int, flat: torch.Tensor, start: int, end: int) -> int:
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
