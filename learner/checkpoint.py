"""Atomic sharded checkpoints and HF export.

    every rank ─dcp.save({"model", "optim"})──▶ <root>/.tmp-step-00000040/   (+ rng-<rank>.safetensors)
    rank 0     ─meta.json (step, version, scheduler, dispatcher, model path, files: size + sha256 of
               every other file) + hf/ (config, tokenizer)
               ─rename──▶ <root>/step-00000040/ ─then──▶ <root>/latest  ("step-00000040", written last)

A checkpoint is complete once its folder has its final name and holds meta.json; `find_latest`
only ever returns such a folder (following `latest`, else the highest complete step), so a
checkpoint cut short by a crash (a .tmp-* folder) is never picked and is cleared on the next save.

Checksums: meta.json lists every other file of the checkpoint with its size and sha256 ("files").
Each rank hashes the files it wrote (its DCP shards, its RNG file) right after writing them, rank 0
the rest; meta.json is written only after every file is hashed (and fsynced), so it vouches for
bytes already on disk. `find_resumable` (--resume, export) re-hashes and skips a checkpoint whose
file is missing, truncated or changed, naming it; retention counts only checkpoints that verify.
A save that fails on any rank (disk full, I/O error) fails on every rank with CheckpointSaveError:
the .tmp folder is removed and nothing else is touched, so the previous checkpoint stays.
We pickle nothing ourselves: tensors go through torch.distributed.checkpoint (whose own
`.metadata` index is torch's pickle, read only from our own checkpoint folders), RNG states
through safetensors, the rest is JSON. `export_hf` turns a checkpoint into a folder transformers and vLLM load.

Progress: while the ranks write, a thread on rank 0 polls the size of the .tmp folder twice a
second (the save path itself does no extra work) and shows it as a bar on a terminal
(learner.status.Activity) or as a log line every 10 s otherwise; the save ends with one line
naming the shard files, bytes, seconds and MiB/s.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import resource
import shutil
import threading
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

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


def _candidates(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, the one `latest` names first, then newest first."""
    if is_complete(root):
        return [root]
    done = sorted((p for p in root.glob("step-*") if is_complete(p)), key=lambda p: p.name, reverse=True)
    marker = root / LATEST
    if marker.is_file():
        cand = root / marker.read_text().strip()
        if is_complete(cand):
            return [cand] + [p for p in done if p != cand]
        log.warning("%s names %s, which is not a complete checkpoint: scanning", marker, cand.name)
    return done


def find_latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root` (or `root` itself if it is one), else None.
    Complete, not verified: see `find_resumable`."""
    found = _candidates(Path(root))
    return found[0] if found else None


def find_resumable(root: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint under `root` that verifies (the order of `find_latest`), and
    the (checkpoint, what is wrong) of each damaged one skipped on the way, each logged as an error."""
    skipped: list[tuple[Path, str]] = []
    for cand in _candidates(Path(root)):
        t0 = time.monotonic()
        problem = check_checkpoint(cand)
        if problem is None:
            log.info("checkpoint %s verifies (%.2fs)", cand, time.monotonic() - t0)
            return cand, skipped
        log.error("checkpoint %s is damaged: %s; skipping it", cand, problem)
        skipped.append((cand, problem))
    return None, skipped


# --------------------------------------------------------------------------- checksums
CHUNK = 8 << 20
_VERIFIED: dict[str, tuple] = {}  # checkpoint → stat signature of its files when this process last hashed them
_UNSUMMED: set[str] = set()  # checkpoints without checksums already warned about


def file_entry(path: Path, sync: bool = False) -> dict:
    """{"bytes", "sha256"} of a file; `sync` also fsyncs it (meta.json, which vouches for it, comes after)."""
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            n += len(chunk)
        if sync:
            os.fsync(f.fileno())
    return {"bytes": n, "sha256": h.hexdigest()}


def _signature(path: Path, files: dict) -> tuple:
    return tuple((name, st.st_size, st.st_mtime_ns, st.st_ino)
                 for name in sorted(files) for st in [(path / name).stat()])


def check_checkpoint(path: str | Path, trust_unchanged: bool = False) -> str | None:
    """None if every file meta.json lists is there with its size and sha256, else what is wrong
    (the file, expected vs found). `trust_unchanged` (retention): a checkpoint this process has
    hashed before and whose files' size, mtime and inode are the same is not read again."""
    path = Path(path)
    try:
        files = json.loads((path / META).read_text()).get("files")
    except FileNotFoundError:
        return f"{META} is missing"
    except (OSError, ValueError, AttributeError) as e:
        return f"{META} is unreadable ({e})"
    if files is None:  # written before checksums existed: take it as it is
        if str(path) not in _UNSUMMED:
            _UNSUMMED.add(str(path))
            log.warning("checkpoint %s has no checksums (written by an older scout): used unverified", path)
        return None
    try:
        for name, want in sorted(files.items()):
            f = path / name
            if not f.is_file():
                return f"{name} is missing (expected {want['bytes']} bytes)"
            size = f.stat().st_size
            if size != want["bytes"]:
                how = "truncated" if size < want["bytes"] else "grown"
                return f"{name} has {size} bytes, expected {want['bytes']} ({how})"
        sig = _signature(path, files)
        if trust_unchanged and _VERIFIED.get(str(path)) == sig:
            return None
        for name, want in sorted(files.items()):
            got = file_entry(path / name)["sha256"]
            if got != want["sha256"]:
                return f"{name} has sha256 {got[:16]}…, expected {want['sha256'][:16]}… (its bytes changed)"
    except (KeyError, TypeError, AttributeError) as e:
        return f"{META} has a malformed file list ({e!r})"
    except OSError as e:
        return f"reading it failed: {e}"
    _VERIFIED[str(path)] = sig
    return None


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


class CheckpointSaveError(RuntimeError):
    """A save failed (on this rank or another); `reason`: no_space, write_error or error."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


REASONS = ("ok", "error", "write_error", "no_space")  # all-reduced as the max index: the worst wins
NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def save_checkpoint(root: str | Path, step: int, model, optimizer, meta: dict, model_path: str | None,
                    rank: int, keep: int = 3, group=None) -> Path:
    """Collective: every rank calls it. Returns the final folder; if any rank's part fails, raises
    CheckpointSaveError on every rank, the .tmp folder removed, the previous checkpoints untouched.
    `group`: a gloo group for the ranks' agreement (None: the default group)."""
    root = Path(root)
    tmp, final = root / f".tmp-{step_name(step)}", root / step_name(step)
    t0 = time.monotonic()
    try:
        _together(lambda: _prepare(root, tmp) if rank == 0 else None, tmp, group)
        state = _state(model, optimizer)
        watch = _SaveWatch(tmp, final.name, _local_bytes(state) * dist.get_world_size()) if rank == 0 else None
        try:
            _together(lambda: _write_rank_part(state, tmp, rank), tmp, group)
        finally:
            files, size = watch.stop() if watch is not None else (0, 0)
        _test_pause(step)
        full = {**meta, "step": step, "world_size": dist.get_world_size(), "model_path": model_path,
                "saved_at": time.time()}
        _together(lambda: _finish(root, tmp, final, full, model_path, keep) if rank == 0 else None, tmp, group)
    except CheckpointSaveError:
        if rank == 0:  # the partial save: never picked, but it holds disk space
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if rank == 0:
        dt = time.monotonic() - t0
        log.info("checkpoint %s written in %.2fs: %d shard file(s) from %d rank(s), %s (%.1f MiB/s)", final, dt,
                 files, dist.get_world_size(), human_bytes(size), size / 2**20 / max(dt, 1e-9))
    return final


def _prepare(root: Path, tmp: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step-*"):  # left by a crash mid-save
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()


def _write_rank_part(state: dict, tmp: Path, rank: int) -> None:
    """This rank's shards (DCP, collective) and RNG file, then their checksums in .sums-<rank>.json."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    dcp.save(state, checkpoint_id=str(tmp))
    save_file(_rng_tensors(), str(tmp / f"rng-{rank}.safetensors"))
    mine = sorted(tmp.glob(f"__{rank}_*.distcp")) + [tmp / f"rng-{rank}.safetensors"]  # DCP names rank r's __r_*
    (tmp / f".sums-{rank}.json").write_text(json.dumps({f.name: file_entry(f, sync=True) for f in mine}))


def _together(part, folder: Path, group) -> None:
    """Run this rank's `part` of a save, then agree with every rank: if any failed, all raise
    CheckpointSaveError (with the worst reason), so no rank waits at a collective for one that gave up."""
    error, code = None, 0
    try:
        part()
    except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
        error = e
        code = REASONS.index(_reason(e, folder))
    flag = torch.tensor([code], device="cuda" if dist.get_backend(group) == "nccl" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    worst = REASONS[int(flag)]
    if error is not None:
        raise CheckpointSaveError(_describe(error, folder), worst) from error
    if worst != "ok":
        raise CheckpointSaveError(f"another rank failed to write its part ({worst}); see its log", worst)


def _chain(error: BaseException) -> list[BaseException]:
    """The error, its causes and contexts, and the per-rank errors inside a DCP CheckpointException."""
    out, todo = [], [error]
    while todo and len(out) < 50:
        e = todo.pop()
        if e is None or any(e is o for o in out):
            continue
        out.append(e)
        todo += [e.__cause__, e.__context__]
        if isinstance(e, CheckpointException):
            todo += [exc for exc, _trace in e.failures.values()]
    return out


def _reason(error: BaseException, folder: Path) -> str:
    chain = _chain(error)
    if any(isinstance(e, OSError) and e.errno in NO_SPACE for e in chain) or _out_of_space(folder):
        return "no_space"
    # torch.save (inside DCP) reports a failed write as "unexpected pos", losing the OSError
    if any(isinstance(e, OSError) or "unexpected pos" in str(e) for e in chain):
        return "write_error"
    return "error"


def _out_of_space(folder: Path) -> bool:
    """The disk has under 1 MiB left, or a file of the save reached the process's file size limit
    (RLIMIT_FSIZE, `ulimit -f`): what a failed write means when its errno was lost on the way."""
    try:
        st = os.statvfs(folder if folder.exists() else folder.parent)
        if st.f_bavail * st.f_frsize < 1 << 20:
            return True
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        return limit != resource.RLIM_INFINITY and any(
            f.is_file() and f.stat().st_size >= limit for f in folder.rglob("*"))
    except OSError:
        return False


def _describe(error: BaseException, folder: Path) -> str:
    """One line: the first failure (not DCP's tracebacks), plus free space and the file size limit."""
    inner = [e for e in _chain(error) if not isinstance(e, CheckpointException)]
    first = inner[0] if inner else error
    text = f"{type(first).__name__}: {str(first).splitlines()[0] if str(first) else ''}"
    try:
        free = human_bytes(shutil.disk_usage(folder if folder.exists() else folder.parent).free)
    except OSError:
        free = "?"
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return text + f" (free on the checkpoint disk: {free}" + (
        f"; file size limit: {human_bytes(limit)})" if limit != resource.RLIM_INFINITY else ")")


def _test_pause(step: int) -> None:
    """Test hook, SCOUT_TEST_CHECKPOINT_PAUSE="STEP:SECONDS[,STEP:SECONDS...]": sleep inside the save of
    that step, once the shards are on disk and before meta.json, so a test can act mid-save."""
    for item in os.environ.get("SCOUT_TEST_CHECKPOINT_PAUSE", "").split(","):
        at, _, seconds = item.partition(":")
        if at.strip() == str(step):
            log.warning("test hook: pausing %s s inside the save of step %d", seconds, step)
            time.sleep(float(seconds))


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
    """(DCP shard files, bytes of every file) in a checkpoint folder being written; the ranks'
    checksum notes (.sums-*.json, folded into meta.json and removed at the end) do not count."""
    files = size = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0, 0
    for e in entries:
        try:
            if e.is_file() and not e.name.startswith(".sums-"):
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
    meta["files"] = _manifest(tmp, meta["world_size"])
    _write_atomic(tmp / META, json.dumps(meta, indent=1))
    _fsync_dir(tmp)
    if final.exists():  # the same step saved again (e.g. after a resume): replace it
        _discard(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    _VERIFIED[str(final)] = _signature(final, meta["files"])  # hashed from the disk just now
    _write_atomic(root / LATEST, final.name)
    try:
        _prune(root, final, keep)
    except OSError as e:  # the new checkpoint is complete: a failed deletion costs disk, not the save
        log.warning("pruning old checkpoints in %s failed: %s", root, e)


def _manifest(tmp: Path, world: int) -> dict:
    """Size and sha256 of every file but meta.json: the ranks' own (.sums-<rank>.json), the rest hashed here."""
    files: dict[str, dict] = {}
    for r in range(world):
        part = tmp / f".sums-{r}.json"
        if part.is_file():
            files.update(json.loads(part.read_text()))
            part.unlink()
    for f in sorted(tmp.rglob("*")):
        name = f.relative_to(tmp).as_posix()
        if f.is_file() and name not in files and name != META:
            files[name] = file_entry(f, sync=True)
    return files


def _prune(root: Path, fresh: Path, keep: int) -> None:
    """Keep `fresh` and the newest checkpoints that verify, `keep` in all; delete the rest. One that does
    not verify is not counted (so the last good one is never deleted for it) and is deleted too."""
    kept = 1
    for old in sorted((p for p in root.glob("step-*") if is_complete(p) and p != fresh),
                      key=lambda p: p.name, reverse=True):
        if kept < keep:
            problem = check_checkpoint(old, trust_unchanged=True)
            if problem is None:
                kept += 1
                continue
            log.warning("checkpoint %s does not verify (%s): not counted as one of the %d kept; deleting it",
                        old, problem, keep)
        _discard(old)


def _discard(path: Path) -> None:
    """Delete a checkpoint folder without ever leaving a half-deleted one under a step-* name
    (rmtree in place could leave meta.json and .metadata beside missing shards: 'complete' to
    find_latest). The rename is atomic; a crash after it leaves a .tmp-* folder the next save clears."""
    trash = path.with_name(f".tmp-{path.name}-old")
    if trash.exists():
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    _VERIFIED.pop(str(path), None)
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
    """Checkpoint folder (or a checkpoint root: its newest that verifies) → HF folder (safetensors +
    config + tokenizer) in the model's original dtype. Runs in one process, no torchrun needed."""
    import torch.distributed.checkpoint as dcp
    from transformers import AutoConfig, AutoModelForCausalLM

    path, damaged = find_resumable(ckpt)
    if path is None:
        raise FileNotFoundError(f"no complete checkpoint that verifies in {ckpt}"
                                + "".join(f"; {p.name}: {why}" for p, why in damaged))
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
