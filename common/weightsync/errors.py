"""The two errors of weight sync, raised on either side (learner or member)."""

from __future__ import annotations


class SyncError(RuntimeError):
    """A weight sync could not be completed on this side; the message says why."""


class SyncAborted(SyncError):
    """The learner abandoned the rendezvous or the transfer this member was part of."""
