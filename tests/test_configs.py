"""The recipes shipped in configs/: each loads and validates, and the Search-R1 one carries the
paper's published hyper-parameters (../shared/reference.md, "Search-R1")."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads_and_agrees_with_itself(path):
    cfg = load_config(path, environ={})
    assert cfg.actor.n_samples == cfg.learner.n_samples, "the actor samples the groups the learner trains on"
    assert cfg.actor.model == cfg.learner.model
    assert cfg.actor.max_new_tokens <= cfg.actor.max_total_tokens


def test_search_r1_recipe_is_the_papers():
    cfg = load_config(CONFIGS[0].parent / "search-r1-qwen2.5-3b.toml", environ={})
    a, lc, r = cfg.actor, cfg.learner, cfg.retriever
    assert (lc.groups_per_step, lc.n_samples, lc.steps, lc.lr, lc.kl_coef) == (512, 5, 500, 1e-6, 0.001)
    assert (lc.eps_low, lc.eps_high) == (0.2, 0.2)
    assert (a.temperature, a.topk, a.max_new_tokens, a.max_obs_tokens, a.max_total_tokens) == (1.0, 3, 500, 500, 4096)
    assert a.reward == "em" and a.format_reward == 0.0 and a.gpu_memory_utilization == 0.6
    assert (r.query_prefix, r.passage_prefix, r.pooling, r.normalize) == ("query: ", "passage: ", "mean", True)
    assert lc.data.endswith(".parquet"), "Search-R1's processed parquet, read as it is"
