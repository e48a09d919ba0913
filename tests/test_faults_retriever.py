"""Issue #8, item 2: the retriever killed with SIGKILL for a while, then restarted.

    RolloutRunner ── searches ──▶ RetrieverClient (deadline per attempt, retries with backoff)
        │                              │ SIGKILL `cli.py retriever` … restart it (same endpoint)
        │ RetrievalError               ▼
        ▼                        the DEALER reconnects by itself
    rollout ends "retrieval_failed": flagged, reward 0, no <information> block
        ▼
    TrajectoryGroup.retrieval_failed ──▶ learner: such samples get advantage 0 and loss mask 0
    (not in the group's baseline); a group whose every sample failed is refused, its prompt re-queued

- test_client_retries_with_growing_backoff: against a real ROUTER that never answers, the client
  sends 1 + retries attempts, each later one at least timeout + half its backoff after the
  previous (backoff doubles), then raises RetrievalError("timeout").
- test_assemble_never_trains_on_failed_retrievals: the learner's batch gives failed samples
  advantage 0 and mask 0 and computes the others' advantages without them.
- test_retriever_outage_rollouts_and_stack: retriever + learner + actor processes, and beside
  them an in-process RolloutRunner (real engine, real client) probing each phase. Before the
  kill its searches read passages; after SIGKILL its rollouts end flagged, with reward 0 and no
  observation, and the learner's batch would not train on them; after the restart the same
  client finds passages again. In the stack: the worker gave up after 1 + retries attempts, no
  accepted group consists of failed retrievals only (they are refused and re-queued), failed
  samples accepted beside working ones scored nothing, the learner and actor processes lived
  through it, and after the restart accepted groups carry successful searches again.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import torch
import zmq

from bench.faults import ANSWER, QUESTION, Stack, build_world, retriever_outage
from common.wire import decode
from common.protocol import Prompt, RetrieveRequest, TrajectoryGroup
from retriever.client import RetrievalError, RetrieverClient, SyncRetriever


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("faults-retriever-world"), questions=100, corpus=True)


# --------------------------------------------------------------------------- client backoff
def test_client_retries_with_growing_backoff(ipc_path):
    endpoint = ipc_path("silent")
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind(endpoint)
    timeout_s, backoff_s, retries = 0.3, 0.2, 3

    async def go():
        client = RetrieverClient(endpoint, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s)
        try:
            await client.search(["capital of zorland"], topk=3)
        finally:
            await client.close()

    box: list[BaseException] = []

    def client_thread():
        try:
            asyncio.run(go())
        except RetrievalError as e:
            box.append(e)

    arrivals = []
    t = threading.Thread(target=client_thread)
    t.start()
    try:
        while t.is_alive() or router.poll(0):
            if router.poll(100):
                frames = router.recv_multipart()
                arrivals.append((time.monotonic(), decode(frames[1:], expect=RetrieveRequest).request_id))
        t.join()
    finally:
        router.close(0)
        ctx.term()
    err = box[0]
    assert err.code == "timeout" and err.attempts == retries + 1
    assert len(arrivals) == retries + 1 and len({rid for _, rid in arrivals}) == retries + 1
    for k in range(1, len(arrivals)):  # attempt k+1 waits timeout, then a jittered backoff_s·2^(k-1) ∈ [½, 1]×
        gap = arrivals[k][0] - arrivals[k - 1][0]
        assert gap >= timeout_s + 0.5 * backoff_s * 2 ** (k - 1) - 0.01, (k, gap)


# --------------------------------------------------------------------------- learner side
def _group(failed: list[bool], rewards: list[float]) -> TrajectoryGroup:
    n, L = len(failed), 6
    mask = np.tile(np.array([0, 0, 1, 1, 1, 1], dtype=np.uint8), n)
    return TrajectoryGroup(
        group_id="g", peer_id="p", run_id="r", prompt_id=0, num_searches=[1] * n, retrieval_failed=failed,
        correct=[r == 1.0 for r in rewards], lengths=np.full(n, L, np.int32), tokens=np.ones(n * L, np.int32),
        loss_mask=mask, logprobs=np.where(mask, -1.0, 0).astype(np.float32),
        versions=np.where(mask, 0, -1).astype(np.int32),
        rewards=np.asarray(rewards, np.float32))


def test_assemble_never_trains_on_failed_retrievals():
    from learner.losses import grpo_advantages
    from learner.trainer import assemble

    ok = _group([False, False, False, False], [1.0, 0.0, 1.0, 0.0])
    mixed = _group([False, True, False, True], [1.0, 0.0, 0.0, 0.0])
    batch = assemble([ok, mixed], std_norm=True)
    adv = batch.adv.view(2, 4)
    assert torch.equal(adv[0], grpo_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0])))  # untouched
    assert adv[1, 1] == 0 and adv[1, 3] == 0  # failed samples: no advantage ...
    assert torch.allclose(adv[1, [0, 2]], grpo_advantages(torch.tensor([1.0, 0.0])))  # ... and not in the baseline
    mask = batch.mask.view(2, 4, 6)
    assert mask[0].sum() == 16 and mask[1, [1, 3]].sum() == 0 and mask[1, [0, 2]].sum() == 8
    assert assemble([_group([True, True], [0.0, 0.0])], True).mask.sum() == 0


# --------------------------------------------------------------------------- rollouts over a real outage
def _runner(world, endpoint: str):
    from actors.engine import TransformersEngine
    from actors.rollout import RolloutRunner
    from common.config import ActorConfig

    acfg = ActorConfig(max_turns=1, max_new_tokens=24, max_obs_tokens=64, max_total_tokens=512, topk=3)
    client = SyncRetriever(RetrieverClient(endpoint, timeout_s=1.0, retries=1, backoff_s=0.1))
    eng = TransformersEngine(world["model"], dtype="float32")
    return RolloutRunner(eng, client, acfg, greedy=True), client, eng


def _run_group(runner, pid: int, timeout: float = 120.0):
    runner.start_group(Prompt(prompt_id=pid, question=QUESTION, golden_answers=[ANSWER]), 2)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = runner.poll()
        if done:
            return done[0]
        if not runner.engine.has_unfinished():
            runner.wait_searches(0.05)
    pytest.fail("the group did not finish")


class OutageProbe:
    """An in-process RolloutRunner (real engine, real client) run at each phase of the outage."""

    def __init__(self, world, endpoint: str):
        self.runner, self.client, self.eng = _runner(world, endpoint)
        self.tok = self.eng.tokenizer
        self.pid = 0

    def group(self):
        self.pid += 1
        return _run_group(self.runner, self.pid)

    def up(self) -> None:
        for t in self.group().samples:  # the taught model searches, reads the passages and answers
            assert t.num_searches == 1 and not t.retrieval_failed and "<information>" in self.tok.decode(t.tokens)

    def down(self) -> None:
        from learner.trainer import assemble

        g = self.group()
        for t in g.samples:
            text = self.tok.decode(t.tokens[t.prompt_len:])
            assert t.retrieval_failed and t.finish == "retrieval_failed" and t.num_searches == 1
            assert t.result.reward == 0.0 and not t.result.correct
            assert "<information>" not in text and text.rstrip().endswith("</search>")  # no observation at all
            assert t.mask[-1] == 1  # the last token is the model's own </search>
        msg = g.to_message("actor-probe", "run")
        assert msg.retrieval_failed == [True, True] and not msg.rewards.any()
        batch = assemble([msg], std_norm=True)
        assert batch.mask.sum() == 0 and not batch.adv.any()  # nothing of it would be trained on

    def back(self) -> None:  # the same client: its socket reconnected by itself
        g = self.group()
        assert all(not t.retrieval_failed and "<information>" in self.tok.decode(t.tokens) for t in g.samples)
        assert self.runner.stats.retrieval_failures == 2

    def close(self) -> None:
        self.runner.close()
        self.client.close()
        self.eng.close()


# --------------------------------------------------------------------------- the outage, end to end
@pytest.mark.slow
@pytest.mark.long
def test_retriever_outage_rollouts_and_stack(world, procs, tmp_path):
    stack = Stack(tmp_path, world, start=procs.start)
    # lr 1e-7: the taught policy must keep searching through the run (a fast learner would teach
    # the tiny model to answer without searching, and the outage would go unnoticed)
    stack.write_config(actor={"retrieval_timeout_s": 1.0, "retrieval_retries": 2}, learner={"lr": 1e-7})
    probe = OutageProbe(world, f"tcp://127.0.0.1:{stack.ports['retriever']}")
    try:
        r = retriever_outage(stack, outage_s=10.0, warm_groups=3, after_s=3.0, timeout=400,
                             hooks={"up": probe.up, "down": probe.down, "back": probe.back})
    finally:
        probe.close()
    print(f"\nretriever outage: {r}")
    actor_log = stack.log("actor").read_text(errors="replace")
    learner_log = stack.log("learner").read_text(errors="replace")
    assert "after 3 attempt(s)" in actor_log  # 1 + retrieval_retries attempts before giving up
    assert "retrieval failed in every sample" in learner_log  # refused, prompt handed out again
    groups = stack.groups()
    assert not any(g["retrieval_failed"].all() for g in groups)  # never accepted as training data
    for g in groups:  # a failed sample, where one was accepted beside working ones, scored nothing
        assert not g["rewards"][g["retrieval_failed"]].any()
    assert r["after"]["groups"] >= 1 and r["after"]["failed_frac"] == 0.0
    assert stack.procs["learner"].poll() is None and stack.procs["actor"].poll() is None
