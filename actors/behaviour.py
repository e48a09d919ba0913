"""The behaviour metrics the Search-R1 paper discusses, per finished rollout, as the actor sees it.

    finished Trajectory ─behaviour_bits─▶ BEHAVIOUR_BITS flags ─▶ TrajectoryGroup.behaviour
      (RolloutRunner._finish, once: Trajectory.bits)
                        ─num_invalid───▶ bad_searches          ─▶ TrajectoryGroup.bad_searches
                                                               └▶ actor counters (worker.py)

    valid_format         the response is well formed (actors.reward.format_ok, as the reward
                         computed it: tags closed and never nested, one final <answer>)
    think_before_search  the turn of the first search reasons first: <think> opens before <search>
                         (the paper's finding that Qwen reasons before it searches)
    answered             the rollout ended in <answer>
    search_hit           some search returned a passage holding a gold answer (normalised as the
                         reward is): the training-time stand-in for the right-search rate, which
                         needs the gold passage id (cli.py eval reports that one)
    bad_searches         turns that were no action, empty queries included (each got the
                         corrective observation)

The learner turns these into per-step rates (learner/behaviour.py).
"""

from __future__ import annotations

from actors.reward import normalize_answer
from common.protocol import BEHAVIOUR_BITS, Passage


def think_before_search(turn_texts: list[str]) -> bool:
    """In the first turn that searches, <think> opens before <search>."""
    for text in turn_texts:
        at = text.find("<search>")
        if at >= 0 and "</search>" in text[at:]:
            think = text.find("<think>")
            return 0 <= think < at
    return False


def passages_hit(golds: list[str], passages: list[Passage]) -> bool:
    """Some passage holds a gold answer, both normalised as the exact-match reward normalises."""
    wanted = [g for g in (normalize_answer(x) for x in golds) if g]
    for p in passages:
        text = f" {normalize_answer(p.title + ' ' + p.text)} "
        if any(f" {g} " in text for g in wanted):
            return True
    return False


def behaviour_bits(valid_format: bool, turn_texts: list[str], finish: str, search_hit: bool) -> int:
    bits = 0
    if valid_format:
        bits |= BEHAVIOUR_BITS["valid_format"]
    if think_before_search(turn_texts):
        bits |= BEHAVIOUR_BITS["think_before_search"]
    if finish == "answer":
        bits |= BEHAVIOUR_BITS["answered"]
    if search_hit:
        bits |= BEHAVIOUR_BITS["search_hit"]
    return bits
