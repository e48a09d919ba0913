"""`index import`: a foreign FAISS Flat inner-product index (built here with plain faiss, the way
Search-R1 ships e5_Flat.index; IVF, HNSW and L2: test_retriever_import_types.py) becomes a scout
index folder without re-encoding; it is searched in process, and served by `cli.py retriever`
over HTTP and ZeroMQ; bad input gets clear errors and leaves no folder behind."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from common.config import RetrieverConfig
from retriever.docstore import CorpusError
from retriever.encoder import PACKAGED, Encoder
from retriever.importer import FaissImportError, import_faiss
from retriever.index import LocalIndex, build_index, encoder_for, load_manifest, verify_checksums
from tests.conftest import ROOT, Procs, ipc_dir
from tests.test_retriever_index import make_corpus, write_jsonl

N = 200
ROWS = make_corpus(N, seed=23)
PICKS = [0, 57, 101, 150, 199]


def texts_of(rows: list[dict]) -> list[str]:
    return [r["contents"].split("\n", 1)[1] for r in rows]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """Cheap input for the error tests: the corpus and N random unit vectors of the encoder's width."""
    import faiss

    base = tmp_path_factory.mktemp("plain")
    vecs = np.random.default_rng(0).standard_normal((N, 384)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    return {"index": write_index(base / "plain.index", faiss.IndexFlatIP(384), vecs),
            "corpus": write_jsonl(base / "wiki.jsonl", ROWS), "vecs": vecs}


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """A foreign index: the packaged encoder run by hand, vectors in a plain faiss.IndexFlatIP."""
    import faiss

    base = tmp_path_factory.mktemp("foreign")
    enc = Encoder(None, threads=1)
    vecs = enc.encode([r["contents"] for r in ROWS], batch_size=64)
    index = faiss.IndexFlatIP(enc.dim)
    index.add(vecs)
    faiss.write_index(index, str(base / "e5_Flat.index"))
    return {"base": base, "index": base / "e5_Flat.index", "corpus": write_jsonl(base / "wiki.jsonl", ROWS),
            "vecs": vecs, "enc": enc}


@pytest.fixture(scope="module")
def imported(foreign):
    """Imported by the real CLI into 2 shards."""
    out = foreign["base"] / "imported"
    r = subprocess.run([sys.executable, "cli.py", "index", "import", "--faiss", str(foreign["index"]), "--corpus",
                        str(foreign["corpus"]), "--out", str(out), "--shards", "2"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"{N} passages, 2 shards, dim 384" in r.stdout
    return out


def gone(out: Path) -> bool:
    return not out.exists() and not out.with_name(out.name + ".tmp-import").exists()


def write_index(path: Path, index, vecs: np.ndarray) -> Path:
    import faiss

    index.add(vecs)
    faiss.write_index(index, str(path))
    return path


# --------------------------------------------------------------------------- the import
@pytest.mark.slow
def test_manifest_matches_a_built_index(imported, foreign, tmp_path):
    import faiss

    m = load_manifest(imported)
    verify_checksums(imported, m)
    assert (m["count"], m["dim"], m["factory"], m["metric"]) == (N, 384, "Flat", "inner_product")
    assert [(s["start"], s["end"]) for s in m["shards"]] == [(0, 100), (100, 200)]
    e = m["encoder"]
    assert (e["path"], e["pooling"], e["normalize"], e["query_prefix"], e["passage_prefix"]) == \
        (PACKAGED, "mean", True, "", "")
    built = build_index(RetrieverConfig(), write_jsonl(tmp_path / "c.jsonl", ROWS[:20]), tmp_path / "built",
                        encoder=foreign["enc"])
    assert set(m) == set(built) | {"source"} and set(e) == set(built["encoder"])
    assert set(m["corpus"]) == set(built["corpus"])
    assert set(m["shards"][0]) == set(built["shards"][0]) and set(m["files"]) == set(built["files"])
    for s in m["shards"]:  # the vectors are copied bit for bit, not re-encoded
        shard = faiss.read_index(str(imported / s["file"]))
        assert type(shard).__name__ == "IndexFlatIP"
        np.testing.assert_array_equal(shard.reconstruct_n(0, shard.ntotal), foreign["vecs"][s["start"]:s["end"]])
    assert not imported.with_name(imported.name + ".tmp-import").exists()


@pytest.mark.slow
def test_in_process_search_finds_the_source_passage(imported, foreign):
    local = LocalIndex(imported, encoder_for(load_manifest(imported), threads=1))
    queries = [texts_of(ROWS)[i] for i in PICKS]
    scores, rows = local.search_vectors(local.encode_queries(queries), 3)
    assert rows[:, 0].tolist() == PICKS
    assert local.docs.contents(rows[:, 0]) == [ROWS[i]["contents"] for i in PICKS]
    import faiss

    ref = faiss.read_index(str(foreign["index"]))
    ref_scores, ref_rows = ref.search(local.encode_queries(queries), 3)
    np.testing.assert_array_equal(rows, ref_rows)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


def test_chunked_copy_and_settings_overrides(plain, tmp_path):
    from retriever.encoder import resolve_encoder_path

    enc_dir = str(resolve_encoder_path(None))
    m = import_faiss(RetrieverConfig(), plain["index"], plain["corpus"], tmp_path / "o", shards=3, chunk_rows=7,
                     encoder=enc_dir, pooling="cls", query_prefix="query: ", passage_prefix="passage: ")
    e = load_manifest(tmp_path / "o")["encoder"]
    assert m["encoder"] == e and [s["count"] for s in m["shards"]] == [66, 67, 67]
    assert (e["path"], e["pooling"], e["query_prefix"], e["passage_prefix"]) == (enc_dir, "cls", "query: ", "passage: ")
    verify_checksums(tmp_path / "o", m)
    import faiss

    last = faiss.read_index(str(tmp_path / "o" / "shard_002.faiss"))
    np.testing.assert_array_equal(last.reconstruct_n(0, 67), plain["vecs"][133:])


@pytest.mark.slow
def test_served_over_http_and_zmq(imported):
    from common.transport import free_tcp_port
    from retriever.client import HttpRetrievalClient, RetrieverClient, SyncRetriever
    from tests.test_retriever_service import post, start_service

    d = ipc_dir()
    procs = Procs()
    try:
        svc = start_service(procs, imported, lambda n: f"ipc://{d}/{n}-{uuid.uuid4().hex[:8]}", free_tcp_port(),
                            free_tcp_port())
        queries = [texts_of(ROWS)[i] for i in PICKS]
        status, body = post(svc, {"queries": queries, "topk": 2, "return_scores": True})
        assert status == 200
        assert [items[0]["document"] for items in body["result"]] == [ROWS[i] for i in PICKS]
        with SyncRetriever(HttpRetrievalClient(svc["http"], timeout_s=30)) as h, \
                SyncRetriever(RetrieverClient(svc["endpoint"], timeout_s=30)) as z:
            assert [r[0].id for r in h.search(queries, topk=1)] == [str(i) for i in PICKS]
            assert [r[0].id for r in z.search(queries, topk=1)] == [str(i) for i in PICKS]
    finally:
        procs.stop_all()


# --------------------------------------------------------------------------- clear errors
def test_row_count_mismatch(plain, tmp_path):
    out = tmp_path / "o"
    short = write_jsonl(tmp_path / "short.jsonl", ROWS[:-1])
    with pytest.raises(FaissImportError, match=rf"holds {N - 1} passages but .* holds {N} vectors"):
        import_faiss(RetrieverConfig(), plain["index"], short, out, shards=2)
    assert gone(out)


def test_dimension_mismatch(tmp_path, plain):
    import faiss

    out = tmp_path / "o"
    path = write_index(tmp_path / "d16.index", faiss.IndexFlatIP(16), np.random.rand(N, 16).astype(np.float32))
    with pytest.raises(FaissImportError, match=r"holds 16-d vectors but the encoder .* gives 384-d"):
        import_faiss(RetrieverConfig(), path, plain["corpus"], out)
    assert gone(out)


def test_unsupported_index_type(tmp_path, plain):
    """More types and the supported ones: tests/test_retriever_import_types.py."""
    import faiss

    index = faiss.IndexIDMap(faiss.IndexFlatIP(384))
    index.add_with_ids(plain["vecs"], np.arange(N))
    faiss.write_index(index, str(tmp_path / "x.index"))
    out = tmp_path / "o"
    with pytest.raises(FaissImportError) as e:
        import_faiss(RetrieverConfig(), tmp_path / "x.index", plain["corpus"], out)
    assert "is a IndexIDMap(IndexFlatIP), which cannot be imported: supported: IndexFlatIP" in str(e.value)
    assert gone(out)


def test_unreadable_and_missing_files(tmp_path, plain):
    out = tmp_path / "o"
    junk = tmp_path / "junk.index"
    junk.write_bytes(b"this is not a faiss index" * 10)
    with pytest.raises(FaissImportError, match=r"cannot read .*junk.index as a faiss index \(.*not recognized\): "
                                               r"expected a file written by faiss.write_index"):
        import_faiss(RetrieverConfig(), junk, plain["corpus"], out)
    with pytest.raises(FaissImportError, match=r"nope.index does not exist \(expected a file written by"):
        import_faiss(RetrieverConfig(), tmp_path / "nope.index", plain["corpus"], out)
    with pytest.raises(CorpusError, match=r"corpus .*nope.jsonl does not exist"):
        import_faiss(RetrieverConfig(), plain["index"], tmp_path / "nope.jsonl", out)
    assert gone(out)


def test_corpus_line_without_contents(tmp_path, plain):
    out = tmp_path / "o"
    bad = write_jsonl(tmp_path / "bad.jsonl", ROWS[:10] + [{"id": "x", "body": "no contents"}] + ROWS[11:])
    with pytest.raises(CorpusError, match=r"bad.jsonl:11: missing field 'contents' \(or 'title' \+ 'text'\)"):
        import_faiss(RetrieverConfig(), plain["index"], bad, out)
    assert gone(out)


def test_out_folder_rules(tmp_path, plain):
    args = (RetrieverConfig(), plain["index"], plain["corpus"])
    empty = tmp_path / "empty"  # an empty folder is fine, and a stale tmp folder is cleared first
    empty.mkdir()
    stale = tmp_path / "empty.tmp-import"
    stale.mkdir()
    (stale / "shard_000.faiss").write_bytes(b"half")
    import_faiss(*args, empty)
    assert load_manifest(empty)["count"] == N and not stale.exists()
    assert json.loads((empty / "manifest.json").read_text())["factory"] == "Flat"
    with pytest.raises(FaissImportError, match=r"already holds an index \(manifest.json\): expected a missing or empty"):
        import_faiss(*args, empty)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    with pytest.raises(FaissImportError, match=r"busy exists and is not empty"):
        import_faiss(*args, busy)
    with pytest.raises(ValueError, match=r"--pooling must be 'mean' or 'cls', got 'max'"):
        import_faiss(*args, tmp_path / "p", pooling="max")
    assert gone(tmp_path / "p")


def test_cli_reports_bad_input_with_exit_2(tmp_path, plain):
    out = tmp_path / "o"
    r = subprocess.run([sys.executable, "cli.py", "index", "import", "--faiss", str(plain["index"]), "--corpus",
                        str(plain["corpus"]), "--out", str(out), "--metric", "l2"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "--metric l2 contradicts" in r.stderr
    assert gone(out)
