"""Learner step benchmark: the real Trainer (FSDP2, gloo on CPU / NCCL on GPU) on synthetic
groups — step time, tokens/s, groups/s, the full-parameter gather a weight sync needs, and an
atomic checkpoint save. One process, or N ranks under torchrun (the script relaunches itself).

    python bench/learner_bench.py [--ranks 1] [--layers 4] [--hidden 256] [--groups 8] \
        [--samples 5] [--tokens 256] [--steps 5] [--threads 1] [--model PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def synthetic_groups(n_groups: int, samples: int, tokens: int, vocab: int, seed: int, trained: float = 0.75):
    from common.protocol import TrajectoryGroup

    rng = np.random.default_rng(seed)
    out = []
    for g in range(n_groups):
        lens = rng.integers(tokens // 2, tokens + 1, samples).astype(np.int32)
        total = int(lens.sum())
        # the last `trained` fraction of each sample is generated (loss mask 1), the rest prompt
        mask = np.concatenate([(np.arange(k) >= round(k * (1 - trained))).astype(np.uint8) for k in lens])
        out.append(TrajectoryGroup(
            group_id=f"{seed}-{g}", peer_id="bench", run_id="bench", prompt_id=g, num_searches=[0] * samples,
            retrieval_failed=[False] * samples, correct=[False] * samples, lengths=lens,
            tokens=rng.integers(0, vocab, total).astype(np.int32), loss_mask=mask,
            logprobs=np.where(mask, -rng.uniform(2, 6, total), 0).astype(np.float32),
            versions=np.where(mask, 0, -1).astype(np.int32), rewards=rng.integers(0, 2, samples).astype(np.float32)))
    return out


def run(args) -> None:
    import torch
    import torch.distributed as dist

    from common.config import load_config
    from learner.checkpoint import save_checkpoint
    from learner.trainer import CTRL_BATCH, Trainer, assemble, broadcast_command, init_distributed

    d = init_distributed()
    lc = load_config(None, [f"learner.model='{args.model}'", f"learner.n_samples={args.samples}",
                            f"learner.micro_batch_tokens={args.micro_tokens}", "learner.lr=1e-5"]).learner
    t = Trainer(lc, d)
    times, tokens = [], 0
    for step in range(args.steps + 1):  # step 0 warms up
        groups = (synthetic_groups(args.groups, args.samples, args.tokens, t.vocab_size, step, args.trained)
                  if d.rank == 0 else None)
        t0 = time.perf_counter()
        _, batch = broadcast_command(d, CTRL_BATCH, assemble(groups, True) if groups else None)
        t.train_step(batch)
        if d.device.type == "cuda":
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - t0)
            tokens += int(batch.lengths.sum())
    t0 = time.perf_counter()
    nbytes = sum(x.numel() * x.element_size() for _, x in t.full_parameters())
    gather_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        save_checkpoint(tmp, 1, t.model, t.optimizer, {"version": 1}, args.model, d.rank)
        ckpt_s = time.perf_counter() - t0
    if d.rank == 0:
        step_s = float(np.median(times))
        print(json.dumps({
            "ranks": d.world, "device": str(d.device), "params_mb": round(nbytes / 2**20, 1),
            "groups": args.groups, "samples": args.samples, "tokens_per_step": tokens // len(times),
            "step_s_median": round(step_s, 3), "tokens_per_s": round(tokens / sum(times), 1),
            "groups_per_s": round(args.groups * len(times) / sum(times), 2),
            "gather_full_params_s": round(gather_s, 3), "checkpoint_save_s": round(ckpt_s, 3)}), flush=True)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--model", default=None, help="HF folder (default: build a tiny Qwen2)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--micro-tokens", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads per rank")
    ap.add_argument("--trained", type=float, default=0.75,
                    help="fraction of each sample's tokens under the loss mask (the demo: about 0.22)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return run(args)
    if args.model is None:
        from demo.tinymodel import build_tiny_model

        args.model = str(build_tiny_model(tempfile.mkdtemp(prefix="scout-learner-bench-"), layers=args.layers,
                                          hidden=args.hidden, heads=4))
    passthrough = ["--model", args.model, "--groups", str(args.groups), "--samples", str(args.samples),
                   "--tokens", str(args.tokens), "--micro-tokens", str(args.micro_tokens), "--steps", str(args.steps),
                   "--worker"]
    launcher = [sys.executable] if args.ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.ranks),
        "--master-addr", "127.0.0.1", "--master-port", str(29500 + os.getpid() % 1000)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    raise SystemExit(subprocess.call([*launcher, __file__, *passthrough], env=env))


if __name__ == "__main__":
    main()
