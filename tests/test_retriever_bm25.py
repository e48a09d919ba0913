"""BM25 indexes (retriever/bm25.py): scores equal to bm25s's, global IDF across shards (the merged
top-k of N shards is the top-k of one unsharded index), `cli.py index build --kind bm25` served by
a real `cli.py retriever` over ZeroMQ and HTTP, the demo world with retriever.kind=bm25, and the
errors (unknown kind, a dense kind set for a BM25 index, an empty corpus)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import numpy as np
import pytest

from common.config import RetrieverConfig, load_config
from retriever.bm25 import LocalBm25, build_bm25, idf, make_tokenizer, score_matrix
from retriever.docstore import CorpusError
from tests.conftest import ROOT, Procs, ipc_dir
from tests.test_retriever_index import make_corpus, write_jsonl

N_SKEW = 100  # two shards of 50 rows


def rcfg(**kw) -> RetrieverConfig:
    return RetrieverConfig(**{"build_chunk_rows": 32, **kw})


def skewed_corpus() -> list[dict]:
    """A corpus where per-shard IDF changes the ranking of "alpha beta". Rows 0..49 (shard 0 of
    2): 10 passages with "alpha", 18 with "beta"; rows 50..99 (shard 1): 2 with "beta". Over the
    whole corpus alpha (df 10) is rarer than beta (df 20), so an alpha passage is the top-1; shard
    1 on its own sees beta in 2 of its 50 rows, rarer than alpha in shard 0 (10 of 50), so
    per-shard IDF ranks its beta passages first. Every passage has 6 words (equal lengths)."""
    rows = []
    for i in range(N_SKEW):
        if i < 10:
            word = "alpha"
        elif i < 28 or i in (60, 80):
            word = "beta"
        else:
            word = "gamma"
        filler = " ".join(f"w{i}x{j}" for j in range(5))
        rows.append({"id": f"d{i}", "contents": f'"doc{i}"\n{word} {filler}'})
    return rows


@pytest.fixture(scope="module")
def skew_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("bm25-skew")
    corpus = write_jsonl(base / "corpus.jsonl", skewed_corpus())
    for k in (1, 2, 3):
        build_bm25(rcfg(), corpus, base / f"s{k}", shards=k)
    return {k: base / f"s{k}" for k in (1, 2, 3)}


# --------------------------------------------------------------------------- scores and global IDF
@pytest.mark.parametrize("method", ["lucene", "robertson", "atire"])
def test_scores_equal_bm25s(method):
    """One shard's score matrix gives bm25s's own scores on the same tokens (its formulas, its
    tokenizer): the global-statistics computation is BM25 as bm25s defines it."""
    import bm25s

    texts = [r["contents"] for r in make_corpus(60, seed=3)]
    tok = make_tokenizer({"lower": True, "pattern": r"(?u)\b\w\w+\b", "stopwords": "en"})
    ids = [list(d) for d in tok.streaming_tokenize(texts, update_vocab=True, allow_empty=False)]
    ref = bm25s.BM25(k1=1.2, b=0.6, method=method)
    ref.index((ids, tok.word_to_id), show_progress=False)
    lengths = np.array([len(d) for d in ids], np.int32)
    flat = np.concatenate([np.array(d, np.int32) for d in ids])
    df = np.bincount(np.concatenate([np.unique(d) for d in ids]), minlength=len(tok.word_to_id))
    data, rows, indptr = score_matrix(flat, lengths, idf(df, len(ids), method), lengths.mean(), 1.2, 0.6, method)
    for query in (ids[5][:3], ids[17][2:6] + ids[40][:1]):
        ours = np.zeros(len(ids))
        for c in query:
            np.add.at(ours, rows[indptr[c]:indptr[c + 1]], data[indptr[c]:indptr[c + 1]])
        np.testing.assert_allclose(ours, ref.get_scores(query), rtol=1e-5, atol=1e-6)


def test_sharded_top_k_equals_unsharded(skew_dirs):
    one, two, three = (LocalBm25(skew_dirs[k]) for k in (1, 2, 3))
    queries = ["alpha beta", "beta", "gamma alpha", "w3x1 beta", "w61x2 alpha gamma", "nothing indexed"]
    s1, i1 = one.search(queries, 10)
    for ix in (two, three):
        s, i = ix.search(queries, 10)
        np.testing.assert_array_equal(i, i1)
        np.testing.assert_allclose(s, s1, rtol=1e-6)
    assert one.docs.ids(i1[0, :1])[0] in {f"d{j}" for j in range(10)}  # an alpha passage is the top-1
    assert (i1[5] == -1).all()  # no indexed word: no passages


def test_sparse_and_dense_accumulation_agree():
    """A query's postings are summed over the rows they touch (rare words) or densely over the
    shard (common ones): same top-k, same scores, ties to the lower row, in both."""
    from retriever.bm25 import accumulate, topk_rows

    rng = np.random.default_rng(5)
    rows = rng.integers(0, 1000, 60).astype(np.int32)
    vals = (rng.integers(1, 6, 60) / 4).astype(np.float32)  # few distinct values: many ties
    cand, sums = accumulate(rows, vals, 1000)
    assert len(cand) < 1000  # the sparse path
    dense = topk_rows(np.arange(1000), np.bincount(rows, weights=vals, minlength=1000).astype(np.float32), 10)
    for got, want in zip(topk_rows(cand, sums, 10), dense):
        np.testing.assert_array_equal(got, want)
    full = np.bincount(rows, weights=vals, minlength=1000).astype(np.float32)
    hit = np.flatnonzero(full > 0)
    best = hit[np.lexsort((hit, -full[hit]))][:10]  # every row sorted: the reference top-10
    np.testing.assert_array_equal(dense[1], best)


def test_per_shard_idf_would_rank_differently(skew_dirs):
    """The corpus discriminates: bm25s indexing each shard on its own (per-shard IDF) and merging
    puts a shard-1 beta passage first, not the global top-1 alpha passage."""
    import bm25s

    rows = skewed_corpus()
    tok = make_tokenizer({"lower": True, "pattern": r"(?u)\b\w\w+\b", "stopwords": "en"})
    best = []
    for a, z in ((0, 50), (50, 100)):
        ix = bm25s.BM25()
        ix.index(tok.tokenize([r["contents"] for r in rows[a:z]], return_as="tuple", show_progress=False),
                 show_progress=False)
        q = [t for t in ("alpha", "beta") if t in ix.vocab_dict]
        scores = ix.get_scores(q)
        best.append((float(scores.max()), a + int(scores.argmax())))
        tok.reset_vocab()
    assert max(best)[1] in (60, 80)
    s, i = LocalBm25(skew_dirs[2]).search(["alpha beta"], 1)
    assert i[0, 0] < 10


# --------------------------------------------------------------------------- built and served by the CLI
@pytest.fixture(scope="module")
def cli_index(tmp_path_factory):
    base = tmp_path_factory.mktemp("bm25-cli")
    corpus = write_jsonl(base / "corpus.jsonl", make_corpus(200, seed=11))
    out = base / "index"
    subprocess.run([sys.executable, "cli.py", "index", "build", "--kind", "bm25", "--corpus", str(corpus), "--out",
                    str(out), "--shards", "2"], cwd=ROOT, check=True, timeout=300)
    return out


def test_cli_build_writes_a_bm25_manifest(cli_index):
    m = json.loads((cli_index / "manifest.json").read_text())
    assert m["kind"] == "bm25" and m["count"] == 200 and m["bm25"]["idf"] == "global"
    assert [(s["start"], s["end"]) for s in m["shards"]] == [(0, 100), (100, 200)]
    assert m["tokenizer"]["library"] == "bm25s" and m["dim"] == len(json.loads((cli_index / "vocab.json").read_text()))
    assert not (cli_index / "tok").exists() and not list(cli_index.glob("*.tmp"))


def test_served_over_zmq_and_http(cli_index, tmp_path):
    from common.transport import free_tcp_port
    from retriever.client import HttpRetrievalClient, RetrieverClient, SyncRetriever
    from tests.test_retriever_service import health, post, start_service

    rows = make_corpus(200, seed=11)
    names = [r["contents"].split("\n")[0].strip('"') for r in rows]
    d = ipc_dir()
    procs = Procs()
    try:
        svc = start_service(procs, cli_index, lambda n: f"ipc://{d}/{n}-{uuid.uuid4().hex[:8]}", free_tcp_port(),
                            free_tcp_port(), "retriever.kind=bm25")
        assert health(svc)["kind"] == "bm25"
        picks = [3, 77, 120, 199]  # both shards; each name is a rare word of one passage
        queries = [f"what is the capital of {names[j]}?" for j in picks] + ["the of and"]
        with SyncRetriever(RetrieverClient(svc["endpoint"], timeout_s=30)) as z:
            got = z.search(queries, topk=3)
        assert [r[0].id for r in got[:4]] == [str(j) for j in picks]
        assert got[4] == []  # stopwords only: nothing to match
        local_s, local_i = LocalBm25(cli_index).search(queries[:4], 3)
        assert [[int(p.id) for p in r] for r in got[:4]] == local_i.tolist()
        np.testing.assert_allclose([[p.score for p in r] for r in got[:4]], local_s, rtol=1e-6)
        status, body = post(svc, {"queries": queries[:2], "topk": 2, "return_scores": True})
        assert status == 200 and [r[0]["document"] for r in body["result"]] == [rows[3], rows[77]]
        with SyncRetriever(HttpRetrievalClient(svc["http"], timeout_s=30)) as h:
            assert [r[0].id for r in h.search(queries[:4], topk=1)] == [str(j) for j in picks]
    finally:
        procs.stop_all()


def test_demo_world_with_bm25(tmp_path):
    """The demo's index with retriever.kind=bm25: its questions find their own passage."""
    from demo.recipe import _cached_index
    from demo.toyworld import build_world

    cfg = load_config(None, ["retriever.kind=bm25"], environ={})
    world = build_world(tmp_path / "world", seed=0, n_entities=80, heldout_entities=16)
    _cached_index(cfg, world.corpus, tmp_path / "index", "digest")
    assert json.loads((tmp_path / "index" / "manifest.json").read_text())["kind"] == "bm25"
    qa = [json.loads(line) for line in world.heldout.read_text().splitlines()]
    _, rows = LocalBm25(tmp_path / "index").search([q["question"] for q in qa], 3)
    ids = LocalBm25(tmp_path / "index").docs.ids(rows[:, 0])
    top1 = np.mean([i == q["passage_id"] for i, q in zip(ids, qa)])
    assert top1 >= 0.95, f"top-1 finds the question's passage for {top1:.0%} of {len(qa)} questions"


def test_interrupted_build_is_never_served_and_resumes(tmp_path, monkeypatch):
    import retriever.bm25 as B
    from retriever.index import IndexFolderError, load_manifest

    corpus = write_jsonl(tmp_path / "c.jsonl", skewed_corpus())
    real = B._write_shard

    def crash_at_shard_1(out, name, arrays):
        if name == "shard_001.bm25":
            raise KeyboardInterrupt
        return real(out, name, arrays)

    monkeypatch.setattr(B, "_write_shard", crash_at_shard_1)
    with pytest.raises(KeyboardInterrupt):
        build_bm25(rcfg(), corpus, tmp_path / "i", shards=2)
    with pytest.raises(IndexFolderError, match="unfinished build"):
        load_manifest(tmp_path / "i")
    first = (tmp_path / "i" / "shard_000.bm25" / "data.npy").stat().st_mtime_ns
    monkeypatch.setattr(B, "_write_shard", real)
    build_bm25(rcfg(), corpus, tmp_path / "i", shards=2)  # the same command again: resumes
    assert (tmp_path / "i" / "shard_000.bm25" / "data.npy").stat().st_mtime_ns == first  # kept
    s, i = LocalBm25(tmp_path / "i").search(["alpha beta", "w77x3"], 3)
    assert i[0, 0] < 10 and i[1, 0] == 77
    with pytest.raises(IndexFolderError, match="different settings"):
        build_bm25(rcfg(bm25_k1=0.9), corpus, tmp_path / "i", shards=2)


# --------------------------------------------------------------------------- bad input
def test_unknown_kind_is_a_clear_error(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_corpus(5))
    r = subprocess.run([sys.executable, "cli.py", "index", "build", "--kind", "splade", "--corpus", str(corpus),
                        "--out", str(tmp_path / "i")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "index kind 'splade' is not one of dense, bm25" in r.stderr
    with pytest.raises(Exception, match="retriever.kind"):
        load_config(None, ["retriever.kind=splade"], environ={})


def test_empty_corpus_and_stopwords_only(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(CorpusError, match="no passages"):
        build_bm25(rcfg(), empty, tmp_path / "a")
    stop = write_jsonl(tmp_path / "stop.jsonl", [{"id": "1", "contents": "the and of"}])
    with pytest.raises(CorpusError, match="no passage holds a word"):
        build_bm25(rcfg(), stop, tmp_path / "b")
    assert not (tmp_path / "b" / "manifest.json").exists()


def test_dense_kind_for_a_bm25_index_refused(cli_index, tmp_path):
    r = subprocess.run([sys.executable, "cli.py", "retriever", "--index", str(cli_index), "--endpoint",
                        f"ipc://{tmp_path}/r", "--http-port", "0", "--set", "retriever.kind=dense"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "holds a bm25 index, but retriever.kind is 'dense'" in r.stderr
