"""The learner as it runs in production: `torchrun --nproc-per-node 2 cli.py learner`, fed by a
test-side actor over the ingest protocol, with a real weight-sync member (common.weightsync's
client.SyncClient + receiver.BucketReceiver over gloo) receiving the versions it broadcasts.

- test_two_rank_learner_trains_and_broadcasts_each_version: versions, records and the weights the
  member ends with.
- test_a_checkpointed_step_has_its_record_even_when_killed_at_once: a member that answers a sync
  seconds late (the learner goes on, "answers later", holding the step's record until the answer
  is in); the learner is SIGKILLed the moment a checkpoint of such a step is complete. The step's
  record must already be in metrics.jsonl (it was lost when the checkpoint was saved before the
  held record was written).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid

import numpy as np
import pytest
import torch

from tests.test_learner_checkpoint import FakeActor, _steps, _wait, _write_config, load_checkpoint_params, tiny_model


class SyncMember(threading.Thread):
    """An actor worker's weight-sync side, keeping the last complete version it received."""

    def __init__(self, endpoint: str, answer_late_s: float = 0.0):
        super().__init__(daemon=True)
        self.endpoint = endpoint
        self.answer_late_s = answer_late_s  # for versions >= 1: hold the SyncDone answer this long
        self.stop = threading.Event()
        self.version, self.versions, self.weights = -1, [], {}
        self.error: Exception | None = None

    def run(self):
        from common.config import TransportConfig
        from common.weightsync.client import SyncClient, follow_sync
        from common.weightsync.receiver import BucketReceiver

        client = SyncClient(self.endpoint, "member-0", uuid.uuid4().hex, TransportConfig(), transports=("gloo",))
        rx = BucketReceiver()
        try:
            client.join(-1)
            while not self.stop.is_set():
                msg = client.poll(200)
                got: dict[str, torch.Tensor] = {}

                def receive(header, data):
                    for name, t in rx.receive(header, data):
                        got[name] = t.clone()
                    if header.get("version", 0) >= 1:
                        time.sleep(self.answer_late_s)  # a slow load: the bytes are in, the answer waits

                res = follow_sync(client, msg, rx.setup, receive)
                if res and res["ok"]:
                    self.weights, self.version = got, res["version"]
                    self.versions.append(res["version"])
        except Exception as e:  # surfaced by the test
            self.error = e
        finally:
            rx.close()
            client.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model(tmp_path_factory)


@pytest.mark.slow
def test_two_rank_learner_trains_and_broadcasts_each_version(tiny, procs, ipc_path, free_port, tmp_path):
    from safetensors.torch import load_file

    ingest, sync = ipc_path("ingest"), ipc_path("sync")
    cfg = _write_config(tmp_path, tiny, ingest, sync, steps=4)
    cfg.write_text(cfg.read_text() + "sync_every = 2\n")
    vocab = int(load_file(f"{tiny}/model.safetensors")["model.embed_tokens.weight"].shape[0])
    member = SyncMember(sync)
    # the actor generates only once its sync member holds weights, so the learner has to push
    # version 0 to the member that joined (members that lack the current version get it)
    actor = FakeActor(ingest, vocab, version_fn=lambda: member.version)
    member.start()
    actor.start()
    try:
        p = procs.start(["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                         "--master-port", str(free_port()), "cli.py", "learner", "--config", str(cfg)],
                        env={"OMP_NUM_THREADS": "1"})
        assert p.wait(timeout=500) == 0
    finally:
        actor.stop.set()
        member.stop.set()
        actor.join(10)
        member.join(20)
    assert member.error is None
    steps = _steps(tmp_path / "run")
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and [r["version"] for r in steps] == [0, 1, 1, 2]
    assert [r["sync_ok"] for r in steps] == [0, 1, 0, 1] and steps[1]["sync_bytes"] > 0
    assert all(r["sync_done_s"] >= r["sync_s"] > 0 for r in steps if r["sync_ok"]), steps
    assert member.versions == [0, 1, 2]
    # what the member holds is exactly what the 2-rank learner ended with (its final checkpoint)
    final = dict(load_checkpoint_params(tmp_path / "ckpt" / "step-00000004", tiny))
    names = set(member.weights)
    assert names == {k for k in final if k != "lm_head.weight"}  # HF names; tied lm_head not sent
    for name in names:
        assert torch.equal(member.weights[name], final[name]), name
    start = load_file(f"{tiny}/model.safetensors")
    assert not torch.equal(final["model.norm.weight"], start["model.norm.weight"])
    assert json.loads((tmp_path / "ckpt" / "step-00000004" / "meta.json").read_text())["version"] == 2
    assert np.isfinite([r["loss"] for r in steps]).all()


@pytest.mark.slow
def test_a_checkpointed_step_has_its_record_even_when_killed_at_once(tiny, procs, ipc_path, tmp_path):
    from safetensors.torch import load_file

    ingest, sync = ipc_path("ingest"), ipc_path("sync")
    cfg = _write_config(tmp_path, tiny, ingest, sync, steps=6)  # checkpoint_every = 2, max_staleness = 1
    cfg.write_text(cfg.read_text() + 'sync_every = 2\nsync_answers = "later"\n')
    vocab = int(load_file(f"{tiny}/model.safetensors")["model.embed_tokens.weight"].shape[0])
    member = SyncMember(sync, answer_late_s=4.0)
    actor = FakeActor(ingest, vocab, version_fn=lambda: member.version)
    member.start()
    actor.start()
    try:
        p = procs.start(["cli.py", "learner", "--config", str(cfg)], env={"OMP_NUM_THREADS": "1"})
        latest = tmp_path / "ckpt" / "latest"
        # step 2 synced version 1, whose answer comes 4 s late: kill as soon as its checkpoint is complete
        _wait(lambda: latest.is_file() and latest.read_text().strip() == "step-00000002", 300, "checkpoint 2", p)
        os.kill(p.pid, signal.SIGKILL)
        assert p.wait(30) == -signal.SIGKILL  # killed mid-run, not finished
    finally:
        actor.stop.set()
        member.stop.set()
        actor.join(10)
        member.join(20)
    steps = _steps(tmp_path / "run")
    assert [r["step"] for r in steps][:2] == [1, 2], steps  # the checkpoint holds step 2: so must the records
    assert steps[1]["version"] == 1 and steps[1]["sync_ok"] == 1  # written once the late answer was in
