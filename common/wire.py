"""Scout's wire format: how a typed message becomes ZeroMQ frames and back.

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

The messages themselves are defined by exchange: common/protocol.py (control, work,
trajectories, retrieval) and common/weightsync/messages.py (weight sync). Each registers its
type name here with `@register`, so `decode` knows every message its process imported.
"""

from __future__ import annotations

from typing import Any, ClassVar

import msgpack
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

PROTOCOL_VERSION = 1

MAX_HEADER_BYTES = 4 << 20  # 4 MiB of msgpack
MAX_FRAMES = 4096
MAX_ARRAY_BYTES = 2 << 30  # 2 GiB in one frame
MAX_STR = 1 << 16  # characters in one string field
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




_object_setattr = object.__setattr__


def construct_checked(cls: type[Message], values: dict) -> Message:
    """What pydantic's model_construct does for a model without aliases, private attributes or
    post-init hooks, without its per-field loop: `values` holds every field, in field order,
    already checked by the caller (tests/test_protocol.py compares it with model_construct)."""
    m = cls.__new__(cls)
    _object_setattr(m, "__dict__", values)
    _object_setattr(m, "__pydantic_fields_set__", set(values))
    _object_setattr(m, "__pydantic_extra__", None)
    _object_setattr(m, "__pydantic_private__", None)
    return m


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
        if not hasattr(t, "buffer"):  # the class, not the frame: a zmq.Frame's property would run
            raise ProtocolError(f"frame of type {t.__name__} is not bytes")
        try:  # zmq.Frame received with copy=False: a view of its data (3 us cheaper than .buffer)
            frame = memoryview(frame)
        except TypeError:
            raise ProtocolError(f"frame of type {t.__name__} does not hold bytes") from None
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
