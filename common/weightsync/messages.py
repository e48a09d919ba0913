"""Weight-sync messages: the learner ⇄ actor-worker exchange that moves a new policy version
(the frames they travel in: common/wire.py; the code that speaks them: this package).

    SyncJoin ──▶ learner ──▶ SyncPlan           a member asks in; the plan says where and how
    WeightUpdateHeader (+ bytes on the group)   one bucket of the update, per bucket
    SyncAbort                                   the learner gave up this version for the member
    SyncDone ◀── member                         loaded (or failed), with the time it took
    SyncColocated, WeightIpcBucket ⇄ WeightIpcAck   the colocated path (CUDA IPC on one GPU)
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from common.wire import DTYPES, MAX_STR, ArraySpec, Message, register


class TensorMeta(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(min_length=1, max_length=1024)
    dtype: str
    shape: list[int] = Field(max_length=8)
    offset: int = Field(ge=0)  # byte offset inside the bucket

    @model_validator(mode="after")
    def _check(self) -> "TensorMeta":
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown tensor dtype {self.dtype!r}")
        if any(d < 0 for d in self.shape):
            raise ValueError("negative dimension")
        return self

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


@register
class SyncJoin(Message):
    """An actor worker asks to join the weight-sync group at the next sync."""

    TYPE = "sync_join"
    peer_id: str = Field(min_length=1, max_length=256)
    run_id: str = Field(min_length=1, max_length=256)
    version: int = Field(ge=-1)
    transports: list[Literal["gloo", "nccl", "zmq"]] = Field(min_length=1, max_length=3)


@register
class SyncPlan(Message):
    """The learner's answer to a join: where and how the next broadcast happens."""

    TYPE = "sync_plan"
    VERSION = 2  # 2: `op` (a version-1 member would receive sends as broadcasts)
    version: int = Field(ge=0)
    generation: int = Field(ge=0)  # group incarnation; changes whenever membership changes
    transport: Literal["gloo", "nccl", "zmq"]
    store_host: str = Field(max_length=256)
    store_port: int = Field(ge=0, le=65535)
    rank: int = Field(ge=0)
    world_size: int = Field(ge=1)
    timeout_s: float = Field(gt=0)
    # how group bytes travel: "broadcast" (one collective per segment), "send" (the learner, rank
    # 0, sends each segment to every member, point to point: gloo's cheaper per-op path) or "chain"
    # (gloo: the learner sends each segment to rank 1 only, rank k forwards it to rank k+1 as it
    # arrives; collective.py). A member of an older build refuses a "chain" plan as malformed.
    op: Literal["broadcast", "send", "chain"] = "broadcast"


def _check_bucket_layout(m: "WeightUpdateHeader | WeightIpcBucket") -> None:
    """The checks a bucket's header shares with a colocated bucket's: index, dtype, tensor spans."""
    if m.bucket >= m.num_buckets:
        raise ValueError(f"bucket {m.bucket} of {m.num_buckets}")
    if m.dtype not in DTYPES:
        raise ValueError(f"unknown bucket dtype {m.dtype!r}")
    for t in m.tensors:
        if t.dtype != m.dtype:
            raise ValueError(f"tensor {t.name} is {t.dtype} in a {m.dtype} bucket")
        if t.offset + t.nbytes > m.nbytes:
            raise ValueError(f"tensor {t.name} runs past the end of the bucket")


@register
class WeightUpdateHeader(Message):
    """Announces one bucket of a weight update. Over gloo/nccl the bucket bytes follow on the
    process group; over zmq they travel as the `data` frame of this message."""

    TYPE = "weight_update"
    ARRAYS = {"data": ArraySpec(("uint8",))}
    version: int = Field(ge=0)
    generation: int = Field(default=0, ge=0)  # the SyncPlan generation whose group carries the bytes
    chunk_bytes: int = Field(default=0, ge=0)  # >0: group bytes come in segments (buckets.bucket_segments)
    bucket: int = Field(ge=0)
    num_buckets: int = Field(ge=1)
    dtype: str
    nbytes: int = Field(ge=0)
    tensors: list[TensorMeta] = Field(max_length=1 << 16)
    data: np.ndarray | None = None

    @model_validator(mode="after")
    def _check(self) -> "WeightUpdateHeader":
        _check_bucket_layout(self)
        if self.data is not None and self.data.nbytes != self.nbytes:
            raise ValueError(f"data has {self.data.nbytes} bytes, header says {self.nbytes}")
        return self


@register
class SyncAbort(Message):
    """The learner abandoned `version` for this member (its group failed or it was too slow).
    rejoin=True: the learner dropped the member, which must send SyncJoin again to get updates."""

    TYPE = "sync_abort"
    version: int = Field(ge=0)
    generation: int = Field(ge=0)
    reason: str = Field(default="", max_length=MAX_STR)
    rejoin: bool = False


@register
class SyncDone(Message):
    """A receiver reports that it loaded `version` (or failed to)."""

    TYPE = "sync_done"
    peer_id: str = Field(min_length=1, max_length=256)
    run_id: str = Field(min_length=1, max_length=256)
    version: int = Field(ge=0)
    ok: bool
    seconds: float = Field(ge=0.0)
    message: str = Field(default="", max_length=MAX_STR)


# --------------------------------------------------------------------------- colocated path (CUDA IPC, one GPU)
@register
class SyncColocated(Message):
    """A member tells the learner where its weights live: host and physical GPU UUID (after its
    SyncJoin). A learner whose tensors sit on that same GPU may share buckets through CUDA IPC
    (learner.colocated_ipc) instead of broadcasting them."""

    TYPE = "sync_colocated"
    peer_id: str = Field(min_length=1, max_length=256)
    run_id: str = Field(min_length=1, max_length=256)
    host: str = Field(min_length=1, max_length=256)
    gpu_uuid: str = Field(min_length=1, max_length=128)


class IpcHandle(BaseModel):
    """The fields of torch's CUDA IPC export of one flat uint8 buffer (what
    torch.multiprocessing.reductions.reduce_tensor returns, minus the classes and callables:
    the receiver supplies those itself, so nothing executable crosses the wire)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    device: int = Field(ge=0)  # the exporter's device index (the receiver opens on its own device)
    handle: bytes = Field(min_length=1, max_length=512)  # cudaIpcMemHandle of the allocation
    storage_size_bytes: int = Field(ge=1)
    storage_offset_bytes: int = Field(ge=0)  # storage start inside the allocation
    tensor_offset: int = Field(ge=0)  # buffer start inside the storage (uint8: bytes)
    ref_counter_handle: bytes = Field(default=b"", max_length=4096)
    ref_counter_offset: int = Field(default=0, ge=0)
    event_handle: bytes = Field(default=b"", max_length=512)  # empty: no event
    event_sync_required: bool = False


@register
class WeightIpcBucket(Message):
    """One packed bucket shared through CUDA IPC with a member on the learner's GPU. The member
    maps the buffer, loads the tensors from it and answers WeightIpcAck; the learner reuses the
    buffer only after that answer."""

    TYPE = "weight_ipc_bucket"
    version: int = Field(ge=0)
    generation: int = Field(ge=0)
    bucket: int = Field(ge=0)
    num_buckets: int = Field(ge=1)
    dtype: str
    nbytes: int = Field(ge=1)
    tensors: list[TensorMeta] = Field(max_length=1 << 16)
    ipc: IpcHandle

    @model_validator(mode="after")
    def _check(self) -> "WeightIpcBucket":
        _check_bucket_layout(self)
        if self.ipc.tensor_offset + self.nbytes > self.ipc.storage_size_bytes:
            raise ValueError(f"{self.nbytes} bytes at offset {self.ipc.tensor_offset} run past the shared "
                             f"storage of {self.ipc.storage_size_bytes} bytes")
        return self


@register
class WeightIpcAck(Message):
    """A member finished reading bucket `bucket` of `version` from the shared buffer (ok) or
    could not use it (the learner then falls back to the broadcast for this member)."""

    TYPE = "weight_ipc_ack"
    peer_id: str = Field(min_length=1, max_length=256)
    run_id: str = Field(min_length=1, max_length=256)
    version: int = Field(ge=0)
    bucket: int = Field(ge=0)
    ok: bool
    message: str = Field(default="", max_length=MAX_STR)

