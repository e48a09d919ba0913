"""Weight sync: the learner (rank 0) sends each new policy version to the actor workers.

    learner rank 0                                        actor worker
    sender.py    WeightSender: broadcast(version, tensors) client.py    SyncClient, follow_sync
      membership.py  member table, ROUTER socket   ◀─ SyncJoin / SyncDone ──  (DEALER)
      group.py       re-forms the group, TCPStore  ── SyncPlan ──────────▶  receiver.py
                                                                              BucketReceiver
      buckets.py     plan / pack / segment ─── WeightUpdateHeader per bucket ─▶ unpack views
      per bucket, one transport per member:
        collective.py  gloo/NCCL process group ══ segments ══▶ join_group, receive_segments
        zmq_path.py    ZMQ fallback: bytes as the header's data frame ─▶ unpack_data
        cuda_ipc.py    colocated (same GPU): CUDA IPC handle ─▶ open_bucket ─▶ WeightIpcAck

messages.py holds the wire messages, errors.py SyncError and SyncAborted. Import each name
from the module that defines it; this file exports nothing.
"""
