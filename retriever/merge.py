"""The router's merge: per-shard top-k -> the global top-k -> each request's answer -> passages.

    batch.parts {shard: (scores, rows)} ─merge_shards()─▶ [n, k] scores + global rows
        ─per_request()─▶ each request's slice (its queries, its topk)
        ─join_piece()──▶ the pieces of a request above max_batch, back in order as one answer
        ─passages_for()─▶ per query, Passages from the document store (ZeroMQ replies)

Pure functions of their arguments; the router loop calls them and sends the answers.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from common.protocol import Passage
from common.wire import MAX_STR
from retriever.batching import Pending
from retriever.docstore import DocStore, split_title
from retriever.index import merge_topk

MAX_TEXT = 1 << 20


def merge_shards(parts: dict, k: int) -> tuple[np.ndarray, np.ndarray]:
    """{shard: (scores [n, <=k], rows [n, <=k])} -> the global top-k over all shards."""
    order = sorted(parts)
    return merge_topk([parts[i][0] for i in order], [parts[i][1] for i in order], k)


def per_request(items: list[Pending], scores: np.ndarray,
                rows: np.ndarray) -> Iterator[tuple[Pending, np.ndarray, np.ndarray]]:
    """A batch's merged [n, k] -> (request, its rows of scores, its rows of rows), cut to its topk."""
    start = 0
    for p in items:
        end = start + len(p.queries)
        yield p, scores[start:end, :p.topk], rows[start:end, :p.topk]
        start = end


def join_piece(piece: Pending, scores: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Record a piece's answer on its whole request; once every piece is in, the whole answer
    (pieces in query order), else None."""
    w = piece.whole
    w.parts.append((piece.offset, scores, rows))
    w.left -= 1
    if w.left != 0:
        return None
    w.parts.sort(key=lambda part: part[0])
    joined = np.concatenate([s for _, s, _ in w.parts]), np.concatenate([r for _, _, r in w.parts])
    w.parts.clear()
    return joined


def passages_for(docs: DocStore, scores: np.ndarray, rows: np.ndarray) -> list[list[Passage]]:
    """[n, k] scores + rows -> per query, the passages (rows < 0 = fewer than k in the index)."""
    valid = rows >= 0
    flat = rows[valid]
    ids, contents = docs.ids(flat), docs.contents(flat)
    out: list[list[Passage]] = []
    j = 0
    for qi in range(rows.shape[0]):
        lst = []
        for ki in range(rows.shape[1]):
            if not valid[qi, ki]:
                continue
            title, text = split_title(contents[j])
            lst.append(Passage(id=ids[j][:1024], title=title[:MAX_STR], text=text[:MAX_TEXT],
                               score=float(scores[qi, ki])))
            j += 1
        out.append(lst)
    return out
