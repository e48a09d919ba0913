"""bench/gpu_check.py without a GPU: the CPU dry run passes its checks, says it measured nothing,
exits 0, and its JSON holds no figure it did not measure."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

MEASURED = {"tokens_per_s", "step_s", "forward_s", "backward_s", "optimizer_s", "logprob_recompute_s",
            "peak_mem_gib", "mfu", "ipc_gbps", "ipc_sync_gbps", "d2d_copy_gbps", "pack_gbps", "ran", "passed"}


def keys(obj) -> set[str]:
    if isinstance(obj, dict):
        return set(obj) | {k for v in obj.values() for k in keys(v)}
    if isinstance(obj, list):
        return {k for v in obj for k in keys(v)}
    return set()


@pytest.mark.slow
@pytest.mark.long  # ~27 s, a check of a bench script: out of CI's 30 minutes since 2026-12-07
def test_dry_run_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the script measures instead of dry-running")
    out = tmp_path / "gpu_check.json"
    p = subprocess.run([sys.executable, "bench/gpu_check.py", "--out", str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "no CUDA device: nothing measured" in p.stdout
    report = json.loads(out.read_text())
    assert report["cuda"] is False and report["mode"] == "dry-run" and report["device"] is None
    checks = report["cpu_checks"]
    assert set(checks) == {"model_and_bucket_plan", "mfu_arithmetic", "imports_without_extras", "gpu_tests_collected"}
    assert all(c["ok"] for c in checks.values()), checks
    plan = checks["model_and_bucket_plan"]
    assert plan["params_24_layers"] == plan["params_extrapolated"] == 494_032_768
    assert plan["bf16_bytes"] == 2 * 494_032_768 and plan["buckets"] >= 1
    assert abs(checks["mfu_arithmetic"]["mfu_at_989_tflops"] - 0.29972) < 1e-4
    assert checks["mfu_arithmetic"]["peak_lookup"]["Tesla T4"] is None  # unknown card: no MFU
    ids = checks["gpu_tests_collected"]["ids"]
    assert "tests/test_weightsync.py::test_cuda_ipc_colocated_for_real" in ids
    assert report["parts"] == {} and not keys(report) & MEASURED  # nothing measured, nothing claimed
