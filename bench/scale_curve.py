"""The retriever's scale curve (issue #19, item 4): index build time and peak RSS, query QPS and
recall@10, for synthetic corpora of 100k / 300k / 1M passages, and the import of a 1M x 768 Flat
index written by plain faiss.

    python bench/scale_curve.py --sizes 100000,300000 --kinds flat,hnsw,ivfpq,bm25,search
    python bench/scale_curve.py --sizes 1000000 --kinds bm25,import
    python bench/scale_curve.py --sizes 1000000 --kinds flat,hnsw,ivfpq      # ~45 min of encoding, idle

Everything goes under --out (default /tmp/scale): <N>/corpus.jsonl, <N>/flat (the real
`cli.py index build`), <N>/hnsw.faiss, <N>/ivfpq.faiss, <N>/bm25, and results.json (rewritten
after every measurement; one JSON line per measurement is printed as well).

Passages are deterministic from --seed: a title of 2 and a text of --words whole words of the
packaged encoder's own vocabulary (so tokens ~ words), Search-R1 `{"id", "contents"}` jsonl.
Queries: --queries of them, each 4 consecutive words of a random passage's text (that passage is
the "source" whose hit rate is reported for every kind).

Every measured step runs as a subprocess: wall time, and its peak RSS from os.wait4 (the kernel's
ru_maxrss of exactly that process). Kinds:
  flat    `cli.py index build --factory Flat` (1 shard), and the encoder alone on the first
          --encode-sample passages in fresh processes just before and just after it (same thread
          count, batch size and max length as the build) -> build passages/s against encoder-alone.
  hnsw    HNSW32 (efSearch set at query time), ivfpq IVF{nlist},PQ{dim/8}x8: the index stage only
          (train + add + write, scout's `_build_shard`) on the Flat build's embedding chunks of the
          same N, which are not encoded again. Needs the Flat build of that N (this run or before).
  bm25    `cli.py index build --kind bm25` (1 shard).
  search  the 1000 queries against every index of that N: QPS at batch 1 and 64 (faiss on 1
          thread) and recall@10 against Flat's top-10, plus the source passage's hit rate.
  import  an N x 768 IndexFlatIP file (random unit vectors, written in
          chunks) + the N-line corpus + a 1-layer random 768-d BERT folder -> `cli.py index import
          --shards 4`: time and peak RSS against the largest shard.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from retriever.encoder import resolve_encoder_path  # noqa: E402

PY = sys.executable
KINDS = ("flat", "hnsw", "ivfpq", "bm25", "search", "import")
QUERY_WORDS = 4
HNSW_EF = (64, 128)
IVF_NPROBE = (16, 64)
IMPORT_DIM = 768


# --------------------------------------------------------------------------- synthetic data
def vocab_words() -> list[str]:
    """Whole lowercase words of the packaged encoder's WordPiece vocabulary (no ## pieces)."""
    path = resolve_encoder_path(None) / "vocab.txt"
    return [w for w in path.read_text().split("\n") if len(w) >= 3 and w.isascii() and w.isalpha() and w.islower()]


def make_corpus(path: Path, n: int, words: int, seed: int) -> None:
    """n passages: '"Title Words"\\n<words> words' drawn uniformly from the vocabulary."""
    vocab = np.asarray(vocab_words())
    rng = np.random.default_rng(seed)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        for a in range(0, n, 10000):
            b = min(n, a + 10000)
            draw = vocab[rng.integers(0, len(vocab), size=(b - a, words + 2))]
            lines = []
            for i, row in enumerate(draw.tolist()):
                title = f"{row[0].capitalize()} {row[1]}"
                lines.append(json.dumps({"id": str(a + i), "contents": f'"{title}"\n' + " ".join(row[2:])}))
            f.write("\n".join(lines) + "\n")
    tmp.replace(path)


def read_contents(corpus: Path, rows: set[int] | None = None, limit: int | None = None) -> dict[int, str]:
    """{row: contents} for the given rows, or for the first `limit` rows."""
    out = {}
    with corpus.open() as f:
        for i, line in enumerate(f):
            if limit is not None and i >= limit:
                break
            if rows is None or i in rows:
                out[i] = json.loads(line)["contents"]
    return out


def make_queries(corpus: Path, n: int, count: int, seed: int) -> list[dict]:
    """count queries: QUERY_WORDS consecutive words of a random passage's text, with its row."""
    rng = np.random.default_rng(seed + 1)
    rows = rng.choice(n, size=count, replace=False)
    texts = read_contents(corpus, set(rows.tolist()))
    out = []
    for r in rows.tolist():
        words = texts[r].split("\n", 1)[1].split()
        a = int(rng.integers(0, len(words) - QUERY_WORDS + 1))
        out.append({"row": r, "query": " ".join(words[a:a + QUERY_WORDS])})
    return out


# --------------------------------------------------------------------------- measuring a subprocess
def rss_mb(pid: int | str = "self", field: str = "VmRSS") -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def measured(cmd: list[str], log_path: Path) -> dict:
    """Run cmd, stamping each output line with its arrival time: wall seconds, exit code, peak RSS
    (ru_maxrss of this one child, from wait4), load averages, the stamped lines and the worker's
    RESULT line when it prints one."""
    load0, t0 = os.getloadavg(), time.perf_counter()
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[tuple[float, str]] = []

    def read() -> None:
        with log_path.open("a") as log:
            log.write(f"$ {' '.join(cmd)}\n")
            for line in p.stdout:
                lines.append((time.perf_counter() - t0, line.rstrip("\n")))
                log.write(f"{lines[-1][0]:9.2f} {line}")
                log.flush()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    hwm = 0.0
    while True:  # VmHWM polled as a cross-check of ru_maxrss (which also counts the parent at fork)
        hwm = np.nanmax([hwm, rss_mb(p.pid, "VmHWM")])
        pid, status, usage = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(0.1)
    p.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    wall = time.perf_counter() - t0
    reader.join(timeout=30)
    result = next((json.loads(s[7:]) for _, s in reversed(lines) if s.startswith("RESULT ")), None)
    if p.returncode != 0:
        tail = "\n".join(s for _, s in lines[-15:])
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {p.returncode} (log {log_path}):\n{tail}")
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "hwm_polled_mb": round(float(hwm), 1),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "load_before": [round(x, 2) for x in load0], "load_after": [round(x, 2) for x in os.getloadavg()],
            "lines": lines, "result": result}


def first_time(lines: list[tuple[float, str]], text: str, last: bool = False) -> float | None:
    hits = [t for t, s in lines if text in s]
    return (hits[-1] if last else hits[0]) if hits else None


def build_phases(lines: list[tuple[float, str]], wall: float) -> dict:
    """Seconds of each phase of `index build`, from its log lines stamped as they arrived."""
    t = {k: first_time(lines, s, last=k == "embedded") for k, s in (
        ("docstore", "writing the document store"), ("loaded", "loaded (dim"), ("embedded", "embedded "),
        ("shard", "shard 0: rows"), ("done", "index written to"))}
    return {"startup_s": t["docstore"], "docstore_and_encoder_load_s": t["loaded"] - t["docstore"],
            "encode_s": t["embedded"] - t["loaded"], "shard_add_write_sha_s": t["shard"] - t["embedded"],
            "manifest_docs_sha_s": t["done"] - t["shard"], "exit_s": wall - t["done"]}


def dir_mb(folder: Path, skip: str = "") -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not (skip and skip in p.parts)) / 2**20


# --------------------------------------------------------------------------- workers (subprocesses)
def worker_encode(a) -> dict:
    """The encoder alone, set up as `build_index` sets it up, on the first a.rows passages."""
    from common.config import RetrieverConfig
    from retriever.encoder import Encoder

    rc = RetrieverConfig()
    importlib.import_module("faiss")  # the build process holds faiss too: the same baseline

    enc = Encoder(rc.encoder, pooling=rc.pooling, normalize=rc.normalize, max_len=rc.max_passage_len,
                  threads=a.threads or rc.encoder_threads)
    baseline = rss_mb()
    texts = list(read_contents(Path(a.corpus), limit=a.rows).values())
    t0, c0 = time.perf_counter(), time.process_time()
    enc.encode(texts, prefix=rc.passage_prefix, batch_size=a.batch)
    wall = time.perf_counter() - t0
    return {"rows": len(texts), "encode_s": round(wall, 2), "passages_per_s": round(len(texts) / wall, 1),
            "cpu_s": round(time.process_time() - c0, 2), "threads": enc.torch.get_num_threads(),
            "batch": a.batch, "max_len": rc.max_passage_len, "baseline_rss_mb": round(baseline, 1)}


def worker_stage(a) -> dict:
    """The index stage of a dense build on existing embedding chunks: train + add + write."""
    import faiss

    from retriever.index import STATE, Embeddings, _build_shard, load_manifest

    flat = Path(a.flat)
    m = load_manifest(flat)
    settings = json.loads((flat / STATE).read_text())["settings"]
    emb = Embeddings(flat / "emb", m["count"], settings["chunk_rows"], m["dim"])
    missing = [c.path.name for c in emb.chunks if not emb.valid(c)]
    if missing:
        raise SystemExit(f"{flat}/emb lacks {len(missing)} embedding chunks (e.g. {missing[0]})")
    baseline = rss_mb()
    t0 = time.perf_counter()
    index = _build_shard(emb, 0, m["count"], a.factory, settings["train_sample"])
    t1 = time.perf_counter()
    tmp = Path(a.dest + ".tmp")
    faiss.write_index(index, str(tmp))
    tmp.replace(a.dest)
    t2 = time.perf_counter()
    return {"factory": a.factory, "train_add_s": round(t1 - t0, 2), "write_s": round(t2 - t1, 2),
            "index_stage_s": round(t2 - t0, 2), "baseline_rss_mb": round(baseline, 1),
            "faiss_threads": faiss.omp_get_max_threads(), "file_mb": round(Path(a.dest).stat().st_size / 2**20, 1)}


def _timed_search(search, n: int, batch: int, limit: int) -> tuple[float, float, np.ndarray]:
    """search(lo, hi) -> rows [hi-lo, 10] over the first `limit` of n queries in batches:
    (queries per wall second, per CPU second of this process, the rows)."""
    m = min(n, limit)
    search(0, min(m, batch))  # warm-up
    out, t0, c0 = [], time.perf_counter(), time.process_time()
    for lo in range(0, m, batch):
        out.append(search(lo, min(m, lo + batch)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return m / wall, m / max(1e-9, cpu), np.concatenate(out)


def _score(rows: np.ndarray, truth: np.ndarray, source: np.ndarray) -> dict:
    recall = np.mean([len(set(r.tolist()) & set(t.tolist())) / 10 for r, t in zip(rows, truth)])
    hit = np.mean([s in r for r, s in zip(rows.tolist(), source.tolist())])
    return {"recall10_vs_flat": round(float(recall), 4), "source_hit10": round(float(hit), 4)}


def _measure_kind(name: str, search, n: int, truth: np.ndarray, source: np.ndarray, b1: int) -> dict:
    qps64, cpu64, rows = _timed_search(search, n, 64, n)
    qps1, cpu1, _ = _timed_search(search, n, 1, b1)
    out = {"kind": name, "queries": n, "qps_b64": round(qps64, 1), "qps_cpu_b64": round(cpu64, 1),
           "qps_b1": round(qps1, 1), "qps_cpu_b1": round(cpu1, 1), "b1_queries": min(n, b1)}
    return out | _score(rows, truth if truth is not None else rows, source)


def worker_search(a) -> dict:
    """Encode the queries once (the Flat index's encoder), then each index's own search."""
    import faiss

    from retriever.bm25 import LocalBm25
    from retriever.index import encoder_for, load_manifest, read_shard

    faiss.omp_set_num_threads(1)
    base = Path(a.base)
    qs = json.loads((base / "queries.json").read_text())
    texts, source = [q["query"] for q in qs], np.asarray([q["row"] for q in qs])
    m = load_manifest(base / "flat")
    enc = encoder_for(m)
    t0 = time.perf_counter()
    qv = enc.encode(texts, prefix=m["encoder"]["query_prefix"], batch_size=64)
    results = [{"kind": "query_encode", "queries": len(texts), "qps_b64": round(len(texts) / (time.perf_counter() - t0), 1)}]
    flat = read_shard(base / "flat", m["shards"][0])
    n = len(texts)
    results.append(_measure_kind("flat", lambda lo, hi: flat.search(qv[lo:hi], 10)[1], n, None, source, a.b1))
    truth = flat.search(qv, 10)[1]
    results[-1] |= _score(truth, truth, source)
    for kind, key, values in (("hnsw", "efSearch", HNSW_EF), ("ivfpq", "nprobe", IVF_NPROBE)):
        path = base / f"{kind}.faiss"
        if not path.is_file():
            continue
        index = faiss.read_index(str(path))
        for v in values:
            faiss.ParameterSpace().set_index_parameters(index, f"{key}={v}")
            r = _measure_kind(kind, lambda lo, hi: index.search(qv[lo:hi], 10)[1], n, truth, source, a.b1)
            results.append(r | {"param": f"{key}={v}"})
    if (base / "bm25" / "manifest.json").is_file():
        bm = LocalBm25(base / "bm25")
        results.append(_measure_kind("bm25", lambda lo, hi: bm.search(texts[lo:hi], 10)[1], n, truth, source, a.b1))
    return {"results": results, "faiss_threads": 1}


def worker_import_data(a) -> dict:
    """The import's inputs, made here rather than in the orchestrator: a child's ru_maxrss counts
    its parent's memory at fork time, so the orchestrator never loads torch or big arrays."""
    t0 = time.perf_counter()
    if not Path(a.dest).is_file():
        write_flat_ip(Path(a.dest), a.rows, a.dim, a.seed)
    if not (Path(a.flat) / "config.json").is_file():
        make_bert(Path(a.flat), a.dim, a.seed)
    return {"setup_s": round(time.perf_counter() - t0, 1)}


WORKERS = {"_encode": worker_encode, "_stage": worker_stage, "_search": worker_search, "_import_data": worker_import_data}


def worker_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog=f"scale_curve.py {argv[0]}")
    ap.add_argument("--corpus"), ap.add_argument("--rows", type=int), ap.add_argument("--batch", type=int)
    ap.add_argument("--flat"), ap.add_argument("--factory"), ap.add_argument("--dest")
    ap.add_argument("--base"), ap.add_argument("--b1", type=int, default=200)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--dim", type=int), ap.add_argument("--seed", type=int, default=0)
    out = WORKERS[argv[0]](ap.parse_args(argv[1:]))
    print("RESULT " + json.dumps(out), flush=True)


# --------------------------------------------------------------------------- the import's inputs
def _flat_prefix(dim: int, n: int) -> bytes:
    """The bytes faiss.write_index puts before the vectors of an IndexFlatIP holding n vectors,
    derived from tiny indexes: the fields that double from 1 to 2 vectors (ntotal, code size)
    are scaled to n, and the result is checked against a real 3-vector file."""
    import faiss

    def serialized(k: int) -> bytes:
        x = np.random.default_rng(k).standard_normal((k, dim)).astype(np.float32)
        index = faiss.IndexFlatIP(dim)
        index.add(x)
        raw = faiss.serialize_index(index).tobytes()
        if not raw.endswith(x.tobytes()):
            raise RuntimeError("this faiss version writes IndexFlatIP differently: cannot stream the file")
        return raw[:-x.nbytes]

    p1, p2 = serialized(1), serialized(2)
    fields = []
    for d in (i for i in range(len(p1)) if p1[i] != p2[i]):
        if any(o <= d < o + 8 for o in fields):
            continue
        o = next(o for o in range(max(0, d - 7), d + 1)
                 if 0 < struct.unpack_from("<q", p1, o)[0] and struct.unpack_from("<q", p2, o)[0]
                 == 2 * struct.unpack_from("<q", p1, o)[0])
        fields.append(o)

    def scaled(k: int) -> bytes:
        p = bytearray(p1)
        for o in fields:
            struct.pack_into("<q", p, o, struct.unpack_from("<q", p1, o)[0] * k)
        return bytes(p)

    if scaled(3) != serialized(3):
        raise RuntimeError("could not derive the IndexFlatIP header layout of this faiss version")
    return scaled(n)


def write_flat_ip(path: Path, n: int, dim: int, seed: int, chunk: int = 65536) -> None:
    """An IndexFlatIP file of n random unit vectors, written chunk by chunk (the bench never holds
    the whole index), readable by faiss.read_index."""
    rng = np.random.default_rng(seed)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(_flat_prefix(dim, n))
        for a in range(0, n, chunk):
            x = rng.standard_normal((min(n, a + chunk) - a, dim), dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            f.write(x.tobytes())
    tmp.replace(path)


def make_bert(folder: Path, dim: int, seed: int) -> None:
    """A 1-layer BERT with random weights and the packaged MiniLM's tokenizer: only its dimension
    matters to the import (the dimension check), but the folder loads as a real encoder."""
    import torch
    from transformers import BertConfig, BertModel

    src = resolve_encoder_path(None)
    cfg = BertConfig.from_pretrained(str(src))
    cfg.update({"hidden_size": dim, "num_hidden_layers": 1, "num_attention_heads": max(1, dim // 64),
                "intermediate_size": dim})
    torch.manual_seed(seed)
    BertModel(cfg).save_pretrained(str(folder))
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).is_file():
            shutil.copy(src / name, folder / name)


# --------------------------------------------------------------------------- the steps of one size
def ivfpq_factory(n: int, dim: int) -> str:
    nlist = 2 ** int(round(np.log2(4 * np.sqrt(n))))  # ~4*sqrt(N), a power of two
    return f"IVF{nlist},PQ{max(1, dim // 8)}x8"


class Run:
    def __init__(self, a):
        self.a, self.out = a, Path(a.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = self.out / "run.log"
        path = self.out / "results.json"
        self.results = json.loads(path.read_text()) if path.is_file() else []

    def record(self, row: dict) -> None:
        row = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())} | row
        print(json.dumps(row), flush=True)
        self.results.append(row)
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=1))
        tmp.replace(self.out / "results.json")

    def data(self, n: int) -> Path:
        base = self.out / str(n)
        base.mkdir(exist_ok=True)
        corpus = base / "corpus.jsonl"
        if not corpus.is_file():
            make_corpus(corpus, n, self.a.words, self.a.seed)
        if not (base / "queries.json").is_file():
            qs = make_queries(corpus, n, min(n, self.a.queries), self.a.seed)
            (base / "queries.json").write_text(json.dumps(qs))
        return base

    def encoder_alone(self, corpus: Path) -> dict:
        r = measured([PY, __file__, "_encode", "--corpus", str(corpus), "--rows", str(self.a.encode_sample),
                      "--batch", str(self.a.batch), "--threads", str(self.a.encoder_threads)], self.log)
        return r["result"] | {"peak_rss_mb": r["peak_rss_mb"], "hwm_polled_mb": r["hwm_polled_mb"], "load_before": r["load_before"],
                              "load_after": r["load_after"]}

    def flat(self, n: int, base: Path) -> None:
        shutil.rmtree(base / "flat", ignore_errors=True)
        sample = self.a.encode_sample > 0  # 0: no encoder-alone runs (the test's tiny run)
        before = self.encoder_alone(base / "corpus.jsonl") if sample else None
        r = measured([PY, "cli.py", "index", "build", "--corpus", str(base / "corpus.jsonl"), "--out",
                      str(base / "flat"), "--factory", "Flat", "--shards", "1", "--batch-size", str(self.a.batch),
                      "--set", f"retriever.encoder_threads={self.a.encoder_threads}"],
                     self.log)
        after = self.encoder_alone(base / "corpus.jsonl") if sample else None
        phases = build_phases(r.pop("lines"), r["wall_s"])
        shard = (base / "flat" / "shard_000.faiss").stat().st_size / 2**20
        row = {"size": n, "kind": "flat", "factory": "Flat", "build_s": r["wall_s"],
               "phases_s": {k: round(v, 1) for k, v in phases.items()},
               "build_passages_per_s": round(n / r["wall_s"], 1),
               "encode_phase_passages_per_s": round(n / phases["encode_s"], 1), "build_cpu_s": r["cpu_s"],
               "peak_rss_mb": r["peak_rss_mb"], "hwm_polled_mb": r["hwm_polled_mb"], "index_mb": round(shard, 1),
               "rss_over_index": round(r["peak_rss_mb"] / shard, 2),
               "docs_mb": round(dir_mb(base / "flat" / "docs"), 1), "encoder_alone": [],
               "load_before": r["load_before"], "load_after": r["load_after"]}
        if sample:
            pair = (before, after)
            alone = sum(e["passages_per_s"] for e in pair) / 2
            base_rss = sum(e["baseline_rss_mb"] for e in pair) / 2
            row |= {"encoder_threads": before["threads"], "encoder_alone": list(pair),
                    "encoder_alone_passages_per_s": round(alone, 1),
                    "ratio_build_vs_alone": round(n / r["wall_s"] / alone, 3),
                    "ratio_encode_phase_vs_alone": round(n / phases["encode_s"] / alone, 3),
                    # per CPU second: steadier than wall time while other jobs share the cores
                    "ratio_build_vs_alone_per_cpu_s": round(n / r["cpu_s"] / (sum(e["rows"] / e["cpu_s"]
                                                                                   for e in pair) / 2), 3),
                    "baseline_rss_mb": round(base_rss, 1),
                    "rss_minus_baseline_over_index": round((r["peak_rss_mb"] - base_rss) / shard, 2)}
        self.record(row)

    def stage(self, n: int, base: Path, kind: str) -> None:
        flat = base / "flat"
        if not (flat / "manifest.json").is_file():
            raise SystemExit(f"--kinds {kind} for {n} needs the Flat build {flat} (add flat to --kinds)")
        dim = json.loads((flat / "manifest.json").read_text())["dim"]
        factory = self.a.hnsw_factory if kind == "hnsw" else (self.a.ivfpq_factory or ivfpq_factory(n, dim))
        r = measured([PY, __file__, "_stage", "--flat", str(flat), "--factory", factory,
                      "--dest", str(base / f"{kind}.faiss")], self.log)
        s = r["result"]
        encode = next((x["phases_s"]["encode_s"] for x in reversed(self.results)
                       if x.get("size") == n and x.get("kind") == "flat" and "phases_s" in x), None)
        self.record({"size": n, "kind": kind, "factory": factory, "encode_shared_s": encode,
                     "index_stage_wall_s": r["wall_s"], **s,
                     "build_s": round(encode + r["wall_s"], 1) if encode is not None else None,
                     "peak_rss_mb": r["peak_rss_mb"], "hwm_polled_mb": r["hwm_polled_mb"], "index_mb": s["file_mb"],
                     "rss_over_index": round(r["peak_rss_mb"] / s["file_mb"], 2),
                     "rss_minus_baseline_over_index": round((r["peak_rss_mb"] - s["baseline_rss_mb"]) / s["file_mb"], 2),
                     "load_before": r["load_before"], "load_after": r["load_after"]})

    def bm25(self, n: int, base: Path) -> None:
        shutil.rmtree(base / "bm25", ignore_errors=True)
        r = measured([PY, "cli.py", "index", "build", "--kind", "bm25", "--corpus", str(base / "corpus.jsonl"),
                      "--out", str(base / "bm25"), "--shards", "1"], self.log)
        size = dir_mb(base / "bm25", skip="docs")
        self.record({"size": n, "kind": "bm25", "build_s": r["wall_s"], "build_passages_per_s": round(n / r["wall_s"], 1),
                     "peak_rss_mb": r["peak_rss_mb"], "hwm_polled_mb": r["hwm_polled_mb"], "index_mb": round(size, 1),
                     "folder_mb": round(dir_mb(base / "bm25"), 1), "rss_over_index": round(r["peak_rss_mb"] / size, 2),
                     "load_before": r["load_before"], "load_after": r["load_after"]})

    def search(self, n: int, base: Path) -> None:
        r = measured([PY, __file__, "_search", "--base", str(base), "--b1", str(self.a.b1)], self.log)
        for row in r["result"]["results"]:
            self.record({"size": n, "step": "search", "faiss_threads": 1, **row,
                         "load_before": r["load_before"], "load_after": r["load_after"]})

    def import_(self, n: int, base: Path) -> None:
        faiss_file, bert, dest = base / f"flat{self.a.import_dim}.faiss", base / "bert768", base / "imported"
        setup = measured([PY, __file__, "_import_data", "--dest", str(faiss_file), "--flat", str(bert), "--rows", str(n),
                          "--dim", str(self.a.import_dim), "--seed", str(self.a.seed)], self.log)["wall_s"]
        shutil.rmtree(dest, ignore_errors=True)
        r = measured([PY, "cli.py", "index", "import", "--faiss", str(faiss_file), "--corpus",
                      str(base / "corpus.jsonl"), "--out", str(dest), "--shards", "4", "--encoder", str(bert)], self.log)
        shards = [p.stat().st_size / 2**20 for p in dest.glob("shard_*.faiss")]
        self.record({"size": n, "kind": "import", "dim": self.a.import_dim, "shards": len(shards),
                     "source_mb": round(faiss_file.stat().st_size / 2**20, 1), "setup_s": round(setup, 1),
                     "import_s": r["wall_s"], "peak_rss_mb": r["peak_rss_mb"], "hwm_polled_mb": r["hwm_polled_mb"], "largest_shard_mb": round(max(shards), 1),
                     "rss_over_largest_shard": round(r["peak_rss_mb"] / max(shards), 2),
                     "docs_mb": round(dir_mb(dest / "docs"), 1),
                     "load_before": r["load_before"], "load_after": r["load_after"]})
        if not self.a.keep:
            faiss_file.unlink()
            shutil.rmtree(dest)


# --------------------------------------------------------------------------- markdown tables
def _table(head: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(head) - 1)) + " |"]
    return "\n".join(lines + ["| " + " | ".join("" if v is None else str(v) for v in r) + " |" for r in rows])


def _load(r: dict) -> str:
    return f"{r['load_before'][0]:.1f} / {r['load_after'][0]:.1f}"


def _encoder_peak(r: dict) -> list:
    """A Flat build's peak RSS less the encoder-alone runs' peak (the encoding's working set,
    which does not grow with N), over the index size."""
    if r["kind"] != "flat" or not r["encoder_alone"]:
        return ["", ""]
    peak = sum(e["peak_rss_mb"] for e in r["encoder_alone"]) / len(r["encoder_alone"])
    return [round(peak, 1), round((r["peak_rss_mb"] - peak) / r["index_mb"], 2)]


def report(results: list[dict]) -> str:
    """The latest measurement of each (size, kind, step, param) as markdown tables."""
    last = {(r["size"], r.get("step", "build"), r["kind"], r.get("param")): r for r in results}
    get = sorted(last.items(), key=lambda kv: (kv[0][0], str(kv[0][1:])))
    flat = [r for (n, st, k, _), r in get if (st, k) == ("build", "flat") and r["encoder_alone"]]
    dense = [r for (n, st, k, _), r in get if st == "build" and k in ("flat", "hnsw", "ivfpq")]
    out = [_table(["N", "threads", "encoder alone before / after (p/s)", "build p/s (whole)", "encode phase p/s",
                   "whole / alone", "encode / alone", "whole / alone per CPU s", "startup + docstore + model load s",
                   "encode s",
                   "shard add+write+sha s", "manifest s", "load 1-min before / after"],
                  [[r["size"], r["encoder_alone"][0]["threads"], " / ".join(str(e["passages_per_s"]) for e in r["encoder_alone"]),
                    r["build_passages_per_s"], r["encode_phase_passages_per_s"], r["ratio_build_vs_alone"],
                    r["ratio_encode_phase_vs_alone"], r.get("ratio_build_vs_alone_per_cpu_s"),
                    round(r["phases_s"]["startup_s"] + r["phases_s"]["docstore_and_encoder_load_s"], 1),
                    r["phases_s"]["encode_s"], r["phases_s"]["shard_add_write_sha_s"],
                    r["phases_s"]["manifest_docs_sha_s"], _load(r)] for r in flat])]
    out.append(_table(["N", "kind", "factory", "build s (encode + index stage)", "peak RSS MB", "index MB",
                       "baseline MB", "RSS / index", "(RSS - baseline) / index", "encoder-alone peak MB",
                       "(RSS - encoder-alone peak) / index", "load 1-min before / after"],
                      [[r["size"], r["kind"], r["factory"],
                        r["build_s"] if r["kind"] == "flat" else f"{r['encode_shared_s']} + {r['index_stage_wall_s']}",
                        r["peak_rss_mb"], r["index_mb"], r.get("baseline_rss_mb"), r["rss_over_index"],
                        r.get("rss_minus_baseline_over_index"), *_encoder_peak(r), _load(r)] for r in dense]))
    out.append(_table(["N", "BM25 build s", "passages/s", "peak RSS MB", "index MB (without docs)", "folder MB",
                       "RSS / index", "load 1-min before / after"],
                      [[r["size"], r["build_s"], r["build_passages_per_s"], r["peak_rss_mb"], r["index_mb"],
                        r["folder_mb"], r["rss_over_index"], _load(r)]
                       for (n, st, k, _), r in get if (st, k) == ("build", "bm25")]))
    out.append(_table(["N", "kind", "setting", "recall@10 vs Flat", "source hit@10", "QPS b64 (per CPU s)",
                       "QPS b1 (per CPU s)", "load 1-min before / after"],
                      [[r["size"], r["kind"], r.get("param", ""), r.get("recall10_vs_flat"), r.get("source_hit10"),
                        f"{r['qps_b64']} ({r.get('qps_cpu_b64', '')})",
                        f"{r['qps_b1']} ({r['qps_cpu_b1']})" if "qps_b1" in r else "", _load(r)]
                       for (n, st, k, _), r in get if st == "search"]))
    out.append(_table(["N x dim", "source MB", "shards", "import s", "peak RSS MB", "largest shard MB",
                       "RSS / largest shard", "load 1-min before / after"],
                      [[f"{r['size']} x {r['dim']}", r["source_mb"], r["shards"], r["import_s"], r["peak_rss_mb"],
                        r["largest_shard_mb"], r["rss_over_largest_shard"], _load(r)]
                       for (n, st, k, _), r in get if (st, k) == ("build", "import")]))
    return "\n\n".join(out) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in WORKERS:
        return worker_main(sys.argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,300000", help="comma-separated passage counts")
    ap.add_argument("--kinds", default="flat,hnsw,ivfpq,bm25,search", help=f"comma-separated: {','.join(KINDS)}")
    ap.add_argument("--out", default="/tmp/scale")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--words", type=int, default=12, help="words per passage text (the title adds 2)")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--encode-sample", type=int, default=10000, help="passages for each encoder-alone run")
    ap.add_argument("--batch", type=int, default=256, help="the build's --batch-size (its default)")
    ap.add_argument("--encoder-threads", type=int, default=0,
                    help="torch threads of the build's encoder (retriever.encoder_threads; 0 = its default, half the cores)")
    ap.add_argument("--b1", type=int, default=200, help="queries searched one at a time (batch 1)")
    ap.add_argument("--import-dim", type=int, default=IMPORT_DIM)
    ap.add_argument("--hnsw-factory", default="HNSW32")
    ap.add_argument("--ivfpq-factory", default=None, help="default IVF{~4*sqrt(N), a power of 2},PQ{dim/8}x8")
    ap.add_argument("--keep", action="store_true", help="keep the import's faiss file and output")
    ap.add_argument("--report", action="store_true", help="print --out's results.json as markdown tables and exit")
    a = ap.parse_args()
    if a.report:
        return print(report(json.loads((Path(a.out) / "results.json").read_text())))
    try:
        sizes = [int(s) for s in a.sizes.split(",") if s]
    except ValueError:
        ap.error(f"--sizes must be comma-separated integers, got {a.sizes!r}")
    kinds = [k for k in a.kinds.split(",") if k]
    if not sizes or min(sizes) < 300 or not kinds or set(kinds) - set(KINDS):
        ap.error(f"--sizes needs integers >= 300 and --kinds a subset of {','.join(KINDS)}")
    run = Run(a)
    steps = {"flat": run.flat, "hnsw": lambda n, b: run.stage(n, b, "hnsw"),
             "ivfpq": lambda n, b: run.stage(n, b, "ivfpq"), "bm25": run.bm25, "search": run.search,
             "import": run.import_}
    for n in sizes:
        base = run.data(n)
        for kind in KINDS:  # in this order: hnsw/ivfpq need flat, search needs them all
            if kind in kinds:
                steps[kind](n, base)


if __name__ == "__main__":
    main()
