"""Process-wide logging set-up: one line per record, role and pid in every line."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(role: str, level: str = "INFO") -> logging.Logger:
    fmt = f"%(asctime)s %(levelname).1s {role}[{os.getpid()}] %(name)s: %(message)s"
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(getattr(logging, str(level).upper(), logging.INFO))
    return logging.getLogger("scout")
