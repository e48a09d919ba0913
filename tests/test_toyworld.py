"""Toy world of the embedded demo: determinism, formats, and the pretraining data's hygiene
(no held-out entity, no true fact, no gold answer ever appears in pretraining)."""

from __future__ import annotations

import json
import re

import pytest

from demo import toyworld as tw
from retriever.docstore import read_corpus, split_title

SMALL = dict(n_entities=120, heldout_entities=20)


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("world")
    tw.build_world(d, seed=3, **SMALL)
    return d


def test_same_seed_same_files_other_seed_other_world(tmp_path, world_dir):
    again = tw.build_world(tmp_path / "a", seed=3, **SMALL)
    for name in ("corpus.jsonl", "train.jsonl", "heldout.jsonl", "corpus_swapped.jsonl", "heldout_swapped.jsonl"):
        assert (world_dir / name).read_bytes() == (again.dir / name).read_bytes(), name
    other = tw.build_world(tmp_path / "b", seed=4, **SMALL)
    assert other.corpus.read_bytes() != again.corpus.read_bytes()


def test_build_is_cached_and_rebuilt_when_the_spec_changes(tmp_path):
    p = tw.build_world(tmp_path, seed=1, **SMALL)
    stamp = p.corpus.stat().st_mtime_ns
    assert tw.build_world(tmp_path, seed=1, **SMALL).corpus.stat().st_mtime_ns == stamp
    tw.build_world(tmp_path, seed=2, **SMALL)
    assert json.loads(p.meta.read_text())["spec"]["seed"] == 2


def test_corpus_and_qa_follow_search_r1_formats(world_dir):
    ids, contents = [], []
    for i, c in read_corpus(world_dir / "corpus.jsonl"):
        ids += i
        contents += c
    assert len(ids) == len(set(ids)) == SMALL["n_entities"] * tw.WorldSpec().relations_per_entity
    by_id = dict(zip(ids, contents))
    for row in _rows(world_dir / "train.jsonl") + _rows(world_dir / "heldout.jsonl"):
        assert set(row) >= {"question", "golden_answers", "data_source"}
        assert isinstance(row["golden_answers"], list) and len(row["golden_answers"]) == 1
        gold = row["golden_answers"][0]
        title, text = split_title(by_id[row["passage_id"]])
        assert title in row["question"] and f" is {gold} ." in text  # one fact per passage
        assert gold not in row["question"].split()  # the answer is only in the corpus
        holders = [k for k, c in by_id.items() if f" {gold} " in c and title in c]
        assert holders == [row["passage_id"]]


def test_heldout_entities_are_disjoint_and_swapped_values_differ(world_dir):
    train_q = {r["question"] for r in _rows(world_dir / "train.jsonl")}
    held = _rows(world_dir / "heldout.jsonl")
    swapped = _rows(world_dir / "heldout_swapped.jsonl")
    assert len(held) == SMALL["heldout_entities"] * tw.WorldSpec().relations_per_entity
    assert not train_q & {r["question"] for r in held}
    sw_corpus = {r["id"]: r["contents"] for r in _rows(world_dir / "corpus_swapped.jsonl")}
    for h, s in zip(held, swapped):
        assert h["question"] == s["question"] and h["golden_answers"] != s["golden_answers"]
        assert f" is {s['golden_answers'][0]} ." in sw_corpus[s["passage_id"]]


def test_heldout_names_only_use_syllables_seen_in_training():
    w = tw.make_world(tw.WorldSpec(seed=5, **SMALL))
    seen = {s for i in w.train_ids for s in w.entities[i].split()}
    assert all(set(w.entities[i].split()) <= seen for i in w.heldout_ids)
    names = set(w.entities)
    assert len(names) == len(w.entities) and not any(" ".join(n.split()[::-1]) in names for n in names)


@pytest.mark.parametrize("k", [1, 3])
def test_relations_per_entity(k):
    w = tw.make_world(tw.WorldSpec(seed=2, relations_per_entity=k, **SMALL))
    assert all(len(set(r)) == k for r in w.relations.values())
    assert len(tw.corpus_records(w)) == len(w.values) == k * SMALL["n_entities"]


def test_pretraining_never_shows_heldout_entities_true_facts_or_gold_answers():
    w = tw.make_world(tw.WorldSpec(seed=5, **SMALL))
    held_names = [w.entities[i] for i in w.heldout_ids]
    true_facts = {tw.passage_text(w.entities[e], r, v) for (e, r), v in w.values.items()}
    everything = tw.pretraining_transcripts(w, 4000, seed=0)
    for t in everything:
        text = f" {t.text} "
        assert not any(f" {n} " in text or f"{n})" in text for n in held_names)
        facts = re.findall(r"the \w+ of \w+ \w+ is \w+(?: \w+)? \.", text)
        assert facts or "<information>" not in text  # the pattern does match the passages shown
        for fact in facts:
            assert fact not in true_facts
    drills = [t for t in everything if t.kind == "drill"]
    ts = [t for t in everything if t.kind == "transcript"]
    assert abs(len(drills) / len(everything) - tw.PriorSpec().p_drill) < 0.05
    assert abs(sum(t.searched for t in ts) / len(ts) - tw.PriorSpec().p_search) < 0.05
    for t in drills:
        first, second = t.text[1:-2].split(" ; ")
        assert first == second and len(first.split()) >= tw.PriorSpec().drill_names
    for t in ts:
        assert t.answer != t.gold
        assert t.text.startswith(tw.make_prompt(t.question))
        if t.searched:  # the answer copies a name of the last information block
            last_info = [s for s, gen in t.segments if not gen][-1]
            assert f" {t.answer} " in last_info or f"Title: {t.answer})" in last_info


def test_pretraining_queries_copy_a_span_of_the_question():
    w = tw.make_world(tw.WorldSpec(seed=5, **SMALL))
    for t in tw.pretraining_transcripts(w, 500, seed=1):
        assert t.kind == "drill" or t.question
        for q in re.findall(r"<search> (.*?) </search>", t.text):
            assert f" {q} " in f" {t.question} "


@pytest.mark.parametrize("hops", [1, 2])
def test_novel_names_are_nobodys_and_their_questions_are_copied_into_searches(hops):
    """The prior's invented names (p_novel_entity) never spell an entity of the world, held-out
    ones included, in either order; they are made of training syllables; a search copies them."""
    from demo.multihop import MULTIHOP_PRIOR

    spec = tw.WorldSpec(seed=5, **SMALL, hops=hops)
    w = tw.make_world(spec)
    prior = MULTIHOP_PRIOR if hops == 2 else tw.PriorSpec()
    assert prior.p_novel_entity > 0  # the demo's recipe uses them
    taken = {n for e in w.entities for n in (e, " ".join(reversed(e.split())))}
    train_syl = {s for i in w.train_ids for s in w.entities[i].split()}
    person = re.compile(r"of (\w+ \w+) \?$")
    novel = copied = 0
    for t in tw.pretraining_transcripts(w, 3000, seed=2, prior=prior):
        if t.kind == "drill":
            continue
        name = person.search(t.question).group(1)
        if name in taken:
            continue
        novel += 1
        assert set(name.split()) <= train_syl and t.answer != t.gold
        first = re.search(r"<search> (.*?) </search>", t.text)
        copied += bool(first and name in first.group(1))
    questions = sum(1 for t in tw.pretraining_transcripts(w, 3000, seed=2, prior=prior) if t.kind != "drill")
    assert novel / questions == pytest.approx(prior.p_novel_entity, abs=0.05)
    assert copied > novel * prior.p_search * 0.1  # some searches carry the whole invented name


def test_a_prior_without_novel_names_draws_as_before():
    """p_novel_entity = 0 consumes no random draw: transcripts (hashed below with the code before the
    field existed) and cache keys of older base models hold, in both worlds."""
    import dataclasses
    import hashlib

    from demo.multihop import MULTIHOP_PRIOR

    h = hashlib.sha256()
    for hops, prior in ((1, tw.PriorSpec()), (2, MULTIHOP_PRIOR)):
        off = dataclasses.replace(prior, p_novel_entity=0.0)
        assert "p_novel_entity" not in off.key_fields() and "p_novel_entity" in prior.key_fields()
        w = tw.make_world(tw.WorldSpec(seed=5, **SMALL, hops=hops))
        for t in tw.pretraining_transcripts(w, 1000, seed=0, prior=off):
            h.update(t.text.encode())
    assert h.hexdigest()[:16] == "995809f02e45fc58"


def test_information_block_matches_search_r1():
    obs = tw.format_information([("a b", "the river of a b is c d ."), ("e f", "x")])
    assert obs == "\n\n<information>Doc 1(Title: a b) the river of a b is c d .\nDoc 2(Title: e f) x</information>\n\n"


@pytest.mark.slow
def test_tokenizer_keeps_every_world_word_whole(tmp_path):
    from demo.tinymodel import build_tokenizer
    from demo.pretrain import _check_tokenizer

    w = tw.make_world(tw.WorldSpec(seed=5, **SMALL))
    texts = [t.text for t in tw.pretraining_transcripts(w, 300, seed=0)]
    texts.append(" ".join(x for x in tw.world_words(w) for _ in range(4)))
    tok = build_tokenizer(texts, tmp_path, vocab_size=1024)
    _check_tokenizer(tok, w)


@pytest.mark.slow
def test_pretraining_starts_again_when_the_copy_check_fails(tmp_path):
    """A check that passes changes nothing (the same weights as no check); one that fails starts
    again without invented names (another tokenizer sample and initialisation), at most
    max_restarts times, and the last attempt runs on, for fallback_steps."""
    from safetensors.torch import load_file

    from demo.pretrain import pretrain_base_model

    paths = tw.build_world(tmp_path / "w", seed=0, **SMALL)
    tiny = dict(steps=6, batch=4, tokenizer_texts=200, check_step=3)
    plain = pretrain_base_model(paths.dir, tmp_path / "plain", seed=0, max_restarts=0, **tiny)
    passed = pretrain_base_model(paths.dir, tmp_path / "passed", seed=0, check_min_copy=0.0, **tiny)
    a, b = (load_file(str(d / "model.safetensors")) for d in (plain, passed))
    assert all(a[k].equal(b[k]) for k in a)
    meta = json.loads((passed / "pretrain.json").read_text())
    assert [c["passed"] for c in meta["copy_checks"]] == [True] and 0 <= meta["copy_checks"][0]["answer_copy"] <= 1
    failed = pretrain_base_model(paths.dir, tmp_path / "failed", seed=0, check_min_copy=1.5, max_restarts=1,
                                 fallback_steps=5, **tiny)
    meta = json.loads((failed / "pretrain.json").read_text())
    assert [(c["attempt"], c["passed"]) for c in meta["copy_checks"]] == [(0, False), (1, False)]
    assert [c["seed"] for c in meta["copy_checks"]] == [0, 7919]
    assert [c["p_novel_entity"] for c in meta["copy_checks"]] == [tw.PriorSpec().p_novel_entity, 0.0]
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(failed)).get_vocab() != AutoTokenizer.from_pretrained(str(plain)).get_vocab()
    assert meta["curve"][-1]["step"] == 5 and not any(e.get("abandoned") for e in meta["curve"])  # fallback_steps
    c = load_file(str(failed / "model.safetensors"))
    assert a.keys() == c.keys()  # the kept model is the second attempt's (its own tokenizer, above)


@pytest.mark.slow
def test_pretrain_writes_a_loadable_cached_model(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from demo.pretrain import PretrainSpec, check_spec, pretrain_base_model

    paths = tw.build_world(tmp_path / "w", seed=0, **SMALL)
    out = pretrain_base_model(paths.dir, tmp_path / "m", seed=0, steps=3, batch=4, tokenizer_texts=200)
    meta = json.loads((out / "pretrain.json").read_text())
    assert meta["spec"]["steps"] == 3 and len(meta["curve"]) == 1
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert pretrain_base_model(paths.dir, out, seed=0, steps=3, batch=4, tokenizer_texts=200) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp  # cached
    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    ids = tok.encode(tw.make_prompt("what is the river of x y ?"), return_tensors="pt")
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape[-1] == len(tok)
    from bench.copy_probe import probe  # the copy probe reads a base model (values for 3 entities)

    row = probe(model, tok, tw.load_world(paths.dir), [0, 1, 2])
    assert row["entities"] == 3 and all(0 <= row[k] <= 1 for k in ("p_syllable_1", "greedy_syllable_2"))
    with pytest.raises(ValueError, match="head size"):
        check_spec(PretrainSpec(hidden=64, heads=4))
    with pytest.raises(ValueError, match="fallback_steps -1"):
        check_spec(PretrainSpec(fallback_steps=-1))
