"""Corpus reading and the memory-mapped document store.

Corpus (Search-R1 format): one record per passage, `{"id": ..., "contents": "\\"Title\\"\\ntext"}`
(title on the first line, usually in double quotes), as jsonl or parquet. Records with
`title` + `text` instead of `contents` are accepted and joined the same way.

Document store (folder `docs/` of an index):

    ids.bin        UTF-8 ids, back to back          ids.off.npy       int64 [n+1] byte offsets
    contents.bin   UTF-8 contents, back to back     contents.off.npy  int64 [n+1] byte offsets

Both blobs and offset arrays are memory-mapped; a lookup slices rows out of the blob (no
Python structure per passage is ever built for the whole corpus).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

READ_BATCH = 65536
DOC_FILES = ("ids.bin", "ids.off.npy", "contents.bin", "contents.off.npy")


class CorpusError(ValueError):
    """The corpus cannot be read; the message names the file and record."""


def split_title(contents: str) -> tuple[str, str]:
    """Search-R1 contents -> (title, text): title is the first line without surrounding quotes."""
    first, _, rest = contents.partition("\n")
    title = first.strip()
    if len(title) >= 2 and title[0] == '"' and title[-1] == '"':
        title = title[1:-1]
    return title, rest


def join_title(title: str, text: str) -> str:
    return f'"{title}"\n{text}'


# --------------------------------------------------------------------------- corpus reading
def _record(obj, where: str) -> tuple[str, str]:
    if not isinstance(obj, dict):
        raise CorpusError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "id" not in obj:
        raise CorpusError(f"{where}: missing field 'id'")
    rid = obj["id"]
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise CorpusError(f"{where}: 'id' must be a string or an integer")
    if "contents" in obj:
        contents = obj["contents"]
    elif "title" in obj and "text" in obj:
        contents = join_title(str(obj["title"]), str(obj["text"]))
    else:
        raise CorpusError(f"{where}: missing field 'contents' (or 'title' + 'text')")
    if not isinstance(contents, str):
        raise CorpusError(f"{where}: 'contents' must be a string")
    return str(rid), contents


def _jsonl_batches(path: Path) -> Iterator[tuple[list[str], list[str]]]:
    ids: list[str] = []
    contents: list[str] = []
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            rid, text = _record(obj, f"{path}:{lineno}")
            ids.append(rid)
            contents.append(text)
            if len(ids) >= READ_BATCH:
                yield ids, contents
                ids, contents = [], []
    if ids:
        yield ids, contents


def _parquet_batches(path: Path) -> Iterator[tuple[list[str], list[str]]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = set(pf.schema_arrow.names)
    if "id" not in names or not ({"contents"} <= names or {"title", "text"} <= names):
        raise CorpusError(f"{path}: needs columns 'id' and 'contents' (or 'title' + 'text'), has {sorted(names)}")
    cols = ["id", "contents"] if "contents" in names else ["id", "title", "text"]
    row = 0
    for batch in pf.iter_batches(batch_size=READ_BATCH, columns=cols):
        data = batch.to_pydict()
        n = batch.num_rows
        ids, contents = [], []
        for i in range(n):
            rid, text = _record({c: data[c][i] for c in cols}, f"{path}: row {row + i}")
            ids.append(rid)
            contents.append(text)
        row += n
        yield ids, contents


def read_corpus(path: str | Path) -> Iterator[tuple[list[str], list[str]]]:
    """Yield (ids, contents) batches from a jsonl or parquet corpus."""
    p = Path(path)
    if not p.is_file():
        raise CorpusError(f"corpus {p} does not exist")
    if p.suffix == ".parquet":
        return _parquet_batches(p)
    if p.suffix in (".jsonl", ".json", ".ndjson"):
        return _jsonl_batches(p)
    raise CorpusError(f"corpus {p}: expected a .jsonl or .parquet file")


# --------------------------------------------------------------------------- writing
class _BlobWriter:
    """Appends UTF-8 strings to `<name>.bin` and collects their int64 end offsets."""

    def __init__(self, folder: Path, name: str):
        self.folder, self.name = folder, name
        self.f = (folder / f"{name}.bin.tmp").open("wb")
        self.ends: list[np.ndarray] = []
        self.pos = 0

    def add(self, strings: list[str]) -> None:
        encoded = [s.encode("utf-8", errors="surrogatepass") for s in strings]
        lengths = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded))
        self.f.write(b"".join(encoded))
        self.ends.append(self.pos + np.cumsum(lengths))
        self.pos += int(lengths.sum())

    def finish(self) -> None:
        self.f.close()
        offsets = np.concatenate([np.zeros(1, np.int64), *self.ends])
        np.save(self.folder / f"{self.name}.off.tmp.npy", offsets)
        (self.folder / f"{self.name}.bin.tmp").replace(self.folder / f"{self.name}.bin")
        (self.folder / f"{self.name}.off.tmp.npy").replace(self.folder / f"{self.name}.off.npy")


def write_docstore(corpus: str | Path, folder: str | Path, progress=None) -> int:
    """Stream the corpus into the document store; returns the passage count. Files appear
    only when complete (written as .tmp, then renamed)."""
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    ids_w, con_w = _BlobWriter(d, "ids"), _BlobWriter(d, "contents")
    n = 0
    try:
        for ids, contents in read_corpus(corpus):
            ids_w.add(ids)
            con_w.add(contents)
            n += len(ids)
            if progress is not None:
                progress(n)
    except BaseException:
        ids_w.f.close()
        con_w.f.close()
        raise
    if n == 0:
        ids_w.f.close()
        con_w.f.close()
        raise CorpusError(f"corpus {corpus} holds no passages")
    ids_w.finish()
    con_w.finish()
    return n


# --------------------------------------------------------------------------- reading
@dataclass
class Doc:
    row: int
    id: str
    contents: str

    @property
    def title(self) -> str:
        return split_title(self.contents)[0]

    @property
    def text(self) -> str:
        return split_title(self.contents)[1]


class DocStore:
    """Memory-mapped, read-only view of `docs/`."""

    def __init__(self, folder: str | Path):
        d = Path(folder)
        missing = [f for f in DOC_FILES if not (d / f).is_file()]
        if missing:
            raise FileNotFoundError(f"document store {d} is incomplete: missing {missing}")
        self.ids_off = np.load(d / "ids.off.npy", mmap_mode="r")
        self.con_off = np.load(d / "contents.off.npy", mmap_mode="r")
        self.ids_blob = self._blob(d / "ids.bin")
        self.con_blob = self._blob(d / "contents.bin")
        if len(self.ids_off) != len(self.con_off):
            raise ValueError(f"document store {d}: ids and contents disagree on the passage count")

    @staticmethod
    def _blob(path: Path) -> np.ndarray:
        if path.stat().st_size == 0:
            return np.zeros(0, dtype=np.uint8)
        return np.memmap(path, dtype=np.uint8, mode="r")

    def __len__(self) -> int:
        return len(self.ids_off) - 1

    @staticmethod
    def _slices(blob: np.ndarray, off: np.ndarray, rows: np.ndarray) -> list[str]:
        starts, ends = off[rows], off[rows + 1]
        return [blob[s:e].tobytes().decode("utf-8", errors="replace") for s, e in zip(starts.tolist(), ends.tolist())]

    def ids(self, rows: np.ndarray) -> list[str]:
        return self._slices(self.ids_blob, self.ids_off, self._check(rows))

    def contents(self, rows: np.ndarray) -> list[str]:
        return self._slices(self.con_blob, self.con_off, self._check(rows))

    def contents_range(self, start: int, end: int) -> list[str]:
        """Contiguous rows [start, end): one slice of the blob, split at the offsets."""
        off = np.asarray(self.con_off[start:end + 1])
        raw = self.con_blob[off[0]:off[-1]].tobytes()
        rel = (off - off[0]).tolist()
        return [raw[a:b].decode("utf-8", errors="replace") for a, b in zip(rel[:-1], rel[1:])]

    def get(self, rows) -> list[Doc]:
        rows = self._check(rows)
        return [Doc(int(r), i, c) for r, i, c in zip(rows.tolist(), self.ids(rows), self.contents(rows))]

    def _check(self, rows) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"row out of range 0..{len(self) - 1}")
        return rows
