"""Multi-node rehearsal on one box: scout started as it runs on three machines.

Three "hosts" are network namespaces with their own stacks, joined by a bridge in a fourth one
(deploy/local/netns.sh): every byte between roles crosses a veth pair, none goes over loopback,
and nothing is added to this machine's own network namespace.

    host C 10.77.0.3 ── retriever (:5555, /metrics :9100), actors (2 workers, :9200 :9201 :9202),
                        and the batch script itself (Slurm runs it on the allocation's first node)
    host A 10.77.0.1 ── learner node rank 0: torchrun agent + rank 0 (ingest :5600, weight sync
                        :5601 + TCPStore :29600, torch master :29500, /metrics :9300)
    host B 10.77.0.2 ── learner node rank 1: torchrun agent + rank 1
    switch 10.77.0.254 ─ Prometheus (Debian's binary) reading the target file the job writes

The job is deploy/slurm/scout.sbatch itself, with SCOUT_HOSTS="C A B C" as the allocation and
deploy/local/srun standing in for srun (one task per node, SLURM_PROCID etc. set, each task run
inside its node's namespace); scout-role.sh starts each role as on a cluster node, every address
from the environment / config. GLOO_SOCKET_IFNAME=scout0 on every host, as a real cluster sets
the fabric's interface.

- test_three_hosts_train_sync_and_are_scraped: the learner (torchrun --nnodes 2) trains STEPS
  steps and the job ends with code 0; each actor worker's /health shows the learner's current
  policy version (> 0) at some point; Prometheus scraped every process that serves metrics
  (retriever, learner rank 0, actor supervisor, both workers) and holds each one's own series.
- test_weight_sync_group_binds_the_address_towards_the_store: without GLOO_SOCKET_IFNAME, a
  weight-sync gloo group (common.weightsync.collective.make_group) forms between hosts A and C:
  it binds the address that reaches the configured store host, not the host name's (which is
  loopback here, as on Debian).

Needs root (network namespaces); skipped otherwise. See docs/DEPLOY.md, "Multi-node rehearsal".
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from learner.report import step_lines
from tests.conftest import ROOT, Procs

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                       reason="needs root and iproute2 (`ip netns`) to make the pretend hosts"),
    pytest.mark.skipif(shutil.which("prometheus") is None,
                       reason="prometheus not installed (Debian: apt-get install -y prometheus)"),
]

EXEC = "import os, sys; os.execvp(sys.argv[1], sys.argv[1:])"  # procs.start runs python: become another program
SUBNET = "10.77.0"  # private to the namespaces below: every test run has its own bridge
HOST_A, HOST_B, HOST_C = f"{SUBNET}.1", f"{SUBNET}.2", f"{SUBNET}.3"
STEPS = 6
WORKERS = 2
DEADLINE_S = 420  # the whole job, on a loaded 2-core machine
CLONE_NEWNET = 0x40000000


# --------------------------------------------------------------------------- the pretend cluster
class NetnsHttp:
    """HTTP GETs made from inside a network namespace: one thread that joined it (setns changes
    only the calling thread's namespace), so the test itself can reach the hosts' addresses."""

    def __init__(self, netns: str):
        self.pool = concurrent.futures.ThreadPoolExecutor(1, initializer=self._join, initargs=(netns,))

    @staticmethod
    def _join(netns: str) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns {netns}")
        finally:
            os.close(fd)

    def get(self, url: str, timeout: float = 5) -> bytes:
        def fetch() -> bytes:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as r:
                    return r.read()
            except urllib.error.HTTPError as e:  # /health answers 503 with a body while starting
                return e.read()
        return self.pool.submit(fetch).result(timeout + 5)

    def json(self, url: str) -> dict:
        return json.loads(self.get(url))

    def close(self) -> None:
        self.pool.shutdown(wait=False)


@pytest.fixture
def cluster():
    prefix = f"scmn{os.getpid()}"
    netns = str(ROOT / "deploy" / "local" / "netns.sh")
    try:
        subprocess.run(["bash", netns, "up", prefix, SUBNET, "3"], check=True, capture_output=True, timeout=60)
        http = NetnsHttp(f"{prefix}-sw")
        yield {"prefix": prefix, "http": http,
               "netns": {HOST_A: f"{prefix}-h0", HOST_B: f"{prefix}-h1", HOST_C: f"{prefix}-h2"}}
        http.close()
    finally:
        subprocess.run(["bash", netns, "down", prefix, "3"], capture_output=True, timeout=60)


def write_run(base: Path) -> tuple[Path, Path]:
    """A tiny index (cli.py index build) and the run's TOML (tiny random Qwen2, STEPS steps)."""
    from demo.tinymodel import build_tiny_model
    from tests.test_retriever_index import make_corpus, write_jsonl

    subprocess.run([sys.executable, "cli.py", "index", "build", "--corpus",
                    str(write_jsonl(base / "corpus.jsonl", make_corpus(40, seed=5))), "--out", str(base / "index"),
                    "--batch-size", "64"], cwd=ROOT, check=True, timeout=600, capture_output=True)
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
steps = {STEPS}
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
    return cfg, base / "index"


def start_prometheus(procs: Procs, base: Path, netns: str) -> subprocess.Popen:
    """deploy/prometheus.yml's file-discovery job "scout" (1 s scrapes), reading the target file
    the job writes, from the switch namespace (the "monitoring host")."""
    from tests.test_deploy import PROM_CONFIG

    cfg = yaml.safe_load(PROM_CONFIG.read_text())
    cfg["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    jobs = [j for j in cfg["scrape_configs"] if j["job_name"] == "scout"]  # the static jobs name 127.0.0.1
    jobs[0]["file_sd_configs"] = [{"files": [str(base / "targets" / "scout-*.json")], "refresh_interval": "1s"}]
    cfg["scrape_configs"] = jobs
    path = base / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg))
    return procs.start(["-c", EXEC, "ip", "netns", "exec", netns, "prometheus", f"--config.file={path}",
                        f"--storage.tsdb.path={base / 'tsdb'}", "--web.listen-address=127.0.0.1:9090",
                        "--log.level=warn"], stdout=open(base / "prometheus.log", "wb"), stderr=subprocess.STDOUT)


def job_env(cfg: Path, index: Path, base: Path, netns: dict) -> dict:
    """What a user's my-run.env holds (deploy/slurm/scout.env.example), for this allocation."""
    return {"SCOUT_CONFIG": str(cfg), "SCOUT_INDEX": str(index), "SCOUT_PYTHON": sys.executable,
            "SCOUT_HOSTS": f"{HOST_C} {HOST_A} {HOST_B} {HOST_C}",  # retriever, learner x2, actors
            "LEARNER_NODES": "2", "ACTOR_NODES": "1", "GPUS_PER_NODE": "0", "ACTOR_WORKERS": str(WORKERS),
            "RETRIEVER_GPUS": "", "SLURM_JOB_ID": "rehearsal", "PROM_TARGETS_DIR": str(base / "targets"),
            "PATH": f"{ROOT / 'deploy' / 'local'}:{os.environ['PATH']}",  # deploy/local/srun stands in for srun
            "SCOUT_LOCAL_NETNS": " ".join(f"{ip}={ns}" for ip, ns in netns.items()),
            "GLOO_SOCKET_IFNAME": "scout0", "OMP_NUM_THREADS": "1"}


# --------------------------------------------------------------------------- watching the run
def poll_health(http: NetnsHttp) -> dict:
    """One look at the learner's and every actor worker's /health (None where it does not answer)."""
    def look(url):
        try:
            return http.json(url)
        except (OSError, ValueError, concurrent.futures.TimeoutError):
            return None
    learner = look(f"http://{HOST_A}:9300/health")
    workers = [look(f"http://{HOST_C}:{9201 + i}/health") for i in range(WORKERS)]
    return {"t": time.monotonic(), "learner": learner and learner.get("version"),
            "step": learner and learner.get("step"), "workers": [w and w.get("version") for w in workers]}


def watch(job: subprocess.Popen, http: NetnsHttp, run_dir: Path, log: Path) -> dict:
    """Poll until the job ends (or DEADLINE_S): when the first step was logged, and the first
    time each worker held the version the learner was at (> 0)."""
    start = time.monotonic()
    first_step = last_step = None
    caught_up: dict[int, int] = {}  # worker -> the learner's version it was seen holding
    max_seen = [0] * WORKERS
    while job.poll() is None:
        if time.monotonic() - start > DEADLINE_S:
            pytest.fail(f"the job did not end within {DEADLINE_S}s:\n{tail(log)}")
        snap = poll_health(http)
        steps = len(step_lines(run_dir))
        if first_step is None and steps:
            first_step = time.monotonic() - start
        if last_step is None and steps >= STEPS:
            last_step = time.monotonic() - start
        for i, v in enumerate(snap["workers"]):
            max_seen[i] = max(max_seen[i], v or 0)
            if v and snap["learner"] and v == snap["learner"] and i not in caught_up:
                caught_up[i] = v
        time.sleep(0.5)
    return {"wall_s": time.monotonic() - start, "first_step_s": first_step, "last_step_s": last_step,
            "caught_up": caught_up,
            "max_seen": max_seen}


def loaded_versions(log: Path) -> dict[int, list[int]]:
    """The policy versions each actor worker logged loading ("policy version N loaded")."""
    out: dict[int, list[int]] = {}
    for m in re.finditer(r"actor-w(\d+)\[\d+\] \S+: policy version (\d+) loaded", log.read_text(errors="replace")):
        out.setdefault(int(m.group(1)), []).append(int(m.group(2)))
    return out


def tail(path: Path, n: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.is_file() else ""


def promql(http: NetnsHttp, expr: str) -> list[dict]:
    body = json.loads(http.get("http://127.0.0.1:9090/api/v1/query?" + urllib.parse.urlencode({"query": expr})))
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def by_instance(result: list[dict]) -> dict[str, float]:
    return {r["metric"]["instance"]: float(r["value"][1]) for r in result}


# --------------------------------------------------------------------------- the rehearsal
@pytest.mark.long  # 2-4 min on the 2-core VM: kept out of CI time (`make test-long`)
def test_three_hosts_train_sync_and_are_scraped(cluster, tmp_path):
    http, netns = cluster["http"], cluster["netns"]
    cfg, index = write_run(tmp_path)
    procs = Procs()
    try:
        prom = start_prometheus(procs, tmp_path, f"{cluster['prefix']}-sw")
        log = tmp_path / "job.log"
        job = procs.start(["-c", EXEC, "ip", "netns", "exec", netns[HOST_C], "bash",
                           str(ROOT / "deploy" / "slurm" / "scout.sbatch")],
                          env=job_env(cfg, index, tmp_path, netns), stdout=open(log, "wb"), stderr=subprocess.STDOUT)
        seen = watch(job, http, tmp_path / "run", log)
        assert prom.poll() is None, tail(tmp_path / "prometheus.log")
        loaded = loaded_versions(log)
        print(f"job: {seen['wall_s']:.0f}s, first step after {seen['first_step_s']:.0f}s, step {STEPS} after "
              f"{seen['last_step_s']:.0f}s; workers seen at the learner's version {seen['caught_up']}, highest seen "
              f"{seen['max_seen']}; versions loaded per worker {loaded}")
        assert job.returncode == 0, tail(log)
        steps = step_lines(tmp_path / "run")
        assert [s["step"] for s in steps][-1] == STEPS, steps[-1:]
        text = log.read_text(errors="replace")
        assert "learner finished with code 0" in text
        # every worker held the learner's current policy version (> 0) at some point
        assert sorted(seen["caught_up"]) == list(range(WORKERS)), (seen, tail(log))
        # and the final version reached both before the run ended (the learner syncs it before saying so)
        assert all(STEPS in loaded.get(i, []) for i in range(WORKERS)), loaded
        check_scraped(http)
    finally:
        procs.stop_all()


def check_scraped(http: NetnsHttp) -> None:
    """Prometheus scraped every process that serves metrics, each one's own series included."""
    expected = {f"{HOST_C}:9100", f"{HOST_A}:9300", f"{HOST_C}:9200"} | {f"{HOST_C}:{9201 + i}" for i in range(WORKERS)}
    up = by_instance(promql(http, 'max_over_time(up{job="scout"}[15m])'))
    assert up == {t: 1.0 for t in expected}, up
    own = {  # a series only that process exports
        f"{HOST_C}:9100": 'max_over_time(scout_retriever_shard_up{job="scout"}[15m])',
        f"{HOST_A}:9300": 'max_over_time(scout_learner_policy_version{job="scout"}[15m])',
        f"{HOST_C}:9200": 'max_over_time(scout_actor_workers_up{job="scout"}[15m])',
    }
    for target, expr in own.items():
        values = by_instance(promql(http, expr))
        assert values.get(target, 0) > 0, (target, expr, values)
    versions = by_instance(promql(http, 'max_over_time(scout_actor_policy_version{job="scout"}[15m])'))
    assert all(versions.get(f"{HOST_C}:{9201 + i}", 0) > 0 for i in range(WORKERS)), versions
    learner = by_instance(promql(http, 'max_over_time(scout_learner_policy_version{job="scout"}[15m])'))
    print(f"Prometheus: targets up {sorted(up)}; highest versions: learner {learner}, workers {versions}")


# --------------------------------------------------------------------------- the gloo address
def test_weight_sync_group_binds_the_address_towards_the_store(cluster, procs):
    """Without GLOO_SOCKET_IFNAME, torch's gloo binds the address of the host name, which here
    is no address of the host's network (in a namespace; and on Debian /etc/hosts maps the name
    to 127.0.1.1): the peers would be told an address they cannot reach. The weight-sync group
    binds the address this host reaches the configured store host (learner.store_host) from,
    so learner (host A) and actor (host C) form it from the config alone."""
    env = {k: v for k, v in os.environ.items() if k != "GLOO_SOCKET_IFNAME"}
    env["GLOO_SOCKET_IFNAME"] = ""  # Procs.start merges os.environ: make sure the test's own is not used
    peers = []
    for rank, host in ((0, HOST_A), (1, HOST_C)):
        peers.append(procs.start(["-c", EXEC, "ip", "netns", "exec", cluster["netns"][host], sys.executable, "-m",
                                  "tests.helpers.gloo_peer", str(rank), HOST_A, "29650"],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=120)[0] for p in peers]
    assert [p.returncode for p in peers] == [0, 0], outs
    assert [o.strip().splitlines()[-1] for o in outs] == [f"ok {HOST_A}", f"ok {HOST_C}"], outs
