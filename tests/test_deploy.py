"""deploy/ without running the system: the Prometheus configs pass the real `promtool`, the
Grafana dashboard is well-formed and every PromQL query in it parses (promtool) and names a
metric the code declares, the declared metric names pass `promtool check metrics`, the Slurm
recipe's dry run launches what it should and writes valid file_sd targets, and the Kubernetes
manifests hang together (their ConfigMap is a valid scout config).

The live side (a real Prometheus scraping running roles) is tests/test_deploy_prometheus.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROM_CONFIG = DEPLOY / "prometheus.yml"
K8S_PROM_CONFIG = DEPLOY / "k8s" / "prometheus-k8s.yml"
DASHBOARD = DEPLOY / "grafana" / "scout-dashboard.json"
CODE_DIRS = ("actors", "learner", "retriever", "common")
BUILTIN_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}  # made by Prometheus itself
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h", "$worker": ".*", "$host": ".*"}

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian: apt-get install -y prometheus)")


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], input=stdin, capture_output=True, text=True, timeout=60)


# --------------------------------------------------------------------------- metric names in the code
_DECL = re.compile(r'\.(counter|gauge|histogram)\(\s*(f?)"([^"]+)"')


def declared_metrics() -> list[tuple[str, str, str]]:
    """(kind, name as exposed, file) for every metric the code creates through common.metrics.
    An f-string name keeps its {placeholders} (e.g. scout_{r}_weight_sync_seconds)."""
    out = []
    for d in CODE_DIRS:
        for path in sorted((ROOT / d).rglob("*.py")):
            for m in _DECL.finditer(path.read_text()):
                kind, name = m.group(1), m.group(3)
                if kind == "counter" and not name.endswith("_total"):
                    name += "_total"  # prometheus_client adds it
                out.append((kind, name, str(path.relative_to(ROOT))))
    return out


def series_patterns(decls=None) -> list[re.Pattern]:
    """Regexes of every series name the declared metrics expose."""
    pats = []
    for kind, name, _ in decls or declared_metrics():
        base = {"counter": name[: -len("_total")], "gauge": name, "histogram": name}[kind]
        suffixes = {"counter": ["_total", "_created"], "gauge": [""],
                    "histogram": ["_bucket", "_sum", "_count", "_created"]}[kind]
        rx = re.sub(r"\\\{[^}]*\\\}", "[a-z0-9_]+", re.escape(base))  # f-string placeholder: any role
        pats += [re.compile(rx + re.escape(s)) for s in suffixes]
    return pats


def metric_exists(series: str, pats: list[re.Pattern]) -> bool:
    return series in BUILTIN_SERIES or any(p.fullmatch(series) for p in pats)


# --------------------------------------------------------------------------- PromQL
_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                 "offset", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (strings, label matchers, ranges, grouping
    clauses and function calls are not names)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"'(?:[^'\\]|\\.)*'", "''", s)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![A-Za-z0-9_.:$])[A-Za-z_:][A-Za-z0-9_:]*", s):
        if m.group(0).lower() in _PROMQL_WORDS or s[m.end():].lstrip().startswith("("):
            continue
        names.add(m.group(0))
    return names


def grafana_to_promql(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return expr


def dashboard_queries(dash: dict) -> list[tuple[str, str]]:
    """(panel title, expr) of every panel target, rows' nested panels included, plus the
    metric of each label_values() template variable as a plain selector."""
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                out.append((p.get("title", "?"), t["expr"]))
            walk(p.get("panels", []))

    walk(dash["panels"])
    for var in dash.get("templating", {}).get("list", []):
        q = var.get("query")
        text = q.get("query", "") if isinstance(q, dict) else (q or "")
        m = re.match(r"label_values\((\w+),", text)
        if m:
            out.append((f"variable {var['name']}", m.group(1)))
    return out


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


# --------------------------------------------------------------------------- Prometheus config
def test_prometheus_config_covers_every_role_on_the_default_ports():
    from common.config import MetricsConfig

    mc = MetricsConfig()
    cfg = yaml.safe_load(PROM_CONFIG.read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    static = {}
    for j in jobs.values():
        assert j.get("honor_labels") is True, f"{j['job_name']}: the processes' own role/worker labels must win"
        for sc in j.get("static_configs", []):
            for t in sc["targets"]:
                static[int(t.rsplit(":", 1)[1])] = sc["labels"]
    assert static[mc.retriever_port]["role"] == "retriever"
    assert static[mc.learner_port]["role"] == "learner"
    assert static[mc.actor_port] == {"role": "actor", "worker": "supervisor"}
    assert static[mc.actor_port + 1]["role"] == "actor" and static[mc.actor_port + 1]["worker"] == "0"
    sd = [j for j in jobs.values() if j.get("file_sd_configs")]
    assert sd, "a file-based service discovery job is expected"
    globs = [f for j in sd for c in j["file_sd_configs"] for f in c["files"]]
    matched = {p.name for g in globs for p in PROM_CONFIG.parent.glob(g)}
    assert "example.yml" not in matched, "the example targets file must not be scraped"


@needs_promtool
def test_promtool_check_config_passes():
    r = promtool("check", "config", str(PROM_CONFIG))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout + r.stderr


@needs_promtool
def test_example_targets_file_is_valid_file_sd(tmp_path):
    """promtool validates the file_sd files a config names: point a copy at the example."""
    cfg = yaml.safe_load(PROM_CONFIG.read_text())
    for j in cfg["scrape_configs"]:
        for c in j.get("file_sd_configs", []):
            c["files"] = [str(DEPLOY / "targets" / "example.yml")]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg))
    r = promtool("check", "config", str(path))
    assert r.returncode == 0 and "WARNING" not in r.stdout + r.stderr, r.stdout + r.stderr
    groups = yaml.safe_load((DEPLOY / "targets" / "example.yml").read_text())
    assert {g["labels"]["role"] for g in groups} == {"retriever", "learner", "actor"}


@needs_promtool
def test_kubernetes_prometheus_config(tmp_path):
    r = promtool("check", "config", str(K8S_PROM_CONFIG))
    out = r.stdout + r.stderr
    if "kubernetes_sd_configs not found" not in out:  # a promtool built with Kubernetes discovery
        assert r.returncode == 0, out
    # Debian's promtool is built without Kubernetes discovery: check everything else (the
    # relabelling rules above all) with the discovery swapped for a static target
    cfg = yaml.safe_load(K8S_PROM_CONFIG.read_text())
    for j in cfg["scrape_configs"]:
        assert j.pop("kubernetes_sd_configs")[0]["role"] == "pod"
        j["static_configs"] = [{"targets": ["127.0.0.1:9"]}]
    path = tmp_path / "k8s-static.yml"
    path.write_text(yaml.safe_dump(cfg))
    r = promtool("check", "config", str(path))
    assert r.returncode == 0, r.stdout + r.stderr


# --------------------------------------------------------------------------- Grafana dashboard
def test_dashboard_json_is_a_well_formed_grafana_dashboard():
    dash = load_dashboard()
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    ids, topics = set(), " ".join(p["title"].lower() for p in dash["panels"])
    for p in dash["panels"]:
        assert isinstance(p["id"], int) and p["id"] not in ids, f"panel id {p['id']} repeats"
        ids.add(p["id"])
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in "hwxy") and 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        assert p["type"] in {"row", "timeseries", "stat", "gauge", "bargauge", "heatmap", "table"}, p["type"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(set(refs)) == len(refs), p["title"]
        assert all(t["expr"].strip() for t in p["targets"]), p["title"]
    for word in ("tokens", "groups", "staleness", "reward", "exact match", "latency", "sample latency", "queue",
                 "idle", "weight sync", "slow", "shard"):
        assert word in topics, f"no panel about {word}"
    names = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "worker", "host"} <= names


def test_every_dashboard_query_names_a_metric_that_exists_in_the_code():
    pats = series_patterns()
    queries = dashboard_queries(load_dashboard())
    assert len(queries) > 20
    missing = {}
    for title, expr in queries:
        names = promql_metric_names(grafana_to_promql(expr))
        assert names, f"{title}: {expr!r} selects no metric"
        for n in names:
            if not metric_exists(n, pats):
                missing.setdefault(n, []).append(title)
    assert not missing, f"dashboard queries name metrics no code declares: {missing}"


def test_promql_name_extraction():
    e = ('histogram_quantile(0.9, sum by (le, worker) (rate(a_bucket{le="0.5",x=~"b|c"}[5m]))) '
         '/ on(job) group_left(host) b_total offset 5m + 1e3 * scalar(up{job="x"})')
    assert promql_metric_names(e) == {"a_bucket", "b_total", "up"}


@needs_promtool
def test_every_dashboard_query_parses(tmp_path):
    """Each query as a recording rule: `promtool check rules` parses the PromQL."""
    rules = [{"record": f"dashboard:query_{i}", "expr": grafana_to_promql(e)}
             for i, (_, e) in enumerate(dashboard_queries(load_dashboard()))]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = promtool("check", "rules", str(path))
    assert r.returncode == 0, r.stdout + r.stderr


# --------------------------------------------------------------------------- metric names
def exposition_of_declared() -> str:
    """A /metrics text with one series per declared metric (placeholders filled with a role)."""
    lines, seen = [], set()
    for kind, name, _ in declared_metrics():
        name = re.sub(r"\{[^}]*\}", "learner", name)
        if name in seen:
            continue
        seen.add(name)
        lines += [f"# HELP {name} declared in the code", f"# TYPE {name} {kind}"]
        if kind == "histogram":
            lines += [f'{name}_bucket{{le="+Inf"}} 0', f"{name}_sum 0", f"{name}_count 0"]
        else:
            lines.append(f"{name} 0")
    return "\n".join(lines) + "\n"


@needs_promtool
def test_declared_metric_names_pass_promtool_lint():
    decls = declared_metrics()
    assert len(decls) > 40
    for kind, name, path in decls:
        assert re.fullmatch(r"scout_(up|process_[a-z_]+|(retriever|actor|learner|\{[a-z_]+\})_[a-z0-9_]+)", name), (path, name)
    r = promtool("check", "metrics", stdin=exposition_of_declared())
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr


# what issue 7 asks every deployment to be able to see; each entry: any of these series exists
REQUIRED_SERIES = {
    "generated tokens per second": ["scout_actor_generated_tokens_total"],
    "generated groups per second": ["scout_actor_groups_total"],
    "trained tokens per second": ["scout_learner_tokens_total"],
    "trained groups per second": ["scout_learner_groups_consumed_total"],
    "staleness histogram": ["scout_learner_group_staleness_bucket"],
    "dropped groups": ["scout_learner_groups_dropped_stale_total"],
    "reward": ["scout_actor_reward_bucket"],
    "search rate": ["scout_actor_searches_total"],
    "weight-sync duration": ["scout_learner_weight_sync_done_seconds_bucket"],
    "what the weight sync held the learner": ["scout_learner_weight_sync_seconds_bucket"],
    "retriever QPS": ["scout_retriever_queries_total"],
    "retriever latency": ["scout_retriever_request_seconds_bucket"],
    "queue depths": ["scout_learner_buffer_groups"],
    "engine idle fraction": ["scout_actor_engine_idle_fraction"],
    "end-to-end sample latency": ["scout_learner_sample_latency_seconds_bucket"],
    "exact-match rate": ["scout_actor_correct_total", "scout_learner_correct_fraction"],
    "learner idle fraction": ["scout_learner_idle_fraction"],
}

def test_metrics_issue_7_asks_for_exist():
    pats = series_patterns()
    absent = [what for what, names in REQUIRED_SERIES.items() if not any(metric_exists(n, pats) for n in names)]
    assert not absent, f"no metric for: {absent}"


# every one of these must be on the dashboard (the queue depths and idle fractions one by one)
DASHBOARD_MUST_SHOW = sorted({n for names in REQUIRED_SERIES.values() for n in names} | {
    "scout_learner_inflight_prompts", "scout_learner_requeued_prompts", "scout_learner_training_groups",
    "scout_actor_groups_in_flight", "scout_retriever_pending_queries", "scout_retriever_inflight_batches",
    "scout_retriever_shard_search_seconds_bucket", "scout_actor_rollouts_total"})


def family(series: str) -> str:
    """Metric family of an exposed series name (histogram parts share one family)."""
    return re.sub(r"_(bucket|sum|count|created)$", "", series)


def dashboard_series() -> dict[str, list[str]]:
    """series name -> titles of the panels that query it"""
    out: dict[str, list[str]] = {}
    for title, expr in dashboard_queries(load_dashboard()):
        for n in promql_metric_names(grafana_to_promql(expr)):
            out.setdefault(n, []).append(title)
    return out


def test_dashboard_shows_every_metric_issue_7_asks_for():
    shown = {family(n) for n in dashboard_series()}
    missing = [n for n in DASHBOARD_MUST_SHOW if family(n) not in shown]
    assert not missing, f"no dashboard panel queries {missing}"


def test_dashboard_panels_for_latency_exact_match_and_slow_workers():
    queries = dashboard_queries(load_dashboard())

    def exprs(title: str) -> list[str]:
        found = [e for t, e in queries if t == title]
        assert found, f"no panel {title!r}"
        return found

    latency = exprs("End-to-end sample latency")
    for qtl in ("0.5", "0.99"):  # p50 and p99 of the histogram, not of a gauge
        assert any(e.startswith(f"histogram_quantile({qtl}, ") and "scout_learner_sample_latency_seconds_bucket" in e
                   for e in latency), qtl
    em = " ".join(exprs("Exact match"))
    assert "scout_actor_correct_total" in em and "scout_actor_rollouts_total" in em
    assert "scout_learner_correct_fraction" in em
    idle = " ".join(exprs("Idle fractions"))
    assert "scout_actor_engine_idle_fraction" in idle and "scout_learner_idle_fraction" in idle
    # a slow actor is found by host, worker and gpu; a slow shard by shard
    slow = exprs("Slowest workers (generated tokens/s)")[0]
    assert slow.startswith("bottomk(") and "by (host, worker, gpu)" in slow
    assert all("by (le, shard)" in e for e in exprs("Retriever shard latency"))
    for title, expr in queries:  # actor panels honour the host / worker variables
        if "scout_actor_" in expr and "worker=~" in expr:
            assert 'host=~"$host"' in expr, (title, expr)


def test_every_scrape_config_labels_host():
    """Where a process does not label `host` itself, each scrape job adds it: static and file-based
    targets from the address, Kubernetes pods from their node."""
    for path in (PROM_CONFIG, K8S_PROM_CONFIG):
        for job in yaml.safe_load(path.read_text())["scrape_configs"]:
            rules = [r for r in job.get("relabel_configs", []) if r.get("target_label") == "host"]
            assert rules, f"{path.name} job {job['job_name']}: no host label"
            src = rules[0]["source_labels"]
            assert src in (["__address__"], ["__meta_kubernetes_pod_node_name"]), (path.name, src)


# --------------------------------------------------------------------------- Slurm
SLURM = DEPLOY / "slurm"


def run_sbatch(tmp_path: Path, hosts: str, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "SCOUT_DRY_RUN": "1", "SCOUT_HOSTS": hosts, "SCOUT_CONFIG": "/shared/run.toml",
            "SCOUT_INDEX": "/shared/index", "PROM_TARGETS_DIR": str(tmp_path / "targets"), "SLURM_JOB_ID": "77",
            "SCOUT_PYTHON": "/opt/venv/bin/python", **env}
    return subprocess.run(["bash", str(SLURM / "scout.sbatch")], env=full, capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)


def test_slurm_scripts_parse():
    for script in ("scout.sbatch", "scout-role.sh"):
        r = subprocess.run(["bash", "-n", str(SLURM / script)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


def inv(*names: str) -> list[str]:
    return [f"{n}.invalid" for n in names]  # .invalid never resolves (RFC 2606): the script keeps the names


def test_slurm_dry_run_places_roles_and_wires_them(tmp_path):
    r0, l0, l1, a0, a1, a2 = inv("r0", "l0", "l1", "a0", "a1", "a2")
    r = run_sbatch(tmp_path, " ".join([r0, l0, l1, a0, a1, a2]), LEARNER_NODES="2", GPUS_PER_NODE="4",
                   SCOUT_CURVE_DIR="/shared/keys")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert f"retriever {r0}, learner {l0},{l1}, actors {a0},{a1},{a2}" in out
    assert re.search(rf"srun .*--nodes=2 .*--nodelist={l0},{l1} .*scout-role.sh learner", out)
    assert re.search(rf"srun .*--nodes=3 .*--nodelist={a0},{a1},{a2} .*scout-role.sh actor", out)
    assert "--gpus-per-node=4" in out
    learner = next(line for line in out.splitlines() if "torch.distributed.run" in line)
    for part in ("--nnodes 2", "--nproc-per-node 4", "--node-rank 0", f"--master-addr {l0}",
                 f"learner.sync_endpoint=tcp://{l0}:5601", "learner.ingest_endpoint=tcp://0.0.0.0:5600",
                 "transport.allow_external_bind=true", "transport.curve_dir=/shared/keys"):
        assert part in learner, part
    actor = next(line for line in out.splitlines() if "cli.py actor" in line)
    for part in ("--gpus all", f"actor.learner_endpoint=tcp://{l0}:5600", f"actor.retriever_endpoint=tcp://{r0}:5555",
                 "transport.curve_dir=/shared/keys"):
        assert part in actor, part
    groups = json.loads((tmp_path / "targets" / "scout-77.json").read_text())
    targets = {t: g["labels"] for g in groups for t in g["targets"]}
    assert targets[f"{r0}:9100"]["role"] == "retriever" and targets[f"{l0}:9300"]["role"] == "learner"
    assert targets[f"{a2}:9200"]["worker"] == "supervisor"
    assert targets[f"{a1}:9204"] == {"role": "actor", "worker": "3", "gpu": "3", "slurm_job": "77"}
    assert len(targets) == 2 + 3 * 5


@needs_promtool
def test_slurm_targets_file_is_valid_for_prometheus(tmp_path):
    assert run_sbatch(tmp_path, " ".join(inv("r0", "l0", "a0")), GPUS_PER_NODE="0", ACTOR_WORKERS="2").returncode == 0
    cfg = yaml.safe_load(PROM_CONFIG.read_text())
    for j in cfg["scrape_configs"]:
        for c in j.get("file_sd_configs", []):
            c["files"] = [str(tmp_path / "targets" / "scout-*.json")]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg))
    r = promtool("check", "config", str(path))
    assert r.returncode == 0 and "WARNING" not in r.stdout + r.stderr, r.stdout + r.stderr


def test_slurm_refuses_an_allocation_too_small(tmp_path):
    r = run_sbatch(tmp_path, " ".join(inv("n0", "n1")))
    assert r.returncode == 2 and "need 1 retriever" in r.stderr


def test_slurm_role_script_rejects_unknown_roles():
    env = {**os.environ, "SCOUT_DIR": str(ROOT), "SCOUT_PYTHON": "python3", "SCOUT_CONFIG": "x.toml"}
    r = subprocess.run(["bash", str(SLURM / "scout-role.sh"), "trainer"], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "unknown role trainer" in r.stderr


# --------------------------------------------------------------------------- Kubernetes
K8S = DEPLOY / "k8s"


def k8s_objects() -> dict[tuple[str, str], dict]:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    objs = {}
    for res in kust["resources"]:
        for doc in yaml.safe_load_all((K8S / res).read_text()):
            assert doc["apiVersion"] and doc["metadata"]["name"], res
            objs[(doc["kind"], doc["metadata"]["name"])] = doc
    return objs


def _container(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]["containers"][0]


def test_k8s_manifests_define_every_role():
    objs = k8s_objects()
    job = objs[("Job", "scout-learner")]
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"]
    env = {e["name"]: e.get("value") for e in _container(job)["env"]}
    assert int(env["LEARNER_NODES"]) == job["spec"]["completions"]
    assert int(env["GPUS_PER_NODE"]) == _container(job)["resources"]["limits"]["nvidia.com/gpu"]
    assert job["spec"]["template"]["spec"]["subdomain"] == "scout-learner"
    assert objs[("Service", "scout-learner")]["spec"]["clusterIP"] == "None"
    assert objs[("Deployment", "scout-actors")]["spec"]["replicas"] >= 1
    assert ("Deployment", "scout-retriever") in objs and ("Service", "scout-retriever") in objs
    assert ("ConfigMap", "scout-config") in objs


def test_k8s_config_map_is_a_valid_scout_config_and_matches_the_manifests(tmp_path):
    from common.config import load_config

    objs = k8s_objects()
    path = tmp_path / "scout.toml"
    path.write_text(objs[("ConfigMap", "scout-config")]["data"]["scout.toml"])
    job_env = {e["name"]: e["value"].replace("$(POD_IP)", "10.0.0.7")
               for e in _container(objs[("Job", "scout-learner")])["env"] if e["name"].startswith("SCOUT_")}
    cfg = load_config(path, environ=job_env)  # raises ConfigError on a bad key or value
    assert cfg.learner.sync_endpoint == "tcp://10.0.0.7:5601" and cfg.learner.store_advertise_host == "10.0.0.7"
    assert cfg.transport.allow_external_bind and cfg.transport.curve_dir == "/etc/scout/keys"
    # actors reach rank 0 through the Job's pod 0 name on the headless Service, the retriever by its Service
    assert cfg.actor.learner_endpoint == "tcp://scout-learner-0.scout-learner:5600"
    svc_ports = {p["port"] for p in objs[("Service", "scout-retriever")]["spec"]["ports"]}
    host, port = cfg.actor.retriever_endpoint[len("tcp://"):].rsplit(":", 1)
    assert host == "scout-retriever" and int(port) in svc_ports
    learner_ports = {p["port"] for p in objs[("Service", "scout-learner")]["spec"]["ports"]}
    assert {5600, 5601, cfg.learner.store_port, cfg.metrics.learner_port} <= learner_ports
    metrics_port = {"scout-retriever": cfg.metrics.retriever_port, "scout-learner": cfg.metrics.learner_port,
                    "scout-actors": cfg.metrics.actor_port + 1}
    for (kind, name), obj in objs.items():
        if kind not in ("Deployment", "Job"):
            continue
        ann = obj["spec"]["template"]["metadata"]["annotations"]
        assert ann["prometheus.io/scrape"] == "true" and int(ann["prometheus.io/port"]) == metrics_port[name]
        c = _container(obj)
        ports = {p["containerPort"] for p in c["ports"]}
        assert metrics_port[name] in ports, name
        assert "/etc/scout/scout.toml" in " ".join(c.get("command", []) + c.get("args", [])), name
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert {"/etc/scout/scout.toml", "/etc/scout/keys", "/data"} <= mounts, name
