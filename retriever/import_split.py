"""Splitting an IVF or HNSW faiss index into scout's contiguous row-range shards, for `importer`.

IVF (IndexIVFFlat, IndexIVFPQ, IndexIVFScalarQuantizer; bare, inside an IndexIDMap/IndexIDMap2,
or behind an IndexPreTransform): shard i is a copy of the trained index (same coarse quantizer,
same PQ / SQ codebooks, same pre-transform, same nprobe) that holds the vectors whose id lies in
[start_i, end_i), stored under the local id (id - start_i). The codes move list by list
(list_size / get_ids / get_codes -> add_entries): nothing is decoded or re-encoded, so a shard
answers exactly as the source does for its rows, and the merged top-k equals the source's. The
source's inverted lists are memory-mapped (IO_FLAG_MMAP) and read once per shard, so the memory
held is one shard plus one list (and a bitmap of n bytes while the ids are checked). The ids must
be the corpus rows 0..ntotal-1, each once (an IndexIDMap's ids are translated first).

HNSW (IndexHNSWFlat): a graph cannot be cut into pieces that stay navigable, so with N > 1 each
shard's graph is rebuilt from the source's own vectors (reconstructed in chunks from its flat
storage: no re-encoding) with the source's M, efConstruction and efSearch. That costs graph
construction time (minutes per million vectors) but keeps N shards searching in parallel and
fits the shard layout everything else uses; serving one unsplit shard would instead leave N-1
shard processes idle and the whole graph in one process. With --shards 1 the source graph is
written as it is, nothing rebuilt.
"""

from __future__ import annotations

import logging

import numpy as np

from retriever.index import IndexFolderError, _faiss

log = logging.getLogger("scout.retriever.import_split")


class FaissImportError(IndexFolderError):
    """The index file, the corpus or the encoder does not fit an import; the message says what
    was found and what was expected."""


def _ivf_types():
    faiss = _faiss()
    return (faiss.IndexIVFFlat, faiss.IndexIVFPQ, faiss.IndexIVFScalarQuantizer)


def unwrap_ivf(index):
    """(id map view or None, the index each shard copies: the IVF or its IndexPreTransform, the
    IVF) for a supported IVF layout, else None."""
    faiss = _faiss()
    idmap = None
    if isinstance(index, faiss.IndexIDMap):
        idmap = faiss.rev_swig_ptr(index.id_map.data(), index.id_map.size()) if index.ntotal else np.empty(0)
        index = faiss.downcast_index(index.index)
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexPreTransform) else index
    if type(inner) in _ivf_types():
        return idmap, index, inner
    return None


def describe_ivf(ivf, outer) -> str:
    """An index_factory-like name of the layout: "PCA->IVF1024,PQ16x8"."""
    faiss = _faiss()
    if isinstance(ivf, faiss.IndexIVFPQ):
        codes = f"PQ{ivf.pq.M}x{ivf.pq.nbits}"
    elif isinstance(ivf, faiss.IndexIVFScalarQuantizer):
        codes = f"SQ({ivf.code_size}B)"
    else:
        codes = "Flat"
    pre = "PreTransform->" if outer is not ivf else ""
    return f"{pre}IVF{ivf.nlist},{codes}"


# --------------------------------------------------------------------------- inverted lists
def _list_ids(invlists, lst: int, size: int) -> np.ndarray:
    faiss = _faiss()
    ptr = invlists.get_ids(lst)
    try:
        return faiss.rev_swig_ptr(ptr, size).copy()
    finally:
        invlists.release_ids(lst, ptr)


def _list_codes(invlists, lst: int, size: int, code_size: int, keep: np.ndarray) -> np.ndarray:
    """The codes of the kept entries of one list (a copy of those rows only)."""
    faiss = _faiss()
    ptr = invlists.get_codes(lst)
    try:
        return np.ascontiguousarray(faiss.rev_swig_ptr(ptr, size * code_size).reshape(size, code_size)[keep])
    finally:
        invlists.release_codes(lst, ptr)


def _global_ids(invlists, lst: int, idmap) -> np.ndarray:
    ids = _list_ids(invlists, lst, invlists.list_size(lst))
    return np.asarray(idmap)[ids] if idmap is not None else ids


def check_ivf_ids(ivf, idmap, n: int, path) -> None:
    """Every stored id is a corpus row in [0, n), each exactly once."""
    seen = np.zeros(n, dtype=bool)
    total = 0
    for lst in range(ivf.nlist):
        ids = _global_ids(ivf.invlists, lst, idmap)
        if not len(ids):
            continue
        total += len(ids)
        if ids.min() < 0 or ids.max() >= n:
            bad = ids[(ids < 0) | (ids >= n)][0]
            raise FaissImportError(f"{path} stores the id {bad} in inverted list {lst}: expected ids 0..{n - 1}, "
                                   f"the corpus rows (an index added with add(), or add_with_ids of the row numbers)")
        if seen[ids].any() or len(np.unique(ids)) != len(ids):
            raise FaissImportError(f"{path} stores an id twice (in inverted list {lst}): expected each corpus row once")
        seen[ids] = True
    if total != n:
        raise FaissImportError(f"{path}: its inverted lists hold {total} entries but ntotal is {n}")


def _empty_copy(outer, ivf):
    """A trained, empty copy of `outer` (quantizer, codebooks, transforms, nprobe). The source's
    lists are swapped out for an empty set while faiss clones: faiss cannot clone memory-mapped
    (OnDisk) lists, and cloning in-memory ones would copy the whole index once per shard."""
    faiss = _faiss()
    empty = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    orig, own = ivf.invlists, ivf.own_invlists
    ivf.own_invlists = False  # replace_invlists would otherwise free the source's lists
    ivf.replace_invlists(empty, False)
    try:
        copy = faiss.clone_index(outer)
    finally:
        ivf.replace_invlists(orig, own)
    copy.reset()
    return copy


def ivf_shard(outer, ivf, idmap, start: int, end: int, nprobe: int | None = None):
    """The shard of rows [start, end): an empty copy filled list by list with the codes of those
    rows under local ids."""
    faiss = _faiss()
    shard = _empty_copy(outer, ivf)
    sivf = faiss.extract_index_ivf(shard)
    sivf.set_direct_map_type(faiss.DirectMap.NoMap)  # not needed to search; add_entries keeps none
    if nprobe is not None:
        sivf.nprobe = nprobe
    for lst in range(ivf.nlist):
        ids = _global_ids(ivf.invlists, lst, idmap)
        keep = (ids >= start) & (ids < end)
        count = int(keep.sum())
        if count:
            local = np.ascontiguousarray(ids[keep] - start, dtype=np.int64)
            codes = _list_codes(ivf.invlists, lst, len(ids), ivf.code_size, keep)
            sivf.invlists.add_entries(lst, count, faiss.swig_ptr(local), faiss.swig_ptr(codes))
            sivf.ntotal += count
    shard.ntotal = sivf.ntotal
    if shard.ntotal != end - start:
        raise FaissImportError(f"shard of rows {start}..{end} holds {shard.ntotal} vectors, expected {end - start}")
    return shard


# --------------------------------------------------------------------------- HNSW
def hnsw_params(src) -> dict:
    return {"M": int(src.hnsw.nb_neighbors(1)), "efConstruction": int(src.hnsw.efConstruction),
            "efSearch": int(src.hnsw.efSearch)}


def hnsw_shard(src, start: int, end: int, chunk_rows: int, whole: bool):
    """Rows [start, end) as an IndexHNSWFlat: the source itself when it is the only shard, else a
    graph built with the source's parameters over its vectors, read chunk_rows at a time."""
    if whole:
        return src
    faiss = _faiss()
    p = hnsw_params(src)
    storage = faiss.downcast_index(src.storage)
    dst = faiss.IndexHNSWFlat(src.d, p["M"], src.metric_type)
    dst.hnsw.efConstruction, dst.hnsw.efSearch = p["efConstruction"], p["efSearch"]
    for a in range(start, end, chunk_rows):
        dst.add(storage.reconstruct_n(a, min(end, a + chunk_rows) - a))
    log.info("HNSW graph of rows %d..%d rebuilt (M %d, efConstruction %d)", start, end, p["M"], p["efConstruction"])
    return dst
