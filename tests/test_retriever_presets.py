"""Encoder conventions as data: `--encoder-preset e5|bge|minilm` lands in the manifest (explicit
options win), the query encoder follows the manifest (prefix, pooling) whatever the config says,
and an index whose prefix does not fit its e5 / bge encoder is warned about at import and at
retriever start."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest

from common.config import RetrieverConfig
from retriever.encoder import Encoder, resolve_encoder_path
from retriever.importer import import_faiss
from retriever.index import LocalIndex, build_index, encoder_for, load_manifest
from retriever.presets import BGE_INSTRUCTION, PRESETS, convention_warnings, with_preset
from tests.conftest import ROOT
from tests.test_retriever_import import ROWS, gone
from tests.test_retriever_index import write_jsonl

QUERIES = ["Which land has the capital Tolo?", "who founded the river land"]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A random-vector Flat index of the corpus (the conventions do not depend on the vectors)."""
    import faiss

    base = tmp_path_factory.mktemp("presets")
    vecs = np.random.default_rng(0).standard_normal((len(ROWS), 384)).astype(np.float32)
    index = faiss.IndexFlatIP(384)
    index.add(vecs)
    faiss.write_index(index, str(base / "plain.index"))
    return {"base": base, "index": base / "plain.index", "corpus": write_jsonl(base / "wiki.jsonl", ROWS)}


def fake_encoder(folder, name: str):
    """An encoder folder that only names itself (config.json): enough for the import and the
    start-up check, which read no weights."""
    folder.mkdir(parents=True)
    src = json.loads((resolve_encoder_path(None) / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**src, "_name_or_path": name}))
    return folder


def encoder_of(out) -> dict:
    e = load_manifest(out)["encoder"]
    return {k: e[k] for k in ("query_prefix", "passage_prefix", "pooling", "normalize")}


# --------------------------------------------------------------------------- presets
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_lands_in_the_manifest(preset, plain, tmp_path):
    rc = RetrieverConfig(query_prefix="config: ", pooling="cls" if preset != "bge" else "mean", normalize=False)
    import_faiss(rc, plain["index"], plain["corpus"], tmp_path / "o", shards=2, preset=preset)
    assert encoder_of(tmp_path / "o") == PRESETS[preset]  # the preset replaces the config's conventions


def test_explicit_options_override_the_preset_through_the_cli(plain, tmp_path):
    out = tmp_path / "o"
    r = subprocess.run([sys.executable, "cli.py", "index", "import", "--faiss", str(plain["index"]), "--corpus",
                        str(plain["corpus"]), "--out", str(out), "--encoder-preset", "bge", "--pooling", "mean",
                        "--query-prefix", "q: "], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert encoder_of(out) == {"query_prefix": "q: ", "passage_prefix": "", "pooling": "mean", "normalize": True}
    bad = subprocess.run([sys.executable, "cli.py", "index", "import", "--faiss", str(plain["index"]), "--corpus",
                          str(plain["corpus"]), "--out", str(tmp_path / "p"), "--encoder-preset", "e6"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--encoder-preset must be one of e5, bge, minilm, got 'e6'" in bad.stderr
    assert gone(tmp_path / "p")


def test_build_records_the_preset_and_encodes_passages_with_it(tmp_path):
    enc = Encoder(None, threads=1)
    rc = with_preset(RetrieverConfig(), "e5")
    m = build_index(rc, write_jsonl(tmp_path / "c.jsonl", ROWS[:8]), tmp_path / "b", encoder=enc)
    assert {k: m["encoder"][k] for k in PRESETS["e5"]} == PRESETS["e5"]
    import faiss

    stored = faiss.read_index(str(tmp_path / "b" / "shard_000.faiss")).reconstruct_n(0, 8)
    np.testing.assert_allclose(stored, enc.encode([r["contents"] for r in ROWS[:8]], prefix="passage: "), atol=1e-5)


# --------------------------------------------------------------------------- query time
@pytest.mark.parametrize("preset,pooling,prefix", [("e5", "mean", "query: "), ("bge", "cls", BGE_INSTRUCTION)])
def test_queries_are_encoded_the_manifests_way(preset, pooling, prefix, plain, tmp_path):
    """The config says mean pooling and no prefix; the manifest (the preset) wins at query time."""
    import_faiss(RetrieverConfig(), plain["index"], plain["corpus"], tmp_path / "o", preset=preset)
    manifest = load_manifest(tmp_path / "o")
    enc = encoder_for(manifest, threads=1)
    assert enc.pooling == pooling
    got = LocalIndex(tmp_path / "o", enc).encode_queries(QUERIES)
    ref = Encoder(None, pooling=pooling, threads=1)
    np.testing.assert_allclose(got, ref.encode(QUERIES, prefix=prefix), atol=1e-5)
    assert np.abs(got - ref.encode(QUERIES)).max() > 1e-3  # the prefix changes the vectors


# --------------------------------------------------------------------------- the warning
@pytest.mark.parametrize("name,preset,warned", [
    ("e5-base-v2", None, ["looks like e5 but the index records the query prefix ''; e5 expects 'query: '"]),
    ("e5-base-v2", "e5", []),
    ("bge-small-en-v1.5", "minilm", [f"looks like bge but the index records the query prefix ''; bge expects "
                                     f"{BGE_INSTRUCTION!r}", "the pooling 'mean'; bge expects 'cls'"]),
    ("bge-small-en-v1.5", "bge", []),
    ("all-MiniLM-L6-v2", None, []),
])
def test_wrong_prefix_is_warned_at_import_and_at_start(name, preset, warned, plain, tmp_path, caplog):
    from retriever.service import _open_index

    enc = fake_encoder(tmp_path / "models" / name, f"org/{name}")
    out = tmp_path / "o"
    with caplog.at_level(logging.WARNING, logger="scout.retriever"):
        import_faiss(RetrieverConfig(), plain["index"], plain["corpus"], out, encoder=str(enc), preset=preset)
        at_import = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        caplog.clear()
        _open_index(RetrieverConfig(index_dir=str(out), verify_checksums=False))
        at_start = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for messages in (at_import, at_start):
        assert len(messages) == len(warned), messages
        assert all(w in " ".join(messages) for w in warned), messages
        assert all(str(enc) in m for m in messages)


def test_family_is_read_from_the_config_name_too(tmp_path):
    enc = fake_encoder(tmp_path / "model", "intfloat/multilingual-e5-large")
    section = {"path": str(enc), "resolved": str(enc), "query_prefix": "", "pooling": "mean"}
    assert "looks like e5" in " ".join(convention_warnings(section))
    m3 = fake_encoder(tmp_path / "m3", "BAAI/bge-m3")  # bge-m3 needs no instruction
    assert convention_warnings({"path": str(m3), "resolved": str(m3), "query_prefix": "", "pooling": "cls"}) == []
