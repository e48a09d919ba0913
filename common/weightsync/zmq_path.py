"""The ZMQ fallback: for members that offer only "zmq" (no process group), every packed bucket
rides as the `data` frame of its WeightUpdateHeader on the sync control channel.

    learner: send_data(header, packed bucket) ── WeightUpdateHeader(data=bytes, chunk_bytes=0) ─▶
    member:  unpack_data(header, data frame) ─▶ [(name, view)]   views into the received frame

The frames are sent zero-copy, so the learner must not touch a packed buffer it sent this way.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np
import torch

from common.weightsync.buckets import unpack_bucket
from common.weightsync.errors import SyncError
from common.weightsync.messages import WeightUpdateHeader

if TYPE_CHECKING:
    from common.weightsync.membership import Member, Membership


def send_data(ms: Membership, header: WeightUpdateHeader, flat: torch.Tensor, members: list[Member],
              deadline: float) -> None:
    """The packed bucket `flat` as the header's data frame to each of `members` still in `ms`;
    whoever cannot take it by the deadline is dropped."""
    if not members:
        return
    data = (flat if flat.device.type == "cpu" else flat.cpu()).numpy()
    msg = header.model_copy(update={"data": data, "chunk_bytes": 0})
    for m in members:
        if ms.members.get(m.peer_id) is m and not ms.send(m, msg, deadline):
            ms.drop(m.peer_id, "could not take the bucket in time")


def unpack_data(header: WeightUpdateHeader, data: np.ndarray) -> list[tuple[str, torch.Tensor]]:
    """Views of a bucket that came as a data frame (read-only: zmq frames are read-only buffers)."""
    arr = np.asarray(data)
    if arr.dtype != np.uint8 or arr.nbytes != header.nbytes:
        raise SyncError(f"data frame is {arr.nbytes} bytes of {arr.dtype}, header says {header.nbytes} uint8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zmq frames are read-only buffers
        flat = torch.from_numpy(arr.reshape(-1))
    return unpack_bucket(flat, header.tensors)
