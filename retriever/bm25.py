"""Sparse BM25 indexes: bm25s's tokenizer, one global vocabulary and global IDF, K shards.

    corpus.jsonl ──stream──▶ docs/ (the same document store as a dense index)
          │ rows in chunks of build_chunk_rows
          ▼
    bm25s Tokenizer (lowercase, bm25s's word pattern, stopwords) ─▶ one global vocabulary
          │ tok/<start>-<end>.npz: token ids + lengths per chunk (removed when the build ends)
          ▼
    global statistics over the WHOLE corpus: document frequency per token, N, avgdl
          │ contiguous row ranges, as the dense build
          ▼
    shard_000.bm25/ … : the shard's BM25 score matrix, CSC (token column -> documents), scored
                        with the global IDF and avgdl: data.npy float32, indices.npy int32 (row
                        in the shard), indptr.npy int64 [vocab + 1]
    vocab.json (word -> token id), manifest.json (kind "bm25", tokenizer, k1, b, method, ...)

Why global statistics: a BM25 score is sum over query terms of idf(t) * tfc(tf, |d| / avgdl).
A shard indexed on its own (bm25s's `BM25().index(shard)`) takes df, N and avgdl from its own
rows, so a term rare in one shard and common in another scores differently in each, and the
merged top-k is not the top-k of the whole corpus. bm25s 0.3.16 computes df and avgdl inside
`build_index_from_ids` from the documents it is given and has no public way to pass them in, so
the score matrix is computed here with numpy from bm25s's tokenizer output, with bm25s's
formulas (lucene, robertson, atire; tests/test_retriever_bm25.py checks that one shard equals
`bm25s.BM25(...).index(...)` on the same tokens). Scores are exactly the same per document
whatever the sharding, so the router's larger-is-better merge gives the unsharded top-k.

A search sums the matrix columns of the query's token ids (duplicates count twice, as in
bm25s) and keeps the top k documents with a score above 0: a query with no indexed word gets
no passages rather than k arbitrary ones.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from retriever.docstore import CorpusError, DocStore
from retriever.index import (FORMAT, FORMAT_VERSION, MANIFEST, STATE, IndexFolderError, _write_json, open_build,
                             merge_topk, sha256_file, shard_bounds)

log = logging.getLogger("scout.retriever.bm25")

METHODS = ("lucene", "robertson", "atire")
PATTERN = r"(?u)\b\w\w+\b"  # bm25s's (and scikit-learn's) default word pattern
VOCAB = "vocab.json"
SHARD_ARRAYS = ("data.npy", "indices.npy", "indptr.npy")


# --------------------------------------------------------------------------- tokenizer
def tokenizer_settings(rcfg) -> dict:
    from bm25s.tokenization import _infer_stopwords

    stop = None if rcfg.bm25_stopwords.lower() in ("none", "") else rcfg.bm25_stopwords
    try:
        _infer_stopwords(stop)
    except ValueError:
        raise ValueError(f"retriever.bm25_stopwords {rcfg.bm25_stopwords!r} is not a bm25s stopword list "
                         "(en, de, fr, es, ... or none)") from None
    return {"library": "bm25s", "lower": True, "pattern": PATTERN, "stopwords": stop}


def make_tokenizer(settings: dict, vocab: dict | None = None):
    from bm25s.tokenization import Tokenizer

    tok = Tokenizer(lower=settings["lower"], splitter=settings["pattern"], stopwords=settings["stopwords"])
    if vocab is not None:
        tok.word_to_id = vocab
    return tok


class QueryTokenizer:
    """Router side: queries -> token ids of the index's global vocabulary (unknown words dropped)."""

    def __init__(self, index_dir: str | Path, manifest: dict):
        vocab = json.loads((Path(index_dir) / VOCAB).read_text())
        if len(vocab) != manifest["dim"]:
            raise IndexFolderError(f"{VOCAB} holds {len(vocab)} words, manifest says {manifest['dim']}")
        self.tok = make_tokenizer(manifest["tokenizer"], vocab)

    def tokenize(self, queries: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """-> (token ids of every query back to back int32, tokens per query int32)."""
        ids = list(self.tok.streaming_tokenize(queries, update_vocab=False, allow_empty=False))
        lengths = np.array([len(q) for q in ids], dtype=np.int32)
        flat = np.fromiter((t for q in ids for t in q), dtype=np.int32, count=int(lengths.sum()))
        return flat, lengths


# --------------------------------------------------------------------------- scoring
def idf(df: np.ndarray, n: int, method: str) -> np.ndarray:
    """bm25s's IDF variants (bm25s/scoring.py), vectorised; 0 where df is 0."""
    df = df.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        if method == "lucene":
            out = np.log1p((n - df + 0.5) / (df + 0.5))
        elif method == "robertson":
            out = np.log(np.maximum(1.0, (n - df + 0.5) / (df + 0.5)))
        elif method == "atire":
            out = np.log(n / df)
        else:
            raise ValueError(f"BM25 method {method!r} is not one of {', '.join(METHODS)}")
    return np.where(df > 0, out, 0.0)


def tfc(tf: np.ndarray, doc_len: np.ndarray, avgdl: float, k1: float, b: float, method: str) -> np.ndarray:
    """bm25s's term-frequency component: lucene and robertson share it, atire has (k1 + 1) on top."""
    tf = tf.astype(np.float64)
    norm = k1 * ((1 - b) + b * doc_len / avgdl)
    return tf * (k1 + 1) / (tf + norm) if method == "atire" else tf / (norm + tf)


def score_matrix(ids: np.ndarray, lengths: np.ndarray, idf_all: np.ndarray, avgdl: float, k1: float, b: float,
                 method: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Documents' token ids (back to back) -> their BM25 matrix as CSC (data, indices, indptr):
    column t holds the documents containing token t and their score for it."""
    vocab = len(idf_all)
    doc = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    keys, tf = np.unique(doc * vocab + ids.astype(np.int64), return_counts=True)  # sorted by (doc, token)
    d, t = keys // vocab, keys % vocab
    scores = (idf_all[t] * tfc(tf, lengths[d], avgdl, k1, b, method)).astype(np.float32)
    order = np.argsort(t, kind="stable")  # by token, documents ascending within each column
    indptr = np.zeros(vocab + 1, dtype=np.int64)
    np.cumsum(np.bincount(t, minlength=vocab), out=indptr[1:])
    return scores[order], d[order].astype(np.int32), indptr


def topk_rows(rows: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of candidate `rows` (ascending) with a score above 0, best first (ties: lower
    row first, as the merge and an unsharded index), padded with -inf / -1."""
    keep = scores > 0
    rows, scores = rows[keep], scores[keep]
    out_s, out_i = np.full(k, -np.inf, np.float32), np.full(k, -1, np.int64)
    if len(rows) > k:
        kth = -np.partition(-scores, k - 1)[k - 1]
        above = scores > kth
        tied = np.flatnonzero(scores == kth)[:k - int(above.sum())]  # the lowest rows at the k-th score
        pick = np.concatenate([np.flatnonzero(above), tied])
        rows, scores = rows[pick], scores[pick]
    order = np.lexsort((rows, -scores))
    out_s[:len(rows)], out_i[:len(rows)] = scores[order], rows[order]
    return out_s, out_i


def accumulate(rows: np.ndarray, vals: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Postings (row, score) of a query's tokens -> (candidate rows ascending, summed scores).
    Few postings (rare words): only the rows they touch; many: a dense pass over the shard.
    Both add a row's scores in the same order, so they give the same float32 sums."""
    if len(rows) * 8 < n:
        cand, inv = np.unique(rows, return_inverse=True)
        return cand, np.bincount(inv, weights=vals, minlength=len(cand)).astype(np.float32)
    return np.arange(n), np.bincount(rows, weights=vals, minlength=n).astype(np.float32)


class Bm25Shard:
    """One shard's score matrix (memory-mapped) and its search."""

    def __init__(self, index_dir: str | Path, entry: dict, vocab: int):
        folder = Path(index_dir) / entry["file"]
        try:
            self.data, self.indices, self.indptr = (np.load(folder / f, mmap_mode="r") for f in SHARD_ARRAYS)
        except (OSError, ValueError) as e:
            raise IndexFolderError(f"{folder}: cannot read the BM25 shard ({e})") from None
        self.ntotal, self.vocab = int(entry["count"]), vocab
        if len(self.indptr) != vocab + 1 or len(self.data) != len(self.indices) or self.indptr[-1] != len(self.data):
            raise IndexFolderError(f"{folder}: the score matrix does not match a {vocab}-word vocabulary")

    def search(self, tokens: np.ndarray, lengths: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Queries as token ids back to back + tokens per query -> scores, shard rows [n, k]."""
        if len(tokens) and (tokens.min() < 0 or tokens.max() >= self.vocab):
            raise ValueError(f"query token ids must lie in 0..{self.vocab - 1}")
        k = max(1, min(k, self.ntotal))
        out_s, out_i = np.empty((len(lengths), k), np.float32), np.empty((len(lengths), k), np.int64)
        ends = np.cumsum(lengths)
        for q, (end, n) in enumerate(zip(ends, lengths)):
            cols = tokens[end - n:end]
            spans = [(int(self.indptr[c]), int(self.indptr[c + 1])) for c in cols]
            rows = np.concatenate([self.indices[a:z] for a, z in spans] or [np.empty(0, np.int32)])
            vals = np.concatenate([self.data[a:z] for a, z in spans] or [np.empty(0, np.float32)])
            out_s[q], out_i[q] = topk_rows(*accumulate(rows, vals, self.ntotal), k)
        return out_s, out_i


class LocalBm25:
    """Every shard of a BM25 index in this process (the in-process baseline, tests, benchmarks)."""

    def __init__(self, index_dir: str | Path):
        from retriever.index import load_manifest

        self.dir = Path(index_dir)
        self.manifest = load_manifest(self.dir)
        if self.manifest.get("kind") != "bm25":
            raise IndexFolderError(f"{self.dir} is not a BM25 index")
        self.tokenizer = QueryTokenizer(self.dir, self.manifest)
        self.shards = [(e, Bm25Shard(self.dir, e, self.manifest["dim"])) for e in self.manifest["shards"]]
        self.docs = DocStore(self.dir / "docs")

    def search(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        tokens, lengths = self.tokenizer.tokenize(queries)
        parts_s, parts_i = [], []
        for entry, shard in self.shards:
            s, i = shard.search(tokens, lengths, k)
            parts_s.append(s)
            parts_i.append(np.where(i >= 0, i + entry["start"], -1))
        return merge_topk(parts_s, parts_i, k)


# --------------------------------------------------------------------------- build
def _settings(rcfg, corpus: Path, shards: int) -> dict:
    st = corpus.stat()
    return {"kind": "bm25", "corpus": {"path": str(corpus.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns},
            "tokenizer": tokenizer_settings(rcfg), "k1": rcfg.bm25_k1, "b": rcfg.bm25_b, "method": rcfg.bm25_method,
            "shards": shards, "chunk_rows": rcfg.build_chunk_rows}


def _tokenize(store: DocStore, folder: Path, settings: dict, chunk_rows: int) -> tuple[dict, np.ndarray, int]:
    """Pass 1 over the whole corpus: the global vocabulary, document frequencies and total length.
    Token ids go to folder/<start>-<end>.npz per chunk (pass 2 reads a shard's rows back)."""
    tok = make_tokenizer(settings["tokenizer"])
    df, total, n = np.zeros(0, np.int64), 0, len(store)
    folder.mkdir(exist_ok=True)
    t0 = time.time()
    for start in range(0, n, chunk_rows):
        end = min(n, start + chunk_rows)
        docs = list(tok.streaming_tokenize(store.contents_range(start, end), update_vocab=True, allow_empty=False))
        lengths = np.array([len(d) for d in docs], dtype=np.int32)
        ids = np.fromiter((t for d in docs for t in d), dtype=np.int32, count=int(lengths.sum()))
        np.savez(folder / f"{start:012d}-{end:012d}.npz", ids=ids, lengths=lengths)
        vocab = len(tok.word_to_id)
        pairs = np.unique(np.repeat(np.arange(end - start, dtype=np.int64), lengths) * vocab + ids)
        df = np.pad(df, (0, vocab - len(df)))
        df += np.bincount(pairs % vocab, minlength=vocab)
        total += int(lengths.sum())
        log.info("tokenized %d/%d passages (%.0f passages/s), vocabulary %d", end, n, end / max(1e-9, time.time() - t0),
                 vocab)
    return dict(tok.word_to_id), df, total


def _read_rows(folder: Path, chunk_rows: int, n: int, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids + lengths of rows [start, end) from pass 1's chunk files."""
    ids, lengths = [], []
    for c0 in range(start - start % chunk_rows, end, chunk_rows):
        c1 = min(n, c0 + chunk_rows)
        with np.load(folder / f"{c0:012d}-{c1:012d}.npz") as z:
            cid, clen = z["ids"], z["lengths"]
        off = np.concatenate([[0], np.cumsum(clen, dtype=np.int64)])
        a, b = max(start, c0) - c0, min(end, c1) - c0
        ids.append(cid[off[a]:off[b]])
        lengths.append(clen[a:b])
    return np.concatenate(ids), np.concatenate(lengths)


def _write_shard(out: Path, name: str, arrays: tuple[np.ndarray, ...]) -> dict:
    """A shard folder written as <name>.tmp and renamed when complete; -> {relative file: sha256}."""
    tmp = out / (name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for fname, arr in zip(SHARD_ARRAYS, arrays):
        np.save(tmp / fname, arr)
    shutil.rmtree(out / name, ignore_errors=True)
    tmp.replace(out / name)
    return {f"{name}/{f}": sha256_file(out / name / f) for f in SHARD_ARRAYS}


def build_bm25(rcfg, corpus: str | Path, out: str | Path, shards: int = 1) -> dict:
    """Tokenize `corpus` and write a K-shard BM25 index folder at `out` (global IDF and avgdl);
    returns the manifest. Re-running the same command after an interruption continues it: the
    document store and the finished shards are kept (tokenizing again gives the same ids)."""
    corpus, out = Path(corpus), Path(out)
    if not corpus.is_file():
        raise CorpusError(f"corpus {corpus} does not exist")
    if rcfg.bm25_method not in METHODS:
        raise ValueError(f"retriever.bm25_method {rcfg.bm25_method!r} is not one of {', '.join(METHODS)}")
    settings = _settings(rcfg, corpus, shards)
    out.mkdir(parents=True, exist_ok=True)
    state, done = open_build(out, corpus, settings)
    if done is not None:
        return done
    store = DocStore(out / "docs")
    n = len(store)
    bounds = shard_bounds(n, shards)
    vocab, df, total = _tokenize(store, out / "tok", settings, rcfg.build_chunk_rows)
    if total == 0:
        raise CorpusError(f"corpus {corpus}: no passage holds a word to index (all empty or stopwords)")
    stats = {"n": n, "avgdl": total / n, "vocab": len(vocab), "tokens": total}
    _write_json(out / VOCAB, vocab)
    idf_all = idf(df, n, settings["method"])
    files = {VOCAB: sha256_file(out / VOCAB)}
    entries = []
    for i in range(shards):
        name, (a, z) = f"shard_{i:03d}.bm25", bounds[i:i + 2]
        done = state["shards"].get(str(i))
        if not (done and all((out / f).is_file() and sha256_file(out / f) == h for f, h in done.items())):
            ids, lengths = _read_rows(out / "tok", rcfg.build_chunk_rows, n, a, z)
            done = _write_shard(out, name, score_matrix(ids, lengths, idf_all, stats["avgdl"], settings["k1"],
                                                        settings["b"], settings["method"]))
            state["shards"][str(i)] = done
            _write_json(out / STATE, state)
            log.info("shard %d: rows %d..%d written", i, a, z)
        files.update(done)
        entries.append({"shard": i, "file": name, "start": a, "end": z, "count": z - a})
    manifest = _manifest(out, settings, stats, entries, files)
    _write_json(out / MANIFEST, manifest)
    state["complete"] = True
    _write_json(out / STATE, state)
    shutil.rmtree(out / "tok", ignore_errors=True)
    log.info("BM25 index written to %s: %d passages, %d shards, vocabulary %d, avgdl %.1f", out, n, shards,
             len(vocab), stats["avgdl"])
    return manifest


def _manifest(out: Path, settings: dict, stats: dict, shards: list[dict], files: dict) -> dict:
    from retriever.docstore import DOC_FILES

    files = {**{f"docs/{f}": sha256_file(out / "docs" / f) for f in DOC_FILES}, **files}
    return {"format": FORMAT, "version": FORMAT_VERSION, "kind": "bm25",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "count": stats["n"],
            "dim": stats["vocab"],  # the sparse space: one column per vocabulary word
            "factory": "bm25", "metric": "bm25", "corpus": settings["corpus"], "tokenizer": settings["tokenizer"],
            "bm25": {"k1": settings["k1"], "b": settings["b"], "method": settings["method"], "avgdl": stats["avgdl"],
                     "tokens": stats["tokens"], "idf": "global"},
            "shards": shards, "files": files}


def build_kind(rcfg, kind: str | None = None) -> str:
    """The kind `index build` makes: --kind, else retriever.kind ("auto" = dense)."""
    kind = kind or rcfg.kind
    if kind not in ("auto", "dense", "bm25"):
        raise ValueError(f"index kind {kind!r} is not one of dense, bm25")
    return "dense" if kind == "auto" else kind
