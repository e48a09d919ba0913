"""HeapTrim (common/procs.py): the C heap's free pages go back to the OS, so a long-lived worker's
RSS does not creep up with glibc's fragmentation (docs/RELIABILITY.md, "Soak")."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from common.procs import HeapTrim

# A fresh interpreter fills its heap with 64 KiB blocks (below glibc's mmap threshold, so they come
# from the heap), keeps the last one alive so that the heap cannot shrink from the top, and frees
# the rest: ~120 MiB free but still resident until someone trims.
FRAGMENT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from common.procs import HeapTrim, rss_bytes
    blocks = [np.ones(64 * 1024 - 64, dtype=np.uint8) for _ in range(2000)]
    keep = blocks[-1]
    del blocks
    trim = HeapTrim(float(sys.argv[1]))
    trim.next_at = 0.0  # due now
    before = rss_bytes()
    freed = trim.maybe()
    print(json.dumps({"freed": freed, "drop": before - rss_bytes(), "trims": trim.trims}))
""")


def run_fragmented(every_s: float) -> dict:
    import json
    out = subprocess.run([sys.executable, "-c", FRAGMENT, str(every_s)], capture_output=True, text=True,
                         timeout=60, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_trim_gives_freed_heap_back():
    r = run_fragmented(30.0)
    assert r["trims"] == 1
    assert r["freed"] >= 64 << 20, r  # most of the ~120 MiB freed inside the heap
    assert r["drop"] >= 64 << 20, r


def test_off_and_not_due_do_nothing():
    r = run_fragmented(0.0)
    assert r == {"freed": None, "drop": r["drop"], "trims": 0}
    assert r["drop"] < 16 << 20
    trim = HeapTrim(3600.0)
    assert trim.maybe() is None and trim.trims == 0  # not due for an hour
