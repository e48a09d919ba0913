"""Wire protocol: round trips for every message type, and fuzzing of every decoder."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import protocol as P
from common import wire as W
from common.weightsync import messages as S


def _group(n: int = 3, seed: int = 0) -> P.TrajectoryGroup:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, 20, size=n).astype(np.int32)
    total = int(lengths.sum())
    mask = (rng.random(total) < 0.6).astype(np.uint8)
    return P.TrajectoryGroup(
        group_id="g-1", peer_id="actor-0", run_id="run-a", prompt_id=7,
        num_searches=[1] * n, retrieval_failed=[False] * n, correct=[True] + [False] * (n - 1),
        created_at=123.5, behaviour=[(5 * i) % 16 for i in range(n)] if seed % 2 else [],
        bad_searches=[i % 3 for i in range(n)] if seed % 2 else [],
        lengths=lengths, tokens=rng.integers(0, 1000, total).astype(np.int32),
        loss_mask=mask, logprobs=np.where(mask == 1, -rng.random(total), 0).astype(np.float32),
        versions=np.where(mask == 1, 3, -1).astype(np.int32), rewards=rng.random(n).astype(np.float32))


SAMPLES: list[W.Message] = [
    P.Hello(role="actor", peer_id="a0", run_id="r1", worker=1, gpu="cuda:1", host="h", pid=42, version=3),
    P.HelloAck(learner_run_id="L", version=2, n_samples=5, max_staleness=4, sync_endpoint="tcp://127.0.0.1:1"),
    P.Heartbeat(peer_id="a0", run_id="r1", seq=9, version=1, time=1.5),
    P.ErrorReply(code="bad_request", message="topk must be >= 1", request_id="x"),
    P.WorkRequest(peer_id="a0", run_id="r1", max_prompts=4, version=0),
    P.WorkAssignment(prompts=[P.Prompt(prompt_id=1, question="who?", golden_answers=["me", "you"], data_source="nq")],
                     version=3, min_version=0, n_samples=5, retry_after_s=0.5),
    _group(),
    P.GroupAck(group_id="g-1", accepted=False, reason="stale", version=9),
    P.RetrieveRequest(request_id="q1", queries=["capital of zorland", "b"], topk=3),
    P.RetrieveReply(request_id="q1", results=[[P.Passage(id="1", title="Z", text="t", score=0.5)], []]),
    S.SyncJoin(peer_id="a0", run_id="r1", version=-1, transports=["gloo", "zmq"]),
    S.SyncPlan(version=1, generation=2, transport="gloo", store_host="127.0.0.1", store_port=29500,
               rank=1, world_size=3, timeout_s=30.0),
    S.WeightUpdateHeader(version=1, bucket=0, num_buckets=2, dtype="bfloat16", nbytes=12,
                         tensors=[S.TensorMeta(name="w", dtype="bfloat16", shape=[2, 3], offset=0)],
                         data=np.arange(12, dtype=np.uint8)),
    S.SyncDone(peer_id="a0", run_id="r1", version=1, ok=True, seconds=0.25),
    S.SyncAbort(version=3, generation=2, reason="member too slow", rejoin=True),
    S.SyncColocated(peer_id="a0", run_id="r1", host="node-1", gpu_uuid="GPU-5f1c2d3e-0000-1111-2222-333344445555"),
    S.WeightIpcBucket(version=2, generation=1, bucket=0, num_buckets=1, dtype="bfloat16", nbytes=24,
                      tensors=[S.TensorMeta(name="w", dtype="bfloat16", shape=[3, 4], offset=0)],
                      ipc=S.IpcHandle(device=0, handle=bytes(range(64)), storage_size_bytes=1 << 20,
                                      storage_offset_bytes=512, tensor_offset=0, ref_counter_handle=b"/torch_1_2",
                                      ref_counter_offset=3, event_handle=bytes(64), event_sync_required=True)),
    S.WeightIpcAck(peer_id="a0", run_id="r1", version=2, bucket=0, ok=False, message="cannot open the handle"),
    P.ShardHello(shard=1, pid=42, count=100, dim=384, device="cpu"),
    P.ShardSearch(seq=3, topk=5, vectors=np.ones((2, 4), np.float32)),
    P.ShardSearchTokens(seq=4, topk=5, tokens=np.array([7, 3, 9], np.int32), lengths=np.array([2, 0, 1], np.int32)),
    P.ShardResult(seq=3, shard=1, scores=np.ones((2, 5), np.float32), ids=np.arange(10, dtype=np.int64).reshape(2, 5)),
]


def _equal(a: W.Message, b: W.Message) -> bool:
    if type(a) is not type(b):
        return False
    for name in type(a).model_fields:
        if name == "array_dtypes":
            continue
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray) and x.dtype == y.dtype
                    and np.array_equal(x, y)):
                return False
        elif x != y:
            return False
    return True


def test_every_registered_type_has_a_sample():
    assert {type(m).TYPE for m in SAMPLES} >= set(W.REGISTRY)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: m.TYPE)
def test_round_trip(msg):
    frames = W.encode(msg)
    assert isinstance(frames[0], bytes)
    out = W.decode([bytes(f) for f in frames])
    assert _equal(msg, out)
    assert W.decode(frames, expect=type(msg)).TYPE == msg.TYPE


def test_arrays_travel_as_raw_frames_without_copies():
    g = _group(4)
    frames = W.encode(g)
    header = msgpack.unpackb(frames[0])
    assert [a[0] for a in header["a"]] == list(P.TrajectoryGroup.ARRAYS)
    assert "tokens" not in header["b"]
    # encode hands out views of the arrays' own memory
    assert np.shares_memory(np.frombuffer(frames[2], dtype=np.int32), g.tokens)
    # decode wraps the received buffers without copying
    buf = bytearray(frames[2])
    frames2 = list(frames)
    frames2[2] = buf
    out = W.decode(frames2)
    buf[0:4] = (99).to_bytes(4, "little")
    assert out.tokens[0] == 99


def _bad(frames, fragment: str):
    with pytest.raises(W.ProtocolError) as e:
        W.decode(frames)
    assert fragment in str(e.value), str(e.value)


def test_clear_errors():
    good = W.encode(_group())
    hdr = msgpack.unpackb(good[0])
    _bad([], "at least one frame")
    _bad([b"\xc1"], "not valid msgpack")
    _bad([msgpack.packb({**hdr, "p": 99}), *good[1:]], "protocol version 99")
    _bad([msgpack.packb({**hdr, "t": "nope"}), *good[1:]], "unknown message type")
    _bad([msgpack.packb({**hdr, "v": 7}), *good[1:]], "version 7 is not supported")
    _bad(good[:-1], "frames follow")
    _bad([good[0], *good[1:-1], b"abc"], "frame has 3 bytes")
    wrong_dtype = {**hdr, "a": [[a[0], "float64" if a[0] == "tokens" else a[1], a[2]] for a in hdr["a"]]}
    _bad([msgpack.packb(wrong_dtype), *good[1:]], "tokens must be one of")
    short = dict(hdr)
    short["b"] = {**hdr["b"], "num_searches": [1]}
    _bad([msgpack.packb(short), *good[1:]], "num_searches has 1 entries")
    extra = dict(hdr)
    extra["b"] = {**hdr["b"], "evil": 1}
    _bad([msgpack.packb(extra), *good[1:]], "evil")
    req = W.encode(P.RetrieveRequest(request_id="r", queries=["a"], topk=3))
    rh = msgpack.unpackb(req[0])
    _bad([msgpack.packb({**rh, "b": {**rh["b"], "topk": 0}})], "topk")
    _bad([msgpack.packb({**rh, "b": {**rh["b"], "queries": ["  "]}})], "query 0 is empty")
    _bad([msgpack.packb({**rh, "b": {**rh["b"], "queries": ["x" * 5000]}})], "cap is 4096")
    with pytest.raises(W.ProtocolError, match="expected"):
        W.decode(req, expect=P.TrajectoryGroup)


def test_ipc_bucket_checks():
    ipc = next(m for m in SAMPLES if isinstance(m, S.WeightIpcBucket))
    hdr = msgpack.unpackb(W.encode(ipc)[0])
    past = {**hdr, "b": {**hdr["b"], "ipc": {**hdr["b"]["ipc"], "storage_size_bytes": 16}}}
    _bad([msgpack.packb(past)], "run past the shared storage")
    as_text = {**hdr, "b": {**hdr["b"], "ipc": {**hdr["b"]["ipc"], "handle": "abc"}}}
    _bad([msgpack.packb(as_text)], "ipc.handle")
    callable_smuggled = {**hdr, "b": {**hdr["b"], "ipc": {**hdr["b"]["ipc"], "rebuild": "os.system"}}}
    _bad([msgpack.packb(callable_smuggled)], "rebuild")
    wrong = {**hdr, "b": {**hdr["b"], "tensors": [{**hdr["b"]["tensors"][0], "dtype": "float32"}]}}
    _bad([msgpack.packb(wrong)], "is float32 in a bfloat16 bucket")


def test_semantic_checks_on_trajectories():
    g = _group()
    frames = W.encode(g)
    hdr = msgpack.unpackb(frames[0])
    idx = [a[0] for a in hdr["a"]].index("logprobs") + 1
    lp = g.logprobs.copy()
    lp[g.loss_mask == 1] = 0.5
    bad = list(frames)
    bad[idx] = lp.tobytes()
    _bad(bad, "logprobs must be finite and <= 0")
    for value in (np.nan, -np.inf):
        lp = g.logprobs.copy()
        lp[int(np.argmax(g.loss_mask))] = value
        bad = list(frames)
        bad[idx] = lp.tobytes()
        _bad(bad, "logprobs must be finite and <= 0")
    idx = [a[0] for a in hdr["a"]].index("versions") + 1
    bad = list(frames)
    bad[idx] = np.full_like(g.versions, -1).tobytes()
    _bad(bad, "without a policy version")


def test_behaviour_fields_are_optional_but_checked():
    assert W.decode(W.encode(_group(3, 0)), expect=P.TrajectoryGroup).behaviour == []  # not reported
    g = W.decode(W.encode(_group(3, 1)), expect=P.TrajectoryGroup)
    assert g.behaviour == [0, 5, 10] and g.bad_searches == [0, 1, 2]
    frames = W.encode(_group(3, 1))
    hdr = msgpack.unpackb(frames[0])
    for key, value, message in (("behaviour", [0, 1], "behaviour has 2 entries, group has 3"),
                                ("behaviour", [0, 1, 16], "behaviour values must be in 0..15"),
                                ("bad_searches", [0, -1, 0], "bad_searches values must be in 0..any")):
        _bad([msgpack.packb({**hdr, "b": {**hdr["b"], key: value}}), *frames[1:]], message)


def test_oldest_version_and_slices():
    g = _group(3)
    assert g.oldest_version() == 3
    sl = g.sample_slices()
    assert sl[0].start == 0 and sl[-1].stop == int(g.lengths.sum())


# ------------------------------------------------------------------ the trajectory fast path
def _parts(msg: W.Message) -> tuple[dict, dict, dict]:
    """What decode hands to _fast_construct: (msgpack body, arrays, logical dtypes)."""
    frames = W.encode(msg)
    cls, body, specs = W._read_header(frames)
    arrays, dtypes = {}, {}
    for entry, frame in zip(specs, frames[1:]):
        name, dtype, arr = W._read_array(cls, entry, frame)
        arrays[name], dtypes[name] = arr, dtype
    return body, arrays, dtypes


def test_valid_groups_take_the_fast_path(monkeypatch):
    """Good groups skip pydantic's model_validate (the hot path); bad ones still get its error."""
    def refuse(*a, **k):
        raise AssertionError("model_validate called for a valid group")
    for n, seed in ((1, 0), (3, 1), (16, 2)):
        g = _group(n, seed)
        with monkeypatch.context() as m:
            m.setattr(P.TrajectoryGroup, "model_validate", refuse)
            out = W.decode(W.encode(g), expect=P.TrajectoryGroup)
        assert _equal(g, out) and out.array_dtypes == {k: v for k, v in _parts(g)[2].items()}
        body, arrays, dtypes = _parts(g)
        assert out.model_fields_set == P.TrajectoryGroup.model_validate(
            {**body, **arrays, "array_dtypes": dtypes}).model_fields_set
        # the fast path builds what pydantic's model_construct builds, and encodes the same body
        ref = P.TrajectoryGroup.model_construct(**body, **arrays, array_dtypes=dtypes)
        assert list(out.__dict__) == list(ref.__dict__) and out.model_fields_set == ref.model_fields_set
        assert out.__pydantic_extra__ == ref.__pydantic_extra__ and out.__pydantic_private__ == ref.__pydantic_private__
        assert g._body() == g.model_dump(mode="python", exclude=set(P.TrajectoryGroup.ARRAYS) | {"array_dtypes"})
        assert out.model_copy(update={"prompt_id": 9}).prompt_id == 9 and out.n == n
    frames = W.encode(_group())
    hdr = msgpack.unpackb(frames[0])
    hdr["b"]["peer_id"] = ""
    _bad([msgpack.packb(hdr), *frames[1:]], "peer_id: String should have at least 1 character")


_ODD_VALUES = (st.none() | st.booleans() | st.integers(-(1 << 64), 1 << 65) | st.floats() | st.text(max_size=300)
               | st.binary(max_size=4)
               | st.lists(st.integers(-3, 3) | st.booleans() | st.floats(-2, 2) | st.none(), max_size=20))


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.integers(1, 5), st.data())
def test_fast_path_accepts_only_what_pydantic_accepts(n, data):
    """Property: whenever _fast_construct builds a group, full validation accepts the same input
    and yields the same fields. Mutates body fields (odd types, lengths, bounds), drops or adds
    keys, and poisons array values."""
    body, arrays, dtypes = _parts(_group(n, data.draw(st.integers(0, 3))))
    for _ in range(data.draw(st.integers(0, 3))):
        op = data.draw(st.sampled_from(["set", "drop", "add", "array"]))
        key = data.draw(st.sampled_from(sorted(body)))
        if op == "set":
            body[key] = data.draw(_ODD_VALUES)
        elif op == "drop":
            body.pop(key, None)
        elif op == "add":
            body[data.draw(st.text(min_size=1, max_size=8))] = 1
        else:
            name = data.draw(st.sampled_from(sorted(arrays)))
            arr = arrays[name].copy()
            if arr.size:
                i = data.draw(st.integers(0, arr.size - 1))
                values = {"i": [-1, 0, 1, 2, 7, -(1 << 20)], "u": [0, 1, 2, 255],
                          "f": [np.nan, -np.inf, np.inf, 0.5, -0.5, 0.0]}[arr.dtype.kind]
                arr[i] = data.draw(st.sampled_from(values))
            arrays[name] = arr
    fast = P.TrajectoryGroup._fast_construct(dict(body), dict(arrays), dict(dtypes))
    if fast is None:
        return
    full = P.TrajectoryGroup.model_validate({**body, **arrays, "array_dtypes": dtypes})  # must not raise
    assert _equal(fast, full)
    assert fast.model_dump(exclude=set(P.TrajectoryGroup.ARRAYS)) == full.model_dump(exclude=set(P.TrajectoryGroup.ARRAYS))


# ------------------------------------------------------------------ fuzzing: only ProtocolError escapes
ALL_FRAMES = [W.encode(m) for m in SAMPLES]


def _decode_only_protocol_errors(frames):
    try:
        W.decode(frames)
    except W.ProtocolError:
        pass


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.binary(max_size=256), max_size=6))
def test_fuzz_random_frames(frames):
    _decode_only_protocol_errors(frames)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.recursive(st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.floats() | st.text(max_size=20)
                    | st.binary(max_size=20),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                    max_leaves=20))
def test_fuzz_random_msgpack_headers(obj):
    _decode_only_protocol_errors([msgpack.packb(obj, use_bin_type=True)])


@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.integers(0, len(ALL_FRAMES) - 1), st.data())
def test_fuzz_mutated_messages(which, data):
    frames = [bytearray(bytes(f)) for f in ALL_FRAMES[which]]
    op = data.draw(st.sampled_from(["flip", "truncate", "drop", "dup", "header"]))
    i = data.draw(st.integers(0, len(frames) - 1))
    if op == "flip" and frames[i]:
        j = data.draw(st.integers(0, len(frames[i]) - 1))
        frames[i][j] ^= data.draw(st.integers(1, 255))
    elif op == "truncate":
        frames[i] = frames[i][: data.draw(st.integers(0, len(frames[i])))]
    elif op == "drop" and len(frames) > 1:
        frames.pop(i)
    elif op == "dup":
        frames.insert(i, frames[i])
    elif op == "header":
        hdr = msgpack.unpackb(bytes(frames[0]))
        key = data.draw(st.sampled_from(sorted(hdr["b"]) or ["x"]))
        hdr["b"][key] = data.draw(st.none() | st.integers(-(1 << 63), (1 << 63) - 1) | st.text(max_size=5) | st.lists(st.integers(-(1 << 63), (1 << 63) - 1), max_size=3)
                                  | st.floats())
        frames[0] = bytearray(msgpack.packb(hdr))
    _decode_only_protocol_errors(frames)
