"""Config loading and overrides, metrics serving, CLI start-up time."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import pytest

from common.config import ConfigError, load_config, parse_device_indices, parse_devices
from common.metrics import Metrics
from common.procs import rss_bytes
from tests.conftest import ROOT


def test_toml_env_and_cli_overrides(tmp_path):
    f = tmp_path / "scout.toml"
    f.write_text('[learner]\nlr = 3e-6\nmax_staleness = 2\n[retriever]\nmax_batch = 16\n')
    cfg = load_config(f, ["learner.max_staleness=0", "actor.reward='f1'"],
                      environ={"SCOUT_LEARNER__LR": "1e-5", "SCOUT_ACTOR__N_SAMPLES": "8", "OTHER": "x"})
    assert cfg.learner.lr == 1e-5  # env beats file
    assert cfg.learner.max_staleness == 0  # --set beats env and file
    assert cfg.retriever.max_batch == 16 and cfg.actor.n_samples == 8 and cfg.actor.reward == "f1"
    assert load_config(None, ["actor.model=/tmp/some model"], environ={}).actor.model == "/tmp/some model"


@pytest.mark.parametrize("override,fragment", [
    ("learner.lr=-1", "learner.lr"),
    ("learner.correction='magic'", "learner.correction"),
    ("learner.nope=1", "learner.nope"),
    ("actor.n_samples='many'", "actor.n_samples"),
    ("nokey", "expected section.key=value"),
])
def test_invalid_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override], environ={})
    assert fragment in str(e.value)


def test_invalid_values_name_where_they_were_set(tmp_path):
    f = tmp_path / "scout.toml"
    f.write_text("[learner]\nlr = -3.0\n")
    with pytest.raises(ConfigError, match=r"learner\.lr: .*, from config file .*scout\.toml"):
        load_config(f, environ={})
    with pytest.raises(ConfigError, match=r"actor\.n_samples: .*, from environment SCOUT_ACTOR__N_SAMPLES"):
        load_config(f, ["learner.lr=1e-5"], environ={"SCOUT_ACTOR__N_SAMPLES": "many"})
    with pytest.raises(ConfigError, match=r"learner\.nope: .*, from --set learner\.nope=1"):
        load_config(None, ["learner.nope=1"], environ={})
    with pytest.raises(ConfigError, match=r"nope: .*, from environment SCOUT_NOPE__X"):
        load_config(None, environ={"SCOUT_NOPE__X": "1"})


def test_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml", environ={})
    (tmp_path / "bad.toml").write_text("[learner\n")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_config(tmp_path / "bad.toml", environ={})


def test_parse_devices(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert parse_devices("0-3") == ["0", "1", "2", "3"]
    assert parse_devices("0,2,5") == ["0", "2", "5"]
    assert parse_devices(None) == []
    for bad in ("3-1", "a", "0,0", "-1"):
        with pytest.raises(ConfigError, match="--gpus"):
            parse_devices(bad)


def test_gpus_all_without_parent_visible_devices(monkeypatch):
    """No CUDA_VISIBLE_DEVICES: `all` is 0..n-1 from torch; no device is a clear error."""
    import torch

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert parse_devices("all") == parse_device_indices("all") == ["0", "1", "2"]
    assert parse_devices("5,7") == ["5", "7"]  # not checked against the count, as before
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ConfigError, match="--gpus all: no CUDA device is visible"):
        parse_devices("all")


def test_gpus_under_parent_visible_devices(monkeypatch):
    """A parent CUDA_VISIBLE_DEVICES: `all` is its entries (torch not asked); lists are indices into it."""
    import torch

    def no_torch():
        raise AssertionError("torch.cuda.device_count() called although CUDA_VISIBLE_DEVICES is set")

    monkeypatch.setattr(torch.cuda, "device_count", no_torch)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6,7")
    assert parse_devices("all") == ["4", "6", "7"]
    assert parse_devices("0,2") == ["4", "7"] and parse_devices("1-2") == ["6", "7"]
    assert parse_device_indices("all") == ["0", "1", "2"] and parse_device_indices("0,2") == ["0", "2"]
    for spec in ("3", "0-3"):
        with pytest.raises(ConfigError, match="device 3 is not visible.*'4,6,7' makes 3 device"):
            parse_devices(spec)
    uuids = "GPU-8e1f0c2a-0000-1111-2222-333344445555, GPU-9a2b3c4d-6666-7777-8888-999900001111"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", uuids)
    assert parse_devices("all") == [u.strip() for u in uuids.split(",")]
    assert parse_devices("1") == ["GPU-9a2b3c4d-6666-7777-8888-999900001111"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-0d4f6e1a-aaaa-bbbb-cccc-ddddeeeeffff")
    assert parse_devices("all") == ["MIG-0d4f6e1a-aaaa-bbbb-cccc-ddddeeeeffff"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,-1,2")  # as CUDA: the list ends at -1
    assert parse_devices("all") == ["0", "1"]
    for hidden in ("-1", ""):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        with pytest.raises(ConfigError, match="--gpus all: no CUDA device is visible"):
            parse_devices("all")
        with pytest.raises(ConfigError, match="device 0 is not visible"):
            parse_devices("0")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,2")
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES='2,2' lists a device twice"):
        parse_devices("all")


@pytest.mark.parametrize("parent, expected", [(None, ["0", "2", "5"]), ("1,3,5,7,9,11", ["1", "5", "11"])])
def test_actor_slots_get_their_own_gpu(monkeypatch, parent, expected):
    """actor.gpus='0,2,5': one worker slot per GPU, each started with only its GPU visible."""
    from actors.main import Supervisor, plan_slots

    if parent is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", parent)
    cfg = load_config(None, ["actor.gpus='0,2,5'", "actor.workers=4"], environ={})
    slots = plan_slots(cfg)
    assert [(s.index, s.gpu) for s in slots] == list(enumerate(expected))  # actor.workers is ignored
    sup = Supervisor(cfg, slots)
    try:
        envs = [sup._env(s) for s in slots]
    finally:
        sup.m.close()
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == expected
    assert [e["SCOUT_WORKER_GPU"] for e in envs] == expected
    assert [e["SCOUT_WORKER_INDEX"] for e in envs] == ["0", "1", "2"]
    assert json.loads(envs[0]["SCOUT_WORKER_CONFIG"])["actor"]["gpus"] == "0,2,5"
    cpu = Supervisor(load_config(None, ["actor.workers=2"], environ={}), [])
    try:
        cpu_envs = [cpu._env(s) for s in plan_slots(cpu.cfg)]
    finally:
        cpu.m.close()
    assert [(e["CUDA_VISIBLE_DEVICES"], e["SCOUT_WORKER_GPU"]) for e in cpu_envs] == [("", "cpu")] * 2


def test_metrics_and_health_endpoints(free_port):
    m = Metrics("actor", {"worker": "3", "gpu": "cuda:1"})
    tokens = m.counter("scout_actor_generated_tokens_total", "tokens sampled")
    lat = m.histogram("scout_test_latency_seconds", "latency", labels=("stage",))
    tokens.inc(5)
    lat.labels(stage="encode").observe(0.01)
    port = m.serve("127.0.0.1", 0, health=lambda: {"engine": "ready"})
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    assert 'scout_actor_generated_tokens_total{gpu="cuda:1",role="actor",worker="3"} 5.0' in body
    assert 'stage="encode"' in body
    # this process's own memory and descriptors, read at the scrape
    rss = rss_bytes()
    for line in body.splitlines():
        if line.startswith("scout_process_resident_memory_bytes{"):
            assert abs(float(line.split()[-1]) - rss) < rss / 4, line
        if line.startswith("scout_process_open_fds{"):
            assert 3 <= float(line.split()[-1]) < 10_000, line
    assert body.count("scout_process_resident_memory_bytes{") == body.count("scout_process_open_fds{") == 1
    h = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health").read())
    assert h["status"] == "ok" and h["engine"] == "ready" and h["worker"] == "3"
    m2 = Metrics("learner")
    port2 = m2.serve("127.0.0.1", 0, health=lambda: {"status": "degraded"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{port2}/health")
    assert e.value.code == 503
    m.close()
    m2.close()


def test_cli_help_is_fast_and_lists_roles():
    out = subprocess.run([sys.executable, "cli.py", "--help"], cwd=ROOT, capture_output=True, text=True, check=True)
    for role in ("retriever", "actor", "learner", "demo", "eval", "index", "keys", "export", "report"):
        assert role in out.stdout
    # no heavy imports behind --help
    probe = subprocess.run([sys.executable, "-c", "import sys, cli; print(any(m in sys.modules for m in ('torch','vllm','faiss','transformers')))"],
                           cwd=ROOT, capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "False"  # start-up time itself is measured in bench/protocol_bench.py


def test_cli_rejects_bad_config_value():
    out = subprocess.run([sys.executable, "cli.py", "learner", "--set", "learner.lr=-1"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 2 and "learner.lr" in out.stderr


def test_keys_generate(tmp_path):
    out = subprocess.run([sys.executable, "cli.py", "keys", "generate", str(tmp_path / "k"), "--client", "actor",
                          "--client", "learner"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert (tmp_path / "k" / "server.key_secret").is_file()
    assert sorted(p.name for p in (tmp_path / "k" / "authorized").iterdir()) == ["actor.key", "learner.key"]
    assert "curve_dir" in out.stdout


def test_status_line_renders_on_a_terminal_and_is_silent_off_one(capsys):
    from learner.status import StatusLine

    off = StatusLine("learner", 10, enabled=False)
    off.update(3, "reward 0.5")
    off.close()
    assert capsys.readouterr().err == ""
    on = StatusLine("learner", 10, enabled=True)
    on.update(7, "reward 0.25  1,000 tok/s")
    on.close()
    err = capsys.readouterr().err
    assert "learner" in err and "7/10" in err and "reward 0.25" in err


def test_sends_later_need_the_answers_later():
    assert load_config(None, [], environ={}).learner.sync_later() == (True, True)  # max_staleness 4: both later
    assert load_config(None, ["learner.max_staleness=0"], environ={}).learner.sync_later() == (False, False)
    got = load_config(None, ["learner.sync_sends='wait'"], environ={}).learner.sync_later()
    assert got == (True, False)
    with pytest.raises(ConfigError, match=r"learner: .*sync_sends = 'later' needs the answers later too"):
        load_config(None, ["learner.max_staleness=0", "learner.sync_sends='later'"], environ={})
