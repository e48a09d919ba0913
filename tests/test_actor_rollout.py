"""The rollout state machine and the engine's stop handling, on the plain transformers engine
(no vLLM here: the vLLM path is tests/test_actor_vllm.py). Turn ends are fed to the runner as the
engine would report them, so every branch is reached deterministically: invalid action, search
(batched across rollouts), answer, EOS, turn and token budgets, retrieval failure (a real client
against a retriever that is not there)."""

from __future__ import annotations

import numpy as np
import pytest

from actors.engine import SamplingSpec, StepOutput, TransformersEngine
from actors.rollout import INVALID_ACTION, RolloutRunner, build_prompt_ids
from common.config import ActorConfig, TransportConfig
from common.wire import decode, encode
from common.protocol import Passage, Prompt, TrajectoryGroup

PASSAGES = [Passage(id="0", title="zorland", text="the capital of zorland is mirabel .", score=0.9)]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from demo.teach import script_texts
    from demo.tinymodel import build_tiny_model

    return TransformersEngine(build_tiny_model(tmp_path_factory.mktemp("m") / "tiny", texts=script_texts()),
                              dtype="float32")


@pytest.fixture
def dead_searcher():
    """The real retriever client pointed at an endpoint nobody serves: every call fails."""
    from retriever.client import RetrieverClient, SyncRetriever

    s = SyncRetriever(RetrieverClient("ipc:///nonexistent/scout-retriever", TransportConfig(),
                                      timeout_s=0.3, retries=0))
    yield s
    s.close()


def make_runner(engine, searcher=None, **kw) -> RolloutRunner:
    cfg = ActorConfig(**{"max_new_tokens": 16, "max_turns": 2, "max_obs_tokens": 40, "max_total_tokens": 512, **kw})
    for rid in list(engine._reqs):
        engine.abort(rid)
    return RolloutRunner(engine, searcher, cfg)


def end_turn(runner, t, text: str, reason: str, stop: str | None = None, version: int = 3) -> list[int]:
    """Finish the trajectory's running turn as if the engine had generated `text`."""
    ids = runner.tok(text, add_special_tokens=False)["input_ids"]
    rid = t.req_id
    assert runner.running.get(rid) is t, "the trajectory has a turn running in the engine"
    runner.engine.abort(rid)
    runner._on_output(StepOutput(rid, list(ids), [-0.5] * len(ids), version, True, reason, stop))
    return list(ids)


def start(runner, n=1, answers=("mirabel",)):
    g = runner.start_group(Prompt(prompt_id=3, question="what is the capital of zorland ?",
                                  golden_answers=list(answers)), n)
    return g, g.samples


def test_invalid_action_gets_corrective_observation_with_mask_zero(engine):
    runner = make_runner(engine)
    g, (t,) = start(runner)
    p = t.prompt_len
    gen = end_turn(runner, t, "<think> hmm </think> no action here", "length")
    obs = runner._encode_cached(INVALID_ACTION)
    assert t.num_invalid == 1 and not t.done and t.turns == 1
    assert t.tokens == build_prompt_ids(engine.tokenizer, g.prompt.question) + gen + obs
    assert t.mask == [0] * p + [1] * len(gen) + [0] * len(obs)
    assert t.versions == [-1] * p + [3] * len(gen) + [-1] * len(obs)
    assert t.logprobs == [0.0] * p + [-0.5] * len(gen) + [0.0] * len(obs)
    assert runner.running[t.req_id] is t and engine._reqs[t.req_id].prompt_ids == t.tokens  # next turn sent as ids


def test_search_read_answer_and_reward(engine):
    runner = make_runner(engine)
    g, (t,) = start(runner, answers=("Mirabel",))
    end_turn(runner, t, "<think> look it up </think> <search> capital of zorland </search>", "stop", "</search>")
    assert runner.queued == [(t, "capital of zorland")] and t.num_searches == 1
    runner.queued.clear()
    obs = runner.observation_ids(PASSAGES)
    runner._observe(t, obs)  # what a successful search batch does
    assert t.tokens[-len(obs):] == obs and t.mask[-len(obs):] == [0] * len(obs)
    text = runner.tok.decode(obs)
    assert text.startswith("\n\n<information>Doc 1(Title: zorland)") and text.endswith("</information>\n\n")
    end_turn(runner, t, "<answer> mirabel </answer>", "stop", "</answer>", version=4)
    assert t.done and t.finish == "answer" and t.result.correct and t.result.reward == 1.0
    assert runner.poll() == [g]
    msg = decode(encode(g.to_message("actor-x-0", "run")), expect=TrajectoryGroup)
    gen = msg.loss_mask.astype(bool)
    assert set(msg.versions[gen].tolist()) == {3, 4} and (msg.versions[~gen] == -1).all()
    assert msg.num_searches == [1] and msg.correct == [True] and msg.rewards.tolist() == [1.0]
    # well formed, reasoned before searching, answered; no search went through a searcher here
    assert msg.behaviour == [1 | 2 | 4] and msg.bad_searches == [0]


def test_a_group_is_handed_over_once_when_its_last_sample_ends(engine):
    """poll() returns a group exactly once, on the first poll after its last sample finished, and
    never one whose samples are still running; abort_all forgets finished groups not yet polled."""
    runner = make_runner(engine)
    g, (a, b) = start(runner, n=2)
    h, (c,) = start(runner, n=1)
    end_turn(runner, a, "<answer> mirabel </answer>", "stop", "</answer>")
    assert runner.poll() == [] and set(runner.groups) == {g.group_id, h.group_id}
    end_turn(runner, b, "<answer> nope </answer>", "stop", "</answer>")
    assert runner.poll() == [g] and runner.poll() == [] and set(runner.groups) == {h.group_id}
    end_turn(runner, c, "<answer> mirabel </answer>", "stop", "</answer>")
    runner.abort_all()
    assert runner.poll() == [] and runner.groups == {}
    with pytest.raises(ValueError, match="at least one sample"):
        runner.start_group(Prompt(prompt_id=4, question="q ?", golden_answers=["x"]), 0)


def test_a_turn_handed_over_whole_keeps_each_tokens_version(engine):
    """A per-turn output (vLLM's whole turn, an update in the middle of it) carries one version per
    token: the trajectory and the group sent keep them, token by token."""
    runner = make_runner(engine)
    g, (t,) = start(runner, answers=("mirabel",))
    ids = runner.tok("<think> so </think> <answer> mirabel </answer>", add_special_tokens=False)["input_ids"]
    k = len(ids) // 2
    versions = [5] * k + [6] * (len(ids) - k)
    runner.engine.abort(t.req_id)
    runner._on_output(StepOutput(t.req_id, list(ids), [-0.5] * len(ids), 6, True, "stop", "</answer>",
                                 versions=versions, final=True))
    assert t.done and t.versions[t.prompt_len:] == versions
    msg = decode(encode(g.to_message("actor-x-0", "run")), expect=TrajectoryGroup)
    assert msg.versions[msg.loss_mask.astype(bool)].tolist() == versions


class ListSearcher:
    """A searcher that always finds the same passages (the runner's side of retrieval only)."""

    def search(self, queries, topk):
        return [list(PASSAGES) for _ in queries]


def test_behaviour_of_real_rollouts_reaches_the_group(engine):
    """Two rollouts through the runner's real search path: one reasons, searches (the passage holds
    the answer) and answers; the other takes an invalid turn, searches without reasoning and runs
    out of turns."""
    runner = make_runner(engine, ListSearcher())
    g, (a, b) = start(runner, n=2, answers=("Mirabel",))
    end_turn(runner, a, "<think> look it up </think> <search> capital of zorland </search>", "stop", "</search>")
    end_turn(runner, b, "no idea", "length")
    end_turn(runner, b, "<search> zorland </search>", "stop", "</search>")
    for _ in range(200):  # the search batch returns through the runner's threads
        runner.poll()
        if not runner.in_search and not runner.queued and a.turns == 1 and len(a.retrieved) == 1 \
                and len(b.retrieved) == 1:
            break
        runner.wait_searches(0.05)
    assert a.search_hit and b.search_hit
    end_turn(runner, a, "<answer> mirabel </answer>", "stop", "</answer>")
    end_turn(runner, b, "<think> hmm </think>", "length")
    done = []
    for _ in range(50):
        done = done or runner.poll()
    msg = decode(encode(g.to_message("actor-x-0", "run")), expect=TrajectoryGroup)
    assert msg.behaviour == [1 | 2 | 4 | 8, 8], msg.behaviour  # b: no answer, no reasoning first, ill formed
    assert msg.bad_searches == [0, 1] and msg.num_searches == [1, 1]


def test_observation_truncated_to_max_obs_tokens(engine):
    runner = make_runner(engine, max_obs_tokens=5)
    long = [Passage(id=str(i), title="t", text="the quick brown fox jumps over the lazy dog", score=0.0) for i in range(3)]
    obs = runner.observation_ids(long)
    head, tail = runner._encode_cached("\n\n<information>"), runner._encode_cached("</information>\n\n")
    assert obs[:len(head)] == head and obs[-len(tail):] == tail and len(obs) == len(head) + 5 + len(tail)


def test_observation_ids_are_cached_and_equal_a_fresh_tokenisation(engine, monkeypatch):
    """Repeated passages (a group's samples read the same ones) are tokenised once; the ids are
    exactly those of a fresh tokenisation; the cache stays bounded."""
    import actors.rollout as rollout
    from retriever.client import format_passages

    runner = make_runner(engine)
    passages = [Passage(id="1", title="zorland", text="the capital of zorland is mirabel .", score=0.5)]
    fresh = list(engine.tokenizer(format_passages(passages).strip(), add_special_tokens=False)["input_ids"])
    calls = []
    encode = runner.text.encode
    runner.text.encode = lambda text, special: calls.append(text) or encode(text, special)
    first = runner.observation_ids(passages)
    assert runner.observation_ids(passages) == first and len(calls) == 3  # the body and the two tags, once
    head = runner._encode_cached("\n\n<information>")
    assert first[len(head):len(head) + len(fresh)] == fresh
    first.append(-1)  # the caller's list is its own
    assert -1 not in runner.observation_ids(passages)
    monkeypatch.setattr(rollout, "OBS_CACHE_SIZE", 4)
    for i in range(10):
        runner._encode_cached(f"passage {i}")
    assert len(runner._obs_cache) == 4


def test_last_turn_eos_and_token_budget(engine):
    runner = make_runner(engine, max_turns=1)
    _, (a, b) = start(runner, n=2)
    end_turn(runner, a, "<search> q </search>", "stop", "</search>")
    runner.queued.clear()
    runner._observe(a, runner.observation_ids(PASSAGES))
    end_turn(runner, a, "<search> again </search>", "stop", "</search>")  # turn 2 of max_turns + 1 = 2
    assert a.done and a.finish == "max_turns" and a.num_searches == 1 and a.result.reward == 0.0
    end_turn(runner, b, "<think> done", "eos")
    assert b.done and b.finish == "eos" and b.result.answer is None
    runner = make_runner(engine, max_turns=3)
    _, (c,) = start(runner)
    end_turn(runner, c, "just words", "length")  # the corrective observation does fit...
    assert not c.done
    more = len(runner.tok("more words", add_special_tokens=False)["input_ids"])
    runner.cfg = runner.cfg.model_copy(update={"max_total_tokens": len(c.tokens) + more + 3})
    end_turn(runner, c, "more words", "length")  # ...this one would not
    assert c.done and c.finish == "max_total_tokens"
    assert len(c.tokens) <= runner.cfg.max_total_tokens


def test_answer_in_a_turn_cut_by_length(engine):
    runner = make_runner(engine)
    _, (t,) = start(runner)
    end_turn(runner, t, "<answer> mirabel </answer> and then", "length")
    assert t.done and t.finish == "answer" and t.result.correct


def test_searches_batched_and_retrieval_failure_never_scored(engine, dead_searcher):
    runner = make_runner(engine, dead_searcher)
    g, (a, b) = start(runner, n=2)
    end_turn(runner, a, "<search> capital of zorland </search>", "stop", "</search>")
    end_turn(runner, b, "<search> zorland </search>", "stop", "</search>")
    runner._dispatch_searches()
    assert len(runner.in_search) == 1 and [q for _, q in next(iter(runner.in_search.values()))] == \
        ["capital of zorland", "zorland"], "both rollouts' queries go out as one batch"
    done = []
    for _ in range(200):
        done = runner.poll()
        if done:
            break
        runner.wait_searches(0.1)
    assert done == [g]
    for t in (a, b):
        assert t.retrieval_failed and t.finish == "retrieval_failed" and t.result.reward == 0.0
    assert runner.stats.retrieval_failures == 2
    msg = g.to_message("actor-x-0", "run")
    assert msg.retrieval_failed == [True, True] and not msg.rewards.any()


def test_engine_stop_strings_eos_and_length(engine):
    tok = engine.tokenizer
    ids = tok("the capital of zorland is", add_special_tokens=False)["input_ids"]
    engine.add("s", [1, 2, 3], SamplingSpec(max_tokens=50, stop=("capital of",)))
    req = engine._reqs["s"]
    out = StepOutput("s", list(ids), [-0.1] * len(ids), 0)
    engine._apply_stop(req, out)
    assert out.finished and out.finish_reason == "stop" and out.stop_string == "capital of"
    assert tok.decode(out.token_ids).endswith("capital of") and len(out.logprobs) == len(out.token_ids)
    engine.add("e", [1, 2, 3], SamplingSpec(max_tokens=50))
    out = StepOutput("e", [ids[0], tok.eos_token_id, ids[1]], [-0.1] * 3, 0)
    engine._apply_stop(engine._reqs["e"], out)
    assert (out.finish_reason, out.token_ids) == ("eos", [ids[0], tok.eos_token_id])
    engine.add("l", [1, 2, 3], SamplingSpec(max_tokens=2))
    out = StepOutput("l", list(ids), [-0.1] * len(ids), 0)
    engine._apply_stop(engine._reqs["l"], out)
    assert (out.finish_reason, out.token_ids) == ("length", list(ids[:2]))
    for rid in ("s", "e", "l"):
        engine.abort(rid)


def test_single_token_stop_is_a_hit_without_a_window_decode(engine, monkeypatch):
    """A stop string that is one token (`</search>` here) ends the turn on that token without any
    decode; the same string spelled in several tokens is still found by the window check, which
    decodes a window only after a token that can end a stop string."""
    tok = engine.tokenizer
    sid = tok.convert_tokens_to_ids("</search>")
    stops = ("</search>", "capital of")
    assert engine.single_token_stops(stops) == {sid: "</search>"}, "'capital of' is several tokens"
    head = tok("<search> zorland", add_special_tokens=False)["input_ids"]
    tail = tok(" and more", add_special_tokens=False)["input_ids"]
    decoded, real_decode = [], tok.decode
    monkeypatch.setattr(tok, "decode", lambda ids, **kw: (decoded.append(list(ids)), real_decode(ids, **kw))[1])
    spelled = [tok.convert_tokens_to_ids(c) for c in "</search>"]  # byte-level pieces, one a character
    for rid, stop_ids in (("single", [sid]), ("spelled", spelled)):
        engine.add(rid, [1, 2, 3], SamplingSpec(max_tokens=50, stop=stops))
        ids = head + stop_ids + tail
        out = StepOutput(rid, list(ids), [-0.1] * len(ids), 0)
        engine._apply_stop(engine._reqs[rid], out)
        assert (out.finished, out.finish_reason, out.stop_string) == (True, "stop", "</search>")
        assert out.token_ids == head + stop_ids and len(out.logprobs) == len(out.token_ids)
        engine.abort(rid)
    windows = [d for d in decoded if len(d) > 1]  # decodes of the newest tokens' window
    assert sid not in [d[-1] for d in decoded], "the single-token stop needed no decode"
    # one window check, at the spelled one's `>` (with and without it): `<search>` ends in `>`
    # too but cannot end `</search>`, so it needed none
    assert windows == [head + spelled, head + spelled[:-1]]


def test_transformers_engine_generates_and_scores_its_own_tokens(engine):
    """The fallback engine end to end: sampled tokens' logprobs equal its own recomputation."""
    prompt = build_prompt_ids(engine.tokenizer, "who founded zorland ?")
    engine.add("g", prompt, SamplingSpec(max_tokens=12, temperature=0.8, top_p=0.95, ignore_eos=True))
    toks, lps = [], []
    while engine.has_unfinished():
        for out in engine.step():
            toks += out.token_ids
            lps += out.logprobs
    assert len(toks) == 12
    # top_p < 1 renormalises over the kept set, so the processed logprob is >= the tempered one
    scored = np.asarray(engine.score(prompt + toks, len(prompt), temperature=0.8))
    assert np.all(np.asarray(lps) >= scored - 1e-5)


def test_chat_template_is_applied(engine):
    tok = engine.tokenizer
    try:
        tok.chat_template = "{% for m in messages %}<|bos|>{{ m['role'] }}: {{ m['content'] }}{% endfor %}" \
                            "{% if add_generation_prompt %} assistant:{% endif %}"
        ids = build_prompt_ids(tok, "q?")
        text = tok.decode(ids)
        assert text.startswith("<|bos|>user: ") and text.endswith(" assistant:") and "Question: q?" in text
    finally:
        tok.chat_template = None
    assert not tok.decode(build_prompt_ids(tok, "q?")).startswith("<|bos|>user")


def test_no_search_control_finds_nothing():
    from actors.rollout import NoSearch, make_searcher
    from common.config import load_config

    searcher = make_searcher(load_config(None, ["actor.no_search=true"], environ={}))
    assert isinstance(searcher, NoSearch)
    assert searcher.search(["capital of zorland", "river of x"], 3) == [[], []]


def test_prompt_template_replaces_the_instruction(engine):
    ids = build_prompt_ids(engine.tokenizer, " what is the capital of zorland ? ", "question: {question}\n")
    assert engine.tokenizer.decode(ids, skip_special_tokens=True) == "question: what is the capital of zorland ?\n"
    runner = make_runner(engine, prompt_template="question: {question}\n")
    g, (t,) = start(runner)
    assert t.tokens[: t.prompt_len] == ids
