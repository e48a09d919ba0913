"""Simulated actors for bench/ingest_bench.py and tests/test_ingest_backpressure.py: many asyncio
"actors" per OS process, each a DEALER speaking the real protocol to a learner's ingest endpoint.

    credit  Hello, then WorkRequest → WorkAssignment; one TrajectoryGroup per assigned prompt, each
            answered by a GroupAck before the next is sent; an empty assignment: sleep retry_after_s
            (what actors/worker.py does, minus the generation)
    flood   an actor that ignores back-pressure: Hello, then groups for any known prompt id, one
            after the other as fast as the acks come back (the learner must refuse what it cannot hold)
    raw     the baseline: the same multipart frames (one encoded group) to a plain ROUTER that
            answers with an ack of the same size, nothing decoded (`raw_server`)

Groups are what the real worker sends (actors/rollout.py GroupState.to_message): per token ids,
loss mask, behaviour logprobs and policy versions; per sample lengths and rewards. A refused group
is not resent (like the worker), its prompt goes back to the learner's queue.

    python bench/ingest_sim.py --endpoint ipc:///tmp/x --actors 16 --mode credit --tokens 2048 \
        --start-at <unix time> --seconds 10 --out counts.json
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import zmq
import zmq.asyncio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.config import TransportConfig  # noqa: E402
from common.protocol import (GroupAck, Hello, HelloAck, TrajectoryGroup, WorkAssignment,  # noqa: E402
                             WorkRequest)
from common.transport import connect  # noqa: E402
from common.wire import decode, encode  # noqa: E402

# sizes of one group: (samples, tokens per sample, generated tokens per sample)
SIZES = {"demo": (8, 96, 24),  # the demo recipe's groups: 8 samples of ~89 tokens, ~20 generated
         "3b": (8, 2048, 1024)}  # a 3B-class run: 8 samples of ~2k tokens


def group_arrays(n: int, tokens: int, gen: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
    """One group's arrays: each sample is [prompt][generated half][observation][generated half]."""
    rng = np.random.default_rng(seed)
    prompt = (tokens - gen) // 2
    half = gen // 2
    sample = np.zeros(tokens, np.uint8)
    sample[prompt:prompt + half] = 1
    sample[tokens - (gen - half):] = 1
    mask = np.tile(sample, n)
    total = n * tokens
    return {"lengths": np.full(n, tokens, np.int32),
            "tokens": rng.integers(0, vocab, total, dtype=np.int32),
            "loss_mask": mask,
            "logprobs": np.where(mask, -rng.exponential(0.7, total), 0.0).astype(np.float32),
            "rewards": rng.random(n, dtype=np.float32)}


def make_group(arrays: dict, version: int, prompt_id: int, peer: str, run: str) -> TrajectoryGroup:
    n = int(arrays["lengths"].shape[0])
    return TrajectoryGroup(
        group_id=uuid.uuid4().hex, peer_id=peer, run_id=run, prompt_id=prompt_id, num_searches=[1] * n,
        retrieval_failed=[False] * n, correct=[False] * n, created_at=time.time(), behaviour=[5] * n,
        bad_searches=[0] * n, versions=np.where(arrays["loss_mask"], version, -1).astype(np.int32), **arrays)


def frame_bytes(frames: list) -> int:
    return sum(len(f) if isinstance(f, bytes) else memoryview(f).nbytes for f in frames)


class Counts:
    """What one process's actors saw: totals, and acks that arrived inside the measured window.

    The process's CPU seconds are read at the window's start and end (`mark_cpu`), not per ack:
    under the bench's load on a 2-core VM a read of the process clock took 220–320 µs of wall
    time (4–5 µs of CPU), so reading it for every accepted group stalled each sender's loop."""

    def __init__(self, window: tuple[float, float]):
        self.window = window
        self.sent = 0
        self.answers: collections.Counter = collections.Counter()  # "accepted" or the refusal's reason
        self.in_window = 0  # accepted groups acked inside the window
        self.bytes_in_window = 0
        self.work_requests = 0
        self.cpu: list[float] = []  # this process's CPU seconds at the window's start and end

    def mark_cpu(self) -> None:
        if len(self.cpu) < 2:
            self.cpu.append(time.process_time())

    def ack(self, reason: str, nbytes: int) -> None:
        self.answers[reason] += 1
        if reason == "accepted" and self.window[0] <= time.time() < self.window[1]:
            self.in_window += 1
            self.bytes_in_window += nbytes

    def to_dict(self) -> dict:
        return {"sent": self.sent, "answers": dict(self.answers), "accepted_in_window": self.in_window,
                "bytes_in_window": self.bytes_in_window, "work_requests": self.work_requests,
                "cpu_s_in_window": self.cpu[-1] - self.cpu[0] if self.cpu else 0.0,
                "window_s": self.window[1] - self.window[0]}


class SimActor:
    def __init__(self, args, index: int, ctx: zmq.asyncio.Context, counts: Counts):
        self.args, self.counts = args, counts
        self.peer, self.run_id = f"sim-{os.getpid()}-{index}", uuid.uuid4().hex
        n, tokens, gen = SIZES[args.size]
        self.arrays = group_arrays(n, tokens, gen, args.vocab, seed=index)
        tc = TransportConfig(curve_dir=args.curve_dir or None, recv_timeout_ms=args.ack_timeout_ms)
        self.sock = connect(ctx, zmq.DEALER, args.endpoint, tc)
        self.version = 0
        self.rng = np.random.default_rng(index)

    async def ask(self, frames: list) -> list:
        await self.sock.send_multipart(frames, copy=False)
        if not await self.sock.poll(self.args.ack_timeout_ms):
            raise TimeoutError("no answer from the learner")
        return await self.sock.recv_multipart(copy=False)

    async def send_group(self, prompt_id: int) -> None:
        frames = encode(make_group(self.arrays, self.version, prompt_id, self.peer, self.run_id))
        self.counts.sent += 1
        ack = decode(await self.ask(frames), GroupAck)
        self.version = max(self.version, ack.version)
        verdict = "stale" if "older than" in ack.reason else ack.reason[:40]  # as actors/worker.py reads it
        self.counts.ack("accepted" if ack.accepted else verdict, frame_bytes(frames))

    async def hello(self) -> None:
        ack = decode(await self.ask(encode(Hello(role="actor", peer_id=self.peer, run_id=self.run_id))), HelloAck)
        self.version = ack.version

    async def credit_loop(self, done) -> None:
        while not done():
            req = WorkRequest(peer_id=self.peer, run_id=self.run_id, max_prompts=self.args.prompts_per_request,
                              version=self.version)
            self.counts.work_requests += 1
            work = decode(await self.ask(encode(req)), WorkAssignment)
            self.version = work.version
            if work.ended:
                return
            if not work.prompts:
                await asyncio.sleep(work.retry_after_s)
            for p in work.prompts:
                await self.send_group(p.prompt_id)

    async def flood_loop(self, done) -> None:
        while not done():
            await self.send_group(int(self.rng.integers(0, self.args.rows)))

    async def raw_loop(self, done) -> None:
        frames = [bytes(f) for f in encode(make_group(self.arrays, 0, 0, self.peer, self.run_id))]
        nbytes = frame_bytes(frames)
        while not done():
            self.counts.sent += 1
            await self.ask(frames)
            self.counts.ack("accepted", nbytes)

    async def run(self, done) -> None:
        try:
            if self.args.mode == "raw":
                await self.raw_loop(done)
                return
            await self.hello()
            await (self.credit_loop if self.args.mode == "credit" else self.flood_loop)(done)
        except TimeoutError:
            self.counts.answers["unanswered"] += 1
        finally:
            self.sock.close(0)


async def run_actors(args) -> Counts:
    start = args.start_at or time.time()
    counts = Counts((start + args.warmup, start + args.warmup + args.seconds))
    ctx = zmq.asyncio.Context()
    loop = asyncio.get_running_loop()
    # pyzmq's reader callback may fire once more as the process ends: not an error of the run
    loop.set_exception_handler(lambda lp, c: None if isinstance(c.get("exception"), zmq.ContextTerminated)
                               else lp.default_exception_handler(c))
    actors = [SimActor(args, args.first + i, ctx, counts) for i in range(args.actors)]
    await asyncio.sleep(max(0.0, start - time.time()))
    end = counts.window[1]

    def done() -> bool:
        if args.groups:  # count-based (tests): stop after this many groups per process
            return counts.sent >= args.groups
        return time.time() >= end or bool(args.stop_file and os.path.exists(args.stop_file))

    for edge in counts.window:  # the process's CPU clock at the window's start and end
        loop.call_later(max(0.0, edge - time.time()), counts.mark_cpu)
    await asyncio.gather(*(a.run(done) for a in actors))
    if len(counts.cpu) == 1:  # the actors stopped inside the window (--groups, --stop-file)
        counts.mark_cpu()
    return counts  # sockets are closed; the context goes with the process


def raw_server(endpoint: str, curve_dir: str | None, ack_bytes: int, stop) -> None:
    """The baseline's receiver: a ROUTER that answers every message with `ack_bytes` bytes, unread."""
    from common.transport import bind

    ctx = zmq.Context()
    sock = bind(ctx, zmq.ROUTER, endpoint, TransportConfig(curve_dir=curve_dir))
    ack = b"a" * ack_bytes
    try:
        while not stop.is_set():
            if sock.poll(100):
                frames = sock.recv_multipart(copy=False)
                sock.send_multipart([frames[0], ack], flags=zmq.NOBLOCK)
    finally:
        sock.close(0)
        ctx.term()


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--endpoint", required=True)
    p.add_argument("--actors", type=int, default=8, help="simulated actors in this process")
    p.add_argument("--first", type=int, default=0, help="index of the first actor (seeds, names)")
    p.add_argument("--mode", choices=("credit", "flood", "raw"), default="credit")
    p.add_argument("--size", choices=tuple(SIZES), default="demo")
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--rows", type=int, default=1000, help="prompt ids known to the learner (flood)")
    p.add_argument("--prompts-per-request", type=int, default=4)
    p.add_argument("--curve-dir", default="")
    p.add_argument("--start-at", type=float, default=0.0, help="unix time to start sending")
    p.add_argument("--warmup", type=float, default=0.0)
    p.add_argument("--seconds", type=float, default=10.0, help="measured window after the warm-up")
    p.add_argument("--groups", type=int, default=0, help="stop after this many groups (instead of time)")
    p.add_argument("--stop-file", default="", help="stop once this file exists")
    p.add_argument("--ack-timeout-ms", type=int, default=60_000)
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    counts = asyncio.run(run_actors(args))
    Path(args.out).write_text(json.dumps(counts.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
