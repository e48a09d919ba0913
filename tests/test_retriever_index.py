"""Retriever index: corpus reading, document store, the real packaged encoder, sharded FAISS
builds (sharded == single for Flat), other factories, manifest checksums, resumable builds."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from common.config import RetrieverConfig
from retriever.docstore import CorpusError, DocStore, read_corpus, split_title, write_docstore
from retriever.encoder import Encoder
from retriever.index import (Embeddings, IndexFolderError, LocalIndex, build_index, encoder_for, load_manifest,
                             merge_topk, verify_checksums)

SYL = ["ka", "lo", "mi", "ra", "zu", "ten", "bor", "vel", "qui", "dan", "sho", "mer", "pla", "tor", "wex", "fin",
       "gal", "hum", "jor", "nix"]


# --------------------------------------------------------------------------- shared helpers
def make_corpus(n: int, seed: int = 0) -> list[dict]:
    """n passages about distinct invented lands: Search-R1 format, title on the first line."""
    rng = random.Random(seed)

    def word(k: int) -> str:
        return "".join(rng.choice(SYL) for _ in range(k)).capitalize()

    rows, seen = [], set()
    while len(rows) < n:
        name = word(3)
        if name in seen:
            continue
        seen.add(name)
        text = (f"{name} is a land whose capital is {word(2)}; it was founded by {word(2)} {word(2)} and the "
                f"{word(2)} river flows through it.")
        rows.append({"id": str(len(rows)), "contents": f'"{name}"\n{text}'})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def rcfg(**kw) -> RetrieverConfig:
    return RetrieverConfig(**{"build_chunk_rows": 64, **kw})


@pytest.fixture(scope="module")
def encoder():
    return Encoder(None, threads=1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rows = make_corpus(300)
    return rows, write_jsonl(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", rows)


@pytest.fixture(scope="module")
def flat_indexes(tmp_path_factory, corpus, encoder):
    _, path = corpus
    base = tmp_path_factory.mktemp("flat")
    one = build_index(rcfg(), path, base / "one", shards=1, factory="Flat", batch_size=32, encoder=encoder)
    three = build_index(rcfg(), path, base / "three", shards=3, factory="Flat", batch_size=32, encoder=encoder)
    return base / "one", base / "three", one, three


# --------------------------------------------------------------------------- corpus + docstore
def test_split_title():
    assert split_title('"Zorland"\nThe capital is Mirabel.\nMore.') == ("Zorland", "The capital is Mirabel.\nMore.")
    assert split_title("Plain title\ntext") == ("Plain title", "text")
    assert split_title('"Only a title"') == ("Only a title", "")
    assert split_title('"Quoted "inner" words"\nt') == ('Quoted "inner" words', "t")


def test_corpus_formats_and_errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": 7, "contents": '"Été"\nUnicode ✓ text'}, {"id": "x", "title": "T", "text": "body"}]
    jl = write_jsonl(tmp_path / "c.jsonl", rows)
    ids, contents = next(iter(read_corpus(jl)))
    assert ids == ["7", "x"] and contents == ['"Été"\nUnicode ✓ text', '"T"\nbody']
    pq.write_table(pa.table({"id": [1, 2], "contents": ['"A"\na', '"B"\nb']}), tmp_path / "c.parquet")
    assert next(iter(read_corpus(tmp_path / "c.parquet"))) == (["1", "2"], ['"A"\na', '"B"\nb'])

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "1", "contents": "ok"}\n{"id": "2", "contents": \n')
    with pytest.raises(CorpusError, match=r"bad.jsonl:2: not valid JSON"):
        list(read_corpus(bad))
    bad.write_text('{"id": "1", "text_only": "x"}\n')
    with pytest.raises(CorpusError, match=r":1: missing field 'contents'"):
        list(read_corpus(bad))
    (tmp_path / "c.csv").write_text("id,contents\n")
    with pytest.raises(CorpusError, match="expected a .jsonl or .parquet"):
        read_corpus(tmp_path / "c.csv")
    bad.write_text("")
    with pytest.raises(CorpusError, match="no passages"):
        write_docstore(bad, tmp_path / "docs-empty")


def test_docstore_lookup(tmp_path):
    rows = make_corpus(50) + [{"id": "u", "contents": '"Ünïcødé"\n日本語 ✓'}]
    n = write_docstore(write_jsonl(tmp_path / "c.jsonl", rows), tmp_path / "docs")
    store = DocStore(tmp_path / "docs")
    assert n == len(store) == 51
    assert isinstance(store.con_blob, np.memmap) and store.con_off.dtype == np.int64
    pick = np.array([50, 0, 17, 17])
    assert store.ids(pick) == [rows[i]["id"] for i in pick]
    assert store.contents(pick) == [rows[i]["contents"] for i in pick]
    assert store.contents_range(10, 20) == [r["contents"] for r in rows[10:20]]
    doc = store.get([50])[0]
    assert (doc.id, doc.title, doc.text) == ("u", "Ünïcødé", "日本語 ✓")
    with pytest.raises(IndexError):
        store.ids(np.array([51]))
    assert not list((tmp_path / "docs").glob("*.tmp*"))


# --------------------------------------------------------------------------- encoder
def test_encoder_normalised_pooling_prefix(encoder):
    texts = ["the capital of zorland is mirabel", "a river flows through the valley", "x"]
    v = encoder.encode(texts)
    assert v.shape == (3, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    # one at a time gives the same vectors as one batch (masked padding does not leak)
    single = np.concatenate([encoder.encode([t]) for t in texts])
    np.testing.assert_allclose(single, v, atol=1e-5)
    assert not np.allclose(encoder.encode(texts[:1], prefix="query: "), v[:1], atol=1e-3)
    cls = Encoder(None, pooling="cls", normalize=False, threads=1)
    c = cls.encode(texts[:1])
    assert not np.isclose(np.linalg.norm(c), 1.0, atol=1e-3)
    assert not np.allclose(c / np.linalg.norm(c), v[:1], atol=1e-3)


# --------------------------------------------------------------------------- build + search
def test_sharded_equals_single_flat(flat_indexes, corpus, encoder):
    one_dir, three_dir, one, three = flat_indexes
    rows, _ = corpus
    assert [s["count"] for s in three["shards"]] == [100, 100, 100]
    assert [(s["start"], s["end"]) for s in three["shards"]] == [(0, 100), (100, 200), (200, 300)]
    a, b = LocalIndex(one_dir, encoder), LocalIndex(three_dir, encoder)
    names = [r["contents"].split("\n")[0].strip('"') for r in rows]
    queries = [f"what is the capital of {n}?" for n in names[::7]] + ["river", "founded by someone"]
    q = a.encode_queries(queries)
    for k in (1, 5, 20):
        sa, ia = a.search_vectors(q, k)
        sb, ib = b.search_vectors(q, k)
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_allclose(sa, sb, rtol=0, atol=1e-6)
    # and both equal brute force over the stored embeddings
    emb = np.concatenate(list(Embeddings(three_dir / "emb", 300, 64, 384).rows(0, 300)))
    brute = q @ emb.T
    top = np.argsort(-brute, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(b.search_vectors(q, 5)[1], top)
    # the encoder is meaningful: "capital of X" finds X's passage first for most X
    hits = (b.search_vectors(q[:-2], 1)[1][:, 0] == np.arange(0, 300, 7)).mean()
    assert hits >= 0.8, hits


def test_merge_topk_ties_and_missing():
    s, i = merge_topk([np.array([[0.5, 0.1]], np.float32), np.array([[0.5, -3e38]], np.float32)],
                      [np.array([[9, 2]]), np.array([[4, -1]])], 3)
    assert i.tolist() == [[4, 9, 2]] and s[0, :2].tolist() == [0.5, 0.5]
    s, i = merge_topk([np.array([[0.2, 0.0]], np.float32)], [np.array([[1, -1]])], 2)
    assert i.tolist() == [[1, -1]] and s[0, 1] == -np.inf


def test_manifest_and_checksums(flat_indexes, tmp_path):
    _, three_dir, _, three = flat_indexes
    m = load_manifest(three_dir)
    assert m == three
    assert m["dim"] == 384 and m["factory"] == "Flat" and m["count"] == 300 and m["metric"] == "inner_product"
    e = m["encoder"]
    assert (e["pooling"], e["normalize"], e["query_prefix"], e["passage_prefix"]) == ("mean", True, "", "")
    assert all(len(s["sha256"]) == 64 for s in m["shards"]) and len(m["files"]) == 4
    verify_checksums(three_dir, m)
    copy = tmp_path / "copy"
    shutil.copytree(three_dir, copy)
    with (copy / "docs" / "contents.bin").open("r+b") as f:
        f.seek(5)
        f.write(b"#")
    with pytest.raises(IndexFolderError, match="contents.bin does not match its sha256"):
        verify_checksums(copy, m)
    (copy / "manifest.json").unlink()
    with pytest.raises(IndexFolderError, match="unfinished build"):
        load_manifest(copy)


def test_other_factories_and_bad_factory(tmp_path, encoder):
    rows = make_corpus(80, seed=3)
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(ValueError, match="index_factory string 'Bogus12'"):
        build_index(rcfg(), path, tmp_path / "bogus", factory="Bogus12", encoder=encoder)
    flat = build_index(rcfg(), path, tmp_path / "flat", shards=1, factory="Flat", encoder=encoder)
    assert flat["count"] == 80
    exact = LocalIndex(tmp_path / "flat", encoder)
    q = exact.encode_queries([r["contents"] for r in rows[:20]])  # a passage finds itself
    for factory, params in (("HNSW32", "efSearch=64"), ("IVF2,Flat", "nprobe=2")):
        out = tmp_path / factory.replace(",", "_")
        m = build_index(rcfg(), path, out, shards=2, factory=factory, encoder=encoder)
        assert m["factory"] == factory and [s["count"] for s in m["shards"]] == [40, 40]
        approx = LocalIndex(out, encoder, params=params)
        np.testing.assert_array_equal(approx.search_vectors(q, 1)[1][:, 0], np.arange(20))
    with pytest.raises(IndexFolderError, match="training 'IVF64,Flat' on 40 vectors failed"):
        build_index(rcfg(), path, tmp_path / "ivf64", shards=2, factory="IVF64,Flat", encoder=encoder)


def test_hnsw_storage_and_graph_are_sized_before_the_first_add():
    """reserve_hnsw: adding block by block then never moves the vector storage or the neighbour
    table (each move holds the old and the doubled buffer: peak RSS 1.70x the index at 300k
    before, 1.07x after). Without it both move; the built index answers the same."""
    import faiss

    from retriever.index import fill_index, make_faiss_index, reserve_hnsw

    x = np.random.default_rng(0).standard_normal((6000, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # inner product: each row finds itself

    def build(reserve: bool):
        index = make_faiss_index(16, "HNSW8")
        assert reserve_hnsw(index, len(x)) if reserve else True
        storage = faiss.downcast_index(index.storage)
        index.add(x[:1000])
        first = (int(storage.codes.data()), int(index.hnsw.neighbors.data()))
        for at in range(1000, len(x), 1000):
            index.add(x[at:at + 1000])
        return index, first == (int(storage.codes.data()), int(index.hnsw.neighbors.data()))

    (reserved, kept), (plain, moved) = build(True), build(False)
    assert kept and not moved
    assert reserved.hnsw.neighbors.size() == plain.hnsw.neighbors.size() > 0
    np.testing.assert_array_equal(reserved.search(x[:50], 1)[1][:, 0], np.arange(50))
    assert not reserve_hnsw(reserved, 10) and not reserve_hnsw(make_faiss_index(16, "Flat"), 10)
    filled = make_faiss_index(16, "HNSW8")  # fill_index reserves, then adds
    fill_index(filled, (x[a:a + 1000] for a in range(0, len(x), 1000)), len(x))
    assert filled.ntotal == len(x)


class _Flaky:
    """Wraps the real encoder; raises KeyboardInterrupt at the N-th call (a killed build)."""

    def __init__(self, enc: Encoder, fail_at: int | None):
        self.enc, self.fail_at, self.calls, self.texts = enc, fail_at, 0, 0
        self.path, self.dim = enc.path, enc.dim

    def encode(self, texts, **kw):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise KeyboardInterrupt
        self.texts += len(texts)
        return self.enc.encode(texts, **kw)


def test_build_resumes_after_interruption(tmp_path, encoder):
    path = write_jsonl(tmp_path / "c.jsonl", make_corpus(100, seed=5))
    cfg = rcfg(build_chunk_rows=16)  # 7 chunks: 6 x 16 + 4
    out = tmp_path / "idx"
    with pytest.raises(KeyboardInterrupt):
        build_index(cfg, path, out, shards=2, encoder=_Flaky(encoder, fail_at=4))
    done = sorted(p.name for p in (out / "emb").glob("*.npy"))
    assert done == ["000000000000-000000000016.npy", "000000000016-000000000032.npy", "000000000032-000000000048.npy"]
    assert not (out / "manifest.json").exists()
    with pytest.raises(IndexFolderError, match="different settings"):
        build_index(cfg, path, out, shards=3, encoder=encoder)
    resumed = _Flaky(encoder, fail_at=None)
    m = build_index(cfg, path, out, shards=2, encoder=resumed)
    assert resumed.texts == 100 - 48  # only the missing chunks were embedded
    again = _Flaky(encoder, fail_at=None)
    assert build_index(cfg, path, out, shards=2, encoder=again) == m and again.calls == 0
    clean = build_index(cfg, path, tmp_path / "clean", shards=2, encoder=encoder)
    assert [s["sha256"] for s in clean["shards"]] == [s["sha256"] for s in m["shards"]]
    assert clean["files"] == m["files"]
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("not an index")
    with pytest.raises(IndexFolderError, match="not empty"):
        build_index(cfg, path, occupied, encoder=encoder)


def test_prefixes_cls_pooling_and_a_copied_encoder(tmp_path, encoder):
    """An e5-style build: query/passage prefixes and CLS pooling with an encoder folder that is not
    the packaged path. The manifest records them, passages are stored prefixed, and queries through
    the built index are encoded with the query prefix and the same pooling."""
    enc_dir = tmp_path / "my-encoder"
    shutil.copytree(encoder.path, enc_dir)
    rows = make_corpus(40, seed=8)
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    cfg = rcfg(encoder=str(enc_dir), query_prefix="query: ", passage_prefix="passage: ", pooling="cls")
    m = build_index(cfg, path, tmp_path / "e5", shards=2, factory="Flat", batch_size=16)
    e = m["encoder"]
    assert (e["path"], e["resolved"]) == (str(enc_dir), str(enc_dir))
    assert (e["query_prefix"], e["passage_prefix"]) == ("query: ", "passage: ")
    assert (e["pooling"], e["normalize"]) == ("cls", True)
    assert load_manifest(tmp_path / "e5") == m

    cls = Encoder(enc_dir, pooling="cls", threads=1)
    texts = [r["contents"] for r in rows]
    stored = np.concatenate(list(Embeddings(tmp_path / "e5" / "emb", 40, 64, 384).rows(0, 40)))
    np.testing.assert_allclose(stored, cls.encode(texts, prefix="passage: "), atol=1e-5)
    assert not np.allclose(stored, cls.encode(texts), atol=1e-3)

    local = LocalIndex(tmp_path / "e5", encoder_for(m, threads=1))
    assert local.encoder.path == enc_dir and local.encoder.pooling == "cls"
    queries = [f"what is the capital of {r['contents'].split(chr(10))[0].strip(chr(34))}?" for r in rows[:8]]
    q = local.encode_queries(queries)
    np.testing.assert_allclose(q, cls.encode(queries, prefix="query: "), atol=1e-5)
    assert not np.allclose(q, cls.encode(queries), atol=1e-3)
    assert not np.allclose(q, encoder.encode(queries, prefix="query: "), atol=1e-3)  # mean pooling differs
    scores, ids = local.search_vectors(q, 3)
    brute = q @ stored.T
    np.testing.assert_array_equal(ids, np.argsort(-brute, axis=1, kind="stable")[:, :3])
    np.testing.assert_allclose(scores, np.take_along_axis(brute, ids, axis=1), atol=1e-5)


class _NoGpuClone:
    """Stands in for faiss-gpu where cloning this factory to a GPU is not implemented."""

    def __init__(self):
        self.asked = []

    def GpuClonerOptions(self):  # noqa: N802 (the faiss name)
        return type("Opts", (), {})()

    def StandardGpuResources(self):  # noqa: N802
        return object()

    def index_cpu_to_gpu(self, res, gpu, index, opts):
        self.asked.append(gpu)
        raise RuntimeError("Error in virtual faiss::Index* faiss::gpu::ToGpuCloner::clone_Index(...)\n"
                           "This index type is not implemented on GPU.")


def test_a_factory_faiss_cannot_put_on_a_gpu_stays_on_the_cpu(tmp_path, encoder, caplog):
    """HNSW has no GPU version: with --gpus the shard keeps it on the CPU with a warning instead of
    exiting (and being restarted, and exiting again)."""
    from retriever import index as index_mod

    m = build_index(rcfg(), write_jsonl(tmp_path / "c.jsonl", make_corpus(30, seed=4)), tmp_path / "hnsw",
                    factory="HNSW16", encoder=encoder)
    cpu = index_mod.read_shard(tmp_path / "hnsw", m["shards"][0])
    fake = _NoGpuClone()
    with caplog.at_level("WARNING", logger="scout.retriever.index"):
        kept = index_mod._to_gpu(fake, cpu, 0, "shard_000.faiss")
    assert kept is cpu and fake.asked == [0] and index_mod.index_device(kept) == "cpu"
    assert "shard_000.faiss" in caplog.text and "cannot be moved to GPU 0" in caplog.text
    assert "not implemented on GPU" in caplog.text
