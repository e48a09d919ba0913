"""One-command GPU check: on a machine with one CUDA GPU, run the `gpu`-marked tests and measure
the learner, the colocated weight sync and the transformers rollout engine on a Qwen2-0.5B-shaped
model (random weights, built locally: no download). Writes a JSON (--out) and prints a table.

    python bench/gpu_check.py [--out gpu_check.json] [--budget 420]

    orchestrator (this process: never touches CUDA beyond naming the device)
      CPU checks   Qwen2 config + 2-layer model, parameter count, MFU arithmetic, bucket plan,
                   the scout modules import without vllm / faiss / prometheus_client
      no CUDA ──▶  the CPU checks above + the ids of the gpu tests (pytest --collect-only),
                   "no CUDA device: nothing measured", exit 0
      CUDA: each part is a subprocess with its own timeout (clamped by what is left of --budget);
      a part that fails or times out is recorded with its error and the next one runs
        1 gpu_tests   pytest -m gpu --junitxml  ─▶ passed / failed / skipped (+ reason) per test
        2 build       random Qwen2 0.5B on cuda ─▶ save_pretrained (bf16) + a demo tokenizer
        3 learner     torchrun --nproc-per-node 1: Trainer (FSDP2, bf16 mixed precision), 4k-token
                      micro-batches ─▶ tokens/s, forward / backward / optimizer / logprob
                      recompute, peak memory, MFU (profile of one step when MFU < 30%)
        4 weightsync  WeightSender(colocated_ipc) ══ CUDA IPC ══▶ member process on the same GPU
                      vs a device-to-device copy of the same bytes; pack_bucket GB/s
        5 rollout     TransformersEngine + RolloutRunner, stand-in searcher ─▶ tokens/s

Uses only scout modules plus torch / transformers / numpy / zmq / msgpack / pydantic (and pytest
for part 1), so it runs with a GPU machine's own python. `--cpu-smoke` (a development aid) runs
parts 2-5 on the CPU at toy sizes to exercise the code paths; its figures are CPU figures of a
toy model, labelled so, and never GPU figures.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Qwen2.5-0.5B's shape (its published parameter count with tied embeddings: 494,032,768)
QWEN05 = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
              intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
              rope_theta=1000000.0, rms_norm_eps=1e-6, use_sliding_window=False)
QWEN05_PARAMS = 494_032_768
SMOKE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, vocab_size=2048, tie_word_embeddings=True, max_position_embeddings=4096)
# dense bf16 peak TFLOPS by the name torch.cuda.get_device_name gives (first match wins)
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100 SXM", 989.0), ("H100 80GB HBM3", 989.0), ("H200", 989.0),
                    ("A100", 312.0)]
MFU_PROFILE_BELOW = 0.30
# packages a GPU machine may lack: the CPU check imports the scout modules used here without them
EXTRAS = ("vllm", "faiss", "prometheus_client", "rich", "typer", "matplotlib", "pyarrow")
SCOUT_MODULES = ("common.config", "common.protocol", "common.transport", "common.weightsync.sender",
                 "common.weightsync.client", "common.weightsync.receiver", "common.weightsync.cuda_ipc",
                 "learner.trainer", "learner.losses", "actors.engine", "actors.rollout", "demo.tinymodel",
                 "demo.teach", "bench.learner_bench")
PART_TIMEOUT_S = {"gpu_tests": 100, "build": 60, "learner": 130, "weightsync": 70, "rollout": 60}
NO_CUDA = "no CUDA device: nothing measured"


# --------------------------------------------------------------------------- arithmetic
def peak_bf16_tflops(name: str | None) -> float | None:
    for key, tflops in PEAK_BF16_TFLOPS:
        if name and key.lower() in name.lower():
            return tflops
    return None


def mfu(params: int, tokens_per_s: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation: 6 · params · tokens/s ÷ the card's dense bf16 peak."""
    if not peak_tflops:
        return None
    return 6.0 * params * tokens_per_s / (peak_tflops * 1e12)


def qwen2_config(smoke: bool = False, layers: int | None = None):
    from transformers import Qwen2Config

    kw = dict(SMOKE if smoke else QWEN05)
    if layers is not None:
        kw["num_hidden_layers"] = layers
    return Qwen2Config(**kw)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights count once


def gib(n: float) -> float:
    return round(n / 2**30, 3)


# --------------------------------------------------------------------------- CPU checks
def check_model_and_plan() -> dict:
    """The config builds; a 2-layer model of the real widths runs a forward; the parameter count
    extrapolates to the published 0.5B count; the weight-sync bucket plan of the full model."""
    import torch
    from transformers import Qwen2ForCausalLM

    from common.config import LearnerConfig
    from common.weightsync.buckets import plan_buckets

    torch.manual_seed(0)
    with torch.device("meta"):  # weights left uninitialised (only shapes matter here): ~4 s less on CPU
        small = Qwen2ForCausalLM(qwen2_config(layers=2))
    small = small.to_empty(device="cpu").to(torch.bfloat16).eval()
    small.tie_weights()  # to_empty gives the tied embedding and lm_head a tensor each
    with torch.no_grad():
        logits = small(input_ids=torch.randint(0, 151936, (1, 16))).logits
    with torch.device("meta"):
        one, full = Qwen2ForCausalLM(qwen2_config(layers=1)), Qwen2ForCausalLM(qwen2_config())
    per_layer = n_params(small) - n_params(one)
    extrapolated = n_params(small) + 22 * per_layer
    bucket_mb = LearnerConfig().bucket_mb
    named = [(n, p.to(torch.bfloat16)) for n, p in full.named_parameters()]
    buckets = plan_buckets(named, int(bucket_mb * 2**20))
    ok = (n_params(full) == QWEN05_PARAMS == extrapolated and tuple(logits.shape) == (1, 16, 151936)
          and sum(b.nbytes for b in buckets) == 2 * QWEN05_PARAMS)
    return {"ok": ok, "params_2_layers": n_params(small), "params_per_layer": per_layer,
            "params_24_layers": n_params(full), "params_extrapolated": extrapolated, "expected": QWEN05_PARAMS,
            "forward_logits_shape": list(logits.shape), "bucket_mb": bucket_mb, "tensors": len(named),
            "buckets": len(buckets), "bucket_gib": [gib(b.nbytes) for b in buckets],
            "bf16_bytes": sum(b.nbytes for b in buckets)}


def check_mfu_arithmetic() -> dict:
    """MFU on a made-up 100k tokens/s against a hand computation; the card table lookups."""
    made_up = 100_000.0
    got = mfu(QWEN05_PARAMS, made_up, 989.0)
    by_hand = 6 * 494_032_768 * 100_000 / 989e12  # = 0.29972...
    names = {"NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H100 PCIe": 756.0, "NVIDIA H200": 989.0,
             "NVIDIA A100-SXM4-80GB": 312.0, "Tesla T4": None}
    lookups = {n: peak_bf16_tflops(n) for n in names}
    ok = abs(got - by_hand) < 1e-12 and lookups == names and mfu(QWEN05_PARAMS, made_up, None) is None
    return {"ok": ok, "made_up_tokens_per_s": made_up, "mfu_at_989_tflops": round(got, 5),
            "by_hand": round(by_hand, 5), "peak_lookup": lookups}


def check_imports() -> dict:
    """The scout modules the GPU parts use import with the optional extras made unavailable."""
    code = ("import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in EXTRAS)
            + f"sys.path.insert(0, {str(ROOT)!r})\nimport importlib\n"
            + f"for m in {SCOUT_MODULES!r}:\n    importlib.import_module(m)\nprint('imports ok')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    return {"ok": p.returncode == 0 and "imports ok" in p.stdout, "without": list(EXTRAS),
            "modules": list(SCOUT_MODULES), "error": None if p.returncode == 0 else p.stderr[-2000:]}


def gpu_test_files() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if "mark.gpu" in p.read_text())


def collect_gpu_tests() -> dict:
    """The ids `pytest -m gpu` would run (collection only: no CUDA needed)."""
    files = gpu_test_files()
    p = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                        *files], capture_output=True, text=True, timeout=180, cwd=ROOT)
    ids = [line.strip() for line in p.stdout.splitlines() if "::" in line and not line.startswith(" ")]
    return {"ok": p.returncode == 0 and bool(ids), "files": files, "ids": ids,
            "error": None if p.returncode == 0 else (p.stdout + p.stderr)[-2000:]}


def cpu_checks(collect: bool) -> dict:
    checks = {"model_and_bucket_plan": check_model_and_plan, "mfu_arithmetic": check_mfu_arithmetic,
              "imports_without_extras": check_imports}
    if collect:
        checks["gpu_tests_collected"] = collect_gpu_tests
    out = {}
    for name, fn in checks.items():
        t0 = time.monotonic()
        try:
            out[name] = fn()
        except Exception as e:  # a broken check is recorded; the others still run
            out[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        out[name]["seconds"] = round(time.monotonic() - t0, 2)
    return out


# --------------------------------------------------------------------------- part 1: gpu tests
def parse_junit(path: str) -> list[dict]:
    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}".strip(":")
        outcome, reason = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                reason = (el.get("message") or el.text or "")[:500]
                break
        rows.append({"id": test_id, "outcome": outcome, "reason": reason, "seconds": float(case.get("time", 0) or 0)})
    return rows


def part_gpu_tests(timeout_s: float) -> dict:
    files = gpu_test_files()
    xml = os.path.join(tempfile.mkdtemp(prefix="scout-gpu-check-"), "junit.xml")
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-rA", "-q", "-p", "no:cacheprovider",
           "--continue-on-collection-errors", f"--junitxml={xml}", *files]
    rc, tail, timed_out = run_subprocess(cmd, timeout_s)
    tests = parse_junit(xml) if os.path.exists(xml) else []
    count = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
    error = None
    if timed_out:
        error = f"pytest ran past {timeout_s:.0f}s"
    elif not tests:
        error = f"no junit results (exit {rc}): {tail[-1500:]}"
    return {"ok": error is None and count["failed"] == count["error"] == 0, "error": error, "exit": rc,
            "ran": count["passed"] + count["failed"] + count["error"], **count, "tests": tests, "files": files}


# --------------------------------------------------------------------------- part 2: the model folder
def part_build(args) -> dict:
    """Random Qwen2 (0.5B shape; --smoke: toy) saved in bf16 with a demo tokenizer, so that the
    learner and the engine load it from a local folder as they require."""
    import torch
    from transformers import Qwen2ForCausalLM

    from demo.teach import script_texts
    from demo.tinymodel import build_tokenizer

    out = Path(args.model)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(script_texts(), out, vocab_size=1024)
    cfg = qwen2_config(smoke=args.smoke)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    dev = "cpu" if args.smoke else "cuda"
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(dev):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(str(out), safe_serialization=True)
    gen = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    (out / "generation_config.json").write_text(json.dumps(gen))
    return {"ok": True, "params": n_params(model), "dtype": "bfloat16", "tokenizer_vocab": len(tok),
            "build_and_save_s": round(time.perf_counter() - t0, 2), "path": str(out)}


# --------------------------------------------------------------------------- part 3: learner
class SyncedPhaseTimer:
    """learner/main.py's PhaseTimer (seconds per phase from module / optimizer hooks, the trainer
    untouched), with a CUDA synchronize at each mark so that the times are GPU times. (PhaseTimer
    itself does not synchronize, and learner.main imports prometheus_client.)"""

    def __init__(self, model, optimizer, cuda: bool):
        self.acc: dict[str, float] = {}
        self._t: dict[str, float] = {}
        self.cuda = cuda
        model.register_forward_pre_hook(lambda *_: self._mark("forward", True))
        model.register_forward_hook(lambda *_: self._mark("forward", False))
        optimizer.register_step_pre_hook(lambda *_: self._mark("optimizer", True))
        optimizer.register_step_post_hook(lambda *_: self._mark("optimizer", False))

    def _mark(self, name: str, begin: bool) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        if begin:
            self._t[name] = now
        elif name in self._t:
            self.acc[name] = self.acc.get(name, 0.0) + now - self._t.pop(name)

    def take(self) -> dict[str, float]:
        out, self.acc = self.acc, {}
        return out


def _sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def _learner_steps(t, args, cuda: bool) -> tuple[list[dict], object]:
    """Warm-up + measured steps on synthetic groups; per step: wall, phases, recompute, tokens."""
    from bench.learner_bench import synthetic_groups
    from learner.trainer import assemble

    timer = SyncedPhaseTimer(t.model, t.optimizer, cuda)
    rows, batch = [], None
    end = time.monotonic() + args.seconds
    for step in range(args.steps + 1):  # step 0 warms up
        if step > 1 and time.monotonic() > end:
            break
        groups = synthetic_groups(args.groups, args.samples, args.tokens, t.vocab_size, step, trained=0.35)
        batch = assemble(groups, True)
        _sync(cuda)
        t0 = time.perf_counter()
        t.train_step(batch)
        _sync(cuda)
        wall = time.perf_counter() - t0
        phases = timer.take()
        _, micro = t._plans(batch)
        t0 = time.perf_counter()
        t._frozen_logprobs(t.model, batch, micro)  # π_prox / reference pass (minibatches > 1, kl_coef > 0)
        _sync(cuda)
        recompute = time.perf_counter() - t0
        timer.take()
        if step:
            rows.append({"wall": wall, "forward": phases.get("forward", 0.0), "optimizer": phases.get("optimizer", 0.0),
                         "recompute": recompute, "tokens": int(batch.lengths.sum())})
    return rows, batch


def _profile_step(t, batch, cuda: bool) -> list[dict]:
    """Top 15 ops by device time of one profiled step."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        t.train_step(batch)
        _sync(cuda)
    avg = list(prof.key_averages())
    dev_time = lambda e: getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)  # noqa: E731
    key = dev_time if cuda else (lambda e: e.cpu_time_total)
    top = sorted(avg, key=key, reverse=True)[:15]
    return [{"op": e.key, "device_ms" if cuda else "cpu_ms": round(key(e) / 1000, 3), "calls": e.count} for e in top]


def part_learner(args) -> dict:
    """Under torchrun (one rank): the real Trainer with FSDP2 + bf16 mixed precision."""
    import numpy as np
    import torch
    import torch.distributed as dist

    from common.config import load_config
    from learner.trainer import Trainer, init_distributed

    d = init_distributed()
    cuda = d.device.type == "cuda"
    lc = load_config(None, [f"learner.model='{args.model}'", f"learner.n_samples={args.samples}",
                            "learner.micro_batch_tokens=4096", "learner.skip_zero_advantage=false",
                            "learner.lr=1e-6", "learner.bf16=true"]).learner
    t = Trainer(lc, d)
    params = n_params(t.model)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rows, batch = _learner_steps(t, args, cuda)
    med = lambda k: float(np.median([r[k] for r in rows]))  # noqa: E731
    tokens_per_s = sum(r["tokens"] for r in rows) / sum(r["wall"] for r in rows)
    name = torch.cuda.get_device_name(d.device) if cuda else "cpu (smoke)"
    peak = peak_bf16_tflops(name) if cuda else None
    util = mfu(params, tokens_per_s, peak)
    out = {"ok": True, "device": name, "params": params, "bf16": lc.bf16 and cuda, "grad_checkpointing":
           lc.grad_checkpointing and cuda, "micro_batch_tokens": lc.micro_batch_tokens, "groups": args.groups,
           "samples": args.samples, "tokens_per_step": rows[0]["tokens"], "steps": len(rows),
           "step_s": round(med("wall"), 4), "forward_s": round(med("forward"), 4),
           "backward_s": round(med("wall") - med("forward") - med("optimizer"), 4),
           "optimizer_s": round(med("optimizer"), 4), "logprob_recompute_s": round(med("recompute"), 4),
           "tokens_per_s": round(tokens_per_s, 1),
           "peak_mem_gib": gib(torch.cuda.max_memory_allocated()) if cuda else None,
           "peak_bf16_tflops": peak, "mfu": None if util is None else round(util, 4),
           "note": "backward_s = step - forward - optimizer (backward with activation recompute, loss, clip)"}
    if cuda and peak is None:
        out["mfu_note"] = f"unknown card {name!r}: no dense bf16 peak in the table"
    if (util is not None and util < MFU_PROFILE_BELOW) or args.smoke:
        out["profile_top15"] = _profile_step(t, batch, cuda)
    dist.destroy_process_group()
    return out


# --------------------------------------------------------------------------- part 4: weight sync
def _timed(fn, repeat: int, cuda: bool) -> float:
    """Median seconds of fn() over `repeat` runs after one warm-up."""
    fn()
    _sync(cuda)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(cuda)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _copy_seconds(nbytes: int, dev, cuda: bool) -> float:
    """Median seconds of one copy_ of `nbytes` from one buffer to another on `dev`."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    return _timed(lambda: dst.copy_(src), 5, cuda)


def _copy_and_pack(named, dev, cuda: bool) -> dict:
    """A plain device-to-device copy of the weights' bytes, and pack_bucket over the bucket plan."""
    import torch

    from common.config import LearnerConfig
    from common.weightsync.buckets import pack_bucket, plan_buckets

    nbytes = sum(t.numel() * t.element_size() for _, t in named)
    copy_s = _copy_seconds(nbytes, dev, cuda)
    buckets = plan_buckets(named, int(LearnerConfig().bucket_mb * 2**20))
    buf = torch.empty(max(b.nbytes for b in buckets), dtype=torch.uint8, device=dev)
    pack_s = _timed(lambda: [pack_bucket(b, out=buf) for b in buckets], 3, cuda)
    return {"bytes": nbytes, "tensors": len(named), "buckets": len(buckets), "copy_s": round(copy_s, 5),
            "d2d_copy_gbps": round(nbytes / copy_s / 1e9, 2), "pack_s": round(pack_s, 5),
            "pack_gbps": round(nbytes / pack_s / 1e9, 2)}


def _byte_sum(named) -> int:
    import torch

    return int(sum(int(torch.sum(t.reshape(-1).view(torch.uint8), dtype=torch.int64)) for _, t in named))


def _ipc_handoff(named, args, versions: int) -> dict:
    """WeightSender with learner.colocated_ipc, one member process on the same GPU (--smoke: the
    CPU stand-in ShmIpcStandIn in both processes); version 1 warms up."""
    from common.config import LearnerConfig, TransportConfig
    from common.transport import free_tcp_port
    from common.weightsync.sender import WeightSender

    cfg = LearnerConfig(sync_endpoint=f"tcp://127.0.0.1:{free_tcp_port()}", store_port=0, colocated_ipc=True,
                        sync_timeout_s=60.0)
    sender = WeightSender(cfg, TransportConfig())
    sender.start()
    result = os.path.join(tempfile.mkdtemp(prefix="scout-gpu-check-"), "member.json")
    cmd = [sys.executable, __file__, "--part", "ipc-member", "--endpoint", sender.endpoint, "--result", result,
           "--versions", str(versions), "--seconds", str(args.seconds)] + (["--smoke"] if args.smoke else [])
    member = subprocess.Popen(cmd, cwd=ROOT)
    try:
        if not sender.wait_members(1, 60):
            raise RuntimeError("the member process did not join within 60 s")
        reports = [sender.broadcast(v, named) for v in range(1, versions + 1)]
        transport = sender.membership.members["gpu-check-member"].transport
        member.wait(timeout=60)
    finally:
        sender.close()
        if member.poll() is None:
            member.kill()
            member.wait()
    got = json.loads(Path(result).read_text()) if os.path.exists(result) else {}
    timed = reports[1:] or reports
    xfer = sorted(r["transfer_seconds"] for r in timed)[len(timed) // 2]
    whole = sorted(r["seconds"] for r in timed)[len(timed) // 2]
    nbytes = reports[0]["bytes"]
    ok = all(r["ok"] == ["gpu-check-member"] for r in reports) and got.get("byte_sum") == _byte_sum(named)
    return {"ok": ok and transport == "cuda_ipc", "transport": transport, "versions": versions,
            "ipc_transfer_s": round(xfer, 4), "ipc_sync_s": round(whole, 4),
            "ipc_gbps": round(nbytes / xfer / 1e9, 2), "ipc_sync_gbps": round(nbytes / whole / 1e9, 2),
            "member_bytes_match": got.get("byte_sum") == _byte_sum(named), "member": got,
            "reports": [{k: r[k] for k in ("version", "ok", "failed", "reasons", "buckets", "seconds")}
                        for r in reports]}


def part_weightsync(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from common.weightsync.cuda_ipc import ShmIpcStandIn, set_ipc_impl

    cuda = not args.smoke
    dev = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(0)
    else:
        set_ipc_impl(ShmIpcStandIn())  # TEST STAND-IN for CUDA IPC (smoke only)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).to(dev)
    named = [(n, p.detach()) for n, p in model.named_parameters()]
    out = {"ok": True, "device": torch.cuda.get_device_name(dev) if cuda else "cpu (smoke, shared-memory stand-in)"}
    out.update(_copy_and_pack(named, dev, cuda))
    ipc = _ipc_handoff(named, args, versions=4)
    out.update(ipc)
    out["ipc_vs_copy"] = round(ipc["ipc_gbps"] / out["d2d_copy_gbps"], 3)
    out["note"] = ("ipc_gbps: bytes / transfer time (learner packs each bucket, member copies it into its own "
                   "tensors, acks); d2d_copy_gbps: one torch copy_ of the same bytes")
    return out


def part_ipc_member(args) -> dict:
    """The member process of part 4: joins, loads every version into its own tensors (device to
    device from the learner's buffers), and records the byte sum of the last one."""
    import torch

    from common.config import TransportConfig
    from common.weightsync.client import SyncClient, follow_sync
    from common.weightsync.cuda_ipc import ShmIpcStandIn, gpu_location, set_ipc_impl
    from common.weightsync.receiver import BucketReceiver

    if args.smoke:
        set_ipc_impl(ShmIpcStandIn())  # TEST STAND-IN for CUDA IPC (smoke only)
        dev, transports = torch.device("cpu"), ["gloo", "zmq"]
    else:
        torch.cuda.set_device(0)
        dev, transports = torch.device("cuda", 0), ["nccl", "gloo"]
    client = SyncClient(args.endpoint, "gpu-check-member", uuid.uuid4().hex, TransportConfig(), transports,
                        colocated=gpu_location(dev))
    receiver = BucketReceiver(device=dev)
    params: dict[str, torch.Tensor] = {}

    def load(header: dict, data) -> None:
        for name, t in receiver.receive(header, data):
            if name not in params:
                params[name] = torch.empty_like(t, device=dev)
            params[name].copy_(t)

    client.join(-1)
    results, end = [], time.monotonic() + args.seconds
    while time.monotonic() < end:
        r = follow_sync(client, client.poll(200), receiver.setup, load)
        if r is None:
            continue
        receiver.release()
        results.append(r)
        if r["ok"] and r["version"] >= args.versions:
            break
    receiver.close()
    client.close()
    return {"ok": bool(results) and results[-1]["ok"], "syncs": results, "byte_sum": _byte_sum(params.items())}


# --------------------------------------------------------------------------- part 5: rollouts
class StandInSearcher:
    """STAND-IN for the retriever (no retriever server in this check): answers every query with
    `topk` demo-like passages built from the query's words."""

    def search(self, queries: list[str], topk: int):
        from common.protocol import Passage

        return [[Passage(id=f"{abs(hash(q)) % 10**6}-{k}", title=(q.split() or ["none"])[0],
                         text=f"the {q} is mirabel . it lies north of the river and has {k + 3} gates .", score=1.0)
                 for k in range(topk)] for q in queries]

    def close(self) -> None:
        pass


def part_rollout(args) -> dict:
    """Multi-turn rollouts (RolloutRunner) over the transformers engine; tokens/s."""
    import torch

    from actors.engine import SamplingSpec, TransformersEngine
    from actors.rollout import RolloutRunner
    from common.config import ActorConfig
    from common.protocol import Prompt

    cuda = not args.smoke
    t0 = time.perf_counter()
    engine = TransformersEngine(args.model, dtype="bfloat16" if cuda else "float32", device="cuda" if cuda else "cpu")
    load_s = time.perf_counter() - t0
    engine.add("warm-up", [1, 2, 3, 4], SamplingSpec(max_tokens=8, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    acfg = ActorConfig(model=args.model, engine="transformers", n_samples=args.samples, max_turns=2,
                       max_new_tokens=args.turn_tokens, max_obs_tokens=200, max_total_tokens=2048)
    runner = RolloutRunner(engine, StandInSearcher(), acfg)
    for i in range(args.groups):
        runner.start_group(Prompt(prompt_id=i, question=f"what is the capital of zorland {i} ?",
                                  golden_answers=["mirabel"]), acfg.n_samples)
    done, end = 0, time.monotonic() + args.seconds
    t0 = time.perf_counter()
    while runner.busy() and time.monotonic() < end:
        done += len(runner.poll())
        if not engine.has_unfinished():
            runner.wait_searches(0.05)
    seconds = time.perf_counter() - t0
    s = runner.stats
    runner.close()
    return {"ok": s.tokens > 0, "device": torch.cuda.get_device_name(0) if cuda else "cpu (smoke)",
            "engine": "transformers", "dtype": "bfloat16" if cuda else "float32", "engine_load_s": round(load_s, 2),
            "groups": args.groups, "samples": acfg.n_samples, "groups_finished": done, "seconds": round(seconds, 2),
            "tokens": s.tokens, "tokens_per_s": round(s.tokens / seconds, 1), "engine_steps": s.steps,
            "searches": s.searches, "invalid_actions": s.invalid_actions, "searcher": "StandInSearcher (stand-in)",
            "note": "random weights: turns mostly end at the per-turn budget and get the corrective observation"}


# --------------------------------------------------------------------------- orchestration
def run_subprocess(cmd: list[str], timeout_s: float) -> tuple[int | None, str, bool]:
    """(exit code, output tail, timed out); the whole process group is killed at the timeout."""
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=max(1.0, timeout_s))
        return p.returncode, out[-6000:], False
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        return None, (out or "")[-6000:], True


def run_part(name: str, args, model: str, timeout_s: float) -> dict:
    """One measuring part in its own process (torchrun for the learner); its JSON result back."""
    from common.transport import free_tcp_port

    result = os.path.join(tempfile.mkdtemp(prefix="scout-gpu-check-"), f"{name}.json")
    own = [__file__, "--part", name, "--model", model, "--result", result, "--seconds",
           str(max(5, int(timeout_s * 0.5))), "--steps", str(args.steps), "--groups", str(args.groups),
           "--samples", str(args.samples), "--tokens", str(args.tokens), "--turn-tokens", str(args.turn_tokens)]
    own += ["--smoke"] if args.smoke else []
    launcher = [sys.executable]
    if name == "learner":
        launcher += ["-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
                     "--master-port", str(free_tcp_port())]
    rc, tail, timed_out = run_subprocess(launcher + own, timeout_s)
    if os.path.exists(result):
        return json.loads(Path(result).read_text())
    why = f"timed out after {timeout_s:.0f}s" if timed_out else f"exit {rc}"
    return {"ok": False, "error": f"{why}: {tail[-3000:]}"}


def measure(args, report: dict, t_start: float) -> None:
    """Parts 1-5, each with min(its timeout, what is left of the budget)."""
    model = os.path.join(tempfile.mkdtemp(prefix="scout-gpu-check-"), "qwen2-0.5b-random")
    names = (["gpu_tests"] if not args.smoke else []) + ["build", "learner", "weightsync", "rollout"]
    for name in names:
        left = args.budget - (time.monotonic() - t_start)
        timeout = min(PART_TIMEOUT_S[name] * (2 if args.smoke else 1), left)
        t0 = time.monotonic()
        if timeout < 10:
            res = {"ok": False, "error": f"not run: {left:.0f}s of the {args.budget:.0f}s budget left"}
        elif name != "build" and name != "gpu_tests" and not report["parts"].get("build", {}).get("ok"):
            res = {"ok": False, "error": "not run: the model folder could not be built"}
        else:
            try:
                res = part_gpu_tests(timeout) if name == "gpu_tests" else run_part(name, args, model, timeout)
            except Exception as e:
                res = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        res["seconds_total"] = round(time.monotonic() - t0, 1)
        report["parts"][name] = res
        print(f"[gpu_check] {name}: {'ok' if res.get('ok') else 'FAILED'} in {res['seconds_total']}s", flush=True)


# --------------------------------------------------------------------------- output
def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


CHECK_FIGURES = ("params_24_layers", "params_extrapolated", "params_2_layers", "bf16_bytes", "buckets", "bucket_gib",
                 "made_up_tokens_per_s", "mfu_at_989_tflops", "by_hand", "without", "ids")
PART_FIGURES = {
    "gpu_tests": ("ran", "passed", "failed", "error", "skipped"),
    "build": ("params", "build_and_save_s"),
    "learner": ("tokens_per_s", "step_s", "forward_s", "backward_s", "optimizer_s", "logprob_recompute_s",
                "peak_mem_gib", "mfu", "peak_bf16_tflops", "tokens_per_step"),
    "weightsync": ("ipc_gbps", "ipc_sync_gbps", "d2d_copy_gbps", "ipc_vs_copy", "pack_gbps", "bytes", "buckets",
                   "transport"),
    "rollout": ("tokens_per_s", "tokens", "seconds", "engine_steps", "searches", "invalid_actions"),
}


def table(report: dict) -> str:
    lines = [f"{'check':<28} {'status':<7} detail", "-" * 100]
    for name, c in report["cpu_checks"].items():
        detail = c.get("error") or ", ".join(f"{k}={_fmt(c[k])}" for k in CHECK_FIGURES if k in c)
        lines.append(f"{name:<28} {'ok' if c.get('ok') else 'FAILED':<7} {detail[:300]}")
    for name, p in report["parts"].items():
        detail = p.get("error") or ", ".join(f"{k}={_fmt(p[k])}" for k in PART_FIGURES[name] if k in p)
        lines.append(f"{name:<28} {'ok' if p.get('ok') else 'FAILED':<7} {detail[:600]}")
        for t in p.get("tests", []):
            lines.append(f"  {t['outcome']:<8} {t['id']} {t['reason'][:120]}")
        if p.get("profile_top15"):
            unit = "device_ms" if "device_ms" in p["profile_top15"][0] else "cpu_ms"
            lines.append(f"  top ops of one profiled step, by {unit}:")
            lines += [f"  {row[unit]:>10.3f}  {row['calls']:>6}  {row['op'][:80]}" for row in p["profile_top15"]]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for everything (parts are clamped)")
    ap.add_argument("--steps", type=int, default=5, help="measured learner steps (after one warm-up)")
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=2048, help="longest sample; lengths are tokens/2..tokens")
    ap.add_argument("--turn-tokens", type=int, default=128, help="rollout: new tokens per turn")
    ap.add_argument("--cpu-smoke", dest="smoke", action="store_true",
                    help="development aid: parts 2-5 on the CPU at toy sizes (CPU figures, not GPU ones)")
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--part", "--model", "--result", "--endpoint"):
        ap.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, default=60.0, help=argparse.SUPPRESS)
    ap.add_argument("--versions", type=int, default=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smoke and not args.part:  # toy sizes: a CPU finishes each part in seconds
        args.steps, args.groups, args.samples, args.tokens, args.turn_tokens = 2, 2, 3, 256, 16
    if args.part:
        return run_one_part(args)
    return orchestrate(args)


def run_one_part(args) -> int:
    fn = {"build": part_build, "learner": part_learner, "weightsync": part_weightsync, "rollout": part_rollout,
          "ipc-member": part_ipc_member}[args.part]
    try:
        res = fn(args)
    except Exception as e:
        import traceback

        res = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    if os.environ.get("RANK", "0") == "0":
        Path(args.result).write_text(json.dumps(res))
    return 0


def orchestrate(args) -> int:
    import torch

    t_start = time.monotonic()
    cuda = torch.cuda.is_available() and not args.smoke
    report = {"cuda": cuda, "device": torch.cuda.get_device_name(0) if cuda else None,
              "torch": torch.__version__, "python": sys.version.split()[0], "budget_s": args.budget,
              "mode": "gpu" if cuda else ("cpu-smoke" if args.smoke else "dry-run"),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpu_checks": {}, "parts": {}}
    try:
        import transformers

        report["transformers"] = transformers.__version__
    except Exception as e:
        report["transformers"] = f"unavailable: {e}"
    report["cpu_checks"] = cpu_checks(collect=not cuda)
    if cuda or args.smoke:
        measure(args, report, t_start)
    report["seconds"] = round(time.monotonic() - t_start, 1)
    report["cpu_checks_ok"] = all(c.get("ok") for c in report["cpu_checks"].values())
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(table(report))
    if args.smoke:
        print("cpu smoke: CPU figures of a toy model (code paths only), not GPU figures")
    elif not cuda:
        print(NO_CUDA)
    print(f"wrote {args.out} in {report['seconds']}s")
    return 0 if report["cpu_checks_ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
