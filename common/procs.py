"""Stopping child processes: everything that starts others (the actor supervisor, the retriever
service and its shards, the demo, the benches and the tests) ends them the same way. And the
C heap trim that keeps the long-lived actor worker and learner from creeping up (HeapTrim). And
a faster exit for processes that imported torch (skip_final_collections)."""

from __future__ import annotations

import gc
import logging
import os
import signal
import subprocess
import time


def skip_final_collections() -> None:
    """Call as the process ends: the interpreter's last garbage collections walk every object
    torch, transformers and vLLM made (1.5-2.5 s of a retriever's exit on the 2-core VM). Frozen
    objects are left out of them; the memory goes back to the OS with the process anyway."""
    gc.freeze()


def stop_processes(procs: list[subprocess.Popen], timeout: float = 20.0, group: bool = True,
                   log: logging.Logger | None = None) -> None:
    """SIGTERM to every live process at once (to its whole process group with `group`), then one
    shared deadline before SIGKILL; a straggler is logged when `log` is given."""
    live = [p for p in procs if p.poll() is None]

    def send(p: subprocess.Popen, sig: int) -> None:
        try:
            if group:
                os.killpg(p.pid, sig)
            else:
                p.send_signal(sig)
        except ProcessLookupError:
            pass

    for p in live:
        send(p, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in live:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            if log is not None:
                log.warning("pid %d did not stop in %.0fs: killing it", p.pid, timeout)
            send(p, signal.SIGKILL)
            p.wait()


def rss_bytes() -> int:
    """This process's resident memory (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class HeapTrim:
    """Every `every_s` seconds, hand the C heap's free pages back to the OS (glibc's malloc_trim).

    torch's CPU tensors come from malloc: vLLM's activations and weight-update buffers in the actor
    worker, gradients and batches in the learner. Their sizes change from step to step, and glibc
    keeps what they free inside a fragmented heap that it cannot shrink from the top, so a process's
    RSS creeps up for as long as it lives (about 12 MB/min in the actor worker during the one-hour
    soak; one malloc_trim gave back 640 MB of its 3.5 GB). `every_s` 0 turns it off; where libc has
    no malloc_trim (musl, macOS) it does nothing."""

    def __init__(self, every_s: float):
        self.every_s = every_s
        self.next_at = time.monotonic() + every_s
        self.trims = 0
        self._trim = None
        if every_s > 0:
            try:
                import ctypes
                self._trim = ctypes.CDLL("libc.so.6").malloc_trim
            except (OSError, AttributeError):
                pass

    def maybe(self) -> int | None:
        """Trim if due: the bytes of RSS given back, or None when not due (or off)."""
        now = time.monotonic()
        if self._trim is None or now < self.next_at:
            return None
        self.next_at = now + self.every_s
        before = rss_bytes()
        self._trim(0)
        freed = max(0, before - rss_bytes())
        self.trims += 1
        took = time.monotonic() - now
        if took > 0.05:  # it holds glibc's heap lock meanwhile: say so when that is long
            logging.getLogger("scout.heap").info("malloc_trim gave back %.0f MB in %.0f ms", freed / 2**20, took * 1e3)
        return freed
