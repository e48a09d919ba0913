"""Shared test fixtures: free ports, ipc paths, process cleanup by PID, gpu skip."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if any("gpu" in item.keywords for item in items) and not _cuda_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
    # the tests that need the demo's pretrained base model run last: it is built in the
    # background while the rest of the session runs (pytest_collection_finish)
    late = [item for item in items if _needs_prepared(item)]
    items[:] = [item for item in items if item not in late] + late


def _needs_prepared(item) -> bool:
    return "demo_prepared" in getattr(item, "fixturenames", ())


class _Background:
    """`cli.py demo --prepare-only` (world, indexes, ~5 min of pretraining on 2 cores) started
    when collection ends, at the lowest CPU priority and on one thread (the weights are
    byte-identical to a 2-thread run's), so it uses the CPU the other tests leave idle."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.dir: Path | None = None

    def start(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="scout-demo-prepared-"))
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        with open(self.dir / "prepare.log", "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "cli.py", "demo", "--prepare-only", "--set",
                                          f"demo.dir='{self.dir}'"], cwd=ROOT, env=env,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        # lowest priority, set while the interpreter is still starting: Linux keeps a nice value per
        # thread and new threads inherit their creator's (prepare starts no process of its own)
        os.setpriority(os.PRIO_PROCESS, self.proc.pid, 19)

    def wait(self, timeout: float) -> Path:
        if self.proc is None:  # collection did not see the test that asks (should not happen)
            self.start()
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        log = (self.dir / "prepare.log").read_text(errors="replace")
        assert rc == 0, f"demo --prepare-only: exit {rc}\n{log[-4000:]}"
        return self.dir

    def stop(self) -> None:
        from common.procs import stop_processes

        if self.proc is not None:
            stop_processes([self.proc], timeout=10)
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


_PREPARED = _Background()


def pytest_collection_finish(session):
    if not session.config.option.collectonly and any(_needs_prepared(item) for item in session.items):
        _PREPARED.start()


def pytest_sessionfinish(session, exitstatus):
    _PREPARED.stop()


@pytest.fixture
def free_port():
    from common.transport import free_tcp_port

    return free_tcp_port


_IPC_DIRS: list[str] = []  # made by ipc_dir() in this test session, removed at its end


def ipc_dir() -> str:
    """A short private folder for ipc:// sockets (a socket path must fit in ~107 bytes, so not under
    tmp_path); removed when the test session ends."""
    d = tempfile.mkdtemp(prefix="scout-ipc-")
    _IPC_DIRS.append(d)
    return d


@pytest.fixture(scope="session", autouse=True)
def _remove_ipc_dirs():
    yield
    for d in _IPC_DIRS:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def _restore_environ():
    """Each test module starts from the session's environment. An in-process vLLM engine writes
    ~20 variables into os.environ (LD_PRELOAD of torch's libgomp, LOCAL_WORLD_SIZE, VLLM_*, ...),
    and every process a later module started inherited them."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture
def ipc_path():
    d = ipc_dir()
    return lambda name="sock": f"ipc://{d}/{name}-{uuid.uuid4().hex[:8]}"


class Procs:
    """Start processes of this repo and end them by PID at teardown."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def start(self, args: list[str], env: dict | None = None, **kw) -> subprocess.Popen:
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        p = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=full_env,
                             start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def stop_all(self):
        from common.procs import stop_processes

        stop_processes(self.procs, timeout=10)


@pytest.fixture
def procs():
    p = Procs()
    yield p
    p.stop_all()


@pytest.fixture(scope="session")
def demo_prepared() -> Path:
    """A demo folder with the world, its indexes and the pretrained base model, made in the
    background since collection ended (_Background)."""
    return _PREPARED.wait(timeout=800)  # alone, on 2 idle cores: ~8 min
