"""A learner-like process for tests: it runs under its own default process group (as the learner
does under torchrun), broadcasts weights with a WeightSender, and checks afterwards that the
default group is untouched and still works. Prints one JSON line per report, then "DEFAULT OK".

    python tests/weightsync_learner.py --endpoint tcp://127.0.0.1:P --init-port Q --members 1 --versions 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from common.config import LearnerConfig, TransportConfig  # noqa: E402
from common.weightsync.sender import WeightSender  # noqa: E402
from tests.weightsync_peer import make_weights  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--init-port", type=int, required=True)
    ap.add_argument("--members", type=int, default=1)
    ap.add_argument("--versions", type=int, default=2)
    args = ap.parse_args()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.init_port}", rank=0, world_size=1)
    default = dist.group.WORLD
    cfg = LearnerConfig(sync_endpoint=args.endpoint, store_port=0, bucket_mb=0.012, sync_timeout_s=20)
    sender = WeightSender(cfg, TransportConfig())
    sender.start()
    if not sender.wait_members(args.members, 60):
        raise SystemExit("members did not join")
    for v in range(1, args.versions + 1):
        print(json.dumps(sender.broadcast(v, make_weights(v).items())), flush=True)
    sender.close()
    t = torch.ones(3)
    dist.all_reduce(t)  # the training group still works
    ok = dist.group.WORLD is default and dist.get_world_size() == 1 and t.tolist() == [1.0, 1.0, 1.0]
    dist.destroy_process_group()
    print("DEFAULT OK" if ok else "DEFAULT CHANGED", flush=True)


if __name__ == "__main__":
    main()
