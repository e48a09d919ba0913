"""Encoder conventions as data: presets for `index build` / `index import`, and the check that
warns when an index's recorded conventions do not fit its encoder.

    preset     query prefix                                                passage prefix  pooling  normalised
    e5         "query: "                                                   "passage: "     mean     yes
    bge        "Represent this sentence for searching relevant passages: " ""              cls      yes
    minilm     ""                                                          ""              mean     yes

A preset replaces the config's pooling / normalize / prefixes; the explicit options (--pooling,
--query-prefix, --passage-prefix) override the preset. The result lands in the manifest's
"encoder" section, which the service's query encoder reads (`index.encoder_for`, and the
batcher's query prefix), so queries are encoded the way the index expects whatever the config says.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

log = logging.getLogger("scout.retriever.presets")

BGE_INSTRUCTION = "Represent this sentence for searching relevant passages: "
PRESETS: dict[str, dict] = {
    "e5": {"query_prefix": "query: ", "passage_prefix": "passage: ", "pooling": "mean", "normalize": True},
    "bge": {"query_prefix": BGE_INSTRUCTION, "passage_prefix": "", "pooling": "cls", "normalize": True},
    "minilm": {"query_prefix": "", "passage_prefix": "", "pooling": "mean", "normalize": True},
}

# Encoder names whose family is recognised by the start-up check: "e5" / "bge" as a word of the
# folder name or the config's _name_or_path (intfloat/e5-base-v2, multilingual-e5-large,
# BAAI/bge-small-en-v1.5). bge-m3 needs no instruction and is left alone.
_FAMILY = {"e5": re.compile(r"(^|[^a-z0-9])e5([^a-z0-9]|$)"), "bge": re.compile(r"(^|[^a-z0-9])bge(?![-_]?m3)")}


def with_preset(rcfg, preset: str | None = None, encoder: str | None = None, pooling: str | None = None,
                query_prefix: str | None = None, passage_prefix: str | None = None):
    """rcfg (a RetrieverConfig) with the preset's conventions, then the explicit options (None =
    keep); a bad preset or pooling is a ValueError naming what is allowed."""
    upd: dict = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"--encoder-preset must be one of {', '.join(PRESETS)}, got {preset!r}")
        upd.update(PRESETS[preset])
    if pooling is not None and pooling not in ("mean", "cls"):
        raise ValueError(f"--pooling must be 'mean' or 'cls', got {pooling!r}")
    enc = str(Path(encoder).expanduser().resolve()) if encoder else None
    explicit = {"encoder": enc, "pooling": pooling, "query_prefix": query_prefix, "passage_prefix": passage_prefix}
    upd.update({k: v for k, v in explicit.items() if v is not None})
    return rcfg.model_copy(update=upd)


def _names(enc: dict) -> list[str]:
    """What the encoder is called: the last two parts of its path(s) and its config's _name_or_path."""
    names = []
    for key in ("path", "resolved"):
        if enc.get(key):
            names.append("/".join(Path(str(enc[key])).parts[-2:]).lower())
    try:
        cfg = json.loads((Path(str(enc.get("resolved", ""))) / "config.json").read_text())
        names.append(str(cfg.get("_name_or_path", "")).lower())
    except (OSError, ValueError, AttributeError):
        pass
    return [n for n in names if n]


def family(enc: dict) -> str | None:
    """"e5", "bge" or None for a manifest's "encoder" section."""
    names = _names(enc)
    for fam, pattern in _FAMILY.items():
        if any(pattern.search(n) for n in names):
            return fam
    return None


def convention_warnings(enc: dict) -> list[str]:
    """Messages for a manifest "encoder" section whose query prefix or pooling does not fit the
    encoder's family (an e5 index searched without "query: " loses much of its recall)."""
    fam = family(enc)
    if fam is None:
        return []
    want, out = PRESETS[fam], []
    name = enc.get("resolved") or enc.get("path")
    for key, what in (("query_prefix", "query prefix"), ("pooling", "pooling")):
        if enc.get(key) != want[key]:
            out.append(f"encoder {name} looks like {fam} but the index records the {what} {enc.get(key)!r}; "
                       f"{fam} expects {want[key]!r} (re-import or rebuild with --encoder-preset {fam}, or "
                       f"--{key.replace('_', '-')})")
    return out


def warn_conventions(enc: dict) -> None:
    for message in convention_warnings(enc):
        log.warning("%s", message)
