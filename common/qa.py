"""Search-R1 QA files (jsonl or parquet rows with `question`, `golden_answers`, `data_source`)."""

from __future__ import annotations

import json
from pathlib import Path

from common.config import ConfigError


def read_rows(path: str | Path, what: str) -> list[dict]:
    """All rows of a jsonl or parquet file; errors name `what` (the config key or role) and the line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {p} does not exist")
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(p).to_pylist()
    rows = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{what} {p} line {i}: {e}") from None
    return rows
