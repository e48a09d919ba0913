"""Bad input at every socket of every role while legitimate traffic runs (issue #8, item 4).

    python bench/fuzz.py --messages 100000        (per socket; --no-actor leaves the actor role out)

    world (a temp folder): 60-passage corpus ─`cli.py index build`─▶ index; tiny Qwen2; QA jsonl
      ├─ `cli.py retriever`  ZeroMQ ROUTER (tcp) · HTTP /retrieve · /metrics + /health   ◀── fuzz
      ├─ `cli.py learner`    ingest ROUTER · weight-sync ROUTER · /metrics + /health     ◀── fuzz
      └─ `cli.py actor`      transformers engine; supervisor + worker /metrics + /health ◀── fuzz
                             (an actor binds no ZeroMQ socket: it only connects out)
    legit clients (threads in this process, before and during the fuzz):
      retriever  RetrieveRequest over ZeroMQ and POST /retrieve, answers equal to a baseline
      ingest     an actor: Hello, WorkRequest, TrajectoryGroup (each must be accepted), Heartbeat
      sync       a weight-sync member (zmq transport) that must load every version it is sent
      (and the real actor worker, whose groups the learner keeps training on)
    fuzzer (a child process, `--fire SPEC`), one socket after another, N messages each:
      ZeroMQ   random bytes, random multipart, mutated valid messages (bit flips, truncation,
               extra / missing frames, value garbage in array frames, header edits: wrong
               dtype / shape, huge declared sizes, wrong versions and types, bad field values),
               well-formed messages the service refuses; plus raw non-ZMTP bytes at the port
      HTTP     random bytes, malformed request lines and headers, bad methods and paths,
               mutated valid requests, bad JSON bodies, oversize / lying Content-Length, and a few
               peers that stall mid-request (the server must drop them on its timeout)
    checks: every process alive, no traceback in any log, for every socket
            scout_<role>_rejected_messages_total{socket} grew by exactly the bad messages the
            fuzzer sent there (each answered with an error), every legit request answered right.

The fuzzer sends only messages it has checked are bad (a mutation that happens to decode into an
acceptable message is discarded), so the counts must match exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import msgpack
import numpy as np
import zmq

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common import protocol as P  # noqa: E402
from common import wire as W  # noqa: E402
from common.weightsync import messages as S  # noqa: E402
from common.metrics import HTTP_TIMEOUT_S  # noqa: E402
from common.wire import ProtocolError, decode, encode  # noqa: E402
from common.transport import free_tcp_port  # noqa: E402

N_SAMPLES = 2
TOPK_CAP = 10
QUERIES = ["capital of Kalomi", "who founded Zuten", "river of Borvel", "Quidan valley", "Shomer founded by"]
SYL = ["ka", "lo", "mi", "ra", "zu", "ten", "bor", "vel", "qui", "dan", "sho", "mer", "pla", "tor", "wex"]


# =========================================================================== the world and its roles
def build_world(base: Path, actor: bool, curve_dir: str | None = None) -> dict:
    """Corpus + index (built in this process, as `cli.py index build` builds it), tiny model, QA
    file, ports and one TOML config for every role (`curve_dir`: CurveZMQ on every ZeroMQ socket,
    as tests/test_auth.py runs it)."""
    from bench.faults import build_index_here
    from demo.tinymodel import build_tiny_model

    rng = random.Random(5)
    with (base / "corpus.jsonl").open("w") as f:
        for i in range(60):
            name = "".join(rng.choice(SYL) for _ in range(3)).capitalize() + str(i)
            text = f"{name} has the capital {rng.choice(SYL)}{rng.choice(SYL)} and the river {rng.choice(SYL)}."
            f.write(json.dumps({"id": str(i), "contents": f'"{name}"\n{text}'}) + "\n")
    build_index_here(base / "corpus.jsonl", base / "index")
    model = build_tiny_model(base / "tiny", layers=2, hidden=64)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    qa = base / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": f"what is the capital of land {i} ?", "golden_answers": [f"c{i}"]})
                          + "\n" for i in range(40)))
    ports = {n: free_tcp_port() for n in ("retriever", "retriever_http", "retriever_metrics", "ingest", "sync",
                                          "store", "learner_metrics")}
    ports["actor_metrics"] = free_tcp_port(count=2)  # the supervisor's and worker 0's
    cfg = base / "fuzz.toml"
    transport = f'[transport]\ncurve_dir = "{curve_dir}"\n' if curve_dir else ""
    cfg.write_text(f"""run_dir = "{base / 'run'}"
{transport}[metrics]
retriever_port = {ports['retriever_metrics']}
learner_port = {ports['learner_metrics']}
actor_port = {ports['actor_metrics']}
[retriever]
index_dir = "{base / 'index'}"
endpoint = "tcp://127.0.0.1:{ports['retriever']}"
http_port = {ports['retriever_http']}
encoder_threads = 1
topk_cap = {TOPK_CAP}
[learner]
model = "{model}"
data = "{qa}"
ingest_endpoint = "tcp://127.0.0.1:{ports['ingest']}"
sync_endpoint = "tcp://127.0.0.1:{ports['sync']}"
store_port = {ports['store']}
n_samples = {N_SAMPLES}
groups_per_step = 2
micro_batch_tokens = 1024
max_staleness = 4
sync_every = 1
steps = 100000000
lr = 1e-5
batch_wait_s = 0.5
cpu_threads = 1
sync_timeout_s = 15
peer_timeout_s = 60
[actor]
model = "{model}"
engine = "transformers"
dtype = "float32"
learner_endpoint = "tcp://127.0.0.1:{ports['ingest']}"
retriever_endpoint = "tcp://127.0.0.1:{ports['retriever']}"
n_samples = {N_SAMPLES}
max_turns = 1
max_new_tokens = 12
max_obs_tokens = 64
max_total_tokens = 512
prompts_per_request = 1
max_groups_in_flight = 2
heartbeat_s = 1.0
""")
    return {"base": base, "cfg": cfg, "ports": ports, "vocab": vocab, "actor": actor}


class Roles:
    """The role processes, each in its own session, logs in the world folder; ended by PID."""

    def __init__(self, world: dict):
        self.world, self.procs, self.logs = world, {}, {}

    def start(self, role: str, *extra: str) -> None:
        log = self.world["base"] / f"{role}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        with open(log, "wb") as f:
            self.procs[role] = subprocess.Popen([sys.executable, "cli.py", role, "--config", str(self.world["cfg"]),
                                                 *extra], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                                start_new_session=True)
        self.logs[role] = log

    def dead(self) -> list[str]:
        return [f"{r} (exit {p.returncode})" for r, p in self.procs.items() if p.poll() is not None]

    def tracebacks(self) -> list[str]:
        return [f"{r}: {line.strip()}" for r, path in self.logs.items()
                for line in path.read_text(errors="replace").splitlines() if "Traceback" in line]

    def tail(self, n: int = 30) -> str:
        return "\n".join(f"--- {r}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-n:])
                         for r, p in self.logs.items())

    def stop(self) -> None:
        from common.procs import stop_processes

        stop_processes(list(self.procs.values()), timeout=20)


def get(url: str, timeout: float = 10) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_for(pred, timeout: float, what: str, roles: Roles) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if roles.dead():
            raise RuntimeError(f"{what}: {roles.dead()} exited\n{roles.tail()}")
        try:
            if pred():
                return
        except Exception:  # not up yet: refused, half-started, or a port not yet bound (self-connect)
            pass
        time.sleep(0.5)
    raise RuntimeError(f"timed out waiting for {what}\n{roles.tail()}")


def rejected(url: str) -> dict[str, dict[str, float]]:
    """/metrics → {socket: {reason: count}} of scout_<role>_rejected_messages_total."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[str, float]] = {}
    for fam in text_string_to_metric_families(get(url)[1].decode()):
        for s in fam.samples:
            if s.name.endswith("_rejected_messages_total"):
                out.setdefault(s.labels["socket"], {})[s.labels["reason"]] = s.value
    return out


def metric(url: str, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for fam in text_string_to_metric_families(get(url)[1].decode()) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


# =========================================================================== message generators
def _group(rng: random.Random, vocab: int, n: int = N_SAMPLES, prompt_id: int = 0, version: int = 0,
           peer: str = "", run: str = "", tokens_hi: int | None = None) -> P.TrajectoryGroup:
    lengths = np.array([rng.randint(3, 12) for _ in range(n)], dtype=np.int32)
    total = int(lengths.sum())
    mask = np.zeros(total, dtype=np.uint8)
    for end, ln in zip(np.cumsum(lengths), lengths):
        mask[end - ln // 2:end] = 1
    return P.TrajectoryGroup(
        group_id=uuid.uuid4().hex, peer_id=peer or f"fuzz-{rng.randrange(1 << 30)}", run_id=run or uuid.uuid4().hex,
        prompt_id=prompt_id, num_searches=[0] * n, retrieval_failed=[False] * n, correct=[False] * n,
        created_at=time.time(), lengths=lengths,
        tokens=np.array([rng.randrange(tokens_hi or vocab) for _ in range(total)], dtype=np.int32),
        loss_mask=mask, logprobs=np.where(mask, -0.7, 0.0).astype(np.float32),
        versions=np.where(mask, version, -1).astype(np.int32), rewards=np.array([1.0] * n, dtype=np.float32))


def valid_messages(rng: random.Random, vocab: int) -> list[W.Message]:
    """One valid instance of every message type (the seeds of mutations and of wrong-type sends)."""
    return [
        P.Hello(role="actor", peer_id="p", run_id="r", worker=1, host="h", pid=3, version=2),
        P.HelloAck(learner_run_id="l", version=1, n_samples=2, max_staleness=1, sync_endpoint="tcp://x:1"),
        P.Heartbeat(peer_id="p", run_id="r", seq=4, version=1, time=1.5),
        P.ErrorReply(code="internal", message="m", request_id="q"),
        P.WorkRequest(peer_id="p", run_id="r", max_prompts=2, version=0),
        P.WorkAssignment(prompts=[P.Prompt(prompt_id=1, question="q?", golden_answers=["a"])], version=1,
                         min_version=0, n_samples=2),
        _group(rng, vocab),
        P.GroupAck(group_id="g", accepted=True, version=1),
        P.RetrieveRequest(request_id="r1", queries=["q one", "q two"], topk=3),
        P.RetrieveReply(request_id="r1", results=[[P.Passage(id="1", title="t", text="x", score=0.5)]]),
        P.ShardHello(shard=0, pid=1, count=3, dim=4),
        P.ShardSearch(seq=1, topk=2, vectors=np.ones((2, 4), dtype=np.float32)),
        P.ShardResult(seq=1, shard=0, scores=np.ones((2, 2), dtype=np.float32), ids=np.ones((2, 2), dtype=np.int64)),
        S.SyncJoin(peer_id="p", run_id="r", version=-1, transports=["gloo", "zmq"]),
        S.SyncPlan(version=1, generation=1, transport="gloo", store_host="h", store_port=1, rank=1, world_size=2,
                   timeout_s=5.0),
        S.WeightUpdateHeader(version=1, bucket=0, num_buckets=1, dtype="float32", nbytes=8,
                             tensors=[S.TensorMeta(name="w", dtype="float32", shape=[2], offset=0)],
                             data=np.zeros(8, dtype=np.uint8)),
        S.SyncAbort(version=1, generation=1, reason="r"),
        S.SyncDone(peer_id="p", run_id="r", version=1, ok=True, seconds=0.1),
    ]


EVIL = [None, -1, -(1 << 63), (1 << 64) - 1, 1e308, float("nan"), float("-inf"), "", "x" * 70000, "\x00\udcff"[:1],
        [], {}, [1] * 5000, b"\xff\x00", True, 3.5, {"k": [None]}, [[[[[]]]]], "actor", 0]


class ZmqGen:
    """Bad messages for one ZeroMQ socket. `accept`: the types the socket serves; `refused`:
    builders of well-formed messages the service must refuse (their refusal is known)."""

    KINDS = (("random_bytes", 8), ("random_multipart", 8), ("bitflip", 16), ("truncate", 10), ("extra_frame", 6),
             ("missing_frame", 6), ("array_garbage", 8), ("header", 30), ("wrong_type", 4), ("refused", 4))

    def __init__(self, seed: int, accept: tuple, refused: list, vocab: int):
        self.rng = random.Random(seed)
        self.accept, self.refusers, self.vocab = accept, refused, vocab
        self.all = valid_messages(self.rng, vocab)
        self.own = [m for m in self.all if isinstance(m, accept)]
        self.kinds, self.weights = zip(*self.KINDS)

    def next(self) -> tuple[str, list[bytes]]:
        for _ in range(100):
            kind = self.rng.choices(self.kinds, self.weights)[0]
            frames = getattr(self, kind)()
            if frames and (kind == "refused" or self.is_bad(frames)):
                return kind, frames
        return "random_bytes", [b"\x00"]

    def is_bad(self, frames: list[bytes]) -> bool:
        try:
            decode(frames, expect=self.accept)
        except ProtocolError:
            return True
        return False  # a mutation that came out valid: not sent

    # ---- raw
    def _bytes(self, n: int) -> bytes:
        return self.rng.randbytes(n)

    def _size(self) -> int:
        r = self.rng.random()
        if r < 0.6:
            return self.rng.randint(0, 64)
        if r < 0.97:
            return self.rng.randint(65, 4096)
        if r < 0.9995:
            return self.rng.randint(4097, 1 << 16)
        return W.MAX_HEADER_BYTES + self.rng.randint(1, 1 << 16)  # over the header cap

    def random_bytes(self) -> list[bytes]:
        return [self._bytes(self._size())]

    def random_multipart(self) -> list[bytes]:
        return [self._bytes(self._size() if i == 0 else self.rng.randint(0, 256)) for i in range(self.rng.randint(2, 9))]

    # ---- mutations of valid encodings
    def _valid(self, own: bool = True) -> list[bytes]:
        return [bytes(f) for f in encode(self.rng.choice(self.own if own else self.all))]

    def bitflip(self) -> list[bytes]:
        frames = self._valid()
        i = 0 if len(frames) == 1 or self.rng.random() < 0.7 else self.rng.randrange(len(frames))
        b = bytearray(frames[i])
        for _ in range(self.rng.randint(1, 8)):
            if b:
                b[self.rng.randrange(len(b))] ^= 1 << self.rng.randrange(8)
        frames[i] = bytes(b)
        return frames

    def truncate(self) -> list[bytes]:
        frames = self._valid()
        i = self.rng.randrange(len(frames))
        frames[i] = frames[i][:self.rng.randrange(max(1, len(frames[i])))]
        return frames

    def extra_frame(self) -> list[bytes]:
        frames = self._valid()
        frames.insert(self.rng.randint(1, len(frames)), self._bytes(self.rng.randint(0, 64)))
        return frames

    def missing_frame(self) -> list[bytes]:
        frames = self._valid()
        if len(frames) == 1:
            return [b"", *frames] if self.rng.random() < 0.5 else [frames[0], frames[0]]
        del frames[self.rng.randrange(len(frames))]
        return frames

    def array_garbage(self) -> list[bytes]:
        """Right header, wrong values: an array frame refilled with random bytes (NaN logprobs,
        negative tokens, masks of 7 ...), or a group-level value made impossible."""
        frames = self._valid()
        if len(frames) == 1:
            return self.header()
        i = self.rng.randrange(1, len(frames))
        frames[i] = self._bytes(len(frames[i]))
        return frames

    def wrong_type(self) -> list[bytes]:
        """A valid message of a type this socket does not serve."""
        return self._valid(own=False)

    def refused(self) -> list[bytes]:
        return [bytes(f) for f in encode(self.rng.choice(self.refusers)(self.rng))]

    def header(self) -> list[bytes]:
        """Edit the msgpack header: versions, type, body fields, array specs, sizes."""
        frames = self._valid()
        hdr = msgpack.unpackb(frames[0], raw=False)
        edit = self.rng.choice(("p", "t", "v", "b", "b", "b", "a", "a", "keys"))
        rng = self.rng
        if edit == "p":
            hdr["p"] = rng.choice([0, 2, -1, 255, "1", None, [1]])
        elif edit == "t":
            hdr["t"] = rng.choice(["", "nope", "x" * 100000, 5, None, ["hello"], rng.choice(list(W.REGISTRY))])
        elif edit == "v":
            hdr["v"] = rng.choice([0, 2, -1, "1", None, (1 << 63) - 1, 1.5])
        elif edit == "b":
            self._edit_body(hdr)
        elif edit == "a":
            self._edit_arrays(hdr, frames)
        else:
            k = rng.choice(list(hdr))
            if rng.random() < 0.5:
                del hdr[k]
            else:
                hdr["z" * rng.randint(1, 3)] = rng.choice(EVIL)
        try:
            frames[0] = msgpack.packb(hdr, use_bin_type=True)
        except (TypeError, ValueError, OverflowError):
            return self.random_bytes()
        return frames

    def _edit_body(self, hdr: dict) -> None:
        rng, body = self.rng, hdr["b"]
        if rng.random() < 0.1 or not isinstance(body, dict) or not body:
            hdr["b"] = rng.choice([[], "x", None, 7, {"": 1}])
            return
        key = rng.choice(list(body))
        r = rng.random()
        if r < 0.15:
            del body[key]
        elif r < 0.25:
            body[rng.choice(["extra", "array_dtypes", "lengths", "x" * 300])] = rng.choice(EVIL)
        else:
            body[key] = rng.choice(EVIL)

    def _edit_arrays(self, hdr: dict, frames: list[bytes]) -> None:
        rng, specs = self.rng, hdr["a"]
        if not specs or rng.random() < 0.1:
            hdr["a"] = rng.choice([{}, "x", [["lengths", "int32", [1]]], [[1, 2, 3]], [None]])
            return
        i = rng.randrange(len(specs))
        what = rng.choice(("dtype", "shape", "shape", "huge", "name", "dup", "entry"))
        if what == "dtype":
            specs[i][1] = rng.choice(["float64", "bfloat16", "int8", "", 5, "uint8", "float16", "int64"])
        elif what == "shape":
            specs[i][2] = rng.choice([[-1], [1, 1], [], "3", [1.5], [None], [0], [3, -3], [1] * 9])
        elif what == "huge":  # declared sizes far beyond any frame: refused before any allocation
            specs[i][2] = rng.choice([[1 << 39], [(1 << 40) - 1], [1 << 20, 1 << 20], [1 << 62]])[:len(specs[i][2]) or 1]
        elif what == "name":
            specs[i][0] = rng.choice(["nope", "", 7, None, "x" * 500, "data"])
        elif what == "dup":
            specs.append(list(specs[i]))
            frames.append(frames[1 + i])
        else:
            specs[i] = rng.choice([[], ["tokens"], "tokens", ["tokens", "int32", [1], 4], None])


def refused_builders(target: str, vocab: int) -> list:
    """Well-formed messages of the socket's own types that the service refuses (by target)."""
    if target == "ingest":
        return [
            lambda r: _group(r, vocab, n=N_SAMPLES + 1),                      # wrong group size
            lambda r: _group(r, vocab, prompt_id=10 ** 6),                     # prompt not in the data
            lambda r: _group(r, vocab, prompt_id=10 ** 6, tokens_hi=vocab + 500),  # token outside vocab
            lambda r: P.Hello(role=r.choice(["learner", "retriever", "client"]), peer_id="p", run_id="r"),
        ]
    if target == "retriever":
        return [lambda r: P.RetrieveRequest(request_id="x", queries=["q"], topk=r.randint(TOPK_CAP + 1, P.MAX_TOPK))]
    return [lambda r: P.Heartbeat(peer_id="p", run_id="r", seq=1)]  # sync: only SyncJoin / SyncDone are served


TARGET_TYPES = {"retriever": (P.RetrieveRequest,), "ingest": (P.Hello, P.WorkRequest, P.TrajectoryGroup, P.Heartbeat),
                "sync": (S.SyncJoin, S.SyncDone)}


# --------------------------------------------------------------------------- HTTP
class HttpGen:
    """Bad HTTP requests (whole byte strings) for a server; `kind` is "api" (POST /retrieve) or
    "metrics" (GET /metrics, /health)."""

    def __init__(self, seed: int, kind: str, host: str):
        self.rng, self.kind, self.host = random.Random(seed), kind, host

    def _valid(self) -> bytes:
        if self.kind == "api":
            body = json.dumps({"queries": [self.rng.choice(QUERIES)], "topk": 3, "return_scores": True}).encode()
            return (f"POST /retrieve HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
        path = self.rng.choice(["/metrics", "/health"])
        return f"GET {path} HTTP/1.0\r\nHost: {self.host}\r\n\r\n".encode()

    def next(self) -> bytes:
        rng = self.rng
        kind = rng.choice(("random", "line", "method", "path", "headers", "bitflip", "truncate", "long")
                          + (("body", "body", "length") if self.kind == "api" else ()))
        if kind == "random":
            return rng.randbytes(rng.randint(1, 512)) + rng.choice([b"", b"\r\n\r\n"])
        if kind == "line":
            return rng.choice([b"GET\r\n\r\n", b"GET / HTTP/1.1 extra\r\n\r\n", b"G\x00T /metrics HTTP/1.1\r\n\r\n",
                               b"GET /metrics HTTP/9.9\r\n\r\n", b"GET /metrics HTTP/1.x\r\n\r\n",
                               b"GET /metrics HTTP/2.0\r\n\r\n", b"\xff\xfe\xfd /x HTTP/1.1\r\n\r\n",
                               b"GET /metrics HTTPS/1.1\r\n\r\n", b" \r\n\r\n"])
        if kind == "method":
            m = rng.choice(["PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "BREW", "get"] + (["POST"] if self.kind == "metrics" else ["GET"]))
            path = "/metrics" if self.kind == "metrics" else "/retrieve"
            return f"{m} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()
        if kind == "path":
            p = rng.choice(["/", "/metricsx", "/../../etc/passwd", "/%00", "/" + "a" * 5000, "/health/x", "*", "x"])
            m = "GET" if self.kind == "metrics" else "POST"
            return f"{m} {p} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()
        if kind == "headers":
            return self._bad_headers()
        if kind == "long":  # request line or headers over http.server's limits (414 / 431)
            return (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n") if rng.random() < 0.5 else \
                (b"GET /metrics HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(120)) + b"\r\n")
        if kind == "body":
            return self._api(self._bad_body())
        if kind == "length":
            return self._bad_length()
        raw = bytearray(self._valid())
        if kind == "bitflip":
            for _ in range(rng.randint(1, 6)):
                raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
            return bytes(raw)
        return bytes(raw[:rng.randint(1, len(raw) - 1)])  # truncate

    def _bad_headers(self) -> bytes:
        rng = self.rng
        line = "GET /metrics HTTP/1.1\r\n" if self.kind == "metrics" else "POST /retrieve HTTP/1.1\r\n"
        h = rng.choice(["Content-Length: -1\r\n", "Content-Length: 1e3\r\n", "Content-Length: \xb2\r\n",
                        "Transfer-Encoding: chunked\r\n", "Host\r\n", ": x\r\n", "X: " + "y" * 70000 + "\r\n",
                        "Content-Length: 5\r\nContent-Length: 7\r\n", "\x00: \x00\r\n", "Expect: 100-continue\r\n"])
        return (line + h + "Connection: close\r\n\r\n").encode("latin-1")

    def _bad_body(self) -> bytes:
        rng = self.rng
        return rng.choice([
            b"", b"{", b"[]", b"null", b'"q"', b"\xff\xfe", b'{"queries": "q"}', b'{"queries": [1, 2]}',
            b'{"queries": []}', b'{"queries": [""]}', b'{"queries": ["q"], "topk": 0}',
            b'{"queries": ["q"], "topk": -3}', b'{"queries": ["q"], "topk": 1000}', b'{"queries": ["q"], "topk": "3"}',
            b'{"queries": ["q"], "topk": true}', b'{"queries": ["q"], "topk": 2.5}', b'{"queries": [""], "extra": 1}',
            b'{"queries": ["q"], "return_scores": "yes"}', b"[" * 100000 + b"]" * 100000,
            b'{"queries": [' + b'"q",' * 5000 + b'"q"]}', json.dumps({"queries": ["x" * 5000]}).encode(),
            b'{"queries": ["q"]' + b" " * rng.randint(0, 9), rng.randbytes(rng.randint(1, 300)),
            b'{"queries": ["\\ud800"]}', b'{"queries": {"a": 1}}',
        ])

    def _api(self, body: bytes, length: str | None = None, method: str = "POST") -> bytes:
        n = str(len(body)) if length is None else length
        return (f"{method} /retrieve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {n}\r\n"
                "Connection: close\r\n\r\n").encode("latin-1") + body

    def _bad_length(self) -> bytes:
        rng, body = self.rng, b'{"queries": ["q"], "topk": 3}'
        return rng.choice([
            self._api(body, str(10 ** 12)), self._api(body, "abc"), self._api(body, "\xb2"),
            self._api(body, str(len(body) + 50)),  # lies: the body ends first (half-closed socket)
            self._api(body, "-5"), self._api(body, ""), self._api(body, "0x10"),
            b"POST /retrieve HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" + body,  # no Content-Length
        ])

    def stall(self) -> bytes:
        """The start of a request, after which the peer goes silent (the server must time out)."""
        return self.rng.choice([b"GET /met", b"GET /metrics HTTP/1.1\r\nHost: x\r\n",
                                b"POST /retrieve HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"queries\""])


STATUS = re.compile(rb"HTTP/1\.[01] (\d{3})[^\r\n]*\r\n")


def http_outcome(data: bytes) -> tuple[int, int, int]:
    """Bytes a server sent back on one connection → (rejections, answers that were fine, 5xx other
    than 501/505). Responses are walked by their Content-Length; a reply without a status line is an
    HTTP/0.9 answer (an error body counts as a rejection); no bytes at all is a refusal."""
    if not data:
        return 1, 0, 0
    bad = ok = internal = 0
    pos = 0
    while pos < len(data):
        m = STATUS.match(data, pos)
        if m is None:
            tail = data[pos:]
            if b'"error"' in tail or tail.startswith(b"not found") or pos == 0 and tail.startswith(b"<"):
                bad += 1
            else:
                ok += 1
            break
        code = int(m.group(1))
        head_end = data.find(b"\r\n\r\n", pos)
        if head_end < 0:
            head_end = len(data)
        clen = re.search(rb"(?i)\r\ncontent-length: *(\d+)", data[pos:head_end + 2])
        pos = head_end + 4 + (int(clen.group(1)) if clen else 0)
        if code < 200:
            continue
        if code >= 400:
            bad += 1
            internal += code >= 500 and code not in (501, 505)
        else:
            ok += 1
    return bad, ok, internal


# =========================================================================== firing
def fire_zmq(endpoint: str, gen: ZmqGen, n: int, window: int, drain_s: float, progress=None) -> dict:
    """n bad messages on DEALERs (a fresh one every 2000), pipelined `window` deep; every reply must
    be a refusal (ErrorReply bad_request, or GroupAck accepted=False for refused groups)."""
    ctx = zmq.Context()
    kinds: dict[str, int] = {}
    out = {"sent": 0, "refusals": 0, "other_replies": 0, "unanswered": 0, "kinds": kinds, "examples": []}
    sent = 0
    t0 = time.monotonic()
    while sent < n:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDTIMEO, 30000)
        sock.connect(endpoint)
        outstanding, batch_end = 0, min(n, sent + 2000)
        while sent < batch_end or outstanding:
            if sent < batch_end and outstanding < window:
                kind, frames = gen.next()
                sock.send_multipart(frames)
                kinds[kind] = kinds.get(kind, 0) + 1
                sent += 1
                outstanding += 1
                continue
            if not sock.poll(int(drain_s * 1000)):
                out["unanswered"] += outstanding
                break
            while sock.poll(0):
                _classify_reply(sock.recv_multipart(), out)
                outstanding -= 1
        sock.close(0)
        if progress:
            progress(sent)
    out["sent"], out["seconds"] = sent, time.monotonic() - t0
    ctx.term()
    return out


def _classify_reply(frames: list, out: dict) -> None:
    try:
        msg = decode(frames)
    except ProtocolError as e:
        msg = e
    if (isinstance(msg, P.ErrorReply) and msg.code == "bad_request") or (isinstance(msg, P.GroupAck) and not msg.accepted):
        out["refusals"] += 1
    else:
        out["other_replies"] += 1
        if len(out["examples"]) < 5:
            out["examples"].append(repr(msg)[:300])


def fire_tcp_raw(host: str, port: int, n: int, rng: random.Random) -> dict:
    """Raw bytes at a ZeroMQ TCP port, not speaking ZMTP 3 (some start like its greeting). libzmq
    drops most connections at the handshake; bytes that happen to parse as the old ZMTP 1.0
    framing, which libzmq still accepts, reach the socket as messages and are refused there."""
    closed = 0
    for _ in range(n):
        junk = rng.choice([b"", b"\xff" + b"\x00" * 8 + b"\x7f\x03\x00"]) + rng.randbytes(rng.randint(1, 2048))
        with socket.create_connection((host, port), timeout=2) as s:
            try:
                s.sendall(junk)
                while s.recv(65536):
                    pass
                closed += 1
            except TimeoutError:
                pass  # still open: libzmq is waiting for more of what it took for ZMTP 1.0 frames
            except ConnectionError:
                closed += 1
    return {"sent": n, "closed_by_server": closed}


def http_exchange(host: str, port: int, raw: bytes, half_close: bool = True, timeout: float = HTTP_TIMEOUT_S + 10
                  ) -> bytes:
    with socket.create_connection((host, port), timeout=timeout) as s:
        try:
            s.sendall(raw)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        except (ConnectionError, BrokenPipeError):
            pass  # the server answered and closed before reading everything: read what it said
        chunks = []
        try:
            while True:
                c = s.recv(65536)
                if not c:
                    break
                chunks.append(c)
        except ConnectionError:
            pass
        return b"".join(chunks)


def fire_http(host: str, port: int, gen: HttpGen, n: int, stalls: int, progress=None) -> dict:
    """n bad requests, one connection each (half-closed after sending), plus `stalls` peers that
    send part of a request and go silent (in threads, while the rest runs)."""
    out = {"sent": 0, "rejected": 0, "accidentally_valid": 0, "internal_errors": 0, "stall_closed": 0, "stall_s": []}

    def stall(raw: bytes) -> None:
        t = time.monotonic()
        data = http_exchange(host, port, raw, half_close=False)
        bad, ok, internal = http_outcome(data)
        with lock:
            out["rejected"] += bad
            out["accidentally_valid"] += ok
            out["internal_errors"] += internal
            out["stall_closed"] += 1
            out["stall_s"].append(round(time.monotonic() - t, 2))

    lock = threading.Lock()
    threads = [threading.Thread(target=stall, args=(gen.stall(),), daemon=True) for _ in range(stalls)]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    for i in range(n):
        data = http_exchange(host, port, gen.next())
        bad, ok, internal = http_outcome(data)
        with lock:
            out["rejected"] += bad
            out["accidentally_valid"] += ok
            out["internal_errors"] += internal
        if progress and (i + 1) % 2000 == 0:
            progress(i + 1)
    out["seconds"] = time.monotonic() - t0
    for t in threads:
        t.join(HTTP_TIMEOUT_S + 20)
    out["sent"] = n + stalls
    return out


def _counted(t: dict) -> dict[str, float]:
    return rejected(t["metrics"]).get(t["socket"], {})


def _delta(a: dict, b: dict) -> dict[str, int]:
    return {k: int(v - a.get(k, 0)) for k, v in b.items() if v - a.get(k, 0)}


def fire_all(spec: dict) -> dict:
    """The fuzzer process: every target of `spec` in turn; the target's rejection counter is read
    before and after each phase, so each phase's count is exact."""
    results = {}
    for t in spec["targets"]:
        name, n, seed = t["name"], t.get("messages") or spec["messages"], spec["seed"] + len(results)

        def progress(k, name=name):
            print(f"[fuzz] {name}: {k}/{n}", flush=True)

        c0 = _counted(t)
        if t["kind"] == "zmq":
            gen = ZmqGen(seed, TARGET_TYPES[t["target"]], refused_builders(t["target"], spec["vocab"]), spec["vocab"])
            results[name] = r = fire_zmq(t["endpoint"], gen, n, t.get("window", 64), t.get("drain_s", 30.0), progress)
            c1 = _counted(t)
            if t["endpoint"].startswith("tcp://"):
                host, port = t["endpoint"][6:].rsplit(":", 1)
                r["raw_tcp"] = fire_tcp_raw(host, int(port), max(5, n // 1000), random.Random(seed))
                time.sleep(1.0)  # what reached the socket is answered by now
                r["raw_tcp"]["refused_by_the_socket"] = sum(_delta(c1, _counted(t)).values())
        else:
            gen = HttpGen(seed, t["http_kind"], t["host"])
            results[name] = r = fire_http(t["host"], t["port"], gen, n, t.get("stalls", 3), progress)
            c1 = _counted(t)
        r["reasons"] = _delta(c0, c1)
        print(f"[fuzz] {name}: done {json.dumps({k: v for k, v in results[name].items() if k != 'stall_s'})}",
              flush=True)
    return results


# =========================================================================== legitimate clients
class Legit(threading.Thread):
    """A legitimate client in a loop; records (time, latency_s, ok, note) per request."""

    def __init__(self, name: str, pause_s: float):
        super().__init__(name=f"legit-{name}", daemon=True)
        self.label, self.pause_s = name, pause_s
        self.stop_evt = threading.Event()
        self.records: list[tuple[float, float, bool, str]] = []

    def run(self) -> None:
        self.setup()
        while not self.stop_evt.is_set():
            t = time.monotonic()
            try:
                ok, note = self.once()
            except Exception as e:  # a legit request that failed in any way is a failure of the run
                ok, note = False, f"{type(e).__name__}: {e}"
            self.records.append((t, time.monotonic() - t, ok, note))
            self.stop_evt.wait(self.pause_s)
        self.close()

    def setup(self) -> None:
        pass

    def close(self) -> None:
        pass


class RetrieverZmq(Legit):
    def __init__(self, endpoint: str, baseline: dict, pause_s: float):
        super().__init__("retriever-zmq", pause_s)
        self.endpoint, self.baseline = endpoint, baseline

    def setup(self) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(self.endpoint)
        self.i = 0

    def once(self) -> tuple[bool, str]:
        self.i += 1
        q = QUERIES[self.i % len(QUERIES)]
        rid = f"legit-{self.i}"
        self.sock.send_multipart(encode(P.RetrieveRequest(request_id=rid, queries=[q], topk=3)))
        if not self.sock.poll(30000):
            return False, "no reply in 30 s"
        reply = decode(self.sock.recv_multipart())
        if not isinstance(reply, P.RetrieveReply) or reply.request_id != rid:
            return False, f"unexpected reply {reply!r:.200}"
        ids = [p.id for p in reply.results[0]]
        return ids == self.baseline[q], "" if ids == self.baseline[q] else f"{q}: {ids} != {self.baseline[q]}"

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


class RetrieverHttp(Legit):
    def __init__(self, url: str, baseline: dict, pause_s: float):
        super().__init__("retriever-http", pause_s)
        self.url, self.baseline, self.i = url, baseline, 0

    def once(self) -> tuple[bool, str]:
        self.i += 1
        q = QUERIES[self.i % len(QUERIES)]
        body = json.dumps({"queries": [q], "topk": 3, "return_scores": True}).encode()
        req = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            res = json.loads(r.read())["result"][0]
        ids = [d["document"]["id"] for d in res]
        return ids == self.baseline[q], "" if ids == self.baseline[q] else f"{q}: {ids} != {self.baseline[q]}"


class IngestActor(Legit):
    """An actor without an engine: asks for prompts, answers each with a valid group of the
    current version; every group must be accepted; heartbeats echo their seq."""

    def __init__(self, endpoint: str, vocab: int, pause_s: float):
        super().__init__("ingest", pause_s)
        self.endpoint, self.vocab = endpoint, vocab
        self.rng = random.Random(1)
        self.accepted = 0
        self.sync_endpoint = ""

    def _ask(self, msg: W.Message, expect) -> W.Message:
        self.sock.send_multipart(encode(msg))
        if not self.sock.poll(30000):
            raise TimeoutError(f"no answer to {msg.TYPE} within 30 s")
        return decode(self.sock.recv_multipart(), expect=expect)

    def setup(self) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(self.endpoint)
        self.run_id = uuid.uuid4().hex
        ack = self._ask(P.Hello(role="actor", peer_id="legit-actor", run_id=self.run_id), P.HelloAck)
        self.sync_endpoint = ack.sync_endpoint
        self.seq = 0

    def once(self) -> tuple[bool, str]:
        self.seq += 1
        hb = self._ask(P.Heartbeat(peer_id="legit-actor", run_id=self.run_id, seq=self.seq), P.Heartbeat)
        if hb.seq != self.seq:
            return False, f"heartbeat seq {hb.seq} != {self.seq}"
        work = self._ask(P.WorkRequest(peer_id="legit-actor", run_id=self.run_id, max_prompts=2, version=-1),
                         P.WorkAssignment)
        for p in work.prompts:
            g = _group(self.rng, self.vocab, n=work.n_samples, prompt_id=p.prompt_id, version=work.version,
                       peer="legit-actor", run=self.run_id)
            ack = self._ask(g, P.GroupAck)
            if not ack.accepted:
                return False, f"group refused: {ack.reason}"
            self.accepted += 1
        return True, ""

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


class SyncMember(Legit):
    """A weight-sync member on the zmq transport: every version it is sent must load."""

    def __init__(self, endpoint: str):
        super().__init__("sync", 0.0)
        self.endpoint, self.versions = endpoint, []

    def setup(self) -> None:
        from common.config import TransportConfig
        from common.weightsync.client import SyncClient
        from common.weightsync.receiver import BucketReceiver

        self.client = SyncClient(self.endpoint, "legit-sync", uuid.uuid4().hex, TransportConfig(), transports=("zmq",))
        self.receiver = BucketReceiver()
        self.client.join(-1)

    def run(self) -> None:  # records only real updates, not idle polls
        from common.weightsync.client import follow_sync

        self.setup()
        while not self.stop_evt.is_set():
            t = time.monotonic()
            try:
                msg = self.client.poll(500)
                res = follow_sync(self.client, msg, self.receiver.setup, self._load)
            except Exception as e:
                self.records.append((t, time.monotonic() - t, False, f"{type(e).__name__}: {e}"))
                continue
            if res is not None:
                self.records.append((t, res["seconds"], res["ok"], res["message"]))
                if res["ok"]:
                    self.versions.append(res["version"])
        self.client.close()

    def _load(self, header: dict, data) -> None:
        for name, t in self.receiver.receive(header, data):
            if not bool(np.isfinite(t.float().numpy()).all()):
                raise ValueError(f"{name} is not finite")


# =========================================================================== the run
def _pcts(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    a = np.array(values) * 1000
    return {"n": len(values), "p50_ms": round(float(np.percentile(a, 50)), 2),
            "p99_ms": round(float(np.percentile(a, 99)), 2)}


def legit_summary(c: Legit, t0: float, t1: float) -> dict:
    recs = list(c.records)
    fails = [r[3] for r in recs if not r[2]]
    return {"requests": len(recs), "failures": len(fails), "failure_examples": fails[:3],
            "before": _pcts([r[1] for r in recs if r[0] < t0 and r[2]]),
            "during": _pcts([r[1] for r in recs if t0 <= r[0] < t1 and r[2]])}


def start_world(base: Path, actor: bool, curve_dir: str | None = None) -> tuple[dict, Roles]:
    world = build_world(base, actor, curve_dir)
    ports, roles = world["ports"], Roles(world)
    try:
        _start_roles(roles, ports, actor)
    except BaseException:
        roles.stop()
        raise
    return world, roles


def _start_roles(roles: Roles, ports: dict, actor: bool) -> None:
    roles.start("retriever")
    roles.start("learner")  # needs no retriever: both start at once
    health = f"http://127.0.0.1:{ports['retriever_metrics']}/health"
    wait_for(lambda: json.loads(get(health)[1])["status"] == "ok", 300, "retriever ready", roles)
    wait_for(lambda: get(f"http://127.0.0.1:{ports['learner_metrics']}/health")[0] == 200, 300, "learner ready", roles)
    if actor:
        roles.start("actor", "--workers", "1")
        wait_for(lambda: get(f"http://127.0.0.1:{ports['actor_metrics'] + 1}/health")[0] == 200, 300,
                 "actor worker ready", roles)


def targets_of(world: dict) -> tuple[list[dict], dict[str, tuple[str, str]]]:
    """Fuzz targets, and for each the metrics URL + socket label that must count its rejections."""
    p, h = world["ports"], "127.0.0.1"
    mets = {"retriever": f"http://{h}:{p['retriever_metrics']}/metrics",
            "learner": f"http://{h}:{p['learner_metrics']}/metrics"}
    targets = [
        {"name": "retriever zmq", "kind": "zmq", "target": "retriever", "endpoint": f"tcp://{h}:{p['retriever']}"},
        {"name": "retriever http /retrieve", "kind": "http", "http_kind": "api", "host": h, "port": p["retriever_http"]},
        {"name": "retriever metrics http", "kind": "http", "http_kind": "metrics", "host": h,
         "port": p["retriever_metrics"]},
        {"name": "learner ingest zmq", "kind": "zmq", "target": "ingest", "endpoint": f"tcp://{h}:{p['ingest']}"},
        # drained between training steps, up to 1000 messages at a time: a deep window, a long wait
        {"name": "learner weight-sync zmq", "kind": "zmq", "target": "sync", "endpoint": f"tcp://{h}:{p['sync']}",
         "window": 400, "drain_s": 60.0},
        {"name": "learner metrics http", "kind": "http", "http_kind": "metrics", "host": h,
         "port": p["learner_metrics"]},
    ]
    counted = {"retriever zmq": (mets["retriever"], "zmq"), "retriever http /retrieve": (mets["retriever"], "http"),
               "retriever metrics http": (mets["retriever"], "metrics_http"),
               "learner ingest zmq": (mets["learner"], "ingest"), "learner weight-sync zmq": (mets["learner"], "sync"),
               "learner metrics http": (mets["learner"], "metrics_http")}
    if world["actor"]:
        for name, port in (("actor supervisor metrics http", p["actor_metrics"]),
                           ("actor worker metrics http", p["actor_metrics"] + 1)):
            targets.append({"name": name, "kind": "http", "http_kind": "metrics", "host": h, "port": port})
            counted[name] = (f"http://{h}:{port}/metrics", "metrics_http")
    return targets, counted


def baseline(endpoint: str) -> dict[str, list[str]]:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    out = {}
    for i, q in enumerate(QUERIES):
        sock.send_multipart(encode(P.RetrieveRequest(request_id=f"b{i}", queries=[q], topk=3)))
        if not sock.poll(60000):
            raise RuntimeError("the retriever did not answer the baseline request")
        out[q] = [p.id for p in decode(sock.recv_multipart(), expect=P.RetrieveReply).results[0]]
    sock.close(0)
    ctx.term()
    return out


def run(base: Path, messages: int, actor: bool = True, quiet_s: float = 10.0, seed: int = 0,
        metrics_messages: int | None = None) -> dict:
    """Start the roles, run legit clients and the fuzzer, check; returns the summary (ok: bool).
    `metrics_messages`: another count for the /metrics + /health servers (one code path, four
    servers; each HTTP request is a new connection and thread, the slowest target on a busy host)."""
    world, roles = start_world(base, actor)
    try:
        return _fuzz_world(world, roles, messages, quiet_s, seed, metrics_messages)
    finally:
        roles.stop()


def _fuzz_world(world: dict, roles: Roles, messages: int, quiet_s: float, seed: int,
                metrics_messages: int | None) -> dict:
    p = world["ports"]
    targets, counted = targets_of(world)
    for t in targets:
        if t.get("http_kind") == "metrics" and metrics_messages:
            t["messages"] = metrics_messages
    base_ids = baseline(f"tcp://127.0.0.1:{p['retriever']}")
    legit = [RetrieverZmq(f"tcp://127.0.0.1:{p['retriever']}", base_ids, 0.05),
             RetrieverHttp(f"http://127.0.0.1:{p['retriever_http']}/retrieve", base_ids, 0.1),
             IngestActor(f"tcp://127.0.0.1:{p['ingest']}", world["vocab"], 0.2),
             SyncMember(f"tcp://127.0.0.1:{p['sync']}")]
    learner_health = f"http://127.0.0.1:{p['learner_metrics']}/health"
    for t in targets:
        t["metrics"], t["socket"] = counted[t["name"]]
    for c in legit:
        c.start()
    time.sleep(quiet_s)
    step0 = json.loads(get(learner_health)[1])["step"]
    actor_groups0 = _actor_groups(p) if world["actor"] else 0
    spec = {"targets": targets, "messages": messages, "seed": seed, "vocab": world["vocab"]}
    (world["base"] / "spec.json").write_text(json.dumps(spec))
    t0 = time.monotonic()
    with open(world["base"] / "fuzzer.log", "wb") as f:
        fz = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--fire", str(world["base"] / "spec.json"),
                             "--out", str(world["base"] / "fired.json")], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    t1 = time.monotonic()
    time.sleep(2.0)  # legit traffic right after the fuzz counts too
    for c in legit:
        c.stop_evt.set()
    for c in legit:
        c.join(60)
    if fz.returncode != 0:
        raise RuntimeError(f"the fuzzer failed:\n{(world['base'] / 'fuzzer.log').read_text()[-3000:]}")
    fired = json.loads((world["base"] / "fired.json").read_text())
    summary = {"messages_per_socket": messages, "fuzz_seconds": round(t1 - t0, 1), "targets": {}, "legit": {},
               "dead": roles.dead(), "tracebacks": roles.tracebacks()[:10]}
    for name in counted:
        summary["targets"][name] = _target_summary(fired[name])
    for c in legit:
        summary["legit"][c.label] = legit_summary(c, t0, t1)
    summary["learner_steps_during_fuzz"] = json.loads(get(learner_health)[1])["step"] - step0
    summary["sync_versions_loaded"] = len(legit[3].versions)
    if world["actor"]:
        summary["actor_groups_accepted_during_fuzz"] = _actor_groups(p) - actor_groups0
    summary["ok"], summary["problems"] = _verdict(summary, world["actor"])
    return summary


def _actor_groups(p: dict) -> float:
    return metric(f"http://127.0.0.1:{p['actor_metrics'] + 1}/metrics", "scout_actor_groups_total", result="accepted")


def _target_summary(f: dict) -> dict:
    delta = f["reasons"]
    counted = sum(delta.values())
    if "refusals" in f:  # ZeroMQ
        bad = f["sent"]
        answered_ok = f["refusals"] == bad and not f["other_replies"] and not f["unanswered"]
        extra = {"refusal_replies": f["refusals"], "other_replies": f["other_replies"], "unanswered": f["unanswered"],
                 "kinds": f["kinds"], "raw_tcp": f.get("raw_tcp"), "examples": f["examples"]}
    else:
        bad = f["rejected"]
        answered_ok = not f["internal_errors"]
        extra = {"accidentally_valid": f["accidentally_valid"], "internal_errors": f["internal_errors"],
                 "stalled_peers_dropped": f["stall_closed"], "stall_seconds": f["stall_s"]}
    return {"sent": f["sent"], "bad": bad, "counted": counted, "reasons": delta,
            "rate_per_s": round(f["sent"] / max(f["seconds"], 1e-9)), "answered_ok": answered_ok, **extra}


def _verdict(s: dict, actor: bool) -> tuple[bool, list[str]]:
    problems = []
    if s["dead"]:
        problems.append(f"processes exited: {s['dead']}")
    if s["tracebacks"]:
        problems.append(f"tracebacks in logs: {s['tracebacks']}")
    for name, t in s["targets"].items():
        if t["counted"] != t["bad"]:
            problems.append(f"{name}: {t['bad']} bad messages sent, {t['counted']} counted as rejected")
        if not t["answered_ok"]:
            problems.append(f"{name}: not every bad message got a refusal ({t})")
    for name, c in s["legit"].items():
        if c["failures"] or not c["during"].get("n"):
            problems.append(f"legit {name}: {c['failures']} failures {c['failure_examples']}, "
                            f"{c['during'].get('n', 0)} answered during the fuzz")
    if s["learner_steps_during_fuzz"] < 1:
        problems.append("the learner did not train during the fuzz")
    if actor and s.get("actor_groups_accepted_during_fuzz", 0) < 1:
        problems.append("the actor's groups were not accepted during the fuzz")
    return not problems, problems


def markdown(s: dict, command: str) -> str:
    lines = [f"`{command}` — {s['fuzz_seconds']} s of fuzzing; "
             f"verdict: {'PASS' if s['ok'] else 'FAIL'}", "",
             "| socket | sent | bad | counted rejected | rate (msg/s) | notes |", "| --- | ---: | ---: | ---: | ---: | --- |"]
    for name, t in s["targets"].items():
        note = ", ".join(f"{k} {v}" for k, v in sorted(t["reasons"].items()))
        if t.get("raw_tcp"):
            raw = t["raw_tcp"]
            note += (f"; raw TCP junk: {raw['sent']} connections, {raw['closed_by_server']} dropped at the handshake, "
                     f"{raw['refused_by_the_socket']} junk messages refused by the socket")
        if "accidentally_valid" in t:
            note += (f"; accidentally valid {t['accidentally_valid']}; stalled peers dropped "
                     f"{t['stalled_peers_dropped']} after {max(t['stall_seconds'] or [0]):.0f} s")
        lines.append(f"| {name} | {t['sent']} | {t['bad']} | {t['counted']} | {t['rate_per_s']} | {note} |")
    lines += ["", "| legit client | requests | failures | p50 / p99 before (ms) | p50 / p99 during (ms) |",
              "| --- | ---: | ---: | --- | --- |"]
    for name, c in s["legit"].items():
        b, d = c["before"], c["during"]
        lines.append(f"| {name} | {c['requests']} | {c['failures']} | {b.get('p50_ms')} / {b.get('p99_ms')} "
                     f"(n={b['n']}) | {d.get('p50_ms')} / {d.get('p99_ms')} (n={d['n']}) |")
    lines.append("")
    lines.append(f"Learner steps during the fuzz: {s['learner_steps_during_fuzz']}; versions loaded by the legit "
                 f"sync member: {s['sync_versions_loaded']}"
                 + (f"; real actor groups accepted during the fuzz: {s['actor_groups_accepted_during_fuzz']:.0f}"
                    if "actor_groups_accepted_during_fuzz" in s else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=100_000, help="bad messages per socket")
    ap.add_argument("--metrics-http-messages", type=int, default=None,
                    help="bad requests per /metrics server (default: --messages)")
    ap.add_argument("--no-actor", action="store_true", help="leave the actor role (transformers engine) out")
    ap.add_argument("--quiet-s", type=float, default=10.0, help="legit traffic alone before the fuzz")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the world folder (logs) after the run")
    ap.add_argument("--json", type=Path, default=None, help="also write the summary here")
    ap.add_argument("--fire", type=Path, default=None, help=argparse.SUPPRESS)  # the fuzzer child process
    ap.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.fire is not None:
        a.out.write_text(json.dumps(fire_all(json.loads(a.fire.read_text()))))
        return 0
    base = Path(tempfile.mkdtemp(prefix="scout-fuzz-"))
    try:
        s = run(base, a.messages, actor=not a.no_actor, quiet_s=a.quiet_s, seed=a.seed,
                metrics_messages=a.metrics_http_messages)
    finally:
        if not a.keep:
            import shutil

            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"world kept in {base}")
    print(json.dumps(s, indent=1))
    print(markdown(s, "python bench/fuzz.py " + " ".join(argv if argv is not None else sys.argv[1:])))
    if a.json:
        a.json.write_text(json.dumps(s, indent=1))
    return 0 if s["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
