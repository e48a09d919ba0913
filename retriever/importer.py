"""Import a prebuilt FAISS index (Search-R1's e5_Flat.index, or an IVF / HNSW index) into scout's
index folder format without re-encoding a single passage.

    FILE.index ──faiss.read_index (mmap: flat codes, inverted lists)──▶ a supported type?
        │  metric from the file (index.metric_type); --metric ip|l2 must agree with it
        │  dim == the encoder's hidden_size? (its config.json)
    corpus.jsonl ──write_docstore──▶ <out>.tmp-import/docs/        rows == index.ntotal?
        │ contiguous row ranges (shard_bounds), one shard built and written at a time
        ▼
    Flat  (IndexFlatIP / IndexFlatL2): reconstruct_n in chunks of chunk_rows rows
    IVF   (IndexIVFFlat / IVFPQ / IVFScalarQuantizer, bare, in an IndexIDMap, behind an
           IndexPreTransform): an empty copy of the trained index per shard, filled list by list
           with the codes whose id is in the shard's range (no decoding; nprobe kept from the file
           or --nprobe); see `import_split`
    HNSW  (IndexHNSWFlat): --shards 1 keeps the graph as it is; N > 1 rebuilds one graph per
           shard from the index's own vectors with its M / efConstruction / efSearch (why: see
           `import_split`)
        ▼
    <out>.tmp-import/shard_000.faiss … shard_K-1.faiss   (the same index type as the source)
        │
        ▼
    manifest.json (index.py's `_manifest`: encoder, pooling, normalisation, prefixes, dim, metric,
                   factory-like name, counts, sha256, "source": file, type, nlist/nprobe or HNSW M)
        │ rename, only when complete
        ▼
    <out>   served by `cli.py retriever --index <out>` as it is

Memory: one shard at a time, plus one chunk (Flat) or one inverted list (IVF); the source is
memory-mapped. Scores: an L2 index's shards answer with -distance (`index.search_shard`), so the
router's larger-is-better merge holds for both metrics.

Encoder conventions: `--encoder-preset e5|bge|minilm` (`presets.PRESETS`) sets the prefixes,
pooling and normalisation; --pooling / --query-prefix / --passage-prefix override it. They land
in the manifest, which the service's query encoder follows; a prefix that does not fit an e5 or
bge encoder is warned about here and at every retriever start.

Nothing half-written is ever served: everything is written under `<out>.tmp-import`, which a
failed import removes and an interrupted one leaves for the next run to remove. Binary, LSH,
IVF fast-scan, HNSW over PQ/SQ and other types are refused naming the type found and the
supported ones.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np

from retriever.docstore import CorpusError, write_docstore
from retriever.encoder import Encoder, resolve_encoder_path, torch_threads_kept
from retriever.import_split import (FaissImportError, check_ivf_ids, describe_ivf, hnsw_params, hnsw_shard,
                                    ivf_shard, unwrap_ivf)
from retriever.index import (MANIFEST, _faiss, _manifest, _settings, _write_json, fill_index, sha256_file,
                             shard_bounds)
from retriever.presets import warn_conventions, with_preset

log = logging.getLogger("scout.retriever.importer")

SUPPORTED = ("supported: IndexFlatIP and IndexFlatL2; IndexIVFFlat, IndexIVFPQ and IndexIVFScalarQuantizer "
             "(bare, in an IndexIDMap/IndexIDMap2 or behind an IndexPreTransform); IndexHNSWFlat")
METRIC_FLAGS = {"ip": "inner_product", "l2": "l2"}


# --------------------------------------------------------------------------- checks
def _reason(e: Exception) -> str:
    """faiss's C++ message without the source location: 'Index type 0x.. not recognized'."""
    text = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    if "Error: " in text:
        return text.rsplit("Error: ", 1)[1]
    m = re.search(r"\.(?:cpp|h):\d+: (.*)$", text)
    return m.group(1) if m else text


def _binary_type(p: Path) -> str | None:
    """The class name when `p` is a binary faiss index (which read_index cannot read)."""
    try:
        return type(_faiss().read_index_binary(str(p))).__name__
    except RuntimeError:
        return None


def read_index(path: str | Path):
    """The index in `path`, memory-mapped where faiss can (flat codes, inverted lists)."""
    p = Path(path)
    if not p.is_file():
        raise FaissImportError(f"faiss index {p} does not exist (expected a file written by faiss.write_index)")
    faiss = _faiss()
    # MMAP_IFC maps flat codes (Flat, HNSW storage) but makes faiss refuse to map IVF lists
    # ("mmap only supported for File objects"): IVF files are then read with MMAP alone.
    ro = faiss.IO_FLAG_READ_ONLY
    for flags in (faiss.IO_FLAG_MMAP | faiss.IO_FLAG_MMAP_IFC | ro, faiss.IO_FLAG_MMAP | ro):
        try:
            index = faiss.read_index(str(p), flags)
            break
        except RuntimeError:
            continue
    else:
        try:
            index = faiss.read_index(str(p))
        except RuntimeError as e:
            binary = _binary_type(p)
            if binary:
                raise FaissImportError(f"{p} is a binary index ({binary}): scout searches float vectors; "
                                       f"{SUPPORTED}") from None
            raise FaissImportError(f"cannot read {p} as a faiss index ({_reason(e)}): expected a file written by "
                                   f"faiss.write_index, such as Search-R1's e5_Flat.index") from None
    if index.ntotal == 0:
        raise FaissImportError(f"{p} holds no vectors: expected one vector per corpus passage")
    return index


def _type_name(index) -> str:
    """"IndexIDMap(IndexFlatIP)" for wrappers, else the class name."""
    faiss = _faiss()
    inner = getattr(index, "index", None)
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexPreTransform)) and inner is not None:
        return f"{type(index).__name__}({_type_name(faiss.downcast_index(inner))})"
    return type(index).__name__


def classify(index, path: Path) -> tuple[str, str]:
    """("flat" | "ivf" | "hnsw", "inner_product" | "l2") of a supported index; else a clear error."""
    faiss = _faiss()
    metric = {faiss.METRIC_INNER_PRODUCT: "inner_product", faiss.METRIC_L2: "l2"}.get(index.metric_type)
    if isinstance(index, faiss.IndexFlat):
        kind = "flat"
    elif type(index) is faiss.IndexHNSWFlat:
        kind = "hnsw"
    elif unwrap_ivf(index) is not None:
        kind = "ivf"
    else:
        raise FaissImportError(f"{path} is a {_type_name(index)}, which cannot be imported: {SUPPORTED}")
    if metric is None:
        raise FaissImportError(f"{path} is a {_type_name(index)} with faiss metric type {index.metric_type}: "
                               f"expected inner product or L2")
    return kind, metric


def check_metric(found: str, asked: str | None, path: Path) -> None:
    """--metric ip|l2 must agree with the metric faiss recorded in the file."""
    if asked is None:
        return
    want = METRIC_FLAGS.get(asked)
    if want is None:
        raise ValueError(f"--metric must be one of {', '.join(METRIC_FLAGS)}, got {asked!r}")
    if want != found:
        flag = {v: k for k, v in METRIC_FLAGS.items()}[found]
        raise FaissImportError(f"--metric {asked} contradicts {path}, which faiss records as {found} "
                               f"(--metric {flag}); the metric is read from the index: drop the flag or fix it")


def encoder_dim(path: str | None) -> tuple[Path, int]:
    """(resolved folder, output dimension) of an encoder, from its config without loading weights
    (the weights are loaded only when the config does not say)."""
    enc_path = resolve_encoder_path(path)
    try:
        dim = json.loads((enc_path / "config.json").read_text()).get("hidden_size")
    except (OSError, ValueError, AttributeError):
        dim = None
    if not isinstance(dim, int) or dim <= 0:
        with torch_threads_kept():
            dim = Encoder(path, threads=1).dim
    return enc_path, dim


def _prepare_out(out: Path) -> Path:
    """Refuse an `out` that holds anything; remove a stale `<out>.tmp-import`; return the latter."""
    if (out / MANIFEST).is_file():
        raise FaissImportError(f"{out} already holds an index ({MANIFEST}): expected a missing or empty folder; "
                               f"choose another --out or delete it")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FaissImportError(f"{out} exists and is not empty: expected a missing or empty folder for the import")
    tmp = out.with_name(out.name + ".tmp-import")
    if tmp.exists():
        log.info("removing %s left by an interrupted import", tmp)
        shutil.rmtree(tmp)
    return tmp


# --------------------------------------------------------------------------- shards
def flat_file_rows(src, path: Path):
    """read(a, b) -> rows [a, b) of the flat index file `path` by plain file reads, or None.
    `src` is memory-mapped: rows taken through the map stay resident, and count in this process's
    RSS, until the import ends (all of the source by the last shard: ~4x a shard of 4); a read
    goes through the page cache only. Used where the file ends with the rows (faiss's layout for
    a flat index), checked on the first and the last row."""
    if not isinstance(src, _faiss().IndexFlat) or src.code_size != 4 * src.d:
        return None
    n, row = src.ntotal, 4 * src.d
    offset = path.stat().st_size - n * row

    def read(a: int, b: int) -> np.ndarray:
        out = np.empty((b - a, src.d), dtype=np.float32)
        with path.open("rb") as f:
            f.seek(offset + a * row)
            if f.readinto(memoryview(out).cast("B")) != out.nbytes:
                raise FaissImportError(f"{path} ended before row {b} (truncated while importing?)")
        return out

    ends_with_rows = offset > 0 and all(np.array_equal(read(i, i + 1), src.reconstruct_n(i, 1)) for i in (0, n - 1))
    return read if ends_with_rows else None


def copy_rows(src, start: int, end: int, chunk_rows: int, read=None):
    """Rows [start, end) of a flat index as a new flat index of its metric, read chunk_rows rows
    at a time (with `read` from flat_file_rows when given)."""
    faiss = _faiss()
    count = end - start
    dst = faiss.IndexFlat(src.d, src.metric_type)
    read = read or (lambda a, b: src.reconstruct_n(a, b - a))
    fill_index(dst, (read(a, min(end, a + chunk_rows)) for a in range(start, end, chunk_rows)), count)
    if dst.ntotal != count:
        raise FaissImportError(f"shard holds {dst.ntotal} vectors, expected {count}")
    return dst


def _shard_maker(index, kind: str, path: Path, shards: int, chunk_rows: int, nprobe: int | None):
    """(make(start, end) -> one shard's faiss index, the manifest's factory name, its "source")."""
    source: dict = {"file": str(path.resolve()), "type": _type_name(index)}
    if kind == "flat":
        read = flat_file_rows(index, path)
        return (lambda a, b: copy_rows(index, a, b, chunk_rows, read)), "Flat", source
    if kind == "hnsw":
        params = hnsw_params(index)
        source.update(hnsw=params, rebuilt=shards > 1)
        if shards > 1:
            log.info("HNSW: each of the %d shards gets its own graph, rebuilt from the index's vectors", shards)
        return (lambda a, b: hnsw_shard(index, a, b, chunk_rows, whole=shards == 1)), f"HNSW{params['M']},Flat", source
    idmap, outer, ivf = unwrap_ivf(index)
    if nprobe is not None and not 1 <= nprobe <= ivf.nlist:
        raise ValueError(f"--nprobe must be in 1..{ivf.nlist} (the index's nlist), got {nprobe}")
    log.info("checking the ids of %d inverted lists", ivf.nlist)
    check_ivf_ids(ivf, idmap, index.ntotal, path)
    source.update(nlist=int(ivf.nlist), nprobe=int(nprobe or ivf.nprobe), nprobe_in_file=int(ivf.nprobe))
    return (lambda a, b: ivf_shard(outer, ivf, idmap, a, b, nprobe)), describe_ivf(ivf, outer), source


def _write_shards(make, folder: Path, bounds: list[int]) -> list[dict]:
    faiss = _faiss()
    entries = []
    for i in range(len(bounds) - 1):
        name = f"shard_{i:03d}.faiss"
        shard = make(bounds[i], bounds[i + 1])
        faiss.write_index(shard, str(folder / name))
        del shard
        entries.append({"shard": i, "file": name, "start": bounds[i], "end": bounds[i + 1],
                        "count": bounds[i + 1] - bounds[i], "sha256": sha256_file(folder / name)})
        log.info("shard %d: rows %d..%d written", i, bounds[i], bounds[i + 1])
    return entries


# --------------------------------------------------------------------------- import
def _open_checked(faiss_path: Path, metric: str | None, encoder: str | None):
    """(index, kind, metric name, encoder folder, dim) after every check that needs no output."""
    index = read_index(faiss_path)
    kind, found = classify(index, faiss_path)
    check_metric(found, metric, faiss_path)
    enc_path, dim = encoder_dim(encoder)
    if index.d != dim:
        raise FaissImportError(f"{faiss_path} holds {index.d}-d vectors but the encoder {enc_path} gives {dim}-d "
                               f"vectors: expected the encoder the index was built with (--encoder)")
    return index, kind, found, enc_path, dim


def import_faiss(rcfg, faiss_path: str | Path, corpus: str | Path, out: str | Path, shards: int = 1,
                 encoder: str | None = None, pooling: str | None = None, query_prefix: str | None = None,
                 passage_prefix: str | None = None, chunk_rows: int | None = None, metric: str | None = None,
                 preset: str | None = None, nprobe: int | None = None) -> dict:
    """Write scout's index folder `out` from a faiss index file and the corpus it was encoded from
    (one corpus row per index row, same order); returns the manifest."""
    faiss_path, corpus, out = Path(faiss_path), Path(corpus), Path(out).expanduser().resolve()
    rc = with_preset(rcfg, preset, encoder, pooling, query_prefix, passage_prefix)
    tmp = _prepare_out(out)
    if not corpus.is_file():
        raise CorpusError(f"corpus {corpus} does not exist")
    index, kind, found, enc_path, dim = _open_checked(faiss_path, metric, rc.encoder)
    bounds = shard_bounds(index.ntotal, shards)
    make, factory, source = _shard_maker(index, kind, faiss_path, shards, chunk_rows or rc.build_chunk_rows, nprobe)
    try:
        tmp.mkdir(parents=True)
        log.info("writing the document store from %s", corpus)
        n = write_docstore(corpus, tmp / "docs")
        if n != index.ntotal:
            raise FaissImportError(f"corpus {corpus} holds {n} passages but {faiss_path} holds {index.ntotal} "
                                   f"vectors: expected one corpus passage per index row, in the same order")
        entries = _write_shards(make, tmp, bounds)
        manifest = _manifest(tmp, _settings(rc, corpus, factory, shards, enc_path), dim, n, entries, metric=found,
                             source=source)
        _write_json(tmp / MANIFEST, manifest)
        if out.is_dir():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    warn_conventions(manifest["encoder"])
    log.info("imported %s (%s, %s) into %s: %d passages, %d shards, dim %d", faiss_path, source["type"], found, out,
             n, shards, dim)
    return manifest
