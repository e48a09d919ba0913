"""BM25 index benchmark: build time and index size, in-process query QPS with 1 and 2 shards.

    python bench/bm25_bench.py [--passages 100000] [--demo] [--seconds 10]

For the synthetic corpus of bench/retriever_bench.py (`--passages N`) and the demo world's
corpus (`--demo`): `build_bm25` wall time, the index folder's size (and without the document
store, which a dense index has too), then LocalBm25 searches (tokenize, every shard, merge) at
batch 1 and 64, top-3, for `--seconds` each: queries per wall second and per CPU second of
the process (steadier on a shared machine). Prints one JSON line per corpus.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.retriever_bench import make_corpus, queries_for  # noqa: E402
from common.config import RetrieverConfig  # noqa: E402
from retriever.bm25 import LocalBm25, build_bm25  # noqa: E402


def size_mb(folder: Path, skip: str = "") -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not (skip and skip in p.parts)) / 1e6


def qps(ix: LocalBm25, qs: list[str], batch: int, seconds: float) -> tuple[float, float]:
    """-> queries per wall second, and per CPU second of this process (the 2 cores are shared:
    the second is the steadier figure)."""
    ix.search(qs[:batch], 3)  # warm-up
    n, i, t0, c0 = 0, 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        ix.search([qs[(i + j) % len(qs)] for j in range(batch)], 3)
        i += batch
        n += batch
    return n / (time.perf_counter() - t0), n / max(1e-9, time.process_time() - c0)


def run(corpus: Path, qs: list[str], base: Path, seconds: float) -> dict:
    import bm25s.tokenization

    assert bm25s.tokenization.Tokenizer  # imported before the clock starts (~1 s): not build time

    out: dict = {"corpus": corpus.name}
    for shards in (1, 2):
        d = base / f"bm25-{shards}"
        t0, c0 = time.perf_counter(), time.process_time()
        m = build_bm25(RetrieverConfig(), corpus, d, shards=shards)
        out[f"build_s_{shards}sh"] = round(time.perf_counter() - t0, 2)
        out[f"build_cpu_s_{shards}sh"] = round(time.process_time() - c0, 2)
        out.update(passages=m["count"], vocab=m["dim"], avgdl=round(m["bm25"]["avgdl"], 1))
        out[f"size_mb_{shards}sh"] = round(size_mb(d), 2)
        out[f"size_mb_no_docs_{shards}sh"] = round(size_mb(d, skip="docs"), 2)
        ix = LocalBm25(d)
        for batch in (1, 64):
            wall, cpu = qps(ix, qs, batch, seconds)
            out[f"qps_b{batch}_{shards}sh"], out[f"qps_cpu_b{batch}_{shards}sh"] = round(wall, 1), round(cpu, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--passages", type=int, default=100_000)
    ap.add_argument("--demo", action="store_true", help="the demo world's corpus instead")
    ap.add_argument("--seconds", type=float, default=10.0)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="scout-bm25-bench-") as tmp:
        base = Path(tmp)
        if a.demo:
            from demo.toyworld import build_world

            world = build_world(base / "world", seed=0)
            corpus = world.corpus
            qs = [json.loads(line)["question"] for line in world.train.read_text().splitlines()]
        else:
            corpus = base / "corpus.jsonl"
            qs = queries_for(make_corpus(corpus, a.passages), 2000)
        print(json.dumps(run(corpus, qs, base, a.seconds)), flush=True)


if __name__ == "__main__":
    main()
