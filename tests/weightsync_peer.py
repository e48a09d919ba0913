"""A weight-sync member process for tests: joins the learner's sync endpoint, receives every
update with a real BucketReceiver, and appends one JSON line per finished update to --out:

    {"version": 3, "ok": true, "message": "", "run_id": "...", "tensors": {name: [dtype, shape, sha256]}}

--die-at V:K    kill -9 itself when bucket K of version V arrives (before receiving it)
--stall-at V:K:S  sleep S seconds when bucket K of version V arrives (a slow member)
--stop-at V:K     SIGSTOP itself when bucket K of version V arrives (a frozen member; the test
                  sends SIGCONT)
--fault-file PATH  read lines "die-at V:K", "stop-at V:K" or "stall-at V:K:S" from PATH, when it
                  exists, at the first bucket of each update (the test picks the victim once it
                  knows the ranks)
--until V       exit after loading version V
--cuda-device I   receive NCCL buckets on GPU I (offer "nccl" in --transports)
--colocated MODE  announce a location for the colocated (CUDA IPC) path: "cuda" (this GPU, real
                  CUDA IPC), "standin" (the CPU shared-memory TEST STAND-IN, ShmIpcStandIn),
                  "standin-elsewhere" (stand-in, but another GPU UUID), "claim-only" (announce the
                  stand-in's location but keep the real CudaIpc, which cannot open on a CPU)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from common.config import TransportConfig  # noqa: E402
from common.weightsync.client import SyncClient, follow_sync  # noqa: E402
from common.weightsync.cuda_ipc import ShmIpcStandIn, gpu_location, set_ipc_impl  # noqa: E402
from common.weightsync.receiver import BucketReceiver  # noqa: E402


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def describe(named) -> dict:
    return {n: [str(t.dtype).removeprefix("torch."), list(t.shape), digest(t)] for n, t in named}


def make_weights(version: int) -> dict[str, torch.Tensor]:
    """~90 KB of mixed dtypes, different for every version (and bf16/f16 with random bit patterns)."""
    g = torch.Generator().manual_seed(1000 + version)
    w = {
        "model.embed_tokens.weight": torch.randn(96, 64, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(64, 64, generator=g).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.bias": torch.randn(64, generator=g).to(torch.bfloat16),
        "model.layers.0.mlp.up_proj.weight": torch.randn(128, 64, generator=g).to(torch.float16),
        "model.layers.0.input_layernorm.weight": torch.randn(64, generator=g),
        "model.layers.1.self_attn.q_proj.weight": torch.randn(64, 64, generator=g).to(torch.bfloat16),
        "model.layers.1.mlp.up_proj.weight": torch.randn(128, 64, generator=g).to(torch.float16),
        "model.norm.weight": torch.randn(64, generator=g),
        "lm_head.weight": torch.randn(96, 64, generator=g).t(),  # non-contiguous on purpose
        "scalar": torch.tensor(float(version)),
    }
    # every 16-bit pattern except NaNs survives a float round trip only if bytes travel untouched
    w["raw_bits.bf16"] = torch.randint(-32768, 32767, (333,), generator=g, dtype=torch.int16).view(torch.bfloat16)
    return w


def _at(spec: str | None) -> tuple[float, ...] | None:
    return tuple(float(x) for x in spec.split(":")) if spec else None


def colocation(args) -> tuple[str, str] | None:
    if args.colocated is None:
        return None
    if args.colocated == "cuda":
        return gpu_location(torch.device("cuda", args.cuda_device or 0))
    standin = ShmIpcStandIn()
    where = standin.location(torch.device("cpu"))
    if args.colocated in ("standin", "standin-elsewhere"):
        set_ipc_impl(standin)
    return (where[0], where[1] + "-elsewhere") if args.colocated == "standin-elsewhere" else where


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--peer-id", required=True)
    ap.add_argument("--run-id", default=None)
    ap.add_argument("--transports", default="gloo,zmq")
    ap.add_argument("--out", required=True)
    ap.add_argument("--until", type=int, default=1 << 30)
    ap.add_argument("--die-at", default=None)
    ap.add_argument("--stall-at", default=None)
    ap.add_argument("--stop-at", default=None)
    ap.add_argument("--fault-file", default=None)
    ap.add_argument("--max-seconds", type=float, default=120.0)
    ap.add_argument("--reuse-buffer", type=int, default=0, help="1: BucketReceiver(reuse_buffer=True)")
    ap.add_argument("--cuda-device", type=int, default=None, help="receive NCCL buckets on this GPU")
    ap.add_argument("--colocated", default=None, choices=["cuda", "standin", "standin-elsewhere", "claim-only"])
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {args.peer_id} %(name)s %(message)s")
    run_id = args.run_id or uuid.uuid4().hex
    faults = {"die-at": _at(args.die_at), "stall-at": _at(args.stall_at), "stop-at": _at(args.stop_at)}
    if args.cuda_device is not None:
        torch.cuda.set_device(args.cuda_device)
    client = SyncClient(args.endpoint, args.peer_id, run_id, TransportConfig(), args.transports.split(","),
                        colocated=colocation(args))
    device = torch.device("cuda", args.cuda_device) if args.colocated == "cuda" else None
    receiver = BucketReceiver(device=device, reuse_buffer=bool(args.reuse_buffer))
    client.join(-1)
    received: dict = {}
    counts = {"ipc": 0}

    def on_bucket(header: dict, data) -> None:
        v, k = header["version"], header["bucket"]
        if k == 0 and args.fault_file and os.path.exists(args.fault_file):
            for line in open(args.fault_file).read().splitlines():
                kind, at = line.split()
                faults[kind] = _at(at)
        die, stall, stop = faults["die-at"], faults["stall-at"], faults["stop-at"]
        if die and (v, k) == die[:2]:
            os.kill(os.getpid(), signal.SIGKILL)
        if stall and (v, k) == stall[:2]:
            time.sleep(stall[2])
        if stop and (v, k) == stop[:2]:
            os.kill(os.getpid(), signal.SIGSTOP)
        if "ipc" in header:
            counts["ipc"] += 1
        received.update(describe(receiver.receive(header, data)))

    end = time.monotonic() + args.max_seconds
    with open(args.out, "a") as out:
        while time.monotonic() < end:
            received.clear()
            counts["ipc"] = 0
            result = follow_sync(client, client.poll(200), receiver.setup, on_bucket)
            if result is None:
                continue
            receiver.release()
            out.write(json.dumps({**result, "run_id": run_id, "ipc_buckets": counts["ipc"],
                                  "tensors": dict(received) if result["ok"] else {}}) + "\n")
            out.flush()
            if result["ok"] and result["version"] >= args.until:
                break
    receiver.close()
    client.close()


if __name__ == "__main__":
    main()
