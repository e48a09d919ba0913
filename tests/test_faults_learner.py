"""Issue #8, item 3: the learner killed with SIGKILL mid-run and restarted with `--resume`.

    `cli.py learner` (checkpoint every step) ◀── groups ── `cli.py actor --workers 1` (transformers)
        SIGKILL at an arbitrary moment (waiting, training, syncing or saving) → `--resume`
        → step / version / optimizer / scheduler / data position from the latest complete checkpoint
        → the worker notices (request deadline or a new learner run id), says hello again, the
          learner pushes its current weights, the worker trains on them again

- test_learner_preempted_twice_resumes_and_the_actor_follows: two kill / resume rounds. After each
  kill `latest` names a complete checkpoint and no step-* folder is incomplete; the first step
  logged after the restart is checkpoint step + 1 with version checkpoint version + 1; the worker
  says hello to the new learner run by itself and loads its weights; no accepted group holds
  tokens of a version newer than the learner's at acceptance (weights from the lost steps are
  never trained on). In the first round, before the restart, the test builds the resuming Learner
  itself (same code path as `--resume`, own endpoints) and checks it against the checkpoint files
  read independently: step, version, scheduler, every AdamW moment tensor and step count, and the
  data position (the first prompts it hands out over its real ingest socket are the checkpoint's
  pending prompts, then the seeded order from the saved cursor).
- test_pruning_cut_short_never_leaves_a_half_deleted_checkpoint: a deletion of an old checkpoint
  that dies half-way (rmtree raising after some files) leaves only a .tmp-* folder, never a
  step-* folder that looks complete; the next save clears it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq

from bench.faults import Stack, build_world, learner_preemption


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("faults-learner-world"), questions=60, coin=True)


# --------------------------------------------------------------------------- in-process resume check
def _dcp_tensors(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Tensors under `prefix` read straight from a DCP folder (no model, no optimizer involved)."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    sd = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in md.items()
          if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(sd, checkpoint_id=str(path), no_dist=True)
    return sd


def _first_prompts(endpoint: str, k: int) -> list[int]:
    from common.config import TransportConfig
    from common.protocol import Hello, HelloAck, WorkAssignment, WorkRequest
    from common.transport import connect, recv, send

    ctx = zmq.Context()
    sock = connect(ctx, zmq.DEALER, endpoint, TransportConfig())
    try:
        send(sock, Hello(role="actor", peer_id="probe", run_id="probe-run"))
        recv(sock, 10_000, HelloAck)
        send(sock, WorkRequest(peer_id="probe", run_id="probe-run", max_prompts=k, version=-1))
        return [p.prompt_id for p in recv(sock, 10_000, WorkAssignment).prompts]
    finally:
        sock.close(0)
        ctx.term()


def check_resume_in_process(config: Path, state: dict, tmp: Path) -> None:
    """Build the resuming Learner here (as `--resume` does) and compare it with the checkpoint files."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from common.config import load_config
    from learner.main import Learner
    from learner.trainer import init_distributed

    tmp.mkdir(parents=True, exist_ok=True)
    cfg = load_config(config, [f"learner.ingest_endpoint='ipc://{tmp}/ingest'",
                               f"learner.sync_endpoint='ipc://{tmp}/sync'", "learner.store_port=0",
                               "metrics.learner_port=0", f"run_dir='{tmp}/run'"])
    d = init_distributed()
    learner = None
    try:
        learner = Learner(cfg, d, resume=True)
        meta = json.loads((state["path"] / "meta.json").read_text())
        assert (learner.step, learner.version) == (meta["step"], meta["version"])
        assert learner.ingest.version == meta["version"]
        assert learner.trainer.scheduler.state_dict()["last_epoch"] == meta["scheduler"]["last_epoch"]
        _, osd = get_state_dict(learner.trainer.model, learner.trainer.optimizer)
        saved = _dcp_tensors(state["path"], "optim.state.")
        assert saved, "no optimizer state in the checkpoint"
        for fqn, st in osd["state"].items():
            for key in ("exp_avg", "exp_avg_sq", "step"):
                got = st[key].full_tensor() if hasattr(st[key], "full_tensor") else st[key]
                assert torch.equal(got.cpu(), saved[f"optim.state.{fqn}.{key}"]), (fqn, key)
        # not a fresh optimizer: AdamW counted one update per learner step (minibatches = 1), and the
        # moments are not zero (the coin-flip model gives groups reward variance, so gradients)
        assert all(int(t) == meta["step"] for k, t in saved.items() if k.endswith(".step"))
        assert any(t.abs().sum() > 0 for k, t in saved.items() if k.endswith("exp_avg_sq"))
        # data position: the checkpoint's pending prompts first, then the seeded order from its cursor
        disp = meta["dispatcher"]
        order = np.random.default_rng([disp["seed"], disp["epoch"]]).permutation(disp["rows"])
        want = [*disp["pending"], *order[disp["cursor"]:].tolist()][:learner.ingest.cap]
        assert _first_prompts(learner.ingest.endpoint, learner.ingest.cap) == want
    finally:
        if learner is not None:
            learner.close()
        dist.destroy_process_group()


# --------------------------------------------------------------------------- kill / resume, end to end
@pytest.mark.slow
@pytest.mark.long
def test_learner_preempted_twice_resumes_and_the_actor_follows(world, procs, tmp_path):
    stack = Stack(tmp_path, world, start=procs.start)
    stack.write_config(actor={"no_search": True, "request_timeout_s": 5.0},
                       learner={"checkpoint_dir": str(stack.ckpt), "checkpoint_every": 1, "keep_checkpoints": 2,
                                "max_staleness": 2, "sync_timeout_s": 8.0})
    checked: list[int] = []

    def before_restart(state: dict) -> None:
        assert state["path"] is not None and state["marker_complete"] and not state["incomplete_step_dirs"], state
        if not checked:
            check_resume_in_process(stack.config, state, tmp_path / f"inproc-{len(checked)}")
        checked.append(state["step"])

    r = learner_preemption(stack, kills=2, warm_steps=3, between_steps=2, timeout=400, before_restart=before_restart)
    rounds = r["kills"]
    print("\nlearner preemption:", json.dumps([{k: v for k, v in x.items() if k != "checkpoint"} for x in rounds]))
    assert len(checked) == 2
    for x in rounds:
        ck = x["checkpoint"]
        assert x["first_step_after"] == ck["step"] + 1 and x["first_version_after"] == ck["version"] + 1, x
    assert len({x["worker_learner_run"] for x in rounds}) == 2  # a hello to each new learner run
    # steps: each run continues from its checkpoint, with no gap and no skip
    steps = [s["step"] for s in stack.steps()]
    restarts = [i for i in range(1, len(steps)) if steps[i] != steps[i - 1] + 1]
    assert len(restarts) <= 2 and all(steps[i] <= steps[i - 1] + 1 for i in restarts)
    # no accepted group holds tokens of a version the learner did not have when it accepted it
    for g in stack.groups():
        gen = g["versions"][g["loss_mask"] == 1]
        assert int(gen.max()) <= int(g["learner_version"]), (g["group_id"], gen.max(), g["learner_version"])
    from learner.checkpoint import find_latest, is_complete

    assert all(is_complete(p) for p in stack.ckpt.glob("step-*")) and find_latest(stack.ckpt) is not None


# --------------------------------------------------------------------------- pruning cut short
@pytest.fixture
def one_rank():
    from learner.trainer import init_distributed

    d = init_distributed()
    yield d
    torch.distributed.destroy_process_group()


def test_pruning_cut_short_never_leaves_a_half_deleted_checkpoint(world, one_rank, tmp_path, monkeypatch):
    from common.config import load_config
    from learner import checkpoint as ck
    from learner.trainer import Trainer

    lc = load_config(None, [f"learner.model='{world['model']}'"]).learner
    t = Trainer(lc, one_rank)
    root = tmp_path / "ckpt"
    ck.save_checkpoint(root, 1, t.model, t.optimizer, {"version": 1}, None, rank=0, keep=1)
    real_rmtree = shutil.rmtree

    def dies_half_way(path, ignore_errors=False):  # removes the shard files, then "the process dies"
        for f in sorted(Path(path).glob("*.distcp")):
            f.unlink()
        raise KeyboardInterrupt("killed while deleting")

    monkeypatch.setattr(ck.shutil, "rmtree", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(root, 2, t.model, t.optimizer, {"version": 2}, None, rank=0, keep=1)  # prunes step 1
    monkeypatch.setattr(ck.shutil, "rmtree", real_rmtree)
    steps = sorted(p.name for p in root.glob("step-*"))
    assert steps == ["step-00000002"] and ck.is_complete(root / steps[0])
    assert ck.find_latest(root) == root / "step-00000002"
    assert [p.name for p in root.glob(".tmp-*")] == [".tmp-step-00000001-old"]  # what is left is never picked
    ck.load_checkpoint(root / "step-00000002", t.model, t.optimizer, rank=0)
    ck.save_checkpoint(root, 3, t.model, t.optimizer, {"version": 3}, None, rank=0, keep=1)
    assert not list(root.glob(".tmp-*")) and sorted(p.name for p in root.glob("step-*")) == ["step-00000003"]
