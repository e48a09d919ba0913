"""Search-R1 QA files (jsonl or parquet rows with `question`, `golden_answers`, `data_source`).

    file ─ read_rows ─▶ raw rows ─ read_qa ─▶ {question, golden_answers (non-empty list), data_source}
                                     │ missing / empty question or golden_answers → ConfigError naming
                                     ▼ the file and the row (jsonl: and the line)
            learner/ingest.py:load_qa (training prompts), actors/evaluate.py:load_questions (eval)
"""

from __future__ import annotations

import json
from pathlib import Path

from common.config import ConfigError
from common.wire import MAX_STR
from common.protocol import MAX_ANSWERS


def _read(path: str | Path, what: str) -> tuple[list[dict], list[int] | None]:
    """Rows of a jsonl or parquet file, and for jsonl each row's 1-based line number."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {p} does not exist")
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(p).to_pylist(), None
    rows, lines = [], []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{what} {p} line {i}: {e}") from None
            lines.append(i)
    return rows, lines


def read_rows(path: str | Path, what: str) -> list[dict]:
    """All rows of a jsonl or parquet file; errors name `what` (the config key or role) and the line."""
    return _read(path, what)[0]


def _answers(value, where: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if hasattr(value, "tolist"):  # a numpy array
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: golden_answers must be a string or a list of strings")
    if not value:
        raise ConfigError(f"{where}: golden_answers is empty (the row could never be answered right)")
    return [v[:MAX_STR] for v in value[:MAX_ANSWERS]]


def read_qa(path: str | Path, what: str, limit: int = 0) -> list[dict]:
    """QA rows as {question, golden_answers, data_source}; at most `limit` rows (0 = all).

    A row without a non-empty `question`, or without `golden_answers` (a string or a non-empty list
    of strings), is a ConfigError naming `what`, the file and the row (0-based, as prompt ids count;
    jsonl rows also give their line): such a row would otherwise score 0 every time.
    """
    p = Path(path)
    rows, lines = _read(path, what)
    out = []
    for i, row in enumerate(rows[: limit or None]):
        where = f"{what} {p} row {i}" + (f" (line {lines[i]})" if lines is not None else "")
        if not isinstance(row, dict):
            raise ConfigError(f"{where}: expected an object with `question` and `golden_answers`")
        q = row.get("question")
        if not isinstance(q, str) or not q.strip():
            raise ConfigError(f"{where}: needs a non-empty `question`")
        if row.get("golden_answers") is None:
            raise ConfigError(f"{where}: needs `golden_answers` (a string or a non-empty list of strings)")
        out.append({"question": q[:MAX_STR], "golden_answers": _answers(row["golden_answers"], where),
                    "data_source": str(row.get("data_source") or "")[:256]})
    if not out:
        raise ConfigError(f"{what} {p} holds no rows")
    return out
