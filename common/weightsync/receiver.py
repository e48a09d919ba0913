"""The actor worker's half of weight sync, its data side: BucketReceiver receives one
member's buckets and returns named views for the model to load. It takes plain dicts, so it may
live in a different process than the SyncClient (client.py), e.g. a vLLM engine worker.

    setup(plan):    zmq plan → nothing to join
                    gloo/nccl → collective.join_group: ready/<rank>, wait "go", build the group
    receive(header, data):
      WeightIpcBucket (colocated)  → cuda_ipc.open_bucket: views of the learner's GPU buffer
      data frame (zmq members)     → zmq_path.unpack_data: views of the frame
      else                         → a buffer (held until release(), up to HOLD_BYTES), filled by
                                     collective.receive_segments over the group (gives up when the
                                     learner sets "abort"), then buckets.unpack_bucket: views;
                                     op "chain": each segment is also forwarded to rank+1 as it
                                     arrives, and those sends may still be reading the buffer
                                     after receive() returned (kept in _forwards: a reused buffer
                                     still being forwarded is replaced, never overwritten)
    release():      after SyncDone, drop the hold on this update's buffers
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import torch

from common.weightsync.buckets import unpack_bucket
from common.weightsync.collective import dispose, first_line, join_all, join_group, receive_segments, watch_forwards
from common.weightsync.cuda_ipc import open_bucket
from common.weightsync.errors import SyncError
from common.weightsync.messages import SyncPlan, WeightIpcBucket, WeightUpdateHeader
from common.weightsync.zmq_path import unpack_data

# a member keeps the CPU buffers it received a sync into, up to this many bytes, until release():
# freeing a 256 MB buffer takes 15-18 ms on the 2-core VM (munmap of its pages), time in which
# the next bucket's receives are not posted yet and SyncDone is not sent
HOLD_BYTES = 1 << 30


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
        self._forwards: list[tuple[threading.Event, torch.Tensor]] = []  # chain sends in flight: (over, buffer)

    def setup(self, plan: dict | SyncPlan) -> None:
        plan = plan if isinstance(plan, SyncPlan) else SyncPlan.model_validate(plan)
        self._close_group()
        self.plan = plan
        if plan.transport == "zmq":
            return
        self._group, self._prefix = join_group(plan)

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
            return unpack_data(header, data)
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
                forwards = receive_segments(self._group, plan, header, flat, deadline, self._aborted)
            except Exception as e:
                self._close_group()
                raise e if isinstance(e, SyncError) else SyncError(first_line(e)) from None
            if forwards:
                self._forwarding()  # forget those that are over
                self._forwards.append((watch_forwards(forwards, 2 * plan.timeout_s), flat))
        # all of it is here (receive_segments raises otherwise): only now are views handed out,
        # so a failed transfer never reaches the model. Read-only: op "chain" may still forward them
        return unpack_bucket(flat, header.tensors)

    def _forwarding(self) -> bool:
        """Whether a chain forward still reads one of the buffers received into (done ones are
        forgotten)."""
        self._forwards = [(over, b) for over, b in self._forwards if not over.is_set()]
        return bool(self._forwards)

    def _finish_forwards(self, timeout_s: float) -> None:
        """Before the group goes away (close): let the chain forwards in flight reach the next
        member (bounded), so that leaving right after SyncDone does not cut the chain."""
        end = time.monotonic() + timeout_s
        for over, _buf in self._forwards:
            over.wait(max(0.0, end - time.monotonic()))
        self._forwards = []

    def _receive_ipc(self, header: dict | WeightIpcBucket) -> list[tuple[str, torch.Tensor]]:
        """Views of a colocated bucket, straight in the learner's buffer on this GPU (no copy);
        they are valid until this member acknowledges the bucket."""
        if not isinstance(header, WeightIpcBucket):
            header = WeightIpcBucket.model_validate(header)
        return open_bucket(header, self.device)

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
        if self._buf is None or self._buf.numel() < nbytes or self._forwarding():
            self._buf = torch.empty(nbytes, dtype=torch.uint8)  # the old one may still be sent from
        return self._buf[:nbytes]

    def release(self) -> None:
        """Drop this receiver's hold on the buffers received so far (their memory goes once the
        loaded views are gone too)."""
        self._held.clear()
        self._held_bytes = 0

    def _close_group(self) -> None:
        if self._group is not None:
            box, self._group = [self._group], None
            self._disposing = [t for t in self._disposing if t.is_alive()] + [dispose(box)]
        self._prefix = None
        if self._forwards:  # sends of a torn-down group may never complete: never reuse their buffer
            self._forwards, self._buf = [], None

    def close(self) -> None:
        self._finish_forwards(min(5.0, self.plan.timeout_s if self.plan else 5.0))
        self.release()
        self._close_group()
        join_all(self._disposing, min(5.0, self.plan.timeout_s if self.plan else 5.0))
        self.plan = None
        self._buf = None
