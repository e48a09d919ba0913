"""Atomic sharded checkpoints and HF export.

    every rank ─dcp.save({"model", "optim"})──▶ <root>/.tmp-step-00000040/   (+ rng-<rank>.safetensors)
    rank 0     ─meta.json (step, version, scheduler, dispatcher, model path) + hf/ (config, tokenizer)
               ─rename──▶ <root>/step-00000040/ ─then──▶ <root>/latest  ("step-00000040", written last)

A checkpoint is complete once its folder has its final name and holds meta.json; `find_latest`
only ever returns such a folder (following `latest`, else the highest complete step), so a
checkpoint cut short by a crash (a .tmp-* folder) is never picked and is cleared on the next save.
We pickle nothing ourselves: tensors go through torch.distributed.checkpoint (whose own
`.metadata` index is torch's pickle, read only from our own checkpoint folders), RNG states
through safetensors, the rest is JSON. `export_hf` turns a checkpoint into a folder transformers and vLLM load.

Progress: while the ranks write, a thread on rank 0 polls the size of the .tmp folder twice a
second (the save path itself does no extra work) and shows it as a bar on a terminal
(learner.status.Activity) or as a log line every 10 s otherwise; the save ends with one line
naming the shard files, bytes, seconds and MiB/s.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from learner.status import Activity, human_bytes

log = logging.getLogger("scout.learner.checkpoint")

META = "meta.json"
LATEST = "latest"
HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
            "chat_template.jinja")


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def is_complete(path: Path) -> bool:
    return path.is_dir() and path.name.startswith("step-") and (path / META).is_file() \
        and (path / ".metadata").is_file()


def find_latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root` (or `root` itself if it is one), else None."""
    root = Path(root)
    if is_complete(root):
        return root
    marker = root / LATEST
    if marker.is_file():
        cand = root / marker.read_text().strip()
        if is_complete(cand):
            return cand
        log.warning("%s names %s, which is not a complete checkpoint: scanning", marker, cand.name)
    done = sorted((p for p in root.glob("step-*") if is_complete(p)), key=lambda p: p.name)
    return done[-1] if done else None


# --------------------------------------------------------------------------- RNG
def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def _restore_rng(path: Path, rank: int) -> None:
    from safetensors.torch import load_file

    f = path / f"rng-{rank}.safetensors"
    if not f.is_file():
        log.warning("no RNG state for rank %d in %s (world size changed?): RNG not restored", rank, path)
        return
    state = load_file(str(f))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --------------------------------------------------------------------------- save / load
def _state(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optim": osd}


def save_checkpoint(root: str | Path, step: int, model, optimizer, meta: dict, model_path: str | None,
                    rank: int, keep: int = 3) -> Path:
    """Collective: every rank calls it. Returns the final folder."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    root = Path(root)
    tmp, final = root / f".tmp-{step_name(step)}", root / step_name(step)
    t0 = time.monotonic()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step-*"):  # left by a crash mid-save
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    state = _state(model, optimizer)
    watch = _SaveWatch(tmp, final.name, _local_bytes(state) * dist.get_world_size()) if rank == 0 else None
    try:
        dcp.save(state, checkpoint_id=str(tmp))
        save_file(_rng_tensors(), str(tmp / f"rng-{rank}.safetensors"))
        dist.barrier()
    finally:
        files, size = watch.stop() if watch is not None else (0, 0)
    if rank == 0:
        _finish(root, tmp, final, {**meta, "step": step, "world_size": dist.get_world_size(),
                                   "model_path": model_path, "saved_at": time.time()}, model_path, keep)
        dt = time.monotonic() - t0
        log.info("checkpoint %s written in %.2fs: %d shard file(s) from %d rank(s), %s (%.1f MiB/s)", final, dt,
                 files, dist.get_world_size(), human_bytes(size), size / 2**20 / max(dt, 1e-9))
    dist.barrier()
    return final


def _local_bytes(state) -> int:
    """Bytes of this rank's part of a (nested) state dict: a DTensor counts its local shard."""
    if isinstance(state, dict):
        return sum(_local_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_local_bytes(v) for v in state)
    if isinstance(state, torch.Tensor):
        local = state.to_local() if hasattr(state, "to_local") else state
        return local.numel() * local.element_size()
    return 0


def folder_usage(folder: Path) -> tuple[int, int]:
    """(DCP shard files, bytes of every file) in a checkpoint folder being written."""
    files = size = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0, 0
    for e in entries:
        try:
            if e.is_file():
                size += e.stat().st_size
                files += e.name.endswith(".distcp")
        except OSError:  # renamed or removed while we looked
            pass
    return files, size


class _SaveWatch:
    """Rank 0: show the checkpoint folder filling up while every rank writes into it."""

    def __init__(self, folder: Path, name: str, expected_bytes: int, interval_s: float = 0.5):
        self.folder, self.interval_s = folder, interval_s
        self.activity = Activity(f"checkpoint {name}", total=expected_bytes or None, unit="B", logger=log)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="checkpoint-progress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            files, size = folder_usage(self.folder)
            self.activity.update(size, f"{files} shard file(s)")

    def stop(self) -> tuple[int, int]:
        self._stop.set()
        self._thread.join(5)
        files, size = folder_usage(self.folder)
        if self.activity.on_screen:  # the bar ends at the real size (off screen the caller logs it)
            self.activity.update(size, f"{files} shard file(s)")
        self.activity.close()
        return files, size


def _finish(root: Path, tmp: Path, final: Path, meta: dict, model_path: str | None, keep: int) -> None:
    if model_path:
        (tmp / "hf").mkdir(exist_ok=True)
        for name in HF_FILES:
            src = Path(model_path) / name
            if src.is_file():
                shutil.copy2(src, tmp / "hf" / name)
    _write_atomic(tmp / META, json.dumps(meta, indent=1))
    _fsync_dir(tmp)
    if final.exists():  # the same step saved again (e.g. after a resume): replace it
        _discard(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    _write_atomic(root / LATEST, final.name)
    done = sorted((p for p in root.glob("step-*") if is_complete(p)), key=lambda p: p.name)
    for old in done[:-keep]:
        _discard(old)


def _discard(path: Path) -> None:
    """Delete a checkpoint folder without ever leaving a half-deleted one under a step-* name
    (rmtree in place could leave meta.json and .metadata beside missing shards: 'complete' to
    find_latest). The rename is atomic; a crash after it leaves a .tmp-* folder the next save clears."""
    trash = path.with_name(f".tmp-{path.name}-old")
    if trash.exists():
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    _fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def load_checkpoint(path: str | Path, model, optimizer, rank: int) -> dict:
    """Collective: restores model + optimizer shards (any world size) and this rank's RNG;
    returns meta (step, version, scheduler, dispatcher ...)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint")
    meta = json.loads((path / META).read_text())
    state = _state(model, optimizer)
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    _restore_rng(path, rank)
    return meta


# --------------------------------------------------------------------------- export
def export_hf(ckpt: str | Path, out: str | Path) -> Path:
    """Checkpoint folder (or a checkpoint root: its latest) → HF folder (safetensors + config +
    tokenizer) in the model's original dtype. Runs in one process, no torchrun needed."""
    import torch.distributed.checkpoint as dcp
    from transformers import AutoConfig, AutoModelForCausalLM

    path = find_latest(ckpt)
    if path is None:
        raise FileNotFoundError(f"no complete checkpoint in {ckpt}")
    meta = json.loads((path / META).read_text())
    hf_dir = path / "hf" if (path / "hf" / "config.json").is_file() else Path(meta.get("model_path") or "")
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no hf/config.json and the original model folder is gone")
    config = AutoConfig.from_pretrained(str(hf_dir))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    sd = {k: torch.empty(v.shape, dtype=torch.float32) for k, v in skeleton.state_dict().items()}
    with warnings.catch_warnings():  # "loading in a single process" is exactly the intent here
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": sd}, checkpoint_id=str(path), no_dist=True)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k not in _tied_names(model)]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.to(dtype).save_pretrained(str(out), safe_serialization=True)
    for name in HF_FILES:
        if name != "config.json" and (hf_dir / name).is_file():
            shutil.copy2(hf_dir / name, out / name)
    log.info("exported %s (step %s) to %s as %s", path, meta.get("step"), out, dtype)
    return out


def _tied_names(model) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or []
    if isinstance(tied, dict):
        tied = list(tied)
    return set(tied) | ({"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set())
