"""QA files, jsonl or parquet, in either of Search-R1's two shapes, told apart by their columns:

    raw (FlashRAG)      question, golden_answers, data_source
    processed           data_source, prompt [{"role": "user", "content": instruction + "Question: ..."}],
    (nq_search.py)      ability, reward_model {"ground_truth": {"target": [answers]}}, extra_info {"index"}

    file ─ read_rows ─▶ rows ─ read_qa ─▶ {prompt_id, question, golden_answers, data_source, text}
                                  │ text: the processed row's user message, used verbatim as the prompt
                                  │ (empty for raw rows: the actor wraps `question` in its instruction)
                                  │ a row of neither shape, or without a question or answers → ConfigError
                                  ▼ naming the file, the row (jsonl: and the line) and the columns found
            learner/ingest.py:load_qa (training prompts), actors/evaluate.py:load_questions (eval)

prompt_id is the processed row's extra_info.index when every row has one and they are distinct,
otherwise the row number.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from common.config import ConfigError
from common.wire import MAX_STR
from common.protocol import MAX_ANSWERS

log = logging.getLogger("scout.qa")
RAW_COLUMNS = ("question", "golden_answers")
PROCESSED_COLUMNS = ("prompt", "reward_model")


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


def _list(value):
    return value.tolist() if hasattr(value, "tolist") else value  # numpy arrays from some readers


def display_question(text: str) -> str:
    """The question inside a templated prompt: what follows its last "Question:" (any case;
    Search-R1's instruction ends with it), else the whole text."""
    at = text.lower().rfind("question:")
    tail = text[at + len("question:"):] if at >= 0 else ""
    return (tail if tail.strip() else text).strip()


def _raw_row(row: dict, where: str) -> dict:
    q = row.get("question")
    if not isinstance(q, str) or not q.strip():
        raise ConfigError(f"{where}: needs a non-empty `question`")
    if row.get("golden_answers") is None:
        raise ConfigError(f"{where}: needs `golden_answers` (a string or a non-empty list of strings)")
    return {"question": q[:MAX_STR], "golden_answers": _answers(row["golden_answers"], where),
            "data_source": str(row.get("data_source") or "")[:256], "text": ""}


def _processed_row(row: dict, where: str) -> dict:
    """A row as Search-R1's data_process scripts write it: the user message is the prompt."""
    chat = _list(row["prompt"])
    users = [m for m in chat if isinstance(m, dict) and m.get("role") == "user"] if isinstance(chat, list) else []
    text = users[-1].get("content") if users else None
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{where}: `prompt` needs a user message with non-empty content "
                          "([{\"role\": \"user\", \"content\": ...}])")
    truth = row["reward_model"].get("ground_truth") if isinstance(row["reward_model"], dict) else None
    target = truth.get("target") if isinstance(truth, dict) else None
    if target is None:
        raise ConfigError(f"{where}: needs reward_model.ground_truth.target (the gold answers)")
    return {"question": display_question(text)[:MAX_STR], "golden_answers": _answers(_list(target), where),
            "data_source": str(row.get("data_source") or "")[:256], "text": text[:MAX_STR]}


def _stable_ids(rows: list[dict], out: list[dict], path: Path) -> None:
    """prompt_id = extra_info.index when every row has a distinct one (ints >= 0), else the row number."""
    idx = [(r.get("extra_info") or {}).get("index") if isinstance(r.get("extra_info"), dict) else None
           for r in rows[:len(out)]]
    usable = all(type(i) is int and i >= 0 for i in idx) and len(set(idx)) == len(idx)
    if not usable and any(i is not None for i in idx):
        log.warning("%s: extra_info.index is missing, negative or repeated in some rows (files merged from "
                    "several sources repeat it): prompt ids are row numbers", path)
    for n, row in enumerate(out):
        row["prompt_id"] = idx[n] if usable else n


def read_qa(path: str | Path, what: str, limit: int = 0) -> list[dict]:
    """QA rows as {prompt_id, question, golden_answers, data_source, text}; at most `limit` rows (0 = all).

    Raw rows need a non-empty `question` and `golden_answers` (a string or a non-empty list of
    strings); processed rows a user message in `prompt` and reward_model.ground_truth.target. A
    row of neither shape, or one without its question or answers, is a ConfigError naming `what`,
    the file and the row (0-based, as prompt ids count; jsonl rows also give their line): such a
    row would otherwise score 0 every time.
    """
    p = Path(path)
    rows, lines = _read(path, what)
    out = []
    for i, row in enumerate(rows[: limit or None]):
        where = f"{what} {p} row {i}" + (f" (line {lines[i]})" if lines is not None else "")
        if not isinstance(row, dict):
            raise ConfigError(f"{where}: expected an object with `question` and `golden_answers`")
        if all(k in row for k in PROCESSED_COLUMNS):
            out.append(_processed_row(row, where))
        elif "question" in row or "golden_answers" in row:
            out.append(_raw_row(row, where))
        else:
            raise ConfigError(f"{where}: neither raw QA columns ({', '.join(RAW_COLUMNS)}) nor Search-R1's "
                              f"processed columns ({', '.join(PROCESSED_COLUMNS)}); found: {sorted(map(str, row))}")
    if not out:
        raise ConfigError(f"{what} {p} holds no rows")
    _stable_ids(rows, out, p)
    return out
