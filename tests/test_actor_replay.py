"""The recording behind `bench/actor_bench.py --compare bare` (bench/actor_replay.py): every turn the
rollout loop adds is recorded with the engine step it was added before and the tokens it made, and
the replay schedule asks bare vLLM for exactly those turns at those steps. On the plain
transformers engine (the replay itself needs vLLM: the bench checks its token count every round)."""

from __future__ import annotations

import pytest

from actors.engine import SamplingSpec, TransformersEngine
from bench.actor_replay import RecordingEngine, replay_schedule


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from demo.tinymodel import build_tiny_model

    engine = TransformersEngine(build_tiny_model(tmp_path_factory.mktemp("m") / "tiny"), dtype="float32")
    engine.core = None  # no vLLM core to time here; the recorder wraps it all the same
    return engine


def test_recording_counts_each_turns_tokens_and_the_step_it_joined(engine):
    rec = RecordingEngine(engine)
    rec.add("a", [5, 6, 7], SamplingSpec(max_tokens=4, ignore_eos=True))
    rec.add("b", [5, 6], SamplingSpec(max_tokens=2, ignore_eos=True))
    made = {"a": 0, "b": 0, "c": 0}
    step = 0
    while rec.has_unfinished():
        if step == 1:  # a turn that joins while others run (a search came back)
            rec.add("c", [9, 9, 9, 9], SamplingSpec(max_tokens=3, ignore_eos=True))
        for o in rec.step():
            made[o.req_id] += len(o.token_ids)
        step += 1
    assert {k: (t.add_step, t.new, len(t.prompt)) for k, t in rec.turns.items()} == \
        {"a": (0, 4, 3), "b": (0, 2, 2), "c": (1, 3, 4)}
    assert made == {k: t.new for k, t in rec.turns.items()} and rec.steps == step == 4
    assert rec.step_cpu_s >= 0.0


def test_replay_schedule_groups_turns_by_step_and_skips_empty_ones(engine):
    rec = RecordingEngine(engine)
    rec.add("x", [5], SamplingSpec(max_tokens=1, ignore_eos=True))
    rec.step()
    rec.add("y", [5, 6], SamplingSpec(max_tokens=1, ignore_eos=True))
    rec.add("z", [7], SamplingSpec(max_tokens=1, ignore_eos=True))
    rec.abort("z")  # made no token: bare vLLM cannot be asked for zero
    rec.step()
    schedule = replay_schedule(rec.turns)
    assert {k: [rid for rid, _ in v] for k, v in schedule.items()} == {0: ["x"], 1: ["y"]}
    assert sum(t.new for v in schedule.values() for _, t in v) == 2
    rec.reset()
    assert rec.turns == {} and rec.steps == 0


def test_grown_model_computes_the_same_logits(tmp_path):
    """bench/grow_model.py: the wider, deeper copy the actor bench runs to see the ratio at a larger
    engine cost writes the demo's rollouts only if its logits are the original's."""
    import torch
    from transformers import AutoModelForCausalLM

    from bench.grow_model import grow
    from demo.tinymodel import build_tiny_model

    src = build_tiny_model(tmp_path / "small", hidden=64, heads=2, layers=2)
    model = AutoModelForCausalLM.from_pretrained(str(src))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every weight, bias and norm off its initial value, so nothing is trivially 0 or 1
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    model.save_pretrained(str(src), safe_serialization=True)
    cfg = grow(src, tmp_path / "grown", hidden=192, layers=5)
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]) == (192, 5, 6)
    big = AutoModelForCausalLM.from_pretrained(str(tmp_path / "grown")).eval()
    assert sum(p.numel() for p in big.parameters()) > 10 * sum(p.numel() for p in model.parameters())
    x = torch.randint(3, model.config.vocab_size, (3, 50), generator=gen)
    with torch.no_grad():
        small_logits, big_logits = model.eval()(x).logits, big(x).logits
    torch.testing.assert_close(big_logits, small_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(big_logits.argmax(-1), small_logits.argmax(-1))
    with pytest.raises(SystemExit, match="multiple of 64"):
        grow(src, tmp_path / "bad", hidden=100, layers=5)
