"""bench/scale_curve.py at a tiny size: the streamed IndexFlatIP file reads back in faiss with the
written vectors (and the importer copies its rows by plain reads), the corpus and queries are
deterministic, and one end-to-end run (Flat build, HNSW and IVF-PQ index stages on its chunks,
BM25, the searches) records every measurement."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from bench.scale_curve import make_corpus, make_queries, write_flat_ip
from retriever.docstore import DocStore, write_docstore
from tests.conftest import ROOT


def test_streamed_flat_file_reads_back(tmp_path):
    import faiss

    path = tmp_path / "x.faiss"
    write_flat_ip(path, 1000, 24, seed=3, chunk=300)  # several chunks, the last one short
    index = faiss.read_index(str(path))
    assert (type(index).__name__, index.ntotal, index.d, index.metric_type) == (
        "IndexFlatIP", 1000, 24, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(3)
    expect = np.concatenate([rng.standard_normal((n, 24), dtype=np.float32) for n in (300, 300, 300, 100)])
    expect /= np.linalg.norm(expect, axis=1, keepdims=True)
    np.testing.assert_array_equal(index.reconstruct_n(0, 1000), expect)


def test_corpus_and_queries_are_deterministic(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    make_corpus(a, 50, words=12, seed=1)
    make_corpus(b, 50, words=12, seed=1)
    assert a.read_bytes() == b.read_bytes()
    assert write_docstore(a, tmp_path / "docs") == 50
    first = DocStore(tmp_path / "docs").contents_range(0, 1)[0]
    title, text = first.split("\n")
    assert title.startswith('"') and len(title.strip('"').split()) == 2 and len(text.split()) == 12
    qs = make_queries(a, 50, 10, seed=1)
    assert qs == make_queries(a, 50, 10, seed=1) and len({q["row"] for q in qs}) == 10
    texts = [json.loads(line)["contents"] for line in a.read_text().splitlines()]
    assert all(q["query"] in texts[q["row"]] and len(q["query"].split()) == 4 for q in qs)


def test_tiny_run_records_every_measurement(tmp_path):
    """The orchestrator end to end at 300 passages (the encoder-alone runs and the import's
    768-d inputs are left out: they cost torch start-ups; both are covered below)."""
    cmd = [sys.executable, "bench/scale_curve.py", "--sizes", "300", "--kinds", "flat,hnsw,ivfpq,bm25,search",
           "--out", str(tmp_path), "--encode-sample", "0", "--queries", "40", "--b1", "5",
           "--ivfpq-factory", "IVF8,PQ8x8np", "--hnsw-factory", "HNSW16"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())
    by = {(r.get("step", "build"), r["kind"], r.get("param")): r for r in rows}
    flat = by["build", "flat", None]
    assert flat["index_mb"] > 0 and flat["peak_rss_mb"] >= flat["hwm_polled_mb"] - 1 > 0  # two readings of one peak, rounded apart
    assert 0 < flat["phases_s"]["encode_s"] < flat["build_s"]
    hnsw, ivfpq = by["build", "hnsw", None], by["build", "ivfpq", None]
    assert hnsw["factory"] == "HNSW16" and ivfpq["file_mb"] > 0
    assert hnsw["build_s"] == round(flat["phases_s"]["encode_s"] + hnsw["index_stage_wall_s"], 1)
    assert by["build", "bm25", None]["index_mb"] > 0
    assert by["search", "flat", None]["recall10_vs_flat"] == 1.0
    assert {("search", "hnsw", "efSearch=64"), ("search", "ivfpq", "nprobe=16"), ("search", "bm25", None)} <= set(by)
    assert 0 <= by["search", "bm25", None]["source_hit10"] <= 1
    assert "| 300 | flat | Flat |" in subprocess.run(cmd[:2] + ["--report", "--out", str(tmp_path)], cwd=ROOT,
                                                     capture_output=True, text=True, timeout=60).stdout


def test_encoder_alone_worker(tmp_path):
    from types import SimpleNamespace

    from bench.scale_curve import worker_encode

    make_corpus(tmp_path / "c.jsonl", 40, words=12, seed=2)
    out = worker_encode(SimpleNamespace(corpus=str(tmp_path / "c.jsonl"), rows=30, batch=16, threads=1))
    assert out["rows"] == 30 and out["threads"] == 1 and out["passages_per_s"] > 0 and out["baseline_rss_mb"] > 0


def test_flat_import_reads_the_file_not_the_map(tmp_path):
    """The importer copies a flat file's rows with plain reads (not through its memory map, whose
    pages would stay in the RSS): same rows as faiss reconstructs; None for a non-flat index."""
    import faiss

    from retriever.importer import copy_rows, flat_file_rows, read_index

    path = tmp_path / "x.faiss"
    write_flat_ip(path, 700, 16, seed=5, chunk=256)
    src = read_index(path)
    read = flat_file_rows(src, path)
    assert read is not None
    np.testing.assert_array_equal(read(5, 300), src.reconstruct_n(5, 295))
    shard = copy_rows(src, 100, 650, 128, read)
    np.testing.assert_array_equal(shard.reconstruct_n(0, 550), src.reconstruct_n(100, 550))
    ivf = faiss.index_factory(16, "IVF4,Flat", faiss.METRIC_INNER_PRODUCT)
    ivf.train(src.reconstruct_n(0, 700))
    assert flat_file_rows(ivf, path) is None
