"""The embedded demo's plumbing: its recipe never overrides what a user set; the eval's
right-search rate; and (slow) a short demo run end to end that must raise the reward."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.config import load_config
from tests.conftest import ROOT


def test_recipe_fills_only_what_the_user_left_alone():
    from demo.recipe import DEMO_RECIPE, apply_recipe

    cfg = load_config(None, ["learner.lr=1e-5", "actor.n_samples=3"])
    tree = apply_recipe(cfg, cfg.model_dump(mode="json", exclude_none=True))
    assert tree["learner"]["lr"] == 1e-5 and tree["actor"]["n_samples"] == 3  # the user's values stay
    assert tree["learner"]["groups_per_step"] == DEMO_RECIPE["learner"]["groups_per_step"]
    assert tree["actor"]["dtype"] == "float32"
    # the result is a valid config
    from common.config import ScoutConfig

    assert ScoutConfig.model_validate(tree).learner.std_norm is False


def test_one_seed_reaches_rl_sampling_and_prompt_order(tmp_path):
    import tomllib

    from demo.recipe import write_run_config

    paths = {"index": tmp_path / "i", "train": tmp_path / "t.jsonl", "model": tmp_path / "m"}
    paths["model"].mkdir()
    (paths["model"] / "config.json").write_text('{"max_position_embeddings": 1024}')
    run = tmp_path / "run"
    run.mkdir()
    tree = tomllib.loads(write_run_config(load_config(None, ["demo.seed=7"], environ={}), paths, run).read_text())
    assert tree["actor"]["seed"] == tree["learner"]["seed"] == tree["demo"]["seed"] == 7
    tree = tomllib.loads(write_run_config(load_config(None, ["demo.seed=7", "actor.seed=3"], environ={}), paths,
                                          run).read_text())
    assert tree["actor"]["seed"] == 3 and tree["learner"]["seed"] == 7  # a seed the user set stays


def test_the_cached_index_follows_the_world(tmp_path):
    """Another --seed builds another world in the same demo folder: its index is rebuilt, never
    reused. A build leaves torch's thread count as it found it (its encoder sets half the cores
    for the whole process, and the demo's pretraining, which runs after it, ran on one core)."""
    import torch

    from demo.recipe import _cached_index
    from demo.toyworld import build_world

    cfg = load_config(None, environ={})
    out = tmp_path / "index"
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, os.cpu_count() or 1))  # above the encoder's half (vLLM in this process may cap it)
    want = torch.get_num_threads()
    try:
        for seed in (0, 1, 1):
            world = build_world(tmp_path / "world", seed=seed, n_entities=80, heldout_entities=16)
            digest = json.loads(world.meta.read_text())["digest"]
            before = (out / "world-digest").read_text() if out.is_dir() else None
            mtime = (out / "manifest.json").stat().st_mtime_ns if out.is_dir() else None
            _cached_index(cfg, world.corpus, out, digest)
            assert (out / "world-digest").read_text() == digest
            if before == digest:  # same world: the index is kept as it was
                assert (out / "manifest.json").stat().st_mtime_ns == mtime
            assert torch.get_num_threads() == want
    finally:
        torch.set_num_threads(threads)
    ids = {json.loads(line)["id"] for line in world.corpus.read_text().splitlines()}
    assert json.loads((out / "manifest.json").read_text())["count"] == len(ids)  # this world's passages


def test_prepare_only_refuses_a_base_model_that_is_no_model_folder(tmp_path):
    """`demo --prepare-only` (and the demo) check demo.base_model before building anything."""
    r = subprocess.run([sys.executable, "cli.py", "demo", "--prepare-only", "--set", f"demo.dir='{tmp_path / 'd'}'",
                        "--set", f"demo.base_model='{tmp_path}'"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1, r.stderr[-2000:]
    assert f"demo.base_model {tmp_path} is not an HF model folder" in r.stderr
    assert not (tmp_path / "d").exists()  # nothing was built


def test_right_search_rate_from_passage_ids(tmp_path):
    from actors.evaluate import gold_passages, mark_right_search, summarise

    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": f"q{i}", "golden_answers": ["a"], "passage_id": f"p{i}"}) + "\n"
                          for i in range(3)))
    gold = gold_passages(qa)
    assert gold == {0: "p0", 1: "p1", 2: "p2"}
    base = {"data_source": "", "em": 0.0, "f1": 0.0, "substring": 0.0, "answer": None, "retrieval_failed": False}
    recs = [{**base, "prompt_id": 0, "searches": 1, "retrieved": [["p9", "p0"]]},
            {**base, "prompt_id": 1, "searches": 2, "retrieved": [["p5"], ["p7"]]},
            {**base, "prompt_id": 2, "searches": 0, "retrieved": []}]
    mark_right_search(recs, gold)
    assert [r["right_search"] for r in recs] == [True, False, False]
    assert summarise(recs)["right_search_rate"] == pytest.approx(1 / 3)
    # QA files without passage ids (Search-R1's) report no right-search rate
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"question": "q", "golden_answers": ["a"]}) + "\n")
    assert gold_passages(plain) == {}
    assert "right_search_rate" not in summarise([{**base, "prompt_id": 0, "searches": 0, "retrieved": []}])


@pytest.mark.slow
def test_short_demo_raises_the_reward(procs, tmp_path, demo_prepared):
    """The demo's own pipeline (world, index, pretraining, retriever, vLLM actor, FSDP learner,
    evals) with fewer learner steps: the reward must rise and held-out EM must improve. The world,
    indexes and base model come from `demo --prepare-only`, run in the background meanwhile
    (conftest: it runs last); the demo must find them all cached."""
    run = tmp_path / "run"
    demo_dir = demo_prepared
    # 40 steps: the reward's takeoff comes anywhere from step ~10 to past step 25 (issue #17: it
    # depends on the actor/learner timing), and 25 steps missed it in 2 of 3 CI runs on 2026-12-06
    p = procs.start(["cli.py", "demo", "--steps", "40", "--set", f"demo.dir='{demo_dir}'",
                     "--set", f"run_dir='{run}'", "--set", "demo.eval_limit=50"],
                    stdout=open(tmp_path / "demo.log", "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    rc = p.wait(timeout=1500)
    log = (tmp_path / "demo.log").read_text(errors="replace")
    assert rc == 0, log[-4000:]
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 40
    first = sum(s["reward_mean"] for s in steps[:5]) / 5
    last = sum(s["reward_mean"] for s in steps[-5:]) / 5
    print(f"reward: first 5 steps {first:.3f}, last 5 steps {last:.3f}")
    assert last > first + 0.1, (first, last)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["em_after"] > summary["em_before"], summary
    assert summary["em_swapped_after"] > 0  # answers come from the retrieved passages
    assert (run / "demo.png").stat().st_size > 10_000
    assert "held-out EM: before" in log
    for f in [tmp_path / "demo.log", *sorted((run / "logs").glob("*.log"))]:  # the terminal and every role's log
        assert "nanobind: leaked" not in f.read_text(errors="replace"), f"{f.name}: exit report (Makefile removes triton)"
    assert "pretrain step" not in log and "embedded" not in log, "the prepared folder was not reused"
    from demo.recipe import DEMO_RECIPE

    logged = [line for line in log.splitlines() if "demo resolved config:" in line]
    assert len(logged) == 1, "the demo logs its config once, with the recipe applied"
    config = json.loads(logged[0].split("demo resolved config: ", 1)[1])
    assert config["learner"]["micro_batch_tokens"] == DEMO_RECIPE["learner"]["micro_batch_tokens"]
    assert config["learner"]["steps"] == 40 and config["run_dir"] == str(run)


@pytest.mark.slow
def test_ctrl_c_stops_every_process_of_the_demo(procs, tmp_path, demo_prepared):
    """SIGINT while the learner and the actor run: the demo exits and leaves no process behind.
    The world and indexes come from the prepared folder (only read); the model is a tiny one."""
    import signal
    import time

    from demo.tinymodel import build_tiny_model

    model = build_tiny_model(tmp_path / "model", layers=1, hidden=64, heads=2)
    run = tmp_path / "run"
    p = procs.start(["cli.py", "demo", "--set", f"demo.dir='{demo_prepared}'", "--set", f"run_dir='{run}'",
                     "--set", f"demo.base_model='{model}'", "--set", "demo.eval_limit=4", "--steps", "1000"],
                    stdout=open(tmp_path / "demo.log", "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    deadline = time.monotonic() + 600
    while "started actor" not in (tmp_path / "demo.log").read_text(errors="replace"):
        assert p.poll() is None and time.monotonic() < deadline, (tmp_path / "demo.log").read_text()[-3000:]
        time.sleep(1)
    time.sleep(5)

    from bench.soak import alive, tree

    family = tree(p.pid)  # the demo and every process below it (retrievers, learner, actor, workers)
    assert len(family) >= 5
    os.kill(p.pid, signal.SIGINT)
    assert p.wait(timeout=300) == 130  # generous: each child gets its own stop timeout on a loaded machine
    deadline = time.monotonic() + 90
    while alive(family) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = {}
    for pid in alive(family):
        try:
            left[pid] = Path(f"/proc/{pid}/cmdline").read_bytes()[:200]
        except OSError:  # gone meanwhile
            pass
    assert left == {}
    assert "interrupted" in (tmp_path / "demo.log").read_text()
