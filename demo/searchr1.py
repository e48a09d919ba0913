"""The demo's world written in Search-R1's own file formats: the files a Search-R1 user already
has on day one, so the whole pipeline can be rehearsed on them (tests/test_searchr1_pipeline.py,
docs/DEPLOY.md "Search-R1's files as they are").

    toy world ──▶ <out>/corpus.jsonl      {"id", "contents": "\"Title\"\ntext"} per line (wiki-18's shape)
              ──▶ <out>/Flat.index        a plain faiss.IndexFlatIP of the passages (e5_Flat.index's kind),
                                          built here with faiss alone: `cli.py index import` serves it
              ──▶ <out>/train.parquet     processed rows, as Search-R1's data_process scripts write them:
              ──▶ <out>/test.parquet      data_source, prompt [{"role": "user", "content": ...}], ability,
                                          reward_model {"style": "rule", "ground_truth": {"target": [...]}},
                                          extra_info {"split", "index"}

The user message is the demo's template around the question (the demo's base model was
pretrained on that shape); the data source is the fact's relation, so evaluation has per-source
EM to report.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from common.qa import read_rows
from demo.toyworld import PROMPT_TEMPLATE, WorldPaths


def processed_row(question: str, answers: list[str], data_source: str, split: str, index: int,
                  template: str = PROMPT_TEMPLATE) -> dict:
    """One row in the shape of Search-R1's processed parquet."""
    return {"data_source": data_source,
            "prompt": [{"role": "user", "content": template.format(question=question)}],
            "ability": "fact-reasoning",
            "reward_model": {"style": "rule", "ground_truth": {"target": list(answers)}},
            "extra_info": {"split": split, "index": index}}


def _source(row: dict) -> str:
    """The relation of a toy-world fact, from its passage id (e<entity>-<relation>)."""
    return str(row.get("passage_id", "")).rpartition("-")[2] or row.get("data_source") or "toyworld"


def write_flat_index(corpus: Path, out: Path, threads: int = 1) -> Path:
    """The corpus encoded with the packaged encoder (mean pooling, normalised) into a plain
    faiss.IndexFlatIP, the way a Search-R1 user's index was built: no scout index builder involved."""
    import faiss

    from retriever.encoder import Encoder

    contents = [json.loads(line)["contents"] for line in corpus.read_text().splitlines() if line.strip()]
    enc = Encoder(None, threads=threads)
    index = faiss.IndexFlatIP(enc.dim)
    index.add(enc.encode(contents, batch_size=64))
    faiss.write_index(index, str(out))
    return out


def export_searchr1(world: WorldPaths, out: str | Path, limit: int = 0) -> dict[str, Path]:
    """Write the world's corpus, a plain faiss index of it, and its train / held-out questions as
    Search-R1 files under `out`; at most `limit` questions per split (0 = all)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"corpus": out / "corpus.jsonl", "index": out / "Flat.index", "train": out / "train.parquet",
             "test": out / "test.parquet"}
    shutil.copyfile(world.corpus, paths["corpus"])  # already {"id", "contents"} with the title first
    write_flat_index(paths["corpus"], paths["index"])
    for split, qa in (("train", world.train), ("test", world.heldout)):
        rows = read_rows(qa, f"toy world {split}")[: limit or None]
        table = [processed_row(r["question"], r["golden_answers"], _source(r), split, i) for i, r in enumerate(rows)]
        pq.write_table(pa.Table.from_pylist(table), paths[split])
    return paths
