"""Weight sync: real TCPStore + ProcessGroupGloo, real ZeroMQ, real member processes.

The learner side (WeightSender) runs in the test process; members are tests/weightsync_peer.py
processes that record a sha256 per received tensor, so every check is bit-exact.
"""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pytest
import torch

from common.config import LearnerConfig, TransportConfig
from common.metrics import Metrics
from common.wire import decode, encode
from common.weightsync.messages import SyncAbort, SyncDone, SyncJoin, TensorMeta, WeightIpcBucket, WeightUpdateHeader
from common.weightsync import receiver
from common.weightsync.buckets import (DIRECT_DIVISOR, MAX_TENSORS_PER_BUCKET, bucket_segments, iter_buckets,
                                       pack_bucket, plan_buckets, segment_tag, unpack_bucket)
from common.weightsync.client import header_dict
from common.weightsync.cuda_ipc import CudaIpc, ShmIpcStandIn, set_ipc_impl, use_ipc
from common.weightsync.errors import SyncError
from common.weightsync.receiver import BucketReceiver
from common.weightsync.sender import WeightSender
from tests.weightsync_peer import describe, make_weights

PEER = "tests/weightsync_peer.py"


def expected(version: int) -> dict:
    return describe(make_weights(version).items())


def sender_cfg(free_port, timeout_s: float = 10.0, bucket_mb: float = 0.012, chunk_mb: float = 0.0,
               colocated_ipc: bool = False, op: str = "send") -> LearnerConfig:
    """Buckets of ~12 KB, so every sync has several. chunk_mb=0.004: tensors of 4 KB and more go
    as segments of their own, smaller ones packed (the segment path); 0: one per bucket. op: how
    a gloo group moves them (point-to-point sends, the fallback path these tests pin, or
    broadcasts; the chain, the default, has tests/test_weightsync_chain.py)."""
    return LearnerConfig(sync_endpoint=f"tcp://127.0.0.1:{free_port()}", store_port=0,
                         bucket_mb=bucket_mb, sync_chunk_mb=chunk_mb, sync_timeout_s=timeout_s,
                         colocated_ipc=colocated_ipc, sync_gloo_op=op)


def start_peer(procs, sender, tmp_path, peer_id, **opts):
    out = tmp_path / f"{peer_id}-{len(procs.procs)}.jsonl"
    args = [PEER, "--endpoint", sender.endpoint, "--peer-id", peer_id, "--out", str(out)]
    for k, v in opts.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return procs.start(args), out


def results(path) -> dict[int, dict]:
    if not os.path.exists(path):
        return {}
    text = open(path).read()
    complete = text[:text.rfind("\n") + 1]  # a peer may be writing its last line right now
    lines = [json.loads(x) for x in complete.splitlines() if x.strip()]
    return {r["version"]: r for r in lines}


def located(member) -> bool:
    """The sender has the member's SyncColocated (it follows SyncJoin), so it can plan CUDA IPC."""
    return member.where is not None


def wait_results(path, version: int, timeout_s: float = 30.0) -> dict:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        r = results(path).get(version)
        if r is not None:
            return r
        time.sleep(0.05)
    raise AssertionError(f"{path} has no result for version {version}")


@pytest.fixture
def sender_factory():
    made = []

    def make(cfg, metrics=None):
        s = WeightSender(cfg, TransportConfig(), metrics)
        s.start()
        made.append(s)
        return s
    yield make
    for s in made:
        s.close()


# --------------------------------------------------------------------------- packing (no processes)
def test_buckets_group_by_dtype_and_respect_size():
    w = make_weights(1)
    buckets = plan_buckets(w.items(), 10_000)
    names = [n for b in buckets for n, _, _ in b.items]
    assert sorted(names) == sorted(w)
    for b in buckets:
        assert len({str(t.dtype) for _, t, _ in b.items}) == 1
        # a bucket only exceeds the size when it holds a single larger tensor
        assert b.nbytes <= 10_000 or len(b.items) == 1
        offsets = [o for _, _, o in b.items]
        assert offsets == sorted(offsets) and offsets[0] == 0
    assert len(buckets) > 3


def test_ramp_starts_small_and_doubles():
    """WeightSender's first bucket is small (the wire is busy early), then sizes double."""
    w = [(f"w{i}", torch.zeros(1000, dtype=torch.uint8)) for i in range(60)]
    sizes = [b.nbytes for b in plan_buckets(w, 16_000, first_bytes=2_000)]
    assert sizes[:4] == [2_000, 4_000, 8_000, 16_000] and max(sizes) <= 16_000 and sum(sizes) == 60_000
    assert [b.nbytes for b in plan_buckets(w, 16_000)][0] == 16_000  # no ramp asked: full buckets


def test_iter_buckets_round_trip_is_bit_exact():
    w = make_weights(2)
    got = {}
    for dtype, items, flat in iter_buckets(w.items(), 4096):
        assert flat.dtype == torch.uint8 and flat.dim() == 1
        metas = plan_buckets(items, 1 << 40)[0].metas()
        got.update(unpack_bucket(flat.clone(), metas))
    assert describe(got.items()) == expected(2)


def test_segments_cover_every_tensor_and_send_big_ones_directly():
    w = make_weights(1)
    for chunk in (0, 256, 4096, 1 << 16, 1 << 20):
        for b in plan_buckets(w.items(), 30_000):
            segs = bucket_segments(b.metas(), b.nbytes, chunk)
            assert segs[0][0] == 0 and segs[-1][1] == b.nbytes
            assert all(e0 == s1 for (_, e0, _), (s1, _, _) in zip(segs, segs[1:]))  # contiguous, no overlap
            for s, e, direct in segs:
                if direct:  # exactly one tensor, and a big one
                    assert [o for _, _, o in b.items if s <= o < e] == [s] and e - s >= chunk // DIRECT_DIVISOR
                elif chunk:
                    assert all(t.numel() * t.element_size() < chunk // DIRECT_DIVISOR
                               for _, t, o in b.items if s <= o < e)


def test_segment_tags_never_collide_between_buckets_in_flight():
    """Two buckets are in flight at most; bucket numbers wrap after 2**11."""
    for k in (0, 1, 2046, 2047, 2048, 5000):
        here = {segment_tag(k, s) for s in (0, 1, 4095, MAX_TENSORS_PER_BUCKET - 1)}
        there = {segment_tag(k + 1, s) for s in (0, 1, 4095, MAX_TENSORS_PER_BUCKET - 1)}
        assert len(here) == 4 and not here & there
        assert all(0 <= t < 1 << 32 for t in here | there)


def test_bad_tensors_are_refused_clearly():
    with pytest.raises(SyncError, match="appears twice"):
        plan_buckets([("a", torch.zeros(2)), ("a", torch.zeros(2))], 100)
    with pytest.raises(SyncError, match="dtype"):
        plan_buckets([("c", torch.zeros(2, dtype=torch.complex64))], 100)
    with pytest.raises(SyncError, match="torch.Tensor"):
        plan_buckets([("n", np.zeros(2))], 100)


def test_header_with_data_frame_round_trips():
    w = make_weights(3)
    dtype, items, flat = next(iter_buckets(w.items(), 1 << 20))
    b = plan_buckets(items, 1 << 40)[0]
    h = WeightUpdateHeader(version=3, generation=2, bucket=0, num_buckets=1, dtype=dtype, nbytes=b.nbytes,
                           tensors=b.metas(), data=flat.numpy())
    back = decode([bytes(f) for f in encode(h)], expect=WeightUpdateHeader)
    got = BucketReceiver().receive(back.model_dump(exclude={"data"}), back.data)
    assert describe(got) == describe(items)


# --------------------------------------------------------------------------- real processes
@pytest.mark.slow
@pytest.mark.parametrize("op,chunk_mb", [("send", 0.004), ("send", 0.0), ("broadcast", 0.004), ("broadcast", 0.0)])
def test_two_gloo_members_several_versions(procs, free_port, tmp_path, sender_factory, op, chunk_mb):
    metrics = Metrics("learner")
    sender = sender_factory(sender_cfg(free_port, chunk_mb=chunk_mb, op=op), metrics)
    outs = [start_peer(procs, sender, tmp_path, "actor-a", until=3)[1],
            start_peer(procs, sender, tmp_path, "actor-b", until=3, reuse_buffer=1)[1]]
    assert sender.wait_members(2, 60)
    for v in (1, 2, 3):
        rep = sender.broadcast(v, make_weights(v).items())
        assert rep["ok"] == ["actor-a", "actor-b"], rep
        assert rep["dropped"] == [] and rep["backend"] == "gloo" and rep["buckets"] > 3
    assert rep["generation"] == 1  # membership never changed: one group for all three versions
    for out in outs:
        for v in (1, 2, 3):
            r = wait_results(out, v)
            assert r["ok"] and r["tensors"] == expected(v)
    text = metrics.render().decode()
    assert "scout_learner_weight_sync_seconds_count" in text
    assert 'scout_learner_weight_sync_members{role="learner"} 2.0' in text


@pytest.mark.slow
def test_sender_under_a_default_group_leaves_it_alone(procs, free_port, tmp_path):
    """The learner runs under torchrun with its own default group: the sync group is separate."""
    import subprocess

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    learner = procs.start(["tests/weightsync_learner.py", "--endpoint", endpoint, "--init-port", str(free_port()),
                           "--members", "1", "--versions", "2"], stdout=subprocess.PIPE, text=True)
    out = tmp_path / "member.jsonl"
    procs.start([PEER, "--endpoint", endpoint, "--peer-id", "actor-a", "--out", str(out), "--until", "2"])
    stdout, _ = learner.communicate(timeout=90)
    assert learner.returncode == 0, stdout
    lines = stdout.strip().splitlines()
    reports = [json.loads(x) for x in lines[:-1]]
    assert [r["ok"] for r in reports] == [["actor-a"], ["actor-a"]]
    assert lines[-1] == "DEFAULT OK"
    for v in (1, 2):
        assert wait_results(out, v)["tensors"] == expected(v)
    assert not torch.distributed.is_initialized()  # and this (test) process never had one


@pytest.mark.slow
def test_zmq_only_member_next_to_a_gloo_member(procs, free_port, tmp_path, sender_factory):
    sender = sender_factory(sender_cfg(free_port))
    _, out_g = start_peer(procs, sender, tmp_path, "gloo-member", until=2)
    _, out_z = start_peer(procs, sender, tmp_path, "zmq-member", until=2, transports="zmq")
    assert sender.wait_members(2, 60)
    for v in (1, 2):
        rep = sender.broadcast(v, make_weights(v).items())
        assert rep["ok"] == ["gloo-member", "zmq-member"], rep
    assert rep["generation"] == 1
    for out in (out_g, out_z):
        for v in (1, 2):
            assert wait_results(out, v)["tensors"] == expected(v)


@pytest.mark.slow
@pytest.mark.parametrize("op", ["send", "broadcast"])
def test_kill9_mid_sync_then_restart_rejoins(procs, free_port, tmp_path, sender_factory, op):
    timeout_s = 8.0
    sender = sender_factory(sender_cfg(free_port, timeout_s=timeout_s, chunk_mb=0.004, op=op))
    _, out_a = start_peer(procs, sender, tmp_path, "actor-a", until=4)
    victim, out_b = start_peer(procs, sender, tmp_path, "actor-b", die_at="2:2")
    assert sender.wait_members(2, 60)
    assert sender.broadcast(1, make_weights(1).items())["ok"] == ["actor-a", "actor-b"]

    t0 = time.monotonic()
    rep = sender.broadcast(2, make_weights(2).items())  # actor-b kill -9's itself at bucket 2
    assert time.monotonic() - t0 < 1.25 * timeout_s + 5  # bounded: the learner never hangs on it
    assert victim.wait(10) == -signal.SIGKILL
    assert "actor-b" in rep["dropped"] and "actor-b" not in sender.members(), rep
    assert "actor-a" in rep["ok"] + rep["failed"]  # a survivor answers either way
    # ... and soon: an aborted transfer does not keep it waiting for its receives' timeout
    assert wait_results(out_a, 2)["seconds"] < 0.5 * timeout_s

    rep = sender.broadcast(3, make_weights(3).items())
    assert rep["ok"] == ["actor-a"] and rep["dropped"] == [], rep
    assert wait_results(out_a, 3)["tensors"] == expected(3)

    # the supervisor restarts actor-b: same peer id, fresh run id -> admitted to the next version
    _, out_b2 = start_peer(procs, sender, tmp_path, "actor-b", until=4)
    end = time.monotonic() + 60
    while "actor-b" not in sender.members() and time.monotonic() < end:
        time.sleep(0.05)
    rep = sender.broadcast(4, make_weights(4).items())
    assert rep["ok"] == ["actor-a", "actor-b"], rep
    assert wait_results(out_b2, 4)["tensors"] == expected(4)
    assert wait_results(out_a, 4)["tensors"] == expected(4)
    assert 2 not in results(out_b2)


@pytest.mark.slow
@pytest.mark.parametrize("op", ["chain", "send"])
def test_member_restarted_between_syncs_gets_the_next_one(procs, free_port, tmp_path, sender_factory, op):
    """An actor restarted between two syncs rejoins under its peer id with a new run id before the
    learner noticed the old run was gone. The old run is dropped (reported with the next sync),
    and the new one gets that next sync: it used to count as dropped too, so its transfer was
    aborted and it waited for the learner's re-send."""
    sender = sender_factory(sender_cfg(free_port, timeout_s=10.0, chunk_mb=0.004, op=op))
    old, out_old = start_peer(procs, sender, tmp_path, "actor-a", until=1)
    _, out_b = start_peer(procs, sender, tmp_path, "actor-b", until=2)
    assert sender.wait_members(2, 60)
    assert sender.broadcast(1, make_weights(1).items())["ok"] == ["actor-a", "actor-b"]
    assert old.wait(30) == 0  # done at version 1; its record stays in the learner's table
    first = sender.membership.members["actor-a"].run_id
    _, out_new = start_peer(procs, sender, tmp_path, "actor-a", until=2)
    end = time.monotonic() + 60
    while sender.membership.members["actor-a"].run_id == first and time.monotonic() < end:
        sender.members()  # reads the join
        time.sleep(0.05)
    rep = sender.broadcast(2, make_weights(2).items())
    assert rep["ok"] == ["actor-a", "actor-b"] and rep["error"] is None, rep
    assert rep["dropped"] == ["actor-a"] and "restarted" in rep["reasons"]["actor-a"], rep  # the old run
    assert wait_results(out_new, 2)["tensors"] == expected(2)
    assert wait_results(out_b, 2)["tensors"] == expected(2)


@pytest.mark.slow
def test_slow_member_is_dropped_and_comes_back(procs, free_port, tmp_path, sender_factory):
    timeout_s = 4.0
    sender = sender_factory(sender_cfg(free_port, timeout_s=timeout_s))
    _, out_a = start_peer(procs, sender, tmp_path, "actor-a", until=3)
    _, out_s = start_peer(procs, sender, tmp_path, "slow", until=3, stall_at=f"1:1:{2 * timeout_s}")
    assert sender.wait_members(2, 60)
    t0 = time.monotonic()
    rep = sender.broadcast(1, make_weights(1).items())
    assert time.monotonic() - t0 < 1.25 * timeout_s + 5
    assert "slow" in rep["dropped"], rep
    # it is alive: told it was dropped, it joins again by itself and gets the next versions
    end = time.monotonic() + 3 * timeout_s
    while "slow" not in sender.members() and time.monotonic() < end:
        time.sleep(0.05)
    assert "slow" in sender.members()
    for v in (2, 3):
        rep = sender.broadcast(v, make_weights(v).items())
        assert "actor-a" in rep["ok"], rep
    assert rep["ok"] == ["actor-a", "slow"], rep
    assert wait_results(out_s, 3)["tensors"] == expected(3)
    assert wait_results(out_a, 3)["tensors"] == expected(3)


@pytest.mark.slow
def test_member_missing_the_rendezvous_is_dropped_and_the_rest_go_on(procs, free_port, tmp_path, sender_factory):
    """A member that joined but never answers its plan: the learner gives up on it at the
    rendezvous, re-plans the others in the same sync, and they get this version."""
    import zmq

    timeout_s = 4.0
    sender = sender_factory(sender_cfg(free_port, timeout_s=timeout_s, chunk_mb=0.004))
    _, out = start_peer(procs, sender, tmp_path, "actor-a", until=1)
    ctx = zmq.Context()
    deaf = ctx.socket(zmq.DEALER)
    deaf.connect(sender.endpoint)
    try:
        deaf.send_multipart(encode(SyncJoin(peer_id="deaf", run_id="r", version=-1, transports=["gloo"])))
        assert sender.wait_members(2, 60)
        t0 = time.monotonic()
        rep = sender.broadcast(1, make_weights(1).items())
        assert time.monotonic() - t0 < 1.25 * timeout_s + 5
        assert rep["ok"] == ["actor-a"] and rep["dropped"] == ["deaf"], rep
        assert rep["generation"] == 2  # re-formed without it inside the same sync
        assert wait_results(out, 1)["tensors"] == expected(1)
    finally:
        deaf.close(0)
        ctx.term()


@pytest.mark.slow
def test_join_during_a_reformation_is_planned_at_the_next_sync(procs, free_port, tmp_path, sender_factory):
    """A member whose join is handled while the group is being re-formed (after the plans went
    out, during the rendezvous) is not in that group; the next sync must re-form and include it.
    (It used to be marked clean with the group and wait for its own 30 s re-join.)"""
    sender = sender_factory(sender_cfg(free_port, timeout_s=60.0))
    _, out_a = start_peer(procs, sender, tmp_path, "actor-a", until=2)
    assert sender.wait_members(1, 60)
    rendezvous, late = sender.group.rendezvous, {}

    def rendezvous_with_a_late_join(group, deadline):
        if not late:  # first re-formation: actor-b starts now and its join is handled here
            late["out"] = start_peer(procs, sender, tmp_path, "actor-b", until=2)[1]
            end = time.monotonic() + 45
            while "actor-b" not in sender.membership.members and time.monotonic() < end:
                sender.membership.drain(50)
            assert "actor-b" in sender.membership.members
        return rendezvous(group, deadline)

    sender.group.rendezvous = rendezvous_with_a_late_join
    rep1 = sender.broadcast(1, make_weights(1).items())
    assert rep1["ok"] == ["actor-a"], rep1  # actor-b joined after this generation's plans
    rep2 = sender.broadcast(2, make_weights(2).items())
    assert rep2["ok"] == ["actor-a", "actor-b"], rep2
    assert rep2["generation"] == rep1["generation"] + 1
    assert wait_results(late["out"], 2)["tensors"] == expected(2)
    assert wait_results(out_a, 2)["tensors"] == expected(2)


def test_broadcast_without_members_still_consumes_the_tensors(free_port, sender_factory):
    sender = sender_factory(sender_cfg(free_port))
    seen = []

    def gen():
        for n, t in make_weights(1).items():
            seen.append(n)  # on the learner this would be a full_tensor() collective
            yield n, t
    rep = sender.broadcast(1, gen())
    assert seen == list(make_weights(1)) and rep["members"] == [] and rep["bytes"] > 0


def test_bad_messages_get_errors_and_sender_keeps_serving(free_port, sender_factory):
    import zmq

    sender = sender_factory(sender_cfg(free_port))
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(sender.endpoint)
    try:
        s.send_multipart([b"\x93garbage"])
        s.send_multipart(encode(SyncDone(peer_id="ghost", run_id="r", version=1, ok=True, seconds=0.1)))
        for _ in range(100):  # the sender answers while it drains its socket
            sender.members()
            if s.poll(50):
                break
        err = decode(s.recv_multipart())
        assert err.TYPE == "error" and err.code == "bad_request"
        for _ in range(100):
            sender.members()
            if s.poll(50):
                break
        abort = decode(s.recv_multipart(), expect=SyncAbort)
        assert abort.rejoin  # an unknown peer is told to join
        s.send_multipart(encode(SyncJoin(peer_id="p", run_id="r", version=-1, transports=["zmq"])))
        assert sender.wait_members(1, 10) and sender.members() == ["p"]
    finally:
        s.close(0)
        ctx.term()


@pytest.mark.gpu
def test_cuda_tensors_reach_a_cpu_gloo_member(procs, free_port, tmp_path, sender_factory):
    """The learner's tensors on CUDA, the member on gloo: bytes are staged through the CPU."""
    sender = sender_factory(sender_cfg(free_port))
    _, out = start_peer(procs, sender, tmp_path, "cpu-member", until=1)
    assert sender.wait_members(1, 60)
    rep = sender.broadcast(1, [(n, t.cuda()) for n, t in make_weights(1).items()])
    assert rep["ok"] == ["cpu-member"] and rep["backend"] == "gloo", rep
    assert wait_results(out, 1)["tensors"] == expected(1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="NCCL needs two GPUs (one rank per device)")
def test_nccl_group_between_two_gpus(procs, free_port, tmp_path, sender_factory):
    sender = sender_factory(sender_cfg(free_port, timeout_s=60.0))
    _, out = start_peer(procs, sender, tmp_path, "gpu-member", until=2, transports="nccl,gloo", cuda_device=1)
    assert sender.wait_members(1, 60)
    torch.cuda.set_device(0)
    for v in (1, 2):
        rep = sender.broadcast(v, [(n, t.cuda()) for n, t in make_weights(v).items()])
        assert rep["ok"] == ["gpu-member"] and rep["backend"] == "nccl", rep
        assert wait_results(out, v)["tensors"] == expected(v)


# --------------------------------------------------------------------------- colocated path (CUDA IPC)
# The CUDA IPC path needs a GPU; the CPU tests run its whole control flow with ShmIpcStandIn, a
# TEST STAND-IN that shares the packed buckets through shared-memory files instead of CUDA IPC.
@pytest.fixture
def ipc_standin():
    """Install the CPU stand-in for the colocated path in this (learner) process."""
    standin = ShmIpcStandIn()
    old = set_ipc_impl(standin)
    yield standin
    set_ipc_impl(old)


def test_colocated_selection_rules():
    here = ("node-1", "GPU-5f1c2d3e")
    assert use_ipc(True, here, here, True)
    assert not use_ipc(False, here, here, True)  # learner.colocated_ipc off
    assert not use_ipc(True, None, here, True)  # the learner's weights are not on a GPU
    assert not use_ipc(True, here, ("node-1", "GPU-other"), True)  # another GPU of the same host
    assert not use_ipc(True, here, ("node-2", "GPU-5f1c2d3e"), True)  # another host
    assert not use_ipc(True, here, None, True)  # the member never announced a location
    assert not use_ipc(True, here, here, False)  # the path failed for it before
    assert CudaIpc().location(torch.device("cpu")) is None  # the real path never picks CPU weights


def test_colocated_bucket_maps_the_learners_memory(ipc_standin):
    """Message round trip, then the member's views read the learner's buffer itself (no copy)."""
    b = plan_buckets(make_weights(1).items(), 1 << 20)[0]
    buf = ipc_standin.alloc(b.nbytes, "cpu")
    try:
        flat = pack_bucket(b, out=buf)
        msg = WeightIpcBucket(version=1, generation=1, bucket=0, num_buckets=1, dtype=b.dtype, nbytes=b.nbytes,
                              tensors=b.metas(), ipc=ipc_standin.export(flat))
        back = decode([bytes(f) for f in encode(msg)], expect=WeightIpcBucket)
        header, data = header_dict(back)
        assert data is None and "ipc" in header
        got = BucketReceiver().receive(header)
        assert describe(got) == describe([(n, t) for n, t, _ in b.items])
        name, view = got[0]
        before = view.reshape(-1).view(torch.uint8)[0].item()
        buf[b.items[0][2]] ^= 0xFF  # the learner writes its buffer: the member's view sees it
        assert view.reshape(-1).view(torch.uint8)[0].item() == before ^ 0xFF
    finally:
        ipc_standin.free(buf)
    with pytest.raises(SyncError, match="CUDA receiver"):  # the real path refuses a CPU receiver
        CudaIpc().open(msg.ipc, msg.nbytes, torch.device("cpu"))


@pytest.mark.slow
def test_colocated_member_gets_handles_and_the_others_the_broadcast(procs, free_port, tmp_path, sender_factory,
                                                                    ipc_standin):
    sender = sender_factory(sender_cfg(free_port, colocated_ipc=True))
    _, near = start_peer(procs, sender, tmp_path, "near", until=3, colocated="standin")
    _, far = start_peer(procs, sender, tmp_path, "far", until=3, colocated="standin-elsewhere")
    _, plain = start_peer(procs, sender, tmp_path, "plain", until=3)
    assert sender.wait_members(3, 60)
    # SyncColocated follows SyncJoin: until it is in, "near" is planned as a gloo member
    assert sender.wait_members(2, 60, ready=located)
    for v in (1, 2, 3):
        rep = sender.broadcast(v, make_weights(v).items())
        assert rep["ok"] == ["far", "near", "plain"], rep
        assert rep["buckets"] > 3  # more buckets than buffers: buffers are re-packed after release
    members = sender.membership.members
    assert members["near"].transport == "cuda_ipc" and members["far"].transport == "gloo"
    for v in (1, 2, 3):
        r = wait_results(near, v)
        assert r["ok"] and r["tensors"] == expected(v) and r["ipc_buckets"] == rep["buckets"]
        for out in (far, plain):
            r = wait_results(out, v)
            assert r["ok"] and r["tensors"] == expected(v) and r["ipc_buckets"] == 0


@pytest.mark.slow
def test_colocated_failure_falls_back_to_the_broadcast(procs, free_port, tmp_path, sender_factory, ipc_standin):
    """A member that claims the learner's GPU but cannot map its memory fails one version, then
    gets the broadcast; with learner.colocated_ipc off nobody gets handles at all."""
    sender = sender_factory(sender_cfg(free_port, colocated_ipc=True))
    _, out = start_peer(procs, sender, tmp_path, "claims", until=2, colocated="claim-only")
    assert sender.wait_members(1, 60, ready=located)
    rep = sender.broadcast(1, make_weights(1).items())
    assert rep["failed"] == ["claims"] and "needs a CUDA receiver" in rep["reasons"]["claims"], rep
    rep = sender.broadcast(2, make_weights(2).items())
    assert rep["ok"] == ["claims"] and rep["backend"] == "gloo", rep
    r = wait_results(out, 2)
    assert r["tensors"] == expected(2) and r["ipc_buckets"] == 0

    off = sender_factory(sender_cfg(free_port, colocated_ipc=False))
    _, out2 = start_peer(procs, off, tmp_path, "near", until=1, colocated="standin")
    assert off.wait_members(1, 60)
    assert off.broadcast(1, make_weights(1).items())["ok"] == ["near"]
    r = wait_results(out2, 1)
    assert r["tensors"] == expected(1) and r["ipc_buckets"] == 0


@pytest.mark.gpu
def test_cuda_ipc_colocated_for_real(procs, free_port, tmp_path, sender_factory):
    """Learner weights on cuda:0, a member process on the same GPU: buckets go through real CUDA
    IPC handles (no stand-in) and arrive bit-exact."""
    torch.cuda.set_device(0)
    sender = sender_factory(sender_cfg(free_port, timeout_s=60.0, colocated_ipc=True))
    _, out = start_peer(procs, sender, tmp_path, "gpu-near", until=2, transports="nccl,gloo", cuda_device=0,
                        colocated="cuda")
    assert sender.wait_members(1, 60, ready=located)
    for v in (1, 2):
        rep = sender.broadcast(v, [(n, t.cuda()) for n, t in make_weights(v).items()])
        assert rep["ok"] == ["gpu-near"], rep
        r = wait_results(out, v)
        assert r["tensors"] == expected(v) and r["ipc_buckets"] == rep["buckets"]
    assert sender.membership.members["gpu-near"].transport == "cuda_ipc"


def test_receiver_holds_cpu_buffers_until_released(monkeypatch):
    """Fresh CPU receive buffers stay referenced until release() (freeing them after SyncDone
    costs the learner nothing), within HOLD_BYTES; the next update's first bucket releases them."""
    monkeypatch.setattr(receiver, "HOLD_BYTES", 2500)  # where BucketReceiver looks it up
    rx = BucketReceiver()
    bufs = [rx._buffer(1000, torch.device("cpu")) for _ in range(3)]
    assert [b.data_ptr() for b in rx._held] == [b.data_ptr() for b in bufs[1:]]  # the oldest went: 3000 > 2500
    rx.release()
    assert rx._held == [] and rx._held_bytes == 0
    header = WeightUpdateHeader(version=1, generation=0, bucket=0, num_buckets=1, dtype="uint8", nbytes=4,
                                tensors=[TensorMeta(name="w", dtype="uint8", shape=[4], offset=0)])
    rx._buffer(1000, torch.device("cpu"))
    rx.receive(header, np.arange(4, dtype=np.uint8))  # zmq data: no buffer of its own
    assert rx._held == []
    kept = BucketReceiver(reuse_buffer=True)
    kept._buffer(1000, torch.device("cpu"))
    assert kept._held == []
