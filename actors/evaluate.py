"""`cli.py eval --model PATH --data FILE`: greedy EM / F1 / search rate through the real rollout loop.

    QA file (jsonl / parquet: question, golden_answers, data_source)
        ▼ load_questions
    RolloutRunner(greedy, n = 1) over the configured engine + retriever, eval_batch questions at once
        ▼ per question: answer, EM, F1, substring, searches, retrieval_failed
    summary (overall and per data_source) → stdout and <run_dir>/eval/<data name>.json,
    per-question records → <run_dir>/eval/<data name>.jsonl
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import defaultdict
from pathlib import Path

from actors.reward import substring_match
from actors.rollout import GroupState, RolloutRunner
from common.config import ConfigError, ScoutConfig
from common.qa import read_qa, read_rows
from common.protocol import Prompt

log = logging.getLogger("scout.actors.evaluate")


def load_questions(path: str | Path, limit: int = 0) -> list[Prompt]:
    """QA rows (raw or Search-R1's processed ones) -> Prompts; bad rows raise (common.qa.read_qa)."""
    return [Prompt(**row) for row in read_qa(path, "eval data", limit)]


def gold_passages(path: str | Path, limit: int = 0) -> dict[int, str]:
    """prompt_id -> the id of the passage that holds the answer, for QA rows that name one
    (`passage_id`, as the demo's toy world writes; Search-R1's datasets have none)."""
    rows = read_rows(path, "eval data")[: limit or None]
    return {i: str(r["passage_id"]) for i, r in enumerate(rows) if isinstance(r, dict) and r.get("passage_id")}


def run_eval(runner: RolloutRunner, prompts: list[Prompt], batch: int) -> list[dict]:
    """Every prompt once, greedy, at most `batch` in flight; one record per prompt."""
    todo = list(prompts)
    records: list[dict] = []
    while todo or runner.busy() or runner.active_groups():
        while todo and runner.active_groups() < batch:
            p = todo.pop(0)
            runner.start_group(p, 1, group_id=f"eval-{p.prompt_id}")
        for g in runner.poll():
            records.append(_record(g))
        if not runner.engine.has_unfinished() and runner.in_search:
            runner.wait_searches(0.05)
    records.sort(key=lambda r: r["prompt_id"])
    return records


def mark_right_search(records: list[dict], gold: dict[int, str]) -> None:
    """right_search: some search of the rollout returned the passage that holds the answer."""
    if not gold:
        return
    for r in records:
        pid = gold.get(r["prompt_id"])
        r["right_search"] = pid is not None and any(pid in ids for ids in r["retrieved"])


def _record(g: GroupState) -> dict:
    t = g.samples[0]
    res = t.result
    answer = res.answer if res else None
    return {"prompt_id": g.prompt.prompt_id, "question": g.prompt.question, "data_source": g.prompt.data_source,
            "golden_answers": g.prompt.golden_answers, "answer": answer,
            "em": res.em if res else 0.0, "f1": res.f1 if res else 0.0,
            "substring": substring_match(answer, g.prompt.golden_answers) if answer is not None else 0.0,
            "searches": t.num_searches, "queries": t.queries, "retrieved": t.retrieved,
            "retrieval_failed": t.retrieval_failed,
            "finish": t.finish, "generated_tokens": sum(t.mask), "response": t.response_text()}


def summarise(records: list[dict]) -> dict:
    def block(rs: list[dict]) -> dict:
        n = len(rs)
        return {"n": n, "em": sum(r["em"] for r in rs) / n, "f1": sum(r["f1"] for r in rs) / n,
                "substring": sum(r["substring"] for r in rs) / n,
                "search_rate": sum(r["searches"] > 0 for r in rs) / n,
                "searches_per_question": sum(r["searches"] for r in rs) / n,
                "answer_rate": sum(r["answer"] is not None for r in rs) / n,
                "retrieval_failed": sum(r["retrieval_failed"] for r in rs),
                **({"right_search_rate": sum(bool(r["right_search"]) for r in rs) / n}
                   if all("right_search" in r for r in rs) else {})}

    by_source = defaultdict(list)
    for r in records:
        by_source[r["data_source"] or "-"].append(r)
    return {**block(records), "by_source": {k: block(v) for k, v in sorted(by_source.items())}}


def main(cfg: ScoutConfig, data_path: str | Path) -> int:
    from actors.engine import EngineError, make_engine
    from actors.rollout import make_searcher

    acfg = cfg.actor
    try:
        prompts = load_questions(data_path, acfg.eval_limit)
        engine = make_engine(acfg)
    except (ConfigError, EngineError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    searcher = make_searcher(cfg)
    runner = RolloutRunner(engine, searcher, acfg, greedy=True)
    t0 = time.monotonic()
    try:
        records = run_eval(runner, prompts, acfg.eval_batch)
        mark_right_search(records, gold_passages(data_path, acfg.eval_limit))
    finally:
        runner.close()
        searcher.close()
        engine.close()
    summary = {"model": acfg.model, "data": str(data_path), "seconds": round(time.monotonic() - t0, 2),
               **summarise(records)}
    out = Path(cfg.run_dir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    name = Path(data_path).stem
    (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (out / f"{name}.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "by_source"}))
    log.info("eval of %s on %s: EM %.4f F1 %.4f search rate %.3f (%d questions) -> %s", acfg.model, data_path,
             summary["em"], summary["f1"], summary["search_rate"], summary["n"], out)
    return 0
