"""Search-R1's day-one path, end to end in its own formats, with real processes:

    toy world ─export_searchr1─▶ corpus.jsonl (wiki-18's shape), Flat.index (plain faiss), train.parquet,
                                 test.parquet (processed rows)
    Flat.index + corpus.jsonl ─`cli.py index import`─▶ index ─▶ `cli.py retriever` (HTTP POST /retrieve)
    `cli.py learner` (learner.data = train.parquet, 2 steps) ◀─groups── `cli.py actor` (actor.retriever_url)
         └── the run ends: the actor exits 0
    `cli.py eval --data test.parquet` (through the same HTTP API) ─▶ EM per data source

A tiny Qwen2 is first taught to search once and answer, on the processed prompts themselves, so
the rollouts really call the retriever. No conversion step touches the Search-R1 files.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.helpers.logged import start, wait

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def taught_model(base: Path, train: Path) -> Path:
    """A tiny model fitted to 'search the entity, read, answer' on a few processed prompts."""
    from transformers import AutoTokenizer

    from common.qa import read_qa
    from demo.teach import script_example, script_texts, teach
    from demo.tinymodel import build_tiny_model
    from demo.toyworld import format_information

    rows = read_qa(train, "train")[:6]
    model = build_tiny_model(base / "tiny", texts=script_texts([r["text"] for r in rows]), layers=2, hidden=64)
    tok = AutoTokenizer.from_pretrained(str(model))
    examples = []
    for r in rows:
        entity = r["question"].split(" of ", 1)[1].rstrip(" ?")
        obs = format_information([(entity, f"{r['question']} {r['golden_answers'][0]}")])
        examples.append(script_example(tok, r["question"], entity, list(tok(obs, add_special_tokens=False)["input_ids"]),
                                       r["golden_answers"][0], text=r["text"]))
    teach(model, examples, steps=300, until_loss=0.05)
    return model


def write_config(base: Path, files: dict, model: Path, ports: dict, ipc_path) -> Path:
    ingest = ipc_path("ingest")
    cfg = base / "scout.toml"
    cfg.write_text(f"""run_dir = "{base / 'run'}"
[metrics]
retriever_port = {ports['retriever_metrics']}
actor_port = 0
learner_port = 0
[retriever]
index_dir = "{base / 'index'}"
endpoint = "{ipc_path('retriever')}"
http_port = {ports['http']}
encoder_threads = 1
[learner]
model = "{model}"
data = "{files['train']}"
ingest_endpoint = "{ingest}"
sync_endpoint = "{ipc_path('sync')}"
store_port = 0
n_samples = 2
groups_per_step = 2
micro_batch_tokens = 2048
steps = 2
lr = 1e-4
batch_wait_s = 0.5
cpu_threads = 1
end_grace_s = 30.0
[actor]
model = "{model}"
engine = "transformers"
dtype = "float32"
learner_endpoint = "{ingest}"
retriever_url = "http://127.0.0.1:{ports['http']}/retrieve"
n_samples = 2
max_turns = 2
max_new_tokens = 24
max_total_tokens = 512
prompts_per_request = 2
temperature = 1.0
heartbeat_s = 1.0
eval_batch = 16
""")
    return cfg


def scrape(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return r.read().decode()
    except OSError:  # not serving yet
        return ""


def test_search_r1_files_train_and_evaluate_as_they_are(tmp_path, procs, ipc_path):
    from common.transport import free_tcp_port
    from demo.searchr1 import export_searchr1
    from demo.toyworld import build_world

    files = export_searchr1(build_world(tmp_path / "world", n_entities=80, heldout_entities=16), tmp_path / "sr1",
                            limit=40)
    subprocess.run([sys.executable, "cli.py", "index", "import", "--faiss", str(files["index"]), "--corpus",
                    str(files["corpus"]), "--out", str(tmp_path / "index")], cwd=ROOT, check=True, timeout=600,
                   capture_output=True)  # the user's own index, not re-encoded
    model = taught_model(tmp_path, files["train"])
    ports = {"http": free_tcp_port(), "retriever_metrics": free_tcp_port()}
    cfg = write_config(tmp_path, files, model, ports, ipc_path)

    retriever, rlog = start(procs, tmp_path, "retriever", "retriever", "--config", str(cfg))
    wait(lambda: retriever.poll() is not None or "scout_up" in scrape(ports["retriever_metrics"]), 300,
         "the retriever", [rlog])
    assert retriever.poll() is None, rlog.read_text()[-3000:]
    learner, llog = start(procs, tmp_path, "learner", "learner", "--config", str(cfg))
    actor, alog = start(procs, tmp_path, "actor", "actor", "--config", str(cfg), "--workers", "1")
    wait(lambda: learner.poll() is not None and actor.poll() is not None, 420, "the run to end", [llog, alog, rlog])
    assert (learner.returncode, actor.returncode) == (0, 0)

    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2]
    assert any(s["searches_mean"] > 0 for s in steps), "the rollouts searched"
    http_ok = [line for line in scrape(ports["retriever_metrics"]).splitlines()
               if line.startswith('scout_retriever_requests_total{') and 'source="http"' in line and 'outcome="ok"' in line]
    assert http_ok and float(http_ok[0].split()[-1]) > 0, "searches went through Search-R1's HTTP API"

    ev, elog = start(procs, tmp_path, "eval", "eval", "--model", str(model), "--data", str(files["test"]),
                     "--config", str(cfg), "--set", f"run_dir='{tmp_path / 'eval-run'}'")
    assert ev.wait(timeout=300) == 0, elog.read_text()[-3000:]
    summary = json.loads((tmp_path / "eval-run" / "eval" / "test.json").read_text())
    assert summary["n"] == 16 and set(summary["by_source"]) <= {"capital", "founder", "river"}
    assert sum(b["n"] for b in summary["by_source"].values()) == 16
    records = [json.loads(line) for line in (tmp_path / "eval-run" / "eval" / "test.jsonl").read_text().splitlines()]
    assert all(r["question"].startswith("what is the ") for r in records), "the template stripped for display"
    assert sum(r["searches"] for r in records) > 0
