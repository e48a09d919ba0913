"""Damaged checkpoints (issue #21, case 5): checksums in meta.json, --resume skipping a checkpoint
that does not verify, a save that fails (disk full) while training goes on, kill -9 mid-save, and
retention that never counts a damaged checkpoint.

In process (tiny model, real DCP files, real RLIMIT_FSIZE):
- test_manifest_lists_every_file_with_its_checksum
- test_damaged_checkpoint_is_skipped_for_the_newest_that_verifies[truncated|missing|flipped|meta]
- test_checkpoint_without_checksums_still_loads_with_a_warning
- test_resume_skips_a_damaged_latest_and_refuses_when_none_verifies (the Learner's --resume path)
- test_disk_full_save_fails_cleanly_and_the_previous_checkpoint_stays
- test_retention_never_counts_a_damaged_checkpoint
Real process (`cli.py learner` fed by a test-side actor):
- test_disk_full_and_kill_9_mid_save_then_resume
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import resource
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from tests.test_learner_checkpoint import FakeActor, group_for, tiny_model

torch.set_num_threads(2)

SHARD = "__0_0.distcp"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model(tmp_path_factory)


@pytest.fixture
def one_rank():
    from learner.trainer import init_distributed

    d = init_distributed()
    yield d
    torch.distributed.destroy_process_group()


@pytest.fixture
def trainer(tiny, one_rank):
    from common.config import load_config
    from learner.trainer import Trainer

    lc = load_config(None, [f"learner.model='{tiny}'", "learner.n_samples=2", "learner.lr=1e-3",
                            "learner.micro_batch_tokens=32"]).learner
    return Trainer(lc, one_rank)


def _save(t, root: Path, step: int, keep: int = 3, model_path: str | None = None) -> Path:
    """One training step (so checkpoints differ), then a checkpoint the Learner could resume."""
    from learner.checkpoint import save_checkpoint
    from learner.trainer import assemble

    t.train_step(assemble([group_for(step * 2 + k, 0, t.vocab_size) for k in range(2)], True))
    meta = {"version": step, "scheduler": t.scheduler.state_dict(), "dispatcher": None}
    return save_checkpoint(root, step, t.model, t.optimizer, meta, model_path, rank=0, keep=keep)


def _params(t) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in t.full_parameters()}


def _flip_byte(f: Path) -> None:
    time.sleep(0.05)  # a later write than the save's, as real damage is (mtime has the coarse clock's resolution)
    with open(f, "r+b") as fh:
        fh.seek(f.stat().st_size // 2)
        b = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([b[0] ^ 0x40]))


def _damage(path: Path, how: str) -> str:
    """Damage a checkpoint; returns the file the error must name."""
    if how == "truncated":
        with open(path / SHARD, "r+b") as fh:
            fh.truncate((path / SHARD).stat().st_size // 2)
        return SHARD
    if how == "missing":
        (path / "rng-0.safetensors").unlink()
        return "rng-0.safetensors"
    if how == "flipped":
        _flip_byte(path / SHARD)
        return SHARD
    (path / "meta.json").write_text('{"step": 2, "files": {')  # cut short
    return "meta.json"


# --------------------------------------------------------------------------- in process
def test_manifest_lists_every_file_with_its_checksum(trainer, tiny, tmp_path):
    from learner.checkpoint import check_checkpoint

    path = _save(trainer, tmp_path / "ckpt", 1, model_path=tiny)
    files = json.loads((path / "meta.json").read_text())["files"]
    on_disk = {f.relative_to(path).as_posix() for f in path.rglob("*") if f.is_file()} - {"meta.json"}
    assert set(files) == on_disk  # shards, .metadata, RNG, hf/*; the ranks' .sums-*.json are gone
    assert {SHARD, ".metadata", "rng-0.safetensors", "hf/config.json"} <= on_disk
    for name, want in files.items():
        data = (path / name).read_bytes()
        assert want == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    assert check_checkpoint(path) is None


@pytest.mark.parametrize("how", ["truncated", "missing", "flipped", "meta"])
def test_damaged_checkpoint_is_skipped_for_the_newest_that_verifies(trainer, one_rank, tmp_path, caplog, how):
    from learner.checkpoint import find_latest, find_resumable, load_checkpoint

    root = tmp_path / "ckpt"
    good = _save(trainer, root, 1)
    good_params = _params(trainer)
    bad = _save(trainer, root, 2)
    name = _damage(bad, how)
    assert find_latest(root) == bad  # complete by the old test (meta.json and .metadata there) ...
    with caplog.at_level(logging.ERROR, logger="scout.learner.checkpoint"):
        path, skipped = find_resumable(root)  # ... but it does not verify
    assert path == good and [p for p, _ in skipped] == [bad]
    why = skipped[0][1]
    assert why.startswith(name) and ("expected" in why if how != "meta" else "unreadable" in why), why
    assert f"checkpoint {bad} is damaged: {name}" in caplog.text
    torch.manual_seed(7)
    _save(trainer, tmp_path / "other", 9)  # move the weights away, then load the good one back
    load_checkpoint(path, trainer.model, trainer.optimizer, rank=0)
    assert all(torch.equal(good_params[k], v) for k, v in _params(trainer).items())


def test_checkpoint_without_checksums_still_loads_with_a_warning(trainer, tmp_path, caplog):
    from learner.checkpoint import find_resumable, load_checkpoint

    path = _save(trainer, tmp_path / "ckpt", 1)
    meta = json.loads((path / "meta.json").read_text())
    del meta["files"]  # as the previous code wrote it
    (path / "meta.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="scout.learner.checkpoint"):
        assert find_resumable(tmp_path / "ckpt") == (path, [])
    assert "has no checksums" in caplog.text
    assert load_checkpoint(path, trainer.model, trainer.optimizer, rank=0)["step"] == 1


def test_resume_skips_a_damaged_latest_and_refuses_when_none_verifies(trainer, tiny, one_rank, tmp_path, caplog):
    from common.config import ConfigError, load_config
    from learner.main import Learner

    root = tmp_path / "ckpt"
    _save(trainer, root, 2)
    _save(trainer, root, 4)
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": f"q{i}?", "golden_answers": ["a"]}) + "\n" for i in range(8)))
    cfg = load_config(None, [f"learner.model='{tiny}'", f"learner.data='{qa}'", f"learner.checkpoint_dir='{root}'",
                             f"learner.ingest_endpoint='ipc://{tmp_path}/ingest'",
                             f"learner.sync_endpoint='ipc://{tmp_path}/sync'", "learner.store_port=0",
                             "metrics.learner_port=0", f"run_dir='{tmp_path}/run'"])
    _damage(root / "step-00000004", "truncated")
    learner = Learner(cfg, one_rank, resume=True)
    try:
        assert (learner.step, learner.version) == (2, 2)
    finally:
        learner.close()
    assert "step-00000004 is damaged: __0_0.distcp has" in caplog.text

    _damage(root / "step-00000002", "missing")
    with pytest.raises(ConfigError) as e:
        Learner(cfg, one_rank, resume=True)
    msg = str(e.value)
    assert "no checkpoint in" in msg and "verifies" in msg and "without --resume" in msg
    assert "step-00000004: __0_0.distcp has" in msg and "step-00000002: rng-0.safetensors is missing" in msg


def test_disk_full_save_fails_cleanly_and_the_previous_checkpoint_stays(trainer, tmp_path):
    from learner.checkpoint import CheckpointSaveError, check_checkpoint, find_resumable

    root = tmp_path / "ckpt"
    first = _save(trainer, root, 1)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    # Python ignores SIGXFSZ, so a write past the limit fails with EFBIG, as a full disk fails with ENOSPC
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, hard))  # the shard file is ~2.1 MB
    try:
        with pytest.raises(CheckpointSaveError) as e:
            _save(trainer, root, 2)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert e.value.reason == "no_space" and "file size limit" in str(e.value)
    assert not list(root.glob(".tmp-*"))  # the partial save is gone
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000001"]
    assert (root / "latest").read_text() == "step-00000001" and check_checkpoint(first) is None
    assert find_resumable(root) == (first, [])
    third = _save(trainer, root, 3)  # space again: the next save works
    assert find_resumable(root) == (third, [])


def test_retention_never_counts_a_damaged_checkpoint(trainer, tmp_path, caplog):
    from learner.checkpoint import check_checkpoint

    root = tmp_path / "ckpt"
    _save(trainer, root, 1, keep=2)
    _save(trainer, root, 2, keep=2)
    _flip_byte(root / "step-00000002" / SHARD)  # same size: only the checksum tells
    with caplog.at_level(logging.WARNING, logger="scout.learner.checkpoint"):
        _save(trainer, root, 3, keep=2)
    # by count, step 2 and 3 would stay and step 1, the older good one, would go
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000001", "step-00000003"]
    assert all(check_checkpoint(p) is None for p in root.glob("step-*"))
    assert "step-00000002 does not verify (__0_0.distcp has sha256" in caplog.text


# --------------------------------------------------------------------------- real process
def _write_config(tmp_path: Path, tiny: str, ingest: str, sync: str, port: int, steps: int) -> Path:
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": f"question {i}?", "golden_answers": [f"a{i}"]}) + "\n"
                          for i in range(12)))
    cfg = tmp_path / "learner.toml"
    cfg.write_text(f"""run_dir = "{tmp_path / 'run'}"
[metrics]
learner_port = {port}
[learner]
model = "{tiny}"
data = "{qa}"
ingest_endpoint = "{ingest}"
sync_endpoint = "{sync}"
store_port = 0
n_samples = 2
groups_per_step = 2
micro_batch_tokens = 64
max_staleness = 1
steps = {steps}
lr = 1e-4
checkpoint_dir = "{tmp_path / 'ckpt'}"
checkpoint_every = 2
keep_checkpoints = 2
batch_wait_s = 0.5
cpu_threads = 1
""")
    return cfg


def _steps(run_dir: Path) -> list[int]:
    f = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in f.read_text().splitlines()] if f.is_file() else []


def _failures(port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    m = re.search(r'^scout_learner_checkpoint_failures_total\{[^}]*reason="no_space"[^}]*\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.mark.slow
def test_kill_9_mid_save_then_resume_into_a_full_disk(tiny, procs, ipc_path, free_port, tmp_path):
    """Run 1 is SIGKILLed inside the save of step 4, between its shards and meta.json: resume picks
    step 2. Run 2 (--resume) gets a 1 MB file size limit while it saves step 4 (small files only from
    there on): the step-6 save fails (logged, counted, cleaned up) and training goes on to step 8,
    whose final save fails too (exit 1); step 4 stays intact and is what a resume would pick."""
    from safetensors.torch import load_file

    from learner.checkpoint import check_checkpoint, find_resumable
    from tests.helpers.logged import wait

    port, ingest = free_port(), ipc_path("ingest")
    cfg = _write_config(tmp_path, tiny, ingest, ipc_path("sync"), port, steps=8)
    ckpt, run, log = tmp_path / "ckpt", tmp_path / "run", tmp_path / "learner.log"
    vocab = int(load_file(f"{tiny}/model.safetensors")["model.embed_tokens.weight"].shape[0])
    logged = lambda text: text in log.read_text(errors="replace")  # noqa: E731

    def start(pause: str, *extra: str) -> subprocess.Popen:
        env = {"OMP_NUM_THREADS": "1", "SCOUT_TEST_CHECKPOINT_PAUSE": pause}
        return procs.start(["cli.py", "learner", "--config", str(cfg), *extra], env=env,
                           stdout=open(log, "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115

    actor = FakeActor(ingest, vocab)
    actor.start()
    try:
        p = start("4:300")
        wait(lambda: logged("inside the save of step 4") or p.poll() is not None, 300, "the step-4 save", [log])
        os.kill(p.pid, signal.SIGKILL)  # shards on disk, meta.json not yet
        p.wait(30)
        assert [q.name for q in ckpt.glob("step-*")] == ["step-00000002"]  # no partial save under a final name
        partial = ckpt / ".tmp-step-00000004"
        assert (partial / SHARD).is_file() and not (partial / "meta.json").exists()
        assert (ckpt / "latest").read_text() == "step-00000002"
        assert find_resumable(ckpt) == (ckpt / "step-00000002", [])
        before = len(_steps(run))

        p = start("4:3", "--resume")
        wait(lambda: log.read_text().count("inside the save of step 4") == 2 or p.poll() is not None, 300,
             "the resumed learner's step-4 save", [log])  # (the log holds both runs)
        hard = resource.prlimit(p.pid, resource.RLIMIT_FSIZE)[1]
        resource.prlimit(p.pid, resource.RLIMIT_FSIZE, (1_000_000, hard))  # the shard file is ~2.1 MB
        wait(lambda: logged("checkpoint of step 6 failed") or p.poll() is not None, 120, "the failed save", [log])
        assert p.poll() is None, "the learner died on the failed save"
        assert _failures(port) >= 1.0  # (the step-8 save may have failed too by now)
        code = p.wait(timeout=300)
    finally:
        actor.stop.set()
        actor.join(10)
    assert logged(f"resumed from {ckpt / 'step-00000002'}: step 2")
    assert logged("checkpoint of step 6 failed (no_space)") and logged("file size limit")
    assert _steps(run)[before:] == list(range(3, 9))  # training went on after the failed save
    assert logged("checkpoint of step 8 failed (no_space)") and code == 1  # the final save failed: exit 1
    assert not list(ckpt.glob(".tmp-*"))  # run 1's partial save and run 2's failed ones are gone
    assert sorted(q.name for q in ckpt.glob("step-*")) == ["step-00000002", "step-00000004"]
    assert (ckpt / "latest").read_text() == "step-00000004"
    assert find_resumable(ckpt) == (ckpt / "step-00000004", [])
    assert check_checkpoint(ckpt / "step-00000002") is None
