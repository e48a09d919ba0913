"""Search-R1's processed QA rows (what its data_process scripts write) read as they are, next to the
raw rows: the user message is the prompt, verbatim; answers, source and a stable id come from
their columns; bad rows name the row and the columns found."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.config import ConfigError
from common.qa import display_question, read_qa

TEMPLATE = ("Answer the question. Reason inside <think> </think>, search with <search> query </search>, "
            "answer inside <answer> </answer>. Question: {q}\n")


def processed(q: str, answers: list[str], index: int, source: str = "nq") -> dict:
    return {"data_source": source, "prompt": [{"role": "user", "content": TEMPLATE.format(q=q)}],
            "ability": "fact-reasoning", "reward_model": {"style": "rule", "ground_truth": {"target": answers}},
            "extra_info": {"split": "train", "index": index}}


def write_parquet(path, rows: list[dict]):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_processed_parquet_reads_as_is(tmp_path):
    f = write_parquet(tmp_path / "train.parquet", [processed("who wrote hamlet?", ["Shakespeare"], 40),
                                                   processed("capital of peru?", ["Lima", "lima city"], 7, "hotpotqa")])
    rows = read_qa(f, "learner.data:")
    assert [r["prompt_id"] for r in rows] == [40, 7]  # extra_info.index: stable across re-orderings
    assert rows[0]["text"] == TEMPLATE.format(q="who wrote hamlet?")  # the user's own template, verbatim
    assert rows[0]["question"] == "who wrote hamlet?"  # stripped for display only
    assert rows[1]["golden_answers"] == ["Lima", "lima city"] and rows[1]["data_source"] == "hotpotqa"
    # raw rows keep working, with row numbers as ids and no text of their own
    raw = tmp_path / "raw.jsonl"
    raw.write_text(json.dumps({"question": "who?", "golden_answers": ["me"], "data_source": "nq"}) + "\n")
    assert read_qa(raw, "eval data") == [{"question": "who?", "golden_answers": ["me"], "data_source": "nq",
                                          "text": "", "prompt_id": 0}]


def test_repeated_or_missing_index_falls_back_to_row_numbers(tmp_path):
    f = write_parquet(tmp_path / "merged.parquet", [processed("a?", ["x"], 3, "nq"), processed("b?", ["y"], 3, "hotpotqa")])
    assert [r["prompt_id"] for r in read_qa(f, "learner.data:")] == [0, 1]  # merged sources repeat indices


@pytest.mark.parametrize("row,fragment", [
    ({"data_source": "nq", "prompt": [], "reward_model": {"ground_truth": {"target": ["x"]}}},
     "`prompt` needs a user message"),
    ({"prompt": [{"role": "user", "content": "Question: a?"}], "reward_model": {"style": "rule"}},
     "needs reward_model.ground_truth.target"),
    ({"prompt": [{"role": "user", "content": "Question: a?"}], "reward_model": {"ground_truth": {"target": []}}},
     "golden_answers is empty"),
    ({"query": "a?", "answer": "x"}, "neither raw QA columns (question, golden_answers) nor Search-R1's processed "
                                     "columns (prompt, reward_model); found: ['answer', 'query']"),
])
def test_bad_rows_name_the_row_and_what_was_found(tmp_path, row, fragment):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps(processed("ok?", ["y"], 0)) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ConfigError) as e:
        read_qa(f, "learner.data:")
    assert f"{f} row 1 (line 2)" in str(e.value) and fragment in str(e.value), e.value


def test_display_question():
    assert display_question(TEMPLATE.format(q="where is lima?")) == "where is lima?"
    assert display_question("question: zor vak\n") == "zor vak"  # the demo's lower-case template
    assert display_question("no marker here") == "no marker here"


def test_dispatcher_hands_out_stable_ids_with_their_text(tmp_path):
    from learner.ingest import Dispatcher, load_qa

    f = write_parquet(tmp_path / "train.parquet", [processed(f"q{i}?", [f"a{i}"], 100 + i) for i in range(5)])
    d = Dispatcher(load_qa(f), seed=0)
    ids = d.take(("p", "r"), 5)
    assert sorted(ids) == [100, 101, 102, 103, 104]
    p = d.prompt(ids[0])
    assert p.text == TEMPLATE.format(q=f"q{ids[0] - 100}?") and p.question == f"q{ids[0] - 100}?"
    assert d.knows(104) and not d.knows(4)


def test_the_prompt_text_goes_to_the_model_verbatim(tmp_path):
    from actors.rollout import INSTRUCTION, build_prompt_ids
    from demo.tinymodel import build_tokenizer

    tok = build_tokenizer([TEMPLATE, INSTRUCTION], tmp_path / "tok")
    text = TEMPLATE.format(q="who?")
    assert tok.decode(build_prompt_ids(tok, "who?", None, text), skip_special_tokens=True) == \
        tok.decode(tok(text)["input_ids"], skip_special_tokens=True)
    wrapped = tok.decode(build_prompt_ids(tok, "who?"), skip_special_tokens=True)
    assert "Work out the answer" in wrapped and "Answer the question" not in wrapped
