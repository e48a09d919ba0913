"""Outcome reward: SQuAD-style normalisation, EM / F1 / substring on the last <answer>, format term."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from actors.reward import (compute_reward, exact_match, extract_answer, f1_score, format_ok, normalize_answer,
                           substring_match)


@pytest.mark.parametrize("raw, norm", [
    ("The Eiffel Tower!", "eiffel tower"),
    ("  an   Apple,  a day ", "apple day"),
    ("Paris.", "paris"),
    ("THE", ""),
    ("theory of the atom", "theory of atom"),  # articles only as whole words
    ("U.S.A.", "usa"),
])
def test_normalize(raw, norm):
    assert normalize_answer(raw) == norm


def _squad_normalize(text: str) -> str:
    """The SQuAD script's normalisation, written out the slow way, as the reference."""
    import re
    import string

    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


@given(st.text(alphabet=st.sampled_from("aAnNtThHeE ,.!?'-()\tx\u00e9\u00c9\u2019"), max_size=40))
def test_normalize_is_squads(raw):
    assert normalize_answer(raw) == _squad_normalize(raw)


def test_extract_last_answer():
    text = "<think>x</think><answer> first </answer> more <answer>  second one </answer>"
    assert extract_answer(text) == "second one"
    assert extract_answer("<answer> open but never closed") is None
    assert extract_answer("no tags") is None
    assert extract_answer("<answer>\nmulti\nline\n</answer>") == "multi\nline"


def test_exact_match_any_gold():
    assert exact_match("the Paris", ["London", "paris"]) == 1.0
    assert exact_match("Paris France", ["Paris"]) == 0.0
    assert exact_match("", ["Paris"]) == 0.0


def test_f1_best_over_golds():
    assert f1_score("paris france", ["paris"]) == pytest.approx(2 / 3)
    assert f1_score("paris", ["london", "paris"]) == 1.0
    assert f1_score("berlin", ["paris"]) == 0.0
    assert f1_score("", ["paris"]) == 0.0


def test_substring():
    assert substring_match("it is Paris, France", ["paris"]) == 1.0
    assert substring_match("london", ["paris"]) == 0.0
    assert substring_match("anything", ["the"]) == 0.0  # a gold that normalises to nothing never matches


def test_format_ok():
    good = "<think>a</think> <search> q </search><think>b</think> <answer> x </answer>"
    assert format_ok(good)
    assert not format_ok("<answer> x </answer> trailing")
    assert not format_ok("<think> <search> q </search> </think> <answer> x </answer>")  # nested
    assert not format_ok("<think> a <answer> x </answer>")  # think left open
    assert not format_ok("<answer> x </answer><answer> y </answer>")  # two answers
    assert not format_ok("plain text")


@pytest.mark.parametrize("kind, expect", [("em", 0.0), ("f1", 2 / 3), ("substring", 1.0)])
def test_compute_reward_kinds(kind, expect):
    r = compute_reward("<think>hm</think> <answer> Paris France </answer>", ["paris"], kind)
    assert r.reward == pytest.approx(expect)
    assert r.correct is False and r.answer == "Paris France" and r.format_ok


def test_compute_reward_correct_and_missing():
    r = compute_reward("<answer> The Mirabel </answer>", ["mirabel"])
    assert (r.reward, r.correct, r.em, r.f1) == (1.0, True, 1.0, 1.0)
    none = compute_reward("<think> no answer given", ["mirabel"], "f1")
    assert (none.reward, none.correct, none.answer) == (0.0, False, None)


def test_format_weight_mixes_in():
    ok_wrong = compute_reward("<answer> london </answer>", ["paris"], "em", format_weight=0.2)
    assert ok_wrong.reward == pytest.approx(0.2)
    bad_right = compute_reward("<answer> paris </answer> junk", ["paris"], "em", format_weight=0.2)
    assert bad_right.reward == pytest.approx(0.8) and bad_right.correct
    with pytest.raises(ValueError, match="reward kind"):
        compute_reward("<answer> x </answer>", ["x"], "bleu")
    with pytest.raises(ValueError, match="format_weight"):
        compute_reward("<answer> x </answer>", ["x"], "em", format_weight=1.5)


@given(st.text(max_size=60), st.lists(st.text(max_size=20), min_size=1, max_size=4))
def test_scores_bounded_and_consistent(pred, golds):
    em, f1, sub = exact_match(pred, golds), f1_score(pred, golds), substring_match(pred, golds)
    assert 0.0 <= f1 <= 1.0 and em in (0.0, 1.0) and sub in (0.0, 1.0)
    if em == 1.0 and normalize_answer(pred):
        assert f1 == 1.0 and sub == 1.0
    assert normalize_answer(normalize_answer(pred)) == normalize_answer(pred)
