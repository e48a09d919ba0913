"""`index import` of IVF (Flat, PQ, ID-mapped, pre-transformed), HNSW and L2 indexes built with
plain faiss over vectors of the packaged MiniLM (e5 conventions): split into 2 shards without
re-encoding, searched in process with the source's answers, served over HTTP with L2 scores
merged the right way round; a contradicting --metric, ids that are not the corpus rows and
unsupported types are clear errors that leave no folder behind."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from common.config import RetrieverConfig
from retriever.encoder import Encoder
from retriever.importer import FaissImportError, import_faiss
from retriever.index import LocalIndex, load_manifest, verify_checksums
from tests.conftest import ROOT, Procs, ipc_dir
from tests.test_retriever_import import PICKS, ROWS, N, gone, texts_of
from tests.test_retriever_index import write_jsonl

IP, L2 = 0, 1  # faiss.METRIC_INNER_PRODUCT, faiss.METRIC_L2


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The corpus, its passages encoded e5-style ("passage: "), and the picked queries encoded
    the way an e5 index is searched ("query: ")."""
    base = tmp_path_factory.mktemp("types")
    enc = Encoder(None, threads=1)
    vecs = enc.encode([r["contents"] for r in ROWS], prefix="passage: ", batch_size=64)
    queries = [texts_of(ROWS)[i] for i in PICKS]
    return {"base": base, "corpus": write_jsonl(base / "wiki.jsonl", ROWS), "vecs": vecs, "enc": enc,
            "queries": queries, "qvecs": enc.encode(queries, prefix="query: ")}


def foreign(base: Path, factory: str, vecs: np.ndarray, metric: int = IP, nprobe: int = 3) -> Path:
    """An index written by plain faiss (index_factory, train, add), nprobe set in the file."""
    import faiss

    index = faiss.index_factory(vecs.shape[1], factory, metric)
    index.train(vecs)
    if factory.startswith("IDMap"):  # added in a shuffled order, ids = the corpus rows
        perm = np.random.default_rng(3).permutation(len(vecs))
        index.add_with_ids(vecs[perm], perm.astype(np.int64))
    else:
        index.add(vecs)
    if "IVF" in factory:
        faiss.extract_index_ivf(index).nprobe = nprobe
    path = base / f"{factory.replace(',', '_')}-{metric}.index"
    faiss.write_index(index, str(path))
    return path


def reference(path: Path, qvecs: np.ndarray, k: int, metric: int = IP):
    """The source index's own answer, scores larger-is-better as scout's shards give them."""
    import faiss

    d, i = faiss.read_index(str(path)).search(qvecs, k)
    return (-d if metric == L2 else d), i


# --------------------------------------------------------------------------- IVF
@pytest.mark.parametrize("factory,inner", [("IVF8,Flat", "IndexIVFFlat"), ("IVF4,PQ16x4", "IndexIVFPQ"),
                                           ("IDMap,IVF8,Flat", "IndexIVFFlat"),
                                           ("PCA64,IVF4,Flat", "IndexPreTransform")])
def test_ivf_split_by_id_answers_as_the_source(factory, inner, data, tmp_path):
    import faiss

    path = foreign(data["base"], factory, data["vecs"])
    out = tmp_path / "o"
    m = import_faiss(RetrieverConfig(), path, data["corpus"], out, shards=2, preset="e5")
    verify_checksums(out, m)
    nlist = 8 if "IVF8" in factory else 4
    assert (m["metric"], m["source"]["nlist"], m["source"]["nprobe"]) == ("inner_product", nlist, 3)
    assert [(s["start"], s["end"]) for s in m["shards"]] == [(0, 100), (100, 200)]
    for s in m["shards"]:
        shard = faiss.read_index(str(out / s["file"]))
        assert type(shard).__name__ == inner and shard.ntotal == 100
        assert faiss.extract_index_ivf(shard).nprobe == 3  # kept from the file
    local = LocalIndex(out)
    scores, rows = local.search_vectors(data["qvecs"], 5)
    ref_scores, ref_rows = reference(path, data["qvecs"], 5)
    np.testing.assert_array_equal(rows, ref_rows)  # the same codes in the same lists: the source's answer
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
    if "PQ" not in factory and "PCA" not in factory:
        assert rows[:, 0].tolist() == PICKS


def test_ivf_lists_are_memory_mapped(data):
    """The source's inverted lists stay on disk (peak memory: one shard, not the source too)."""
    import faiss

    from retriever.importer import read_index

    index = read_index(foreign(data["base"], "IVF8,Flat", data["vecs"]))  # held: ivf points into it
    ivf = faiss.extract_index_ivf(index)
    assert type(faiss.downcast_InvertedLists(ivf.invlists)).__name__ == "OnDiskInvertedLists"


def test_nprobe_option_is_stored_in_the_shards(data, tmp_path):
    import faiss

    path = foreign(data["base"], "IVF8,Flat", data["vecs"])
    m = import_faiss(RetrieverConfig(), path, data["corpus"], tmp_path / "o", shards=2, nprobe=8)
    assert (m["source"]["nprobe"], m["source"]["nprobe_in_file"]) == (8, 3)
    assert faiss.extract_index_ivf(faiss.read_index(str(tmp_path / "o" / "shard_001.faiss"))).nprobe == 8
    with pytest.raises(ValueError, match=r"--nprobe must be in 1..8 \(the index's nlist\), got 9"):
        import_faiss(RetrieverConfig(), path, data["corpus"], tmp_path / "p", nprobe=9)
    assert gone(tmp_path / "p")


@pytest.mark.parametrize("ids,found", [("range", r"stores the id 200 in inverted list \d+: expected ids 0..199"),
                                       ("dup", r"stores an id twice")])
def test_ivf_ids_must_be_the_corpus_rows(ids, found, data, tmp_path):
    import faiss

    index = faiss.index_factory(384, "IVF4,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(data["vecs"])
    labels = np.arange(N, dtype=np.int64) + (1 if ids == "range" else 0)
    if ids == "dup":
        labels[7] = 8
    index.add_with_ids(data["vecs"], labels)
    faiss.write_index(index, str(tmp_path / "x.index"))
    with pytest.raises(FaissImportError, match=found):
        import_faiss(RetrieverConfig(), tmp_path / "x.index", data["corpus"], tmp_path / "o", shards=2)
    assert gone(tmp_path / "o")


# --------------------------------------------------------------------------- HNSW, L2
def test_hnsw_rebuilt_per_shard_from_its_own_vectors(data, tmp_path):
    import faiss

    src = faiss.IndexHNSWFlat(384, 12, faiss.METRIC_INNER_PRODUCT)
    src.hnsw.efConstruction, src.hnsw.efSearch = 60, 24
    src.add(data["vecs"])
    faiss.write_index(src, str(tmp_path / "h.index"))
    m = import_faiss(RetrieverConfig(), tmp_path / "h.index", data["corpus"], tmp_path / "o", shards=2, chunk_rows=30)
    assert m["source"]["hnsw"] == {"M": 12, "efConstruction": 60, "efSearch": 24} and m["source"]["rebuilt"]
    for s in m["shards"]:
        shard = faiss.read_index(str(tmp_path / "o" / s["file"]))
        assert type(shard).__name__ == "IndexHNSWFlat" and shard.hnsw.nb_neighbors(1) == 12
        assert (shard.hnsw.efConstruction, shard.hnsw.efSearch) == (60, 24)
        np.testing.assert_array_equal(faiss.downcast_index(shard.storage).reconstruct_n(0, 100),
                                      data["vecs"][s["start"]:s["end"]])  # the index's vectors, not re-encoded
    assert LocalIndex(tmp_path / "o").search_vectors(data["qvecs"], 3)[1][:, 0].tolist() == PICKS
    one = import_faiss(RetrieverConfig(), tmp_path / "h.index", data["corpus"], tmp_path / "one")
    assert not one["source"]["rebuilt"]  # one shard: the source graph as it is
    np.testing.assert_array_equal(LocalIndex(tmp_path / "one").search_vectors(data["qvecs"], 5)[1],
                                  reference(tmp_path / "h.index", data["qvecs"], 5)[1])


def test_flat_l2_scores_are_negated_distances(data, tmp_path):
    path = foreign(data["base"], "Flat", data["vecs"], metric=L2)
    m = import_faiss(RetrieverConfig(), path, data["corpus"], tmp_path / "o", shards=2, metric="l2")
    assert (m["metric"], m["factory"]) == ("l2", "Flat")
    scores, rows = LocalIndex(tmp_path / "o").search_vectors(data["qvecs"], 5)
    assert rows[:, 0].tolist() == PICKS
    dist = ((data["qvecs"][:, None, :] - data["vecs"][rows]) ** 2).sum(-1)
    np.testing.assert_allclose(scores, -dist, atol=1e-4)  # larger is closer, merged across both shards
    assert (np.diff(scores, axis=1) <= 0).all()
    np.testing.assert_array_equal(rows, reference(path, data["qvecs"], 5, L2)[1])


# --------------------------------------------------------------------------- errors
def test_metric_flag_that_contradicts_the_file(data, tmp_path):
    ip = foreign(data["base"], "Flat", data["vecs"])
    with pytest.raises(FaissImportError, match=r"--metric l2 contradicts .* which faiss records as inner_product "
                                               r"\(--metric ip\)"):
        import_faiss(RetrieverConfig(), ip, data["corpus"], tmp_path / "o", metric="l2")
    with pytest.raises(ValueError, match=r"--metric must be one of ip, l2, got 'cosine'"):
        import_faiss(RetrieverConfig(), ip, data["corpus"], tmp_path / "o", metric="cosine")
    assert gone(tmp_path / "o")
    assert import_faiss(RetrieverConfig(), ip, data["corpus"], tmp_path / "o", metric="ip")["metric"] == "inner_product"


def _unsupported(kind: str, vecs: np.ndarray, path: Path) -> str:
    """Write an index faiss can read but scout cannot import; return the type the error names."""
    import faiss

    if kind == "binary":
        b = faiss.IndexBinaryFlat(384)
        b.add(np.packbits(vecs > 0, axis=1))
        faiss.write_index_binary(b, str(path))
        return "is a binary index (IndexBinaryFlat)"
    index, name = {"lsh": (faiss.IndexLSH(384, 64), "IndexLSH"),
                   "idmap-flat": (faiss.IndexIDMap(faiss.IndexFlatIP(384)), "IndexIDMap(IndexFlatIP)"),
                   "hnsw-sq": (faiss.IndexHNSWSQ(384, faiss.ScalarQuantizer.QT_8bit, 8), "IndexHNSWSQ"),
                   "fastscan": (faiss.index_factory(384, "IVF2,PQ16x4fs"), "IndexIVFPQFastScan")}[kind]
    if not index.is_trained:
        index.train(vecs)
    index.add_with_ids(vecs, np.arange(len(vecs))) if kind == "idmap-flat" else index.add(vecs)
    faiss.write_index(index, str(path))
    return f"is a {name}, which cannot be imported"


@pytest.mark.parametrize("kind", ["binary", "lsh", "idmap-flat", "hnsw-sq", "fastscan"])
def test_unsupported_types_are_named(kind, data, tmp_path):
    found = _unsupported(kind, data["vecs"], tmp_path / "x.index")
    with pytest.raises(FaissImportError) as e:
        import_faiss(RetrieverConfig(), tmp_path / "x.index", data["corpus"], tmp_path / "o", shards=2)
    assert found in str(e.value), str(e.value)
    assert "supported: IndexFlatIP and IndexFlatL2; IndexIVFFlat, IndexIVFPQ" in str(e.value)
    assert "IndexHNSWFlat" in str(e.value) and gone(tmp_path / "o")


# --------------------------------------------------------------------------- served
@pytest.mark.slow
def test_ivf_l2_e5_served_over_http(data):
    """An IVF-Flat L2 index of e5-style vectors, imported by the real CLI with --encoder-preset e5
    into 2 shards, served by `cli.py retriever`: the right top-1, and scores that are the negated
    L2 distance to the query encoded with the manifest's "query: " prefix (not without it)."""
    from common.transport import free_tcp_port
    from tests.test_retriever_service import post, start_service

    path = foreign(data["base"], "IVF8,Flat", data["vecs"], metric=L2, nprobe=8)
    out = data["base"] / "served"
    r = subprocess.run([sys.executable, "cli.py", "index", "import", "--faiss", str(path), "--corpus",
                        str(data["corpus"]), "--out", str(out), "--shards", "2", "--encoder-preset", "e5",
                        "--metric", "l2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "IVF8,Flat, metric l2" in r.stdout and load_manifest(out)["encoder"]["query_prefix"] == "query: "
    d = ipc_dir()
    procs = Procs()
    try:
        svc = start_service(procs, out, lambda n: f"ipc://{d}/{n}-{uuid.uuid4().hex[:8]}", free_tcp_port(),
                            free_tcp_port())
        status, body = post(svc, {"queries": data["queries"], "topk": 3, "return_scores": True})
        assert status == 200
        assert [items[0]["document"] for items in body["result"]] == [ROWS[i] for i in PICKS]
        got = np.array([[it["score"] for it in items] for items in body["result"]])
        top = data["vecs"][PICKS]
        assert (np.diff(got, axis=1) <= 0).all()
        np.testing.assert_allclose(got[:, 0], -((data["qvecs"] - top) ** 2).sum(1), atol=1e-4)
        bare = data["enc"].encode(data["queries"])  # without the prefix the scores would differ
        assert np.abs(got[:, 0] + ((bare - top) ** 2).sum(1)).max() > 1e-3  # 10x the tolerance above
    finally:
        procs.stop_all()
