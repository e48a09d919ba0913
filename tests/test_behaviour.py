"""The Search-R1 paper's behaviour metrics on hand-made rollouts whose right values are known: the
actor's per-rollout bits (actors/behaviour.py), its Prometheus counters (actors/worker_metrics.py)
and the learner's per-step rates for metrics.jsonl (learner/behaviour.py)."""

from __future__ import annotations

import numpy as np
import pytest

from actors.behaviour import behaviour_bits, passages_hit, think_before_search
from actors.reward import format_ok
from common.protocol import BEHAVIOUR_BITS, Passage, TrajectoryGroup

VALID, THINK, ANSWERED, HIT = (BEHAVIOUR_BITS[k] for k in ("valid_format", "think_before_search", "answered",
                                                           "search_hit"))


@pytest.mark.parametrize("turns,finish,hit,bits", [
    (["<think> a </think> <search> zor vak </search>", "<answer> mel </answer>"], "answer", True,
     VALID | THINK | ANSWERED | HIT),
    (["<search> zor vak </search>", "<think> b </think> <answer> x </answer>"], "answer", False, VALID | ANSWERED),
    (["i do not know"], "max_turns", False, 0),
    (["<think> a <search> q </search>"], "max_turns", False, THINK),  # reasons first, but <think> never closed
    (["<answer> a </answer> <answer> b </answer>"], "answer", False, ANSWERED),  # two answers: ill formed
    (["<think> x </think> no search", "<search> q </search>"], "max_turns", True, HIT),  # reasoning was another turn
])
def test_behaviour_bits(turns, finish, hit, bits):
    assert behaviour_bits(format_ok("".join(turns)), turns, finish, hit) == bits


def test_think_before_search_looks_at_the_first_search():
    assert think_before_search(["<think> x </think> <search> a </search>", "<search> b </search>"])
    assert not think_before_search(["<search> a </search>", "<think> x </think> <search> b </search>"])
    assert not think_before_search(["<think> only thinking </think>"])
    assert not think_before_search(["<think> x </think> <search> never closed"])


def test_a_hit_is_a_whole_gold_answer_in_a_passage():
    p = [Passage(id="1", title="Zor Vak", text="The capital of zor vak is Mel Ba.", score=1.0)]
    assert passages_hit(["mel ba"], p) and passages_hit(["nope", "The Mel-Ba"], []) is False
    assert passages_hit(["MEL BA!"], p)  # normalised as the reward normalises
    assert not passages_hit(["mel"], [Passage(id="2", title="t", text="melba", score=0.0)])  # not a word of it
    assert not passages_hit(["the"], p)  # an answer that normalises to nothing never hits


def group(behaviour, searches, rewards, gen_tokens, bad=None) -> TrajectoryGroup:
    n = len(rewards)
    lengths = np.array([4 + g for g in gen_tokens], np.int32)
    mask = np.concatenate([[0] * 4 + [1] * g for g in gen_tokens]).astype(np.uint8)
    total = int(lengths.sum())
    return TrajectoryGroup(group_id=f"g{id(rewards)}", peer_id="p", run_id="r", prompt_id=0, num_searches=searches,
                           retrieval_failed=[False] * n, correct=[r > 0 for r in rewards], behaviour=behaviour,
                           bad_searches=bad if bad is not None else ([0] * n if behaviour else []),
                           lengths=lengths, tokens=np.zeros(total, np.int32), loss_mask=mask,
                           logprobs=np.where(mask == 1, -0.1, 0).astype(np.float32),
                           versions=np.where(mask == 1, 1, -1).astype(np.int32),
                           rewards=np.array(rewards, np.float32))


def test_learner_rates_of_a_step():
    from learner.behaviour import behaviour_rates

    groups = [
        group([VALID | THINK | ANSWERED | HIT, ANSWERED], [1, 2], [1.0, 0.0], [10, 20], bad=[0, 2]),
        group([THINK, 0], [1, 0], [0.0, 0.0], [30, 40], bad=[1, 1]),
        group([], [0, 0], [1.0, 1.0], [50, 50]),  # an actor that does not report bits: rates leave it out
    ]
    r = behaviour_rates(groups)
    assert r["valid_format_rate"] == 1 / 4 and r["answer_rate"] == 2 / 4
    # three of the reporting samples searched; two of them reasoned first, one found the answer
    assert r["think_before_search_rate"] == 2 / 3 and r["search_hit_rate"] == 1 / 3
    assert r["bad_searches_mean"] == 1.0  # (0 + 2 + 1 + 1) / 4
    assert r["response_tokens_mean"] == 200 / 6  # every sample's generated tokens, reporting or not
    assert r["groups_rewarded_frac"] == 2 / 3


def test_learner_rates_without_a_base_are_none():
    from learner.behaviour import behaviour_rates

    r = behaviour_rates([group([ANSWERED], [0], [0.0], [5])])  # nobody searched
    assert r["think_before_search_rate"] is None and r["search_hit_rate"] is None and r["answer_rate"] == 1.0
    r = behaviour_rates([group([], [1], [0.0], [5])])  # nobody reported
    assert r["valid_format_rate"] is None and r["bad_searches_mean"] is None and r["groups_rewarded_frac"] == 0.0


def test_actor_counters(tmp_path):
    from actors.rollout import Trajectory
    from actors.worker_metrics import WorkerMetrics, count_behaviour

    mm = WorkerMetrics(0, "cpu")
    a = Trajectory("g", 0, ["mel"], [1, 2], 2, turn_texts=["<think> a </think> <search> q </search>",
                                                          "<answer> mel </answer>"], num_searches=1, finish="answer",
                   search_hit=True)
    b = Trajectory("g", 1, ["mel"], [1, 2], 2, turn_texts=["nothing", "more nothing"], num_invalid=2, finish="max_turns")
    for t in (a, b):
        t.bits = behaviour_bits(format_ok(t.response_text()), t.turn_texts, t.finish, t.search_hit)
        count_behaviour(mm, t)
    text = mm.m.render().decode()

    def value(name: str, labels: str = "") -> float:
        line = next(x for x in text.splitlines() if x.startswith(name + "{") and labels in x)
        return float(line.rsplit(" ", 1)[1])

    for behaviour in ("valid_format", "think_before_search", "answered", "search_hit"):
        assert value("scout_actor_rollout_behaviour_total", f'behaviour="{behaviour}"') == 1.0
    assert value("scout_actor_searching_rollouts_total") == 1.0 and value("scout_actor_bad_searches_total") == 2.0
