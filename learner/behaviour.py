"""Per-step behaviour rates of the trained batch, for metrics.jsonl (the Search-R1 paper's
behaviour metrics; the actor sets the per-sample bits, actors/behaviour.py says when).

    groups of the step ─▶ valid_format_rate, answer_rate            over every sample
                          think_before_search_rate, search_hit_rate  over the samples that searched
                          bad_searches_mean, response_tokens_mean    per sample
                          groups_rewarded_frac                       groups with some reward > 0

A rate whose base is empty (no sample reported its bits, or none searched) is None.
"""

from __future__ import annotations

import numpy as np

from common.protocol import BEHAVIOUR_BITS, TrajectoryGroup


def _rate(hits: int, base: int) -> float | None:
    return hits / base if base else None


def behaviour_rates(groups: list[TrajectoryGroup]) -> dict:
    bits, searched, bad = [], [], []
    for g in groups:
        if g.behaviour:  # groups from an actor that does not report them are left out
            bits += g.behaviour
            searched += [s > 0 for s in g.num_searches]
            bad += g.bad_searches or [0] * g.n
    flags = {name: [bool(b & bit) for b in bits] for name, bit in BEHAVIOUR_BITS.items()}
    n_searched = sum(searched)
    gen = [int(g.loss_mask[sl].sum()) for g in groups for sl in g.sample_slices()]
    return {
        "valid_format_rate": _rate(sum(flags["valid_format"]), len(bits)),
        "answer_rate": _rate(sum(flags["answered"]), len(bits)),
        "think_before_search_rate": _rate(sum(f and s for f, s in zip(flags["think_before_search"], searched)),
                                          n_searched),
        "search_hit_rate": _rate(sum(f and s for f, s in zip(flags["search_hit"], searched)), n_searched),
        "bad_searches_mean": float(np.mean(bad)) if bad else None,
        "response_tokens_mean": float(np.mean(gen)) if gen else None,
        "groups_rewarded_frac": _rate(sum(float(g.rewards.max()) > 0 for g in groups), len(groups)),
    }
