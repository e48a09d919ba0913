"""Scout's wire protocol: every message that crosses a socket, as one typed schema.

A message travels as a ZeroMQ multipart message:

    frame 0   msgpack header  {"p": PROTOCOL_VERSION, "t": type, "v": type version,
                               "b": {scalar / list / dict fields},
                               "a": [[array name, dtype, shape], ...]}
    frame 1.. raw array bytes, one frame per entry of "a", in that order (zero-copy)

Arrays (token ids, logprobs, masks, versions, weights) never go through msgpack: they are sent
from and received into numpy buffers without copies.  `decode` validates everything it is given
(frame count, header shape, protocol and message versions, dtypes, shapes against byte counts,
size caps, field types, cross-field lengths) and raises exactly one exception type,
`ProtocolError`, whose message says what is wrong.  No pickle anywhere.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import msgpack
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PROTOCOL_VERSION = 1

MAX_HEADER_BYTES = 4 << 20  # 4 MiB of msgpack
MAX_FRAMES = 4096
MAX_ARRAY_BYTES = 2 << 30  # 2 GiB in one frame
MAX_STR = 1 << 16  # characters in one string field
MAX_ANSWERS = 256  # golden answers in one Prompt
MAX_QUERY_CHARS = 4096
MAX_QUERIES = 4096
MAX_TOPK = 100
MAX_GROUP = 1024
MAX_GROUP_TOKENS = 1 << 24
MAX_PROMPTS = 4096
_MAX_DIM = 1 << 40
_HEADER_KEYS = frozenset({"p", "t", "v", "b", "a"})

# Logical dtype name -> numpy storage dtype. bfloat16 has no numpy dtype: it travels as its raw
# 16-bit pattern (uint16 storage) and torch reinterprets it on arrival.
DTYPES: dict[str, np.dtype] = {
    "uint8": np.dtype("uint8"),
    "bool": np.dtype("bool"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
}


class ProtocolError(ValueError):
    """Raised for any message that cannot be encoded or decoded; the text says why.

    `reason` is a short, bounded category for rejection metrics: malformed, too_large, version,
    unknown_type, unexpected_type or invalid (well-framed but fails the schema)."""

    def __init__(self, message: str, reason: str = "malformed"):
        super().__init__(message)
        self.reason = reason


def _r(value: Any, limit: int = 80) -> str:
    """repr() of a peer-supplied value, cut short: error texts never echo megabytes back."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# numpy dtype -> logical name (bfloat16 is never inferred: its storage dtype is uint16)
_DTYPE_NAMES: dict[np.dtype, str] = {dt: name for name, dt in DTYPES.items() if name != "bfloat16"}


def numpy_dtype_name(arr: np.ndarray) -> str:
    name = _DTYPE_NAMES.get(arr.dtype)
    if name is None:
        raise ProtocolError(f"arrays of dtype {arr.dtype} cannot travel on the wire")
    return name


class ArraySpec:
    """What one array field may hold: a set of logical dtypes and a number of dimensions."""

    def __init__(self, dtypes: tuple[str, ...], ndim: int | None = 1):
        self.dtypes = dtypes
        self.ndim = ndim


class Message(BaseModel):
    """Base of every wire message. Subclasses set TYPE, VERSION and ARRAYS."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, strict=True)

    TYPE: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1
    ARRAYS: ClassVar[dict[str, ArraySpec]] = {}
    # Logical dtype for arrays whose storage dtype is ambiguous (bfloat16 stored as uint16).
    array_dtypes: dict[str, str] = Field(default_factory=dict, exclude=True)

    @classmethod
    def _fast_construct(cls, body: dict, arrays: dict, dtypes: dict) -> "Message | None":
        """Optional hot path for `decode` (None: run the full pydantic validation)."""
        return None

    def _body(self) -> dict:
        """The msgpack body: every field but the arrays (a hot message may override this)."""
        return self.model_dump(mode="python", exclude=_body_exclude(type(self)))


_EXCLUDES: dict[type, set[str]] = {}


def _body_exclude(cls: type[Message]) -> set[str]:
    ex = _EXCLUDES.get(cls)
    if ex is None:
        ex = _EXCLUDES[cls] = set(cls.ARRAYS) | {"array_dtypes"}
    return ex


REGISTRY: dict[str, type[Message]] = {}


def register(cls: type[Message]) -> type[Message]:
    if not cls.TYPE or cls.TYPE in REGISTRY:
        raise RuntimeError(f"message type {cls.TYPE!r} is empty or registered twice")
    REGISTRY[cls.TYPE] = cls
    return cls


Str = Field(max_length=MAX_STR)


# --------------------------------------------------------------------------- control plane
@register
class Hello(Message):
    """A peer announces itself. A restarted process announces a fresh run_id."""

    TYPE = "hello"
    role: Literal["actor", "learner", "retriever", "client"]
    peer_id: str = Field(min_length=1, max_length=256)
    run_id: str = Field(min_length=1, max_length=256)
    worker: int = Field(default=0, ge=0)
    gpu: str = Field(default="cpu", max_length=64)
    host: str = Field(default="", max_length=256)
    pid: int = Field(default=0, ge=0)
    version: int = Field(default=-1, ge=-1)  # policy version currently loaded


@register
class HelloAck(Message):
    TYPE = "hello_ack"
    learner_run_id: str = Field(max_length=256)
    version: int = Field(ge=0)
    n_samples: int = Field(ge=1, le=MAX_GROUP)
    max_staleness: int = Field(ge=0)
    sync_endpoint: str = Field(default="", max_length=512)


@register
class Heartbeat(Message):
    TYPE = "heartbeat"
    peer_id: str = Field(min_length=1, max_length=256)
    run_id: str = Field(min_length=1, max_length=256)
    seq: int = Field(ge=0)
    version: int = Field(default=-1, ge=-1)
    time: float = 0.0


@register
class ErrorReply(Message):
    TYPE = "error"
    code: Literal["bad_request", "unauthorised", "unavailable", "internal", "timeout", "stale"]
    message: str = Field(max_length=MAX_STR)
    request_id: str = Field(default="", max_length=256)


# --------------------------------------------------------------------------- prompts / work
class Prompt(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    prompt_id: int = Field(ge=0)
    question: str = Field(min_length=1, max_length=MAX_STR)
    golden_answers: list[str] = Field(max_length=MAX_ANSWERS)
    data_source: str = Field(default="", max_length=256)


@register
class WorkRequest(Message):
    """An actor asks for up to `max_prompts` prompts (one GRPO group each)."""

    TYPE = "work_request"
    peer_id: str = Field(min_length=1, max_length=256)
    run_id: str = Field(min_length=1, max_length=256)
    max_prompts: int = Field(ge=1, le=MAX_PROMPTS)
    version: int = Field(ge=-1)


@register
class WorkAssignment(Message):
    """The learner hands out prompts: each is a credit for one group. Empty means wait."""

    TYPE = "work_assignment"
    prompts: list[Prompt] = Field(max_length=MAX_PROMPTS)
    version: int = Field(ge=0)  # learner's current policy version
    min_version: int = Field(ge=0)  # oldest policy version whose tokens will still be accepted
    n_samples: int = Field(ge=1, le=MAX_GROUP)
    retry_after_s: float = Field(default=0.0, ge=0.0, le=3600.0)


_object_setattr = object.__setattr__


def _construct_checked(cls: type[Message], values: dict) -> Message:
    """What pydantic's model_construct does for a model without aliases, private attributes or
    post-init hooks, without its per-field loop: `values` holds every field, in field order,
    already checked by the caller (tests/test_protocol.py compares it with model_construct)."""
    m = cls.__new__(cls)
    _object_setattr(m, "__dict__", values)
    _object_setattr(m, "__pydantic_fields_set__", set(values))
    _object_setattr(m, "__pydantic_extra__", None)
    _object_setattr(m, "__pydantic_private__", None)
    return m


# --------------------------------------------------------------------------- trajectories
_GROUP_BODY_KEYS = frozenset({"group_id", "peer_id", "run_id", "prompt_id", "num_searches", "retrieval_failed",
                              "correct", "created_at"})
_GROUP_BODY_ORDER = ("group_id", "peer_id", "run_id", "prompt_id", "num_searches", "retrieval_failed", "correct",
                     "created_at")
_INT_SET, _BOOL_SET = {int}, {bool}
_MIN, _MAX = np.minimum.reduce, np.maximum.reduce


def _check_group(lengths: np.ndarray, tokens: np.ndarray, loss_mask: np.ndarray, logprobs: np.ndarray,
                 versions: np.ndarray, rewards: np.ndarray, num_searches: list, retrieval_failed: list,
                 correct: list) -> None:
    """Cross-field and value checks of a TrajectoryGroup (raises ValueError). Runs on every received
    group, so each check is one vectorised pass without gathers."""
    n = lengths.shape[0]
    if not 1 <= n <= MAX_GROUP:
        raise ValueError(f"group size {n} outside 1..{MAX_GROUP}")
    if rewards.shape[0] != n or len(num_searches) != n or len(retrieval_failed) != n or len(correct) != n:
        for name, k in (("rewards", rewards.shape[0]), ("num_searches", len(num_searches)),
                        ("retrieval_failed", len(retrieval_failed)), ("correct", len(correct))):
            if k != n:
                raise ValueError(f"{name} has {k} entries, group has {n}")
    # Per-sample arrays are short: plain Python beats numpy's per-call overhead (and cannot overflow).
    lens = lengths.tolist()
    if min(lens) < 1:
        raise ValueError("every sample needs at least one token")
    total = sum(lens)
    if total > MAX_GROUP_TOKENS:
        raise ValueError(f"group has {total} tokens, cap is {MAX_GROUP_TOKENS}")
    if tokens.shape[0] != total or loss_mask.shape[0] != total or logprobs.shape[0] != total \
            or versions.shape[0] != total:
        for name, arr in (("tokens", tokens), ("loss_mask", loss_mask), ("logprobs", logprobs), ("versions", versions)):
            if arr.shape[0] != total:
                raise ValueError(f"{name} has {arr.shape[0]} entries, lengths sum to {total}")
    # Per-token arrays: one vectorised pass each, no gathers. total >= 1 here.
    if int(_MIN(tokens)) < 0:
        raise ValueError("negative token id")
    if int(_MAX(loss_mask)) > 1:
        raise ValueError("loss_mask must be 0 or 1")
    if np.count_nonzero((versions < 0).view(np.uint8) & loss_mask):
        raise ValueError("generated token without a policy version")
    # max propagates NaN (and NaN <= x is False); min exposes -inf
    if not float(_MAX(logprobs)) <= 1e-4 or not math.isfinite(float(_MIN(logprobs))):
        raise ValueError("behaviour logprobs must be finite and <= 0")
    if not all(map(math.isfinite, rewards.tolist())):
        raise ValueError("rewards must be finite")
    if min(num_searches) < 0:
        raise ValueError("num_searches must be >= 0")


@register
class TrajectoryGroup(Message):
    """n samples of one prompt (a GRPO group), flattened sample after sample.

    Per token (length = sum(lengths)): tokens, loss_mask (1 = generated by the policy),
    logprobs (behaviour logprob of generated tokens, 0 elsewhere), versions (policy version
    that generated the token, -1 for prompt/observation tokens). Per sample: lengths, rewards.
    """

    TYPE = "trajectory_group"
    ARRAYS = {
        "lengths": ArraySpec(("int32",)),
        "tokens": ArraySpec(("int32",)),
        "loss_mask": ArraySpec(("uint8",)),
        "logprobs": ArraySpec(("float32",)),
        "versions": ArraySpec(("int32",)),
        "rewards": ArraySpec(("float32",)),
    }
    group_id: str = Field(min_length=1, max_length=256)
    peer_id: str = Field(min_length=1, max_length=256)
    run_id: str = Field(min_length=1, max_length=256)
    prompt_id: int = Field(ge=0)
    num_searches: list[int] = Field(max_length=MAX_GROUP)
    retrieval_failed: list[bool] = Field(max_length=MAX_GROUP)
    correct: list[bool] = Field(max_length=MAX_GROUP)
    created_at: float = 0.0  # generation start (unix seconds), for end-to-end latency
    lengths: np.ndarray
    tokens: np.ndarray
    loss_mask: np.ndarray
    logprobs: np.ndarray
    versions: np.ndarray
    rewards: np.ndarray

    @model_validator(mode="after")
    def _consistent(self) -> "TrajectoryGroup":
        _check_group(self.lengths, self.tokens, self.loss_mask, self.logprobs, self.versions, self.rewards,
                     self.num_searches, self.retrieval_failed, self.correct)
        return self

    @classmethod
    def _fast_construct(cls, body: dict, arrays: dict, dtypes: dict) -> "TrajectoryGroup | None":
        """Hot path of `decode`: explicit checks that accept only what the pydantic schema accepts
        (exact types, lengths, bounds) plus the same `_check_group`, then a construct without a second
        validation. Anything unusual returns None and the full validation runs, which produces the
        error message, so errors read the same on both paths (tests/test_protocol.py checks that the
        fast path never accepts what pydantic rejects)."""
        if body.keys() != _GROUP_BODY_KEYS or arrays.keys() != cls.ARRAYS.keys():
            return None
        for key in ("group_id", "peer_id", "run_id"):
            v = body[key]
            if type(v) is not str or not 1 <= len(v) <= 256:
                return None
        pid, created = body["prompt_id"], body["created_at"]
        if type(pid) is not int or pid < 0 or type(created) is not float:
            return None
        for key, item_type in (("num_searches", _INT_SET), ("retrieval_failed", _BOOL_SET), ("correct", _BOOL_SET)):
            v = body[key]
            if type(v) is not list or len(v) > MAX_GROUP or set(map(type, v)) != item_type:
                return None
        try:
            _check_group(arrays["lengths"], arrays["tokens"], arrays["loss_mask"], arrays["logprobs"],
                         arrays["versions"], arrays["rewards"], body["num_searches"], body["retrieval_failed"],
                         body["correct"])
        except Exception:  # any doubt: the full validation decides and words the error
            return None
        return _construct_checked(cls, {
            "array_dtypes": dtypes, "group_id": body["group_id"], "peer_id": body["peer_id"],
            "run_id": body["run_id"], "prompt_id": pid, "num_searches": body["num_searches"],
            "retrieval_failed": body["retrieval_failed"], "correct": body["correct"], "created_at": created,
            "lengths": arrays["lengths"], "tokens": arrays["tokens"], "loss_mask": arrays["loss_mask"],
            "logprobs": arrays["logprobs"], "versions": arrays["versions"], "rewards": arrays["rewards"]})

    def _body(self) -> dict:
        d = self.__dict__
        return {k: d[k] for k in _GROUP_BODY_ORDER}

    @property
    def n(self) -> int:
        return int(self.lengths.shape[0])

    def oldest_version(self) -> int:
        """Oldest policy version among generated tokens (-1 if none were generated)."""
        gen = self.loss_mask.view(bool)
        return int(self.versions[gen].min()) if gen.any() else -1

    def sample_slices(self) -> list[slice]:
        ends = np.cumsum(self.lengths.astype(np.int64))
        starts = ends - self.lengths
        return [slice(int(s), int(e)) for s, e in zip(starts, ends)]


@register
class GroupAck(Message):
    TYPE = "group_ack"
    group_id: str = Field(max_length=256)
    accepted: bool
    reason: str = Field(default="", max_length=1024)
    version: int = Field(ge=0)


# --------------------------------------------------------------------------- retrieval
class Passage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    id: str = Field(max_length=1024)
    title: str = Field(max_length=MAX_STR)
    text: str = Field(max_length=1 << 20)
    score: float


@register
class RetrieveRequest(Message):
    TYPE = "retrieve_request"
    request_id: str = Field(min_length=1, max_length=256)
    queries: list[str] = Field(min_length=1, max_length=MAX_QUERIES)
    topk: int = Field(ge=1, le=MAX_TOPK)

    @model_validator(mode="after")
    def _queries(self) -> "RetrieveRequest":
        for i, q in enumerate(self.queries):
            if not q.strip():
                raise ValueError(f"query {i} is empty")
            if len(q) > MAX_QUERY_CHARS:
                raise ValueError(f"query {i} has {len(q)} characters, cap is {MAX_QUERY_CHARS}")
        return self


@register
class RetrieveReply(Message):
    TYPE = "retrieve_reply"
    request_id: str = Field(max_length=256)
    results: list[list[Passage]] = Field(max_length=MAX_QUERIES)


# Internal to the retriever service: router <-> shard processes (DEALER shard -> ROUTER router).
@register
class ShardHello(Message):
    """A shard process has loaded its index and is ready to search."""

    TYPE = "shard_hello"
    shard: int = Field(ge=0)
    pid: int = Field(ge=0)
    count: int = Field(ge=0)  # vectors held by this shard
    dim: int = Field(ge=1)
    device: str = Field(default="cpu", max_length=64)


@register
class ShardSearch(Message):
    """Router -> shard: search these (already encoded, normalised) query vectors."""

    TYPE = "shard_search"
    ARRAYS = {"vectors": ArraySpec(("float32",), ndim=2)}
    seq: int = Field(ge=0)
    topk: int = Field(ge=1, le=MAX_TOPK)
    vectors: np.ndarray

    @model_validator(mode="after")
    def _check(self) -> "ShardSearch":
        if not 1 <= self.vectors.shape[0] <= MAX_QUERIES:
            raise ValueError(f"{self.vectors.shape[0]} query vectors, expected 1..{MAX_QUERIES}")
        return self


@register
class ShardResult(Message):
    """Shard -> router: top-k per query. ids are global corpus rows, -1 where none."""

    TYPE = "shard_result"
    ARRAYS = {"scores": ArraySpec(("float32",), ndim=2), "ids": ArraySpec(("int64",), ndim=2)}
    seq: int = Field(ge=0)
    shard: int = Field(ge=0)
    scores: np.ndarray
    ids: np.ndarray

    @model_validator(mode="after")
    def _check(self) -> "ShardResult":
        if self.scores.shape != self.ids.shape:
            raise ValueError(f"scores {self.scores.shape} and ids {self.ids.shape} differ in shape")
        return self


# --------------------------------------------------------------------------- weight sync
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
    # how group bytes travel: "broadcast" (one collective per segment) or "send" (the learner, rank
    # 0, sends each segment to every member, point to point: gloo's cheaper per-op path)
    op: Literal["broadcast", "send"] = "broadcast"


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
    chunk_bytes: int = Field(default=0, ge=0)  # >0: group bytes come in segments (weightsync.bucket_segments)
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


# ---------------------------------------------- weight sync, colocated path (CUDA IPC, one GPU)
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


# --------------------------------------------------------------------------- encode / decode
def encode(msg: Message) -> list[Any]:
    """Message -> list of frames (bytes header + memoryviews of the arrays, no copies)."""
    body = msg._body()
    specs, frames = [], []
    for name, spec in msg.ARRAYS.items():
        arr = getattr(msg, name)
        if arr is None:
            continue
        if not isinstance(arr, np.ndarray):
            raise ProtocolError(f"{msg.TYPE}.{name} must be a numpy array")
        dtype = msg.array_dtypes.get(name) or numpy_dtype_name(arr)
        if dtype not in spec.dtypes:
            raise ProtocolError(f"{msg.TYPE}.{name} must be one of {spec.dtypes}, got {dtype}")
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)
        specs.append([name, dtype, list(arr.shape)])
        frames.append(arr.data.cast("B") if arr.size else b"")
    header = {"p": PROTOCOL_VERSION, "t": msg.TYPE, "v": msg.VERSION, "b": body, "a": specs}
    try:
        packed = msgpack.packb(header, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise ProtocolError(f"cannot encode {msg.TYPE}: {e}") from None
    if len(packed) > MAX_HEADER_BYTES:
        raise ProtocolError(f"{msg.TYPE} header is {len(packed)} bytes, cap is {MAX_HEADER_BYTES}")
    return [packed, *frames]


def _buffer(frame: Any) -> memoryview:
    t = type(frame)
    if t is not bytes and t is not bytearray and t is not memoryview:
        if not hasattr(frame, "buffer"):
            raise ProtocolError(f"frame of type {t.__name__} is not bytes")
        frame = frame.buffer  # zmq.Frame received with copy=False: a memoryview of its data
        if not isinstance(frame, (bytes, bytearray, memoryview)):
            raise ProtocolError(f"frame buffer of type {type(frame).__name__} is not bytes")
    view = frame if type(frame) is memoryview else memoryview(frame)
    return view if view.ndim == 1 and view.format == "B" else view.cast("B")


def _read_header(frames: Any) -> tuple[type[Message], dict, list]:
    if not isinstance(frames, (list, tuple)) or not frames:
        raise ProtocolError("a message needs at least one frame")
    if len(frames) > MAX_FRAMES:
        raise ProtocolError(f"{len(frames)} frames, cap is {MAX_FRAMES}", "too_large")
    raw = _buffer(frames[0])
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header is {len(raw)} bytes, cap is {MAX_HEADER_BYTES}", "too_large")
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises many types for malformed input
        raise ProtocolError(f"header is not valid msgpack: {type(e).__name__}: {e}") from None
    if type(header) is not dict or header.keys() != _HEADER_KEYS:
        raise ProtocolError("header must be a map with keys p, t, v, b, a")
    if header["p"] != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {_r(header['p'])} is not supported (this build speaks {PROTOCOL_VERSION})",
                            "version")
    cls = REGISTRY.get(header["t"]) if isinstance(header["t"], str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {_r(header['t'])}", "unknown_type")
    if header["v"] != cls.VERSION:
        raise ProtocolError(f"{cls.TYPE} version {_r(header['v'])} is not supported (this build speaks {cls.VERSION})",
                            "version")
    if not isinstance(header["b"], dict) or not isinstance(header["a"], list):
        raise ProtocolError("header fields b and a must be a map and a list")
    if len(header["a"]) != len(frames) - 1:
        raise ProtocolError(f"header names {len(header['a'])} arrays but {len(frames) - 1} frames follow")
    return cls, header["b"], header["a"]


def _read_array(cls: type[Message], spec_entry: Any, frame: Any) -> tuple[str, str, np.ndarray]:
    if type(spec_entry) is not list or len(spec_entry) != 3:
        raise ProtocolError("array spec must be [name, dtype, shape]")
    name, dtype, shape = spec_entry
    spec = cls.ARRAYS.get(name) if type(name) is str else None
    if spec is None:
        raise ProtocolError(f"{cls.TYPE} has no array field {name!r}")
    if dtype not in spec.dtypes:
        raise ProtocolError(f"{cls.TYPE}.{name} must be one of {spec.dtypes}, got {dtype!r}")
    if type(shape) is not list or (spec.ndim is not None and len(shape) != spec.ndim):
        raise ProtocolError(f"{cls.TYPE}.{name} shape must be a list of {spec.ndim} non-negative ints")
    count = 1
    for d in shape:
        if type(d) is not int or not 0 <= d < _MAX_DIM:
            raise ProtocolError(f"{cls.TYPE}.{name} shape must be a list of non-negative ints")
        count *= d
    np_dtype = DTYPES[dtype]
    nbytes = count * np_dtype.itemsize
    if nbytes > MAX_ARRAY_BYTES:
        raise ProtocolError(f"{cls.TYPE}.{name} is {nbytes} bytes, cap is {MAX_ARRAY_BYTES}")
    buf = _buffer(frame)
    if buf.nbytes != nbytes:
        raise ProtocolError(f"{cls.TYPE}.{name} frame has {buf.nbytes} bytes, shape {shape} of {dtype} needs {nbytes}")
    # A view of the received frame (zmq.Frame buffer or bytes): no copy. Read-only when the frame is.
    arr = np.frombuffer(buf, np_dtype)
    return name, dtype, arr if len(shape) == 1 else arr.reshape(shape)


def decode(frames: Any, expect: type[Message] | tuple[type[Message], ...] | None = None) -> Message:
    """Frames -> validated Message. Raises ProtocolError and nothing else."""
    try:
        cls, body, arrays_spec = _read_header(frames)
        if expect is not None and not issubclass(cls, expect):
            names = expect.TYPE if isinstance(expect, type) else [e.TYPE for e in expect]
            raise ProtocolError(f"expected {names}, got {cls.TYPE}", "unexpected_type")
        arrays, dtypes = {}, {}
        for entry, frame in zip(arrays_spec, frames[1:]):
            name, dtype, arr = _read_array(cls, entry, frame)
            if name in arrays:
                raise ProtocolError(f"array {name!r} sent twice")
            arrays[name], dtypes[name] = arr, dtype
        overlap = arrays.keys() & body.keys()
        if overlap or "array_dtypes" in body:
            raise ProtocolError(f"fields sent both as body and array: {sorted(overlap)}")
        fast = cls._fast_construct(body, arrays, dtypes)
        return fast if fast is not None else cls.model_validate({**body, **arrays, "array_dtypes": dtypes})
    except ProtocolError:
        raise
    except ValidationError as e:
        errs = "; ".join(f"{'.'.join(str(p)[:64] for p in err['loc']) or '<message>'}: {err['msg'][:512]}"
                         for err in e.errors()[:5])
        raise ProtocolError(f"invalid {_r(frames_type(frames))}: {errs}"[:MAX_STR], "invalid") from None
    except Exception as e:  # last line of defence: a decoder never lets anything else escape
        raise ProtocolError(f"malformed message: {type(e).__name__}: {e}"[:MAX_STR]) from None


def frames_type(frames: Any) -> str:
    try:
        return msgpack.unpackb(_buffer(frames[0]), raw=False).get("t", "message")
    except Exception:
        return "message"


def error_frames(code: str, message: str, request_id: str = "") -> list[Any]:
    return encode(ErrorReply(code=code, message=message[:MAX_STR], request_id=request_id[:256]))
