"""A real Prometheus (Debian's `prometheus` binary) scraping real scout roles on this machine,
with a config generated from deploy/prometheus.yml (same jobs, labels and relabelling; targets
moved to free ports, 1 s scrapes, the file_sd glob moved to a temp folder holding a targets file).

The roles are started the way deploy/slurm/scout-role.sh starts them on a cluster node (the
script itself runs, with BIND_HOST=127.0.0.1), from a tiny index (`cli.py index build` on a
generated corpus) and a tiny random Qwen2 (demo.tinymodel).

- test_retriever_metrics_through_prometheus: static and file-based discovery both reach the
  retriever; a counter read back through /api/v1/query matches the queries we sent; every
  dashboard query evaluates; the live /metrics passes `promtool check metrics`.
- test_learner_throughput_through_prometheus_matches_its_log: learner (torchrun, 1 rank) +
  actor (transformers engine) train against that retriever; the trained-tokens rate Prometheus
  computes (PromQL rate(), and from the raw samples) matches the learner's metrics.jsonl within
  10 %; the throughput / staleness / reward dashboard queries return data; `cli.py report`
  makes its plots from the same run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from learner.report import step_lines
from bench.faults import build_index_here
from tests.conftest import ROOT, Procs
from tests.test_deploy import PROM_CONFIG, dashboard_queries, grafana_to_promql, load_dashboard

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("prometheus") is None or shutil.which("promtool") is None,
                                 reason="prometheus/promtool not installed (Debian: apt-get install -y prometheus)")]

EXEC = "import os, sys; os.execvp(sys.argv[1], sys.argv[1:])"  # procs.start runs python: become bash
ROLE = str(ROOT / "deploy" / "slurm" / "scout-role.sh")
SCRAPE_S = 1.0
LIVE_VARS = {"$__rate_interval": "20s"}  # short enough for a run of a minute or two


# --------------------------------------------------------------------------- helpers
def get(url: str, timeout: float = 10) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def wait_until(pred, timeout: float, what: str, procs: list | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs or []:
            if p.poll() is not None:
                pytest.fail(f"{what}: {p.args[3:]} exited with code {p.returncode}")
        try:
            value = pred()
            if value:
                return value
        except (OSError, ValueError, KeyError, IndexError):
            pass
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def promql(prom: str, expr: str, at: float | None = None) -> list[dict]:
    args = {"query": expr, **({"time": f"{at:.3f}"} if at is not None else {})}
    body = json.loads(get(f"{prom}/api/v1/query?{urllib.parse.urlencode(args)}"))
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def scalar(result: list[dict]) -> float:
    assert len(result) == 1, result
    return float(result[0]["value"][1])


def role_env(cfg: Path, ports: dict, **extra) -> dict:
    return {"SCOUT_DIR": str(ROOT), "SCOUT_PYTHON": sys.executable, "SCOUT_CONFIG": str(cfg),
            "BIND_HOST": "127.0.0.1", "LEARNER_ADDR": "127.0.0.1", "RETRIEVER_ADDR": "127.0.0.1",
            "LEARNER_NODES": "1", "GPUS_PER_NODE": "0", "ACTOR_WORKERS": "1", "SLURM_PROCID": "0",
            "RETRIEVER_GPUS": "", "OMP_NUM_THREADS": "1",
            **{k: str(v) for k, v in ports.items()}, **extra}


def start_role(procs: Procs, role: str, env: dict, log: Path):
    f = open(log, "wb")  # noqa: SIM115 (kept open for the process's life)
    return procs.start(["-c", EXEC, "bash", ROLE, role], env=env, stdout=f, stderr=subprocess.STDOUT)


def tail(path: Path, n: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.is_file() else ""


def prometheus_config(base: dict, ports: dict, targets_dir: Path) -> dict:
    """deploy/prometheus.yml with the default metrics ports moved to this test's ports."""
    cfg = json.loads(json.dumps(base))  # deep copy (YAML anchors resolved)
    cfg["global"].update(scrape_interval=f"{SCRAPE_S:g}s", scrape_timeout=f"{SCRAPE_S:g}s",
                         evaluation_interval=f"{SCRAPE_S:g}s")
    move = {9100: ports["RETRIEVER_METRICS_PORT"], 9200: ports["ACTOR_METRICS_PORT"],
            9201: ports["ACTOR_METRICS_PORT"] + 1, 9300: ports["LEARNER_METRICS_PORT"]}
    for job in cfg["scrape_configs"]:
        for sc in job.get("static_configs", []):
            sc["targets"] = [f"127.0.0.1:{move[int(t.rsplit(':', 1)[1])]}" for t in sc["targets"]]
        for sd in job.get("file_sd_configs", []):
            sd["files"] = [str(targets_dir / "scout-*.json")]
            sd["refresh_interval"] = "1s"
    return cfg


# --------------------------------------------------------------------------- the stack
@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from common.transport import free_tcp_port
    from tests.test_retriever_index import make_corpus, write_jsonl

    base = tmp_path_factory.mktemp("deploy-prom")
    names = ("RETRIEVER_PORT", "RETRIEVER_HTTP_PORT", "RETRIEVER_METRICS_PORT", "INGEST_PORT", "SYNC_PORT",
             "STORE_PORT", "TORCH_PORT", "LEARNER_METRICS_PORT", "PROM_PORT")
    ports = {n: free_tcp_port() for n in names}
    ports["ACTOR_METRICS_PORT"] = free_tcp_port(count=2)  # the supervisor's and worker 0's
    ports["ACTOR_METRICS_PORT_W0"] = ports["ACTOR_METRICS_PORT"] + 1
    build_index_here(write_jsonl(base / "corpus.jsonl", make_corpus(40, seed=5)), base / "index")
    cfg = base / "scout.toml"
    cfg.write_text(f'run_dir = "{base / "run"}"\n')
    procs = Procs()
    try:
        env = role_env(cfg, {k: v for k, v in ports.items() if k != "PROM_PORT"}, SCOUT_INDEX=str(base / "index"))
        retriever = start_role(procs, "retriever", env, base / "retriever.log")
        # Prometheus from the repository's config, pointed at this test's ports
        targets = base / "targets"
        targets.mkdir()
        (targets / "scout-test.json").write_text(json.dumps(
            [{"targets": [f"127.0.0.1:{ports['RETRIEVER_METRICS_PORT']}"], "labels": {"role": "retriever"}}]))
        prom_cfg = base / "prometheus.yml"
        prom_cfg.write_text(yaml.safe_dump(prometheus_config(yaml.safe_load(PROM_CONFIG.read_text()), ports, targets)))
        check = subprocess.run(["promtool", "check", "config", str(prom_cfg)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        prom_url = f"http://127.0.0.1:{ports['PROM_PORT']}"
        prom = procs.start(["-c", EXEC, "prometheus", f"--config.file={prom_cfg}",
                            f"--storage.tsdb.path={base / 'tsdb'}",
                            f"--web.listen-address=127.0.0.1:{ports['PROM_PORT']}",
                            "--log.level=warn"], stdout=open(base / "prometheus.log", "wb"), stderr=subprocess.STDOUT)
        wait_until(lambda: get(f"{prom_url}/-/ready", 2), 60, "prometheus ready", [prom])
        metrics = f"http://127.0.0.1:{ports['RETRIEVER_METRICS_PORT']}"
        wait_until(lambda: json.loads(get(f"{metrics}/health", 2))["status"] == "ok", 300, "retriever ready",
                   [retriever])
        yield {"base": base, "ports": ports, "cfg": cfg, "prom": prom_url, "procs": procs, "env": env,
               "retriever_metrics": metrics, "retriever": retriever,
               "http": f"http://127.0.0.1:{ports['RETRIEVER_HTTP_PORT']}/retrieve"}
    finally:
        procs.stop_all()


def live_metrics_pass_promtool(url: str) -> None:
    text = get(f"{url}/metrics").decode()
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), f"{url}: {r.stdout}{r.stderr}"


def evaluate_dashboard(prom: str) -> dict[str, list[dict]]:
    """Every dashboard query through the HTTP API (status success); the series each returns."""
    out = {}
    for title, expr in dashboard_queries(load_dashboard()):
        q = expr
        for var, value in LIVE_VARS.items():
            q = q.replace(var, value)
        out[expr] = promql(prom, grafana_to_promql(q))
    return out


def panel_results(results: dict[str, list[dict]], title: str) -> list[tuple[str, list[dict]]]:
    """(expr, series) of every query of the panel `title`."""
    found = [(e, results[e]) for t, e in dashboard_queries(load_dashboard()) if t == title]
    assert found, f"no panel {title!r}"
    return found


def finite(series: list[dict]) -> list[float]:
    return [v for v in (float(s["value"][1]) for s in series) if v == v and abs(v) != float("inf")]


# --------------------------------------------------------------------------- retriever
def test_retriever_metrics_through_prometheus(stack):
    prom = stack["prom"]
    # static discovery (job scout-retriever) and file-based discovery (job scout) both scrape it
    for job in ("scout-retriever", "scout"):
        try:  # generous: a loaded CI machine can delay discovery and the first scrape
            wait_until(lambda job=job: [float(r["value"][1]) for r in promql(prom, f'up{{job="{job}"}}')] == [1.0],
                       120, f"{job} target up")
        except pytest.fail.Exception:
            targets = get(f"{prom}/api/v1/targets").decode(errors="replace")
            pytest.fail(f"{job} never came up.\nPrometheus targets: {targets[:3000]}\n"
                        f"prometheus.log:\n{tail(stack['base'] / 'prometheus.log')}\n"
                        f"retriever.log:\n{tail(stack['base'] / 'retriever.log')}")
    sent = 0
    for batch in (3, 4):  # two batches, each seen by Prometheus: a rate needs an increase between samples
        for _ in range(batch):
            req = urllib.request.Request(stack["http"], headers={"Content-Type": "application/json"},
                                         data=json.dumps({"queries": [f"land capital {sent}"], "topk": 2}).encode())
            assert json.loads(get_req(req))["result"]
            sent += 1
        series = wait_until(lambda: [s for s in promql(prom, 'scout_retriever_queries_total{job="scout-retriever"}')
                                     if float(s["value"][1]) >= sent], 30, "the query counter in Prometheus")
        assert float(series[0]["value"][1]) == sent  # exactly the queries this test sent
    labels = series[0]["metric"]
    assert labels["role"] == "retriever" and labels["source"] == "http" and labels["host"] == "127.0.0.1"
    time.sleep(2 * SCRAPE_S)
    qps = scalar(promql(prom, 'sum(rate(scout_retriever_queries_total{job="scout-retriever"}[30s]))'))
    assert qps > 0
    p99 = scalar(promql(prom, 'histogram_quantile(0.99, sum by (le) '
                              '(rate(scout_retriever_request_seconds_bucket{job="scout-retriever"}[30s])))'))
    assert p99 > 0
    live_metrics_pass_promtool(stack["retriever_metrics"])
    results = evaluate_dashboard(prom)
    assert results["sum by (source) (rate(scout_retriever_queries_total[$__rate_interval]))"]
    # per-shard latency (a slow shard can be found): the one shard of this index answered every batch
    for expr, series in panel_results(results, "Retriever shard latency"):
        assert [s["metric"]["shard"] for s in series] == ["0"] and all(v > 0 for v in finite(series)), expr


def get_req(req: urllib.request.Request) -> bytes:
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.read()


# --------------------------------------------------------------------------- learner + actor
def write_run_config(stack) -> Path:
    from demo.tinymodel import build_tiny_model

    base = stack["base"]
    model = build_tiny_model(base / "tiny", layers=2, hidden=64)
    qa = base / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": f"what is the capital of land {i}?", "golden_answers": [f"c{i}"]})
                          + "\n" for i in range(40)))
    cfg = base / "run.toml"
    cfg.write_text(f"""run_dir = "{base / 'run'}"
[learner]
model = "{model}"
data = "{qa}"
n_samples = 2
groups_per_step = 2
micro_batch_tokens = 1024
max_staleness = 2
steps = 100000
lr = 1e-4
batch_wait_s = 0.5
cpu_threads = 1
[actor]
model = "{model}"
engine = "transformers"
n_samples = 2
max_turns = 1
max_new_tokens = 16
max_obs_tokens = 64
max_total_tokens = 512
prompts_per_request = 2
""")
    return cfg


MIN_STEPS = 25


def test_learner_throughput_through_prometheus_matches_its_log(stack, procs):
    prom, base = stack["prom"], stack["base"]
    cfg = write_run_config(stack)
    env = {**stack["env"], "SCOUT_CONFIG": str(cfg)}
    learner = start_role(procs, "learner", env, base / "learner.log")
    actor = start_role(procs, "actor", env, base / "actor.log")
    run_dir = base / "run"
    try:
        wait_until(lambda: len(step_lines(run_dir)) >= MIN_STEPS, 600, f"{MIN_STEPS} learner steps", [learner, actor])
    except BaseException:
        print("learner log:\n" + tail(base / "learner.log") + "\nactor log:\n" + tail(base / "actor.log"))
        raise
    time.sleep(3 * SCRAPE_S)  # a few scrapes after the last step we wait for
    # raw samples of the learner's counter, read back through the query API
    matrix = promql(prom, 'scout_learner_tokens_total{job="scout-learner"}[10m]')
    assert len(matrix) == 1, matrix
    samples = [(float(t), float(v)) for t, v in matrix[0]["values"]]
    assert matrix[0]["metric"]["role"] == "learner" and matrix[0]["metric"]["rank"] == "0"
    (t0, v0), (t1, v1) = samples[0], samples[-1]
    steps = step_lines(run_dir)
    logged = sum(s["tokens"] for s in steps if t0 < s["time"] <= t1)
    assert logged > 0 and len([s for s in steps if t0 < s["time"] <= t1]) >= MIN_STEPS // 2
    log_rate = logged / (t1 - t0)
    sample_rate = (v1 - v0) / (t1 - t0)
    # PromQL's own rate() over the same window (evaluated at the last sample's time)
    window = t1 - t0 + SCRAPE_S / 2
    rate_expr = f'rate(scout_learner_tokens_total{{job="scout-learner"}}[{int(window * 1000)}ms])'
    promql_rate = scalar(promql(prom, rate_expr, at=t1))
    print(f"trained tokens/s over {t1 - t0:.1f}s: learner log {log_rate:.1f}, Prometheus samples {sample_rate:.1f}, "
          f"PromQL rate() {promql_rate:.1f}")
    assert sample_rate > 0 and promql_rate > 0
    assert abs(sample_rate - log_rate) <= 0.10 * log_rate
    assert abs(promql_rate - log_rate) <= 0.10 * log_rate
    # the actor's side arrived too, with its own labels
    gen = promql(prom, 'scout_actor_generated_tokens_total{job="scout-actor"}')
    assert gen and float(gen[0]["value"][1]) > 0
    labels = gen[0]["metric"]  # enough to find a slow actor: role, host, worker, gpu
    assert (labels["role"], labels["host"], labels["worker"], labels["gpu"]) == ("actor", "127.0.0.1", "0", "cpu")
    assert scalar(promql(prom, 'up{job="scout-actor", worker="supervisor"}')) == 1
    ports = stack["ports"]
    for port in (ports["LEARNER_METRICS_PORT"], ports["ACTOR_METRICS_PORT"], ports["ACTOR_METRICS_PORT"] + 1):
        live_metrics_pass_promtool(f"http://127.0.0.1:{port}")
    # throughput, staleness, reward and latency panels have data
    results = evaluate_dashboard(prom)
    for expr in ("sum(rate(scout_learner_tokens_total[$__rate_interval]))",
                 "sum(rate(scout_actor_generated_tokens_total[$__rate_interval]))",
                 "sum(rate(scout_learner_groups_consumed_total[$__rate_interval]))",
                 "histogram_quantile(0.5, sum by (le) (rate(scout_learner_group_staleness_bucket[$__rate_interval])))",
                 "max(scout_learner_reward_mean)",
                 "histogram_quantile(0.5, sum by (le) (rate(scout_learner_step_seconds_bucket[$__rate_interval])))"):
        assert results[expr], f"no data for {expr}"
    check_new_panels(results)
    with_data = sum(1 for v in results.values() if v)
    print(f"dashboard: {with_data}/{len(results)} queries return data")
    # the same run, summarised without Prometheus
    r = subprocess.run([sys.executable, "cli.py", "report", str(run_dir)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    for name in ("reward.png", "em.png", "throughput.png", "staleness.png", "summary.txt"):
        assert (run_dir / "report" / name).stat().st_size > 0


def check_new_panels(results: dict[str, list[dict]]) -> None:
    """End-to-end latency, exact match, idle fractions, queue depths and the slow-worker panel
    have data from the live run, with values in range."""
    for expr, series in panel_results(results, "End-to-end sample latency"):
        assert finite(series) and all(v > 0 for v in finite(series)), expr  # p50, p99, mean
    for title in ("Exact match", "Idle fractions", "Exact match per worker"):
        for expr, series in panel_results(results, title):
            values = finite(series)
            assert values and all(0 <= v <= 1 for v in values), (title, expr, series)
    for expr, series in panel_results(results, "Queue depths"):
        assert finite(series) and all(v >= 0 for v in finite(series)), expr
    (expr, slow), = panel_results(results, "Slowest workers (generated tokens/s)")
    assert [(s["metric"]["host"], s["metric"]["worker"], s["metric"]["gpu"]) for s in slow] == [("127.0.0.1", "0", "cpu")]
