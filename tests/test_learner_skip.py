"""`learner.skip_zero_advantage`: samples whose advantage is 0 are not forwarded, and the update
is the same as when they are (the token-mean denominator still counts their tokens)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def groups(vocab: int):
    from tests.test_learner_fsdp import make_groups

    gs = make_groups(vocab)
    gs[1].rewards = np.array([1.0, 1.0], dtype=np.float32)  # all equal: advantage 0 for both samples
    return gs


def worker(model: str, out: str) -> None:
    torch.set_num_threads(1)
    from safetensors.torch import save_file

    from common.config import load_config
    from learner.trainer import Trainer, assemble, init_distributed

    d = init_distributed()
    result = {}
    for skip in (False, True):
        cfg = load_config(None, [f"learner.model='{model}'", "learner.n_samples=2", "learner.lr=1e-3",
                                 "learner.micro_batch_tokens=16", "learner.correction='tis'", "learner.kl_coef=0.0",
                                 f"learner.skip_zero_advantage={str(skip).lower()}"])
        t = Trainer(cfg.learner, d)
        batch = assemble(groups(t.vocab_size), std_norm=False)
        assert int((batch.adv == 0).sum()) == 2
        stats = t.train_step(batch)
        save_file({n: p.clone() for n, p in t.full_parameters()}, os.path.join(out, f"skip-{skip}.safetensors"))
        result[str(skip)] = stats
    Path(out, "stats.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_skipping_zero_advantage_samples_changes_nothing(procs, tmp_path, tmp_path_factory):
    from safetensors.torch import load_file

    from tests.test_learner_checkpoint import tiny_model

    model = tiny_model(tmp_path_factory)
    p = procs.start(["tests/test_learner_skip.py", "--worker", str(model), str(tmp_path)], env={"OMP_NUM_THREADS": "1"})
    assert p.wait(timeout=600) == 0
    full, skipped = (load_file(str(tmp_path / f"skip-{s}.safetensors")) for s in (False, True))
    initial = load_file(f"{model}/model.safetensors")
    moved = 0.0
    for name in full:
        assert torch.allclose(full[name], skipped[name], atol=1e-6, rtol=0), name
        moved = max(moved, float((full[name] - initial[name]).abs().max()))
    assert moved > 1e-4  # the step did change the weights
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["True"]["loss"] == pytest.approx(stats["False"]["loss"], rel=1e-5, abs=1e-7)
    assert stats["True"]["loss_tokens"] == stats["False"]["loss_tokens"]


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":
    worker(sys.argv[2], sys.argv[3])
