"""The multi-hop toy world (demo/multihop.py): chains person -> country -> capital, whole chains
held out, and a pretraining prior that never shows a true fact, a held-out name or a gold answer."""

from __future__ import annotations

import json
import re

import pytest

from demo import multihop as mh
from demo import toyworld as tw
from retriever.docstore import read_corpus, split_title

SMALL = dict(n_entities=150, heldout_entities=30, hops=2)


@pytest.fixture(scope="module")
def world():
    return tw.make_world(tw.WorldSpec(seed=4, **SMALL))


def test_single_hop_worlds_and_base_models_keep_their_cache_keys():
    from demo.pretrain import PretrainSpec

    # the values before the multi-hop fields existed: a changed key would rebuild every user's cache
    assert tw.WorldSpec().digest() == "9246bf4aad36b7a0"
    before_novel = PretrainSpec(steps=1500, prior=tw.PriorSpec(p_novel_entity=0.0), max_restarts=0)  # until then
    assert before_novel.key("9246bf4aad36b7a0", 0) == "8c850de1fa99f2e9"
    assert PretrainSpec().key("9246bf4aad36b7a0", 0) != "8c850de1fa99f2e9"
    assert tw.WorldSpec(hops=2).digest() != tw.WorldSpec().digest()
    with pytest.raises(ValueError, match="hops must be 1 or 2"):
        tw.make_world(tw.WorldSpec(hops=3))


def test_files_chain_two_passages_per_question(tmp_path):
    paths = tw.build_world(tmp_path, seed=4, **SMALL)
    by_id = {}
    for ids, contents in read_corpus(paths.corpus):
        by_id.update(zip(ids, contents))
    assert len(by_id) == 2 * SMALL["n_entities"]
    rows = [json.loads(x) for x in paths.train.read_text().splitlines()]
    held = [json.loads(x) for x in paths.heldout.read_text().splitlines()]
    assert len(rows) + len(held) == SMALL["n_entities"] and len(held) == SMALL["heldout_entities"]
    for row in rows + held:
        first, second = row["hop_passage_ids"]
        assert second == row["passage_id"]
        person, born = split_title(by_id[first])
        country, capital = split_title(by_id[second])
        assert row["question"] == mh.chain_question(person)
        assert born == f"the birthplace of {person} is {country} ."  # hop 1 names hop 2's title
        assert capital == f"the capital of {country} is {row['golden_answers'][0]} ."
        assert country not in row["question"] and row["golden_answers"][0] not in row["question"].split()
    swapped = {r["question"]: r["golden_answers"] for r in map(json.loads, paths.heldout_swapped.read_text().splitlines())}
    assert all(swapped[r["question"]] != r["golden_answers"] for r in held)


def test_whole_chains_are_held_out(world):
    held_people = [p for p in world.chains if p in world.heldout]
    assert len(held_people) == SMALL["heldout_entities"]
    assert {world.chains[p] for p in held_people} == world.heldout - set(held_people)
    seen = {s for i in world.train_ids for s in world.entities[i].split()}
    assert all(set(world.entities[p].split()) <= seen for p in held_people)
    countries = [world.entities[c] for c in world.chains.values()]  # one word each, never a person's
    assert len(set(countries)) == len(countries) and all(" " not in c for c in countries)
    assert not set(countries) & {world.entities[p] for p in world.chains}
    # swapping keeps the chain: only capitals change
    for (eid, rel), value in world.values.items():
        assert (world.swapped[(eid, rel)] == value) == (rel == mh.BIRTHPLACE)


def test_prior_never_shows_heldout_names_true_facts_or_gold(world):
    held_people = [world.entities[p] for p in world.chains if p in world.heldout]
    held_countries = {world.entities[world.chains[p]] for p in world.chains if p in world.heldout}
    true = {tw.passage_text(world.entities[e], r, v) for (e, r), v in world.values.items()}
    ts = tw.pretraining_transcripts(world, 3000, seed=0, prior=mh.MULTIHOP_PRIOR)
    searches = {0: 0, 1: 0, 2: 0}
    drilled: set[str] = set()
    for t in ts:
        text = f" {t.text} "
        assert not any(f" {n} " in text or f"{n})" in text for n in held_people)
        facts = re.findall(r"the \w+ of \w+(?: \w+)? is \w+ \.", text)
        assert facts or "<information>" not in text
        assert not set(facts) & true
        if t.kind == "drill":  # the only place a held-out country's word appears: a bare list
            first, second = t.text[1:-2].split(" ; ")
            assert first == second
            drilled |= held_countries & set(first.split())
            continue
        assert not held_countries & set(t.text.replace(")", " ").split())
        searches[t.text.count("<search>")] += 1
        assert t.question.startswith("what is the capital of the birthplace of") and t.answer != t.gold
    assert len(drilled) > len(held_countries) / 2  # their tokens get trained
    n = sum(searches.values())
    assert abs((searches[1] + searches[2]) / n - mh.MULTIHOP_PRIOR.p_search) < 0.05
    assert searches[2] / (searches[1] + searches[2]) == pytest.approx(mh.MULTIHOP_PRIOR.p_search_again, abs=0.06)


def test_second_search_copies_a_value_of_the_first_block(world):
    countries = {world.entities[c] for c in world.chains.values()}
    seen = 0
    for t in tw.pretraining_transcripts(world, 1500, seed=2, prior=mh.MULTIHOP_PRIOR):
        queries = re.findall(r"<search> (.*?) </search>", t.text)
        if len(queries) < 2:
            continue
        first_block = [s for s, generated in t.segments if not generated][1]
        assert f" {queries[0]} " in f" {t.question} "
        assert f" is {queries[1]} ." in first_block  # a value the block showed
        seen += queries[1] in countries
        last_block = [s for s, generated in t.segments if not generated][-1]
        assert f" is {t.answer} ." in last_block
    assert seen > 50  # birthplaces show countries, so "search what you read" often names one


def test_world_words_cover_the_chain_template(world):
    words = set(tw.world_words(world))
    assert set(mh.chain_question("").split()) <= words and "birthplace" in words


def test_multihop_recipe_retrieves_one_passage_unless_the_user_chose():
    from common.config import load_config
    from demo.recipe import apply_recipe

    def tree(*sets):
        cfg = load_config(None, list(sets), environ={})
        return apply_recipe(cfg, cfg.model_dump(mode="json", exclude_none=True))

    assert tree()["actor"]["topk"] == 3  # the single-hop demo keeps three
    assert tree("demo.world='multihop'")["actor"]["topk"] == mh.MULTIHOP_PRIOR.topk == 1
    assert tree("demo.world='multihop'", "actor.topk=2")["actor"]["topk"] == 2


def test_multihop_runs_longer_unless_the_user_set_steps():
    from common.config import load_config
    from demo.pretrain import default_spec
    from demo.recipe import MULTIHOP_STEPS, demo_steps

    assert demo_steps(load_config(None, [], environ={})) == 100
    assert demo_steps(load_config(None, ["demo.world='multihop'"], environ={})) == MULTIHOP_STEPS
    assert demo_steps(load_config(None, ["demo.world='multihop'", "demo.steps=7"], environ={})) == 7
    w = tw.make_world(tw.WorldSpec(seed=4, **SMALL))
    assert default_spec(w).prior == mh.MULTIHOP_PRIOR and default_spec(w).steps == 3000
