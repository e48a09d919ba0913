"""The actor worker's half of weight sync, its control side: SyncClient (the line to the
learner's sync endpoint) and follow_sync (one update, from the first message to SyncDone).
The bytes themselves are received by a BucketReceiver (receiver.py), possibly in another
process (a vLLM engine worker reached through collective_rpc): it is handed plain dicts.

    learner (sender.py)                                   SyncClient (DEALER)
    ◀── SyncJoin(peer_id, run_id, version, transports) ─── join(version)
    ◀── SyncColocated(host, gpu_uuid) ──────────────────── (on a GPU: the colocated path)
                                                          follow_sync(client, client.poll(0),
                                                                      setup, receive):
    ── SyncPlan ─────────────────────────────────────────▶ setup(plan dict)
    ── WeightUpdateHeader k of n (+ data: zmq members) ──▶ receive(header dict, data)
    ── WeightIpcBucket k of n (colocated) ───────────────▶ receive(header dict, None), then
    ◀── WeightIpcAck(bucket, ok) ───────────────────────── once the GPU finished reading it
    ── SyncAbort ────────────────────────────────────────▶ the update ends, failed
    ◀── SyncDone(version, ok, seconds, message) ────────── after the last bucket (or a failure)
    ── SyncAbort(rejoin=True), at any time ──────────────▶ poll() sends SyncJoin again

In one process:

    client = SyncClient(sync_endpoint, peer_id, run_id, cfg.transport); client.join(version)
    receiver = BucketReceiver()
    ...between engine steps:
    result = follow_sync(client, client.poll(0), receiver.setup,
                         lambda header, data: model.load_weights(receiver.receive(header, data)))
    # result: None (nothing arrived) or {version, ok, seconds, message, buckets}; SyncDone is sent
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
import zmq

from common.protocol import ErrorReply, Heartbeat
from common.transport import TransportTimeout, connect, recv_frames, send, term_context
from common.weightsync.cuda_ipc import gpu_location, ipc_impl
from common.weightsync.errors import SyncError
from common.weightsync.messages import (SyncAbort, SyncColocated, SyncDone, SyncJoin, SyncPlan, WeightIpcAck,
                                        WeightIpcBucket, WeightUpdateHeader)
from common.wire import Message, ProtocolError, decode

log = logging.getLogger("scout.weightsync")

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
            term_context(self._ctx)


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
            ipc_impl().done_reading()
    except Exception as e:
        error = f"bucket {msg.bucket} of version {msg.version}: {e}"
        if ipc:
            client.ack_ipc(msg.version, msg.bucket, False, error)
        return error
    if ipc:
        client.ack_ipc(msg.version, msg.bucket, True)
    return ""
