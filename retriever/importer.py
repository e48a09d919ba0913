"""Import a prebuilt FAISS index (Search-R1's e5_Flat.index) into scout's index folder format
without re-encoding a single passage.

    FILE.index ──faiss.read_index (mmap)──▶ IndexFlat with inner product?  (else: a clear error)
        │                                  dim == the encoder's hidden_size? (its config.json)
    corpus.jsonl ──write_docstore──▶ <out>.tmp-import/docs/        rows == index.ntotal?
        │ contiguous row ranges (shard_bounds)
        ▼ reconstruct_n in chunks of chunk_rows rows (peak memory ≈ one shard + one chunk)
    <out>.tmp-import/shard_000.faiss … shard_K-1.faiss   (IndexFlatIP each)
        │
        ▼
    manifest.json (index.py's `_manifest`: encoder, pooling, prefixes, dim, "Flat", counts, sha256)
        │ rename, only when complete
        ▼
    <out>   served by `cli.py retriever --index <out>` as it is

Nothing half-written is ever served: everything is written under `<out>.tmp-import`, which a
failed import removes and an interrupted one leaves for the next run to remove.
Only Flat inner-product indexes are supported so far (IVF, HNSW, PQ: issue 19).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np

from retriever.docstore import CorpusError, write_docstore
from retriever.encoder import Encoder, resolve_encoder_path
from retriever.index import (MANIFEST, IndexFolderError, _faiss, _manifest, _settings, _write_json, sha256_file,
                             shard_bounds)

log = logging.getLogger("scout.retriever.importer")

SUPPORTED = "only Flat inner-product indexes (IndexFlatIP) can be imported so far (others: issue 19)"


class FaissImportError(IndexFolderError):
    """The index file, the corpus or the encoder does not fit an import; the message says what
    was found and what was expected."""


# --------------------------------------------------------------------------- checks
def _reason(e: Exception) -> str:
    """faiss's C++ message without the source location: 'Index type 0x.. not recognized'."""
    text = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    if "Error: " in text:
        return text.rsplit("Error: ", 1)[1]
    m = re.search(r"\.(?:cpp|h):\d+: (.*)$", text)
    return m.group(1) if m else text


def read_flat_ip(path: str | Path):
    """The index in `path`, memory-mapped where faiss can (flat codes), checked to be Flat IP."""
    p = Path(path)
    if not p.is_file():
        raise FaissImportError(f"faiss index {p} does not exist (expected a file written by faiss.write_index)")
    faiss = _faiss()
    flags = getattr(faiss, "IO_FLAG_MMAP_IFC", 0) | getattr(faiss, "IO_FLAG_READ_ONLY", 0)
    try:
        index = faiss.read_index(str(p), flags)
    except RuntimeError:
        try:
            index = faiss.read_index(str(p))
        except RuntimeError as e:
            raise FaissImportError(f"cannot read {p} as a faiss index ({_reason(e)}): expected a file written by "
                                   f"faiss.write_index, such as Search-R1's e5_Flat.index") from None
    metric = {faiss.METRIC_INNER_PRODUCT: "inner-product", faiss.METRIC_L2: "L2"}.get(
        index.metric_type, f"metric-{index.metric_type}")
    if not isinstance(index, faiss.IndexFlat) or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise FaissImportError(f"{p} is a {type(index).__name__} with the {metric} metric: {SUPPORTED}")
    if index.ntotal == 0:
        raise FaissImportError(f"{p} holds no vectors: expected one vector per corpus passage")
    return index


def encoder_dim(path: str | None) -> tuple[Path, int]:
    """(resolved folder, output dimension) of an encoder, from its config without loading weights
    (the weights are loaded only when the config does not say)."""
    enc_path = resolve_encoder_path(path)
    try:
        dim = json.loads((enc_path / "config.json").read_text()).get("hidden_size")
    except (OSError, ValueError, AttributeError):
        dim = None
    if not isinstance(dim, int) or dim <= 0:
        dim = Encoder(path, threads=1).dim
    return enc_path, dim


def _settings_for(rcfg, encoder, pooling, query_prefix, passage_prefix):
    """rcfg with the command's overrides (None = keep the config's value)."""
    if pooling is not None and pooling not in ("mean", "cls"):
        raise ValueError(f"--pooling must be 'mean' or 'cls', got {pooling!r}")
    enc = str(Path(encoder).expanduser().resolve()) if encoder else None
    upd = {"encoder": enc, "pooling": pooling, "query_prefix": query_prefix, "passage_prefix": passage_prefix}
    return rcfg.model_copy(update={k: v for k, v in upd.items() if v is not None})


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
def _preallocated(dst, count: int) -> np.ndarray | None:
    """A writable float32 [count, d] view of dst's storage sized once (no growth while adding),
    or None where this faiss build does not expose its storage."""
    faiss = _faiss()
    try:
        dst.codes.resize(count * dst.code_size)
        raw = faiss.rev_swig_ptr(dst.codes.data(), count * dst.code_size)
    except (AttributeError, TypeError, RuntimeError):
        dst.reset()
        return None
    return np.asarray(raw).view(np.float32).reshape(count, dst.d)


def copy_rows(src, start: int, end: int, chunk_rows: int):
    """Rows [start, end) of a flat index as a new IndexFlatIP, read chunk_rows rows at a time."""
    faiss = _faiss()
    count = end - start
    dst = faiss.IndexFlatIP(src.d)
    view = _preallocated(dst, count)
    for a in range(start, end, chunk_rows):
        block = src.reconstruct_n(a, min(end, a + chunk_rows) - a)
        if view is None:
            dst.add(block)
        else:
            view[a - start:a - start + len(block)] = block
    if view is not None:
        dst.ntotal = count
    if dst.ntotal != count:
        raise FaissImportError(f"shard holds {dst.ntotal} vectors, expected {count}")
    return dst


def _write_shards(src, folder: Path, bounds: list[int], chunk_rows: int) -> list[dict]:
    faiss = _faiss()
    entries = []
    for i in range(len(bounds) - 1):
        name = f"shard_{i:03d}.faiss"
        shard = copy_rows(src, bounds[i], bounds[i + 1], chunk_rows)
        faiss.write_index(shard, str(folder / name))
        del shard
        entries.append({"shard": i, "file": name, "start": bounds[i], "end": bounds[i + 1],
                        "count": bounds[i + 1] - bounds[i], "sha256": sha256_file(folder / name)})
        log.info("shard %d: rows %d..%d written", i, bounds[i], bounds[i + 1])
    return entries


# --------------------------------------------------------------------------- import
def import_faiss(rcfg, faiss_path: str | Path, corpus: str | Path, out: str | Path, shards: int = 1,
                 encoder: str | None = None, pooling: str | None = None, query_prefix: str | None = None,
                 passage_prefix: str | None = None, chunk_rows: int | None = None) -> dict:
    """Write scout's index folder `out` from a Flat inner-product faiss file and the corpus it was
    encoded from (one corpus row per index row, same order); returns the manifest."""
    faiss_path, corpus, out = Path(faiss_path), Path(corpus), Path(out).expanduser().resolve()
    rc = _settings_for(rcfg, encoder, pooling, query_prefix, passage_prefix)
    tmp = _prepare_out(out)
    if not corpus.is_file():
        raise CorpusError(f"corpus {corpus} does not exist")
    index = read_flat_ip(faiss_path)
    enc_path, dim = encoder_dim(rc.encoder)
    if index.d != dim:
        raise FaissImportError(f"{faiss_path} holds {index.d}-d vectors but the encoder {enc_path} gives {dim}-d "
                               f"vectors: expected the encoder the index was built with (--encoder)")
    bounds = shard_bounds(index.ntotal, shards)
    try:
        tmp.mkdir(parents=True)
        log.info("writing the document store from %s", corpus)
        n = write_docstore(corpus, tmp / "docs")
        if n != index.ntotal:
            raise FaissImportError(f"corpus {corpus} holds {n} passages but {faiss_path} holds {index.ntotal} "
                                   f"vectors: expected one corpus passage per index row, in the same order")
        entries = _write_shards(index, tmp, bounds, chunk_rows or rc.build_chunk_rows)
        manifest = _manifest(tmp, _settings(rc, corpus, "Flat", shards, enc_path), dim, n, entries)
        _write_json(tmp / MANIFEST, manifest)
        if out.is_dir():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("imported %s into %s: %d passages, %d shards, dim %d", faiss_path, out, n, shards, dim)
    return manifest
