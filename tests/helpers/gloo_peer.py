"""One end of a weight-sync gloo group across two machines, for tests/test_multinode.py.

    python -m tests.helpers.gloo_peer RANK STORE_HOST STORE_PORT

Rank 0 serves the TCPStore on STORE_HOST (as the learner does), rank 1 connects to it (as an
actor does); both build the group with common.weightsync.collective.make_group on a PrefixStore,
as the weight sync does, rank 0 sends a tensor, rank 1 checks it. Prints "ok <address>" (the
address the group bound) and exits 0, or exits 1 with the error.
"""

from __future__ import annotations

import datetime
import sys

import torch
import torch.distributed as dist

from common.transport import gloo_bind_address, is_loopback
from common.weightsync.collective import make_group

TIMEOUT = datetime.timedelta(seconds=20)


def main() -> None:
    rank, host, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    store = dist.TCPStore(host, port, 2, rank == 0, timeout=TIMEOUT, wait_for_workers=False)
    prefix = dist.PrefixStore("scout/1", store)
    try:
        pg = make_group("gloo", prefix, rank, 2, 20.0, is_loopback(host))
        t = torch.arange(8, dtype=torch.float32) if rank == 0 else torch.zeros(8)
        work = pg.send([t], 1, 0) if rank == 0 else pg.recv([t], 0, 0)
        work.wait(TIMEOUT)
        assert rank == 0 or t.tolist() == list(range(8)), t
    except Exception as e:  # noqa: BLE001 (reported to the test)
        print(f"failed: {str(e).splitlines()[0][:300]}", flush=True)
        sys.exit(1)
    print(f"ok {gloo_bind_address(prefix, is_loopback(host))}", flush=True)
    if rank == 0:
        store.wait(["done"], TIMEOUT)  # keep serving the store until rank 1 has finished
    else:
        store.set("done", b"1")


if __name__ == "__main__":
    main()
