"""Build a sharded FAISS index from a Search-R1 corpus, and open one.

    corpus.jsonl/.parquet ──stream──▶ docs/ (ids + contents blobs, int64 offsets, memmapped)
                                         │ rows in chunks of build_chunk_rows
                                         ▼
                      Encoder (passage prefix, pooling, L2-normalised), batches of batch_size
                                         │
                                         ▼
                      emb/<start>-<end>.npy  (one file per chunk: the resume points)
                                         │ contiguous row ranges
                                         ▼
              shard_000.faiss … shard_K-1.faiss  (index_factory, inner product; trained on a
                                                  sample when the factory needs training)
                                         │
                                         ▼
              manifest.json (encoder, dims, factory, prefixes, pooling, counts, sha256)

Resume: every artefact is written under a temporary name and renamed when complete;
`build.json` records the build settings. Run the same command again after an interruption and
it continues from the first missing chunk / shard. Different settings on an unfinished folder
are refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retriever.docstore import DOC_FILES, CorpusError, DocStore, write_docstore
from retriever.encoder import PACKAGED, Encoder, resolve_encoder_path, torch_threads_kept

log = logging.getLogger("scout.retriever.index")

FORMAT = "scout-faiss-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATE = "build.json"
# The manifest's "metric": faiss's inner product (larger is closer) or squared L2 distance
# (smaller is closer). Shards answer L2 searches with the negated distance as the score, so the
# router's merge (larger is better, `merge_topk`) is right for both.
METRICS = ("inner_product", "l2")
KINDS = ("dense", "bm25")  # the manifest's "kind" (retriever/bm25.py builds and searches "bm25")


class IndexFolderError(RuntimeError):
    """An index folder is missing, incomplete, corrupt or built with other settings."""


# --------------------------------------------------------------------------- small helpers
def sha256_file(path: Path, block: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    tmp.replace(path)


def shard_bounds(n: int, shards: int) -> list[int]:
    """Contiguous row ranges: shard i holds rows [b[i], b[i+1])."""
    if shards < 1 or shards > n:
        raise ValueError(f"cannot split {n} passages into {shards} shards")
    return [i * n // shards for i in range(shards + 1)]


def _faiss():
    import faiss

    return faiss


def make_faiss_index(dim: int, factory: str):
    faiss = _faiss()
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else "invalid"
        raise ValueError(f"faiss index_factory string {factory!r} is not valid: {first}") from None


# --------------------------------------------------------------------------- embeddings on disk
@dataclass
class Chunk:
    start: int
    end: int
    path: Path


class Embeddings:
    """The chunk files of `emb/`: rows [start, end) per file, float32 [rows, dim]."""

    def __init__(self, folder: Path, n: int, chunk_rows: int, dim: int):
        self.folder, self.n, self.dim = folder, n, dim
        self.chunks = [Chunk(s, min(n, s + chunk_rows), folder / f"{s:012d}-{min(n, s + chunk_rows):012d}.npy")
                       for s in range(0, n, chunk_rows)]

    def valid(self, c: Chunk) -> bool:
        if not c.path.is_file():
            return False
        try:
            arr = np.load(c.path, mmap_mode="r")
        except (ValueError, OSError):
            return False
        return arr.dtype == np.float32 and arr.shape == (c.end - c.start, self.dim)

    def write(self, c: Chunk, vectors: np.ndarray) -> None:
        tmp = c.path.with_name(c.path.name + ".tmp")
        with tmp.open("wb") as f:
            np.save(f, np.ascontiguousarray(vectors, dtype=np.float32))
        tmp.replace(c.path)

    def rows(self, start: int, end: int, piece: int = 65536):
        """Yield consecutive float32 blocks covering rows [start, end)."""
        for c in self.chunks:
            lo, hi = max(start, c.start), min(end, c.end)
            if lo >= hi:
                continue
            arr = np.load(c.path, mmap_mode="r")
            for a in range(lo, hi, piece):
                b = min(hi, a + piece)
                yield np.ascontiguousarray(arr[a - c.start:b - c.start], dtype=np.float32)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Gather sorted row numbers (used for the training sample)."""
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        for c in self.chunks:
            lo, hi = np.searchsorted(rows, [c.start, c.end])
            if lo < hi:
                arr = np.load(c.path, mmap_mode="r")
                out[lo:hi] = arr[rows[lo:hi] - c.start]
        return out


# --------------------------------------------------------------------------- build
def _settings(rcfg, corpus: Path, factory: str, shards: int, enc_path: Path) -> dict:
    st = corpus.stat()
    return {
        "corpus": {"path": str(corpus.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns},
        "encoder": {"path": rcfg.encoder or PACKAGED, "resolved": str(enc_path), "pooling": rcfg.pooling,
                    "normalize": rcfg.normalize, "query_prefix": rcfg.query_prefix,
                    "passage_prefix": rcfg.passage_prefix, "max_query_len": rcfg.max_query_len,
                    "max_passage_len": rcfg.max_passage_len},
        "factory": factory, "shards": shards, "chunk_rows": rcfg.build_chunk_rows,
        "train_sample": rcfg.train_sample,
    }


def _start_state(out: Path, settings: dict) -> dict:
    """Load build.json (resume) or start a new one; refuse a folder built with other settings."""
    path = out / STATE
    if path.is_file():
        state = json.loads(path.read_text())
        if state.get("settings") != settings:
            raise IndexFolderError(
                f"{out} holds a build with different settings ({path}); use a fresh --out folder or "
                f"delete it. recorded: {json.dumps(state.get('settings'), sort_keys=True)}; "
                f"asked: {json.dumps(settings, sort_keys=True)}")
        log.info("resuming the build in %s", out)
        return state
    if any(out.iterdir()):
        raise IndexFolderError(f"{out} is not empty and holds no build.json: refusing to write an index there")
    state = {"settings": settings, "docs": None, "shards": {}, "started": time.time()}
    _write_json(path, state)
    return state


def open_build(out: Path, corpus: Path, settings: dict) -> tuple[dict, dict | None]:
    """Start or resume a build in `out` (dense or BM25): (its state, the manifest when the index is
    already complete). The document store is written first, once."""
    state = _start_state(out, settings)
    if (out / MANIFEST).is_file() and state.get("complete"):
        log.info("index in %s is already complete", out)
        return state, load_manifest(out)
    if state["docs"] is None:
        log.info("writing the document store from %s", corpus)
        state["docs"] = {"count": write_docstore(corpus, out / "docs")}
        _write_json(out / STATE, state)
    return state, None


def _progress(total: int, what: str):
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    console = Console(stderr=True)
    rate = TextColumn("{task.fields[rate]}")  # passages/s over the build so far, set by the caller
    return Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), rate, TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console, disable=not console.is_terminal)


def _embed(enc: Encoder, store: DocStore, emb: Embeddings, prefix: str, batch_size: int) -> None:
    todo = [c for c in emb.chunks if not emb.valid(c)]
    done_rows = emb.n - sum(c.end - c.start for c in todo)
    if done_rows:
        log.info("embeddings: %d of %d rows already on disk, %d chunks to go", done_rows, emb.n, len(todo))
    t0, rows_done, last_log = time.time(), 0, time.time()
    with _progress(emb.n, "embedding") as bar:
        task = bar.add_task("embed", total=emb.n, completed=done_rows, rate="")

        def advance(m: int) -> None:
            nonlocal rows_done
            rows_done += m
            bar.update(task, advance=m, rate=f"{rows_done / max(1e-9, time.time() - t0):.0f} passages/s")

        for c in todo:
            texts = store.contents_range(c.start, c.end)
            vecs = enc.encode(texts, prefix=prefix, batch_size=batch_size, on_batch=advance)
            emb.write(c, vecs)
            if time.time() - last_log > 30 or c is todo[-1]:
                rate = rows_done / max(1e-9, time.time() - t0)
                log.info("embedded %d/%d rows (%.0f passages/s)", done_rows + rows_done, emb.n, rate)
                last_log = time.time()


def _build_shard(emb: Embeddings, start: int, end: int, factory: str, train_sample: int, seed: int = 0):
    index = make_faiss_index(emb.dim, factory)
    count = end - start
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(np.arange(start, end), size=min(train_sample, count), replace=False))
        sample = emb.take(rows)
        try:
            index.train(sample)
        except RuntimeError as e:
            raise IndexFolderError(f"training {factory!r} on {len(sample)} vectors failed: "
                              f"{str(e).strip().splitlines()[-1]}") from None
    fill_index(index, emb.rows(start, end), count)
    if index.ntotal != count:
        raise IndexFolderError(f"shard holds {index.ntotal} vectors, expected {count}")
    return index


def preallocated_flat(index, count: int) -> np.ndarray | None:
    """A writable float32 [count, d] view of a flat index's storage, sized once; None for other
    index types or where this faiss build does not expose the storage."""
    faiss = _faiss()
    if not isinstance(index, faiss.IndexFlat) or index.ntotal:
        return None
    try:
        index.codes.resize(count * index.code_size)
        raw = faiss.rev_swig_ptr(index.codes.data(), count * index.code_size)
    except (AttributeError, TypeError, RuntimeError):
        index.reset()
        return None
    return np.asarray(raw).view(np.float32).reshape(count, index.d)


def reserve_hnsw(index, count: int) -> bool:
    """Give an empty HNSW index's vector storage and neighbour table their final capacity before
    the first add(): each add() grows both std::vectors by doubling, which holds the old and the
    new buffer at once. The neighbour slots come from the level probabilities (twice the expected
    upper-level share, so a larger draw is rare; it then grows as before). Resizing to the
    capacity and back to 0 keeps the capacity. False where this is not an empty HNSW index."""
    faiss = _faiss()
    if not isinstance(index, faiss.IndexHNSW) or index.ntotal:
        return False
    hnsw, storage = index.hnsw, faiss.downcast_index(index.storage)
    if not isinstance(storage, faiss.IndexFlatCodes) or storage.ntotal:
        return False
    probas = faiss.vector_to_array(hnsw.assign_probas)
    upper = sum(p * (hnsw.cum_nb_neighbors(level + 1) - hnsw.nb_neighbors(0))
                for level, p in enumerate(probas))
    slots = int(count * (hnsw.nb_neighbors(0) + 2 * upper)) + 4096
    for vec, size in ((storage.codes, count * storage.code_size), (hnsw.neighbors, slots)):
        vec.resize(size)
        vec.resize(0)
    return True


def fill_index(index, blocks, count: int) -> None:
    """Add `count` rows arriving as float32 blocks. A flat index is filled in place: add() block by
    block grows a std::vector, which holds the old and the doubled buffer at once (peak up to ~2x
    the index); an HNSW index gets its capacity first (reserve_hnsw). The caller checks
    index.ntotal against what it expected."""
    view = preallocated_flat(index, count)
    if view is None:
        reserve_hnsw(index, count)
        for block in blocks:
            index.add(block)
        return
    at = 0
    for block in blocks:
        view[at:at + len(block)] = block
        at += len(block)
    index.ntotal = at


def build_index(rcfg, corpus: str | Path, out: str | Path, shards: int = 1, factory: str = "Flat",
                batch_size: int = 256, encoder: Encoder | None = None) -> dict:
    """Embed `corpus` and write a K-shard FAISS index folder at `out`; returns the manifest.
    Re-running the same command resumes an interrupted build (and is a no-op on a finished one)."""
    corpus, out = Path(corpus), Path(out)
    if not corpus.is_file():
        raise CorpusError(f"corpus {corpus} does not exist")
    out.mkdir(parents=True, exist_ok=True)
    enc_path = encoder.path if encoder is not None else resolve_encoder_path(rcfg.encoder)
    settings = _settings(rcfg, corpus, factory, shards, enc_path)
    state, done = open_build(out, corpus, settings)
    if done is not None:
        return done
    store = DocStore(out / "docs")
    n = len(store)
    bounds = shard_bounds(n, shards)
    with torch_threads_kept():  # the caller's process goes on after the build
        enc = encoder or Encoder(rcfg.encoder, pooling=rcfg.pooling, normalize=rcfg.normalize,
                                 max_len=rcfg.max_passage_len, threads=rcfg.encoder_threads)
        make_faiss_index(enc.dim, factory)  # a bad factory string fails before hours of embedding
        emb_dir = out / "emb"
        emb_dir.mkdir(exist_ok=True)
        emb = Embeddings(emb_dir, n, rcfg.build_chunk_rows, enc.dim)
        _embed(enc, store, emb, rcfg.passage_prefix, batch_size)
    shard_entries = _write_shards(out, state, emb, bounds, factory, rcfg.train_sample)
    manifest = _manifest(out, settings, enc.dim, n, shard_entries)
    _write_json(out / MANIFEST, manifest)
    state["complete"] = True
    _write_json(out / STATE, state)
    log.info("index written to %s: %d passages, %d shards, factory %s, dim %d", out, n, shards, factory, enc.dim)
    return manifest


def _write_shards(out: Path, state: dict, emb: Embeddings, bounds: list[int], factory: str,
                  train_sample: int) -> list[dict]:
    faiss = _faiss()
    entries = []
    for i in range(len(bounds) - 1):
        name = f"shard_{i:03d}.faiss"
        path = out / name
        recorded = state["shards"].get(str(i))
        if recorded and path.is_file() and sha256_file(path) == recorded:
            log.info("shard %d already written", i)
        else:
            index = _build_shard(emb, bounds[i], bounds[i + 1], factory, train_sample, seed=i)
            tmp = out / (name + ".tmp")
            faiss.write_index(index, str(tmp))
            tmp.replace(path)
            state["shards"][str(i)] = sha256_file(path)
            _write_json(out / STATE, state)
            log.info("shard %d: rows %d..%d written", i, bounds[i], bounds[i + 1])
        entries.append({"shard": i, "file": name, "start": bounds[i], "end": bounds[i + 1],
                        "count": bounds[i + 1] - bounds[i], "sha256": state["shards"][str(i)]})
    return entries


def _manifest(out: Path, settings: dict, dim: int, n: int, shards: list[dict], metric: str = "inner_product",
              source: dict | None = None) -> dict:
    docs = {f"docs/{f}": sha256_file(out / "docs" / f) for f in DOC_FILES}
    m = {"format": FORMAT, "version": FORMAT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
         "count": n, "dim": dim, "factory": settings["factory"], "metric": metric,
         "encoder": {**settings["encoder"], "dim": dim}, "corpus": settings["corpus"],
         "shards": shards, "files": docs}
    if source is not None:
        m["source"] = source  # an imported index: the file it came from, its type and search settings
    return m


# --------------------------------------------------------------------------- open
def load_manifest(index_dir: str | Path) -> dict:
    d = Path(index_dir)
    path = d / MANIFEST
    if not path.is_file():
        hint = " (an unfinished build: run `index build` again to resume)" if (d / STATE).is_file() else ""
        raise IndexFolderError(f"{path} does not exist{hint}")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise IndexFolderError(f"{path} is not valid JSON: {e}") from None
    if m.get("format") != FORMAT or m.get("version") != FORMAT_VERSION:
        raise IndexFolderError(f"{path}: not a {FORMAT} v{FORMAT_VERSION} manifest")
    shards = m.get("shards") or []
    if not shards or sum(s["count"] for s in shards) != m["count"]:
        raise IndexFolderError(f"{path}: shard counts do not add up to {m.get('count')}")
    kind = m.get("kind", "dense")  # manifests from before BM25 have no kind: dense
    if kind not in KINDS:
        raise IndexFolderError(f"{path}: index kind {kind!r} is not one of {', '.join(KINDS)}")
    if kind == "dense" and m.get("metric", "inner_product") not in METRICS:
        raise IndexFolderError(f"{path}: metric {m.get('metric')!r} is not one of {', '.join(METRICS)}")
    return m


def search_shard(index, vectors: np.ndarray, k: int, metric: str = "inner_product") -> tuple[np.ndarray, np.ndarray]:
    """One shard's (scores [n, k], local rows [n, k]) with larger = closer for every metric: an L2
    index's squared distances come back negated (its scores, over HTTP too, are -distance)."""
    scores, rows = index.search(np.ascontiguousarray(vectors, dtype=np.float32), k)
    if metric == "l2":
        scores = -scores
    return scores, rows


def verify_checksums(index_dir: str | Path, manifest: dict) -> None:
    d = Path(index_dir)
    # a BM25 shard is a folder: its arrays are listed in "files", its entry has no sha256
    files = {**manifest["files"], **{s["file"]: s["sha256"] for s in manifest["shards"] if "sha256" in s}}
    for rel, digest in files.items():
        p = d / rel
        if not p.is_file():
            raise IndexFolderError(f"{p} is missing")
        if sha256_file(p) != digest:
            raise IndexFolderError(f"{p} does not match its sha256 in the manifest (corrupt or replaced)")


def read_shard(index_dir: str | Path, entry: dict, params: str = "", gpu: str | None = None):
    """Load one shard's faiss index (onto a GPU when asked and faiss-gpu is installed; a factory
    faiss cannot clone to a GPU stays on the CPU, see `index_device`)."""
    faiss = _faiss()
    index = faiss.read_index(str(Path(index_dir) / entry["file"]))
    if index.ntotal != entry["count"]:
        raise IndexFolderError(f"{entry['file']} holds {index.ntotal} vectors, manifest says {entry['count']}")
    if gpu is not None:
        if not hasattr(faiss, "StandardGpuResources"):
            raise IndexFolderError("--gpus given but this faiss build has no GPU support (install faiss-gpu)")
        index = _to_gpu(faiss, index, int(gpu), entry["file"])
    if params:
        faiss.ParameterSpace().set_index_parameters(index, params)
    return index


def _to_gpu(faiss, index, gpu: int, name: str):
    """The index on GPU `gpu`; factories faiss cannot clone to a GPU (HNSW, some PQ variants)
    stay on the CPU with a warning instead of failing the shard (and crash-looping it)."""
    opts = faiss.GpuClonerOptions()
    opts.useFloat16 = True
    res = faiss.StandardGpuResources()
    try:
        moved = faiss.index_cpu_to_gpu(res, gpu, index, opts)
    except (RuntimeError, ValueError) as e:
        why = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        log.warning("%s (%s) cannot be moved to GPU %d (%s): this shard searches on the CPU", name,
                    type(index).__name__, gpu, why)
        return index
    moved._scout_res = res  # keep the resources alive as long as the index
    moved._scout_device = f"cuda:{gpu}"
    return moved


def index_device(index) -> str:
    """Where read_shard put this index: "cuda:<i>" or "cpu"."""
    return getattr(index, "_scout_device", "cpu")


def merge_topk(scores: list[np.ndarray], ids: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-shard [n, k_i] results -> global top-k by score (ties: lower row first). Missing
    entries (id -1) sort last with score -inf."""
    s = np.concatenate(scores, axis=1).astype(np.float32, copy=False)
    i = np.concatenate(ids, axis=1).astype(np.int64, copy=False)
    s = np.where(i < 0, -np.inf, s)
    order = np.lexsort((i, -s), axis=-1)[:, :k]
    return np.take_along_axis(s, order, axis=1), np.take_along_axis(i, order, axis=1)


class LocalIndex:
    """All shards of an index in this process: the in-process baseline and a library API."""

    def __init__(self, index_dir: str | Path, encoder: Encoder | None = None, threads: int = 0,
                 params: str = "", verify: bool = False):
        self.dir = Path(index_dir)
        self.manifest = load_manifest(self.dir)
        if self.manifest.get("kind", "dense") != "dense":
            raise IndexFolderError(f"{self.dir} is a {self.manifest['kind']} index: open it with "
                                   "retriever.bm25.LocalBm25")
        if verify:
            verify_checksums(self.dir, self.manifest)
        if threads:
            _faiss().omp_set_num_threads(threads)
        self.shards = [(e, read_shard(self.dir, e, params)) for e in self.manifest["shards"]]
        self.docs = DocStore(self.dir / "docs")
        self.encoder = encoder

    def search_vectors(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        parts_s, parts_i = [], []
        metric = self.manifest.get("metric", "inner_product")
        for entry, index in self.shards:
            s, i = search_shard(index, vectors, k, metric)
            parts_s.append(s)
            parts_i.append(np.where(i >= 0, i + entry["start"], -1))
        return merge_topk(parts_s, parts_i, k)

    def encode_queries(self, queries: list[str]) -> np.ndarray:
        e = self.manifest["encoder"]
        return self.encoder.encode(queries, prefix=e["query_prefix"], batch_size=max(1, len(queries)))


def encoder_for(manifest: dict, override_path: str | None = None, threads: int = 0, device: str = "cpu") -> Encoder:
    """The query encoder an index was built with (path overridable when the index moved)."""
    e = manifest["encoder"]
    path = override_path or (None if e["path"] == PACKAGED else e["path"])
    if override_path is None and path is not None and not Path(path).is_dir() and Path(e["resolved"]).is_dir():
        path = e["resolved"]
    enc = Encoder(path, pooling=e["pooling"], normalize=e["normalize"], max_len=e["max_query_len"],
                  threads=threads, device=device)
    if enc.dim != manifest["dim"]:
        raise IndexFolderError(f"encoder {enc.path} gives {enc.dim}-d vectors, the index holds {manifest['dim']}-d")
    return enc

