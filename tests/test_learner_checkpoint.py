"""Checkpoints: exact round trip of model/optimizer/schedule/RNG, atomicity, --resume after
kill -9 of a real learner process fed by a test-side actor, and HF export."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq

from common.protocol import GroupAck, Hello, HelloAck, TrajectoryGroup, WorkAssignment, WorkRequest
from common.transport import connect, recv, send

torch.set_num_threads(2)


_TINY: list[str] = []


def tiny_model(tmp_path_factory) -> str:
    """One tiny Qwen2 folder per test session, shared by the learner test modules."""
    from demo.tinymodel import build_tiny_model

    if not _TINY or not Path(_TINY[0], "config.json").is_file():
        _TINY[:] = [str(build_tiny_model(tmp_path_factory.mktemp("tiny-learner"), layers=2, hidden=64))]
    return _TINY[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model(tmp_path_factory)


def group_for(prompt_id: int, version: int, vocab: int, n: int = 2, peer="fake", run="r") -> TrajectoryGroup:
    """Deterministic content per prompt (so runs are comparable), generated 'at' `version`."""
    rng = np.random.default_rng(prompt_id)
    lens = rng.integers(6, 14, n).astype(np.int32)
    total = int(lens.sum())
    mask = np.concatenate([(np.arange(k) >= 3).astype(np.uint8) for k in lens])
    return TrajectoryGroup(
        group_id=uuid.uuid4().hex, peer_id=peer, run_id=run, prompt_id=prompt_id, num_searches=[1] * n,
        retrieval_failed=[False] * n, correct=[bool(i % 2) for i in range(n)], created_at=time.time(),
        lengths=lens, tokens=rng.integers(0, vocab, total).astype(np.int32), loss_mask=mask,
        logprobs=np.where(mask, -rng.uniform(3, 7, total), 0).astype(np.float32),
        versions=np.where(mask, version, -1).astype(np.int32), rewards=rng.integers(0, 2, n).astype(np.float32))


# --------------------------------------------------------------------------- in-process round trip
@pytest.fixture
def one_rank():
    from learner.trainer import init_distributed

    d = init_distributed()
    yield d
    torch.distributed.destroy_process_group()


def _optim_tensors(opt) -> dict[str, torch.Tensor]:
    out = {}
    for i, (p, st) in enumerate(opt.state.items()):
        for k, v in st.items():
            out[f"{i}.{k}"] = (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
    return out


@pytest.mark.slow
def test_checkpoint_round_trip_is_exact_and_atomic(tiny, one_rank, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.config import load_config
    from learner.checkpoint import export_hf, find_latest, load_checkpoint, save_checkpoint
    from learner.trainer import Trainer, assemble

    lc = load_config(None, [f"learner.model='{tiny}'", "learner.n_samples=2", "learner.lr=1e-3",
                            "learner.warmup_steps=5", "learner.micro_batch_tokens=32"]).learner
    a = Trainer(lc, one_rank)
    vocab = a.vocab_size
    for s in range(2):
        a.train_step(assemble([group_for(s * 2 + k, 0, vocab) for k in range(2)], True))
    root = tmp_path / "ckpt"
    meta = {"version": 2, "scheduler": a.scheduler.state_dict(), "dispatcher": {"cursor": 4}}
    torch.manual_seed(1234)
    path = save_checkpoint(root, 2, a.model, a.optimizer, meta, tiny, rank=0)
    rng_after_save = torch.get_rng_state()

    # a crash mid-save and a folder without meta are never picked
    (root / ".tmp-step-00000009").mkdir()
    (root / "step-00000007").mkdir()
    assert find_latest(root) == path
    (root / "latest").write_text("step-00000007")
    assert find_latest(root) == path  # the marker names an incomplete one: scan finds the newest complete

    b = Trainer(lc, one_rank)
    torch.manual_seed(999)
    got = load_checkpoint(path, b.model, b.optimizer, rank=0)
    b.scheduler.load_state_dict(got["scheduler"])
    assert got["step"] == 2 and got["version"] == 2 and got["dispatcher"] == {"cursor": 4}
    assert torch.equal(torch.get_rng_state(), rng_after_save)
    pa, pb = dict(a.full_parameters()), dict(b.full_parameters())
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    oa, ob = _optim_tensors(a.optimizer), _optim_tensors(b.optimizer)
    assert oa.keys() == ob.keys() and len(oa) > 0 and all(torch.equal(oa[k], ob[k]) for k in oa)
    assert b.optimizer.param_groups[0]["lr"] == a.optimizer.param_groups[0]["lr"] == pytest.approx(3e-3 / 5)

    # and the next step is the same step
    nxt = assemble([group_for(10 + k, 2, vocab) for k in range(2)], True)
    sa, sb = a.train_step(nxt), b.train_step(nxt)
    assert sa["loss"] == sb["loss"] and sa["grad_norm"] == sb["grad_norm"]
    pa, pb = dict(a.full_parameters()), dict(b.full_parameters())
    assert all(torch.equal(pa[k], pb[k]) for k in pa)

    # export: an HF folder transformers loads, holding the checkpoint's weights
    out = export_hf(root, tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(str(out))
    saved = dict(load_checkpoint_params(path, tiny))
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), saved[name]), name
    assert AutoTokenizer.from_pretrained(str(out)).decode([5]) is not None


def load_checkpoint_params(path, tiny):
    """The checkpoint's model weights, read back independently of export_hf."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    sd = {k: torch.empty_like(v) for k, v in load_file(f"{tiny}/model.safetensors").items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # single-process load is the intent
        dcp.load({"model": sd}, checkpoint_id=str(path), no_dist=True)
    return sd.items()


# --------------------------------------------------------------------------- real process, kill -9
class FakeActor(threading.Thread):
    """Plays an actor worker over the real protocol: asks for prompts, returns groups at the
    learner's current version, survives a learner restart (timeouts, then says hello again)."""

    def __init__(self, endpoint: str, vocab: int, version_fn=None):
        super().__init__(daemon=True)
        self.endpoint, self.vocab = endpoint, vocab
        self.version_fn = version_fn  # the policy version its engine holds (None: the learner's)
        self.stop = threading.Event()
        self.accepted = 0
        self.run_id = uuid.uuid4().hex

    def run(self):
        from common.config import TransportConfig

        ctx = zmq.Context()
        sock = connect(ctx, zmq.DEALER, self.endpoint, TransportConfig())
        hello = True
        while not self.stop.is_set():
            try:
                if hello:
                    send(sock, Hello(role="actor", peer_id="fake", run_id=self.run_id))
                    recv(sock, 2000, HelloAck)
                    hello = False
                held = self.version_fn() if self.version_fn else -1
                if self.version_fn and held < 0:  # no weights loaded yet: wait for the first sync
                    time.sleep(0.1)
                    continue
                send(sock, WorkRequest(peer_id="fake", run_id=self.run_id, max_prompts=4, version=held))
                work = recv(sock, 2000, WorkAssignment)
                if not work.prompts:
                    time.sleep(max(0.05, work.retry_after_s))
                for p in work.prompts:
                    version = self.version_fn() if self.version_fn else work.version
                    send(sock, group_for(p.prompt_id, version, self.vocab, run=self.run_id))
                    self.accepted += recv(sock, 2000, GroupAck).accepted
            except Exception:  # learner gone (TransportTimeout ...): drop the socket, start over
                sock.close(0)
                sock = connect(ctx, zmq.DEALER, self.endpoint, TransportConfig())
                hello = True
                time.sleep(0.2)
        sock.close(0)
        ctx.term()


def _write_config(tmp_path: Path, tiny: str, ingest: str, sync: str, steps: int) -> Path:
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": f"question {i}?", "golden_answers": [f"a{i}"]}) + "\n"
                          for i in range(12)))
    cfg = tmp_path / "learner.toml"
    cfg.write_text(f"""run_dir = "{tmp_path / 'run'}"
[metrics]
learner_port = 0
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
batch_wait_s = 0.5
""")
    return cfg


def _steps(run_dir: Path) -> list[dict]:
    f = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.is_file() else []


def _wait(cond, timeout: float, what: str, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"learner exited with {proc.returncode} while waiting for {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_resume_after_kill_9_continues_at_the_checkpoint(tiny, procs, ipc_path, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ingest, sync = ipc_path("ingest"), ipc_path("sync")
    cfg = _write_config(tmp_path, tiny, ingest, sync, steps=8)
    env = {"OMP_NUM_THREADS": "1"}
    vocab = int(load_file(f"{tiny}/model.safetensors")["model.embed_tokens.weight"].shape[0])
    actor = FakeActor(ingest, vocab)
    actor.start()
    try:
        p = procs.start(["cli.py", "learner", "--config", str(cfg)], env=env)
        latest = tmp_path / "ckpt" / "latest"
        _wait(lambda: latest.is_file() and latest.read_text().strip() == "step-00000004", 300, "checkpoint 4", p)
        os.kill(p.pid, signal.SIGKILL)  # mid-run: steps 5..8 still to come
        p.wait(30)
        ckpt_step = int(latest.read_text().strip().split("-")[1])
        before = len(_steps(tmp_path / "run"))
        (tmp_path / "ckpt" / ".tmp-step-00000099").mkdir()  # a half-written checkpoint ...
        (tmp_path / "ckpt" / "step-00000098").mkdir()  # ... and one without meta: never picked

        p2 = procs.start(["cli.py", "learner", "--config", str(cfg), "--resume"], env=env)
        assert p2.wait(timeout=400) == 0
    finally:
        actor.stop.set()
        actor.join(10)
    after = _steps(tmp_path / "run")[before:]
    assert [r["step"] for r in after] == list(range(ckpt_step + 1, 9))
    assert after[0]["version"] == ckpt_step + 1  # sync_every = 1: the version came back with the step
    assert all(r["staleness_max"] <= 1 for r in after)
    assert (tmp_path / "ckpt" / "step-00000008" / "meta.json").is_file()

    # the CLI export of the final checkpoint loads in transformers
    out = tmp_path / "exported"
    ex = procs.start(["cli.py", "export", str(tmp_path / "ckpt"), str(out)], env=env)
    assert ex.wait(timeout=300) == 0
    model = AutoModelForCausalLM.from_pretrained(str(out))
    start = load_file(f"{tiny}/model.safetensors")
    assert not torch.equal(model.model.embed_tokens.weight.detach(), start["model.embed_tokens.weight"])


def test_owned_full_parameters_stay_as_they_were_while_training_goes_on(tiny, one_rank):
    """learner.sync_sends "later" sends the gathered tensors while the next steps train: with
    owned=True none of them is a parameter's own memory. The plain gather shows why it matters:
    on one rank in the model's dtype it hands out the parameters themselves, which a step changes."""
    from common.config import load_config
    from learner.trainer import Trainer, assemble

    lc = load_config(None, [f"learner.model='{tiny}'", "learner.n_samples=2", "learner.lr=1e-2",
                            "learner.micro_batch_tokens=32", "learner.sync_dtype='float32'"]).learner
    t = Trainer(lc, one_rank)
    plain, owned = dict(t.full_parameters()), dict(t.full_parameters(owned=True))
    before = {k: v.clone() for k, v in owned.items()}
    ptrs = {(p.to_local() if hasattr(p, "to_local") else p).untyped_storage().data_ptr()
            for p in t.model.parameters()}
    assert not {v.untyped_storage().data_ptr() for v in owned.values()} & ptrs
    assert {v.untyped_storage().data_ptr() for v in plain.values()} & ptrs  # the premise: plain aliases here
    t.train_step(assemble([group_for(k, 0, t.vocab_size) for k in range(2)], True))
    assert all(torch.equal(owned[k], before[k]) for k in owned)
    assert any(not torch.equal(plain[k], before[k]) for k in plain)
