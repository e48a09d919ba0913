"""Hand-written code next to the library that could replace it: measurements, not taste.

    python bench/handwritten_vs_library.py [--quick] [--requests 500] [--rounds 3] [--stall 5]

Prints markdown tables for four places where scout writes by hand what a library also does:

1. Metrics HTTP server: `common.metrics.Metrics.serve` (http.server, /metrics + /health, 10 s
   socket timeout) against `prometheus_client.start_http_server` on the same registry. Each server
   runs in its own process (so the client threads do not share its GIL); the bench process scrapes
   GET /metrics over loopback with a new connection per request (Connection: close), 1 client and
   8 client threads, rounds alternating which server goes first. Also: what GET /health answers on
   each, and whether a scrape is answered while another client has sent half a request line and
   stalls (`--stall` seconds), and whether the server dropped the staller by then.
2. Config: `common.config.load_config` (TOML file < SCOUT_SECTION__KEY env parsed as TOML literals
   < --set section.key=value) against pydantic-settings building the same `ScoutConfig` (TOML
   source, env source with env_prefix="SCOUT_" and env_nested_delimiter="__", CLI source with
   --section.key=value). Load time (median of 50), extra import time of pydantic_settings
   (fresh processes, median of 5, and -X importtime), and a behaviour table over the cases
   tests/test_config_metrics.py and the docs rely on. Skipped, with a note, when pydantic-settings
   is not importable.
3. The retriever shard child's argument parsing: fresh `python -c` start-up (import + parse of a
   one-command, 8-option parser) with argparse (what retriever/shard.py uses) against typer (what
   cli.py uses), median of 7, interleaved, next to the interpreter alone and the shard's own imports.
4. Plotting: a scan of the sources for matplotlib use and for hand-drawn plotting (PIL drawing,
   SVG/PNG written by hand, block-character charts). No timing.

Loopback only (127.0.0.1, ports from common.transport.free_tcp_port). --quick: fewer requests and
rounds, a 1 s stall, fewer repetitions (about 20 s); the full run takes about 1-2 minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import multiprocessing as mp
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common.transport import free_tcp_port  # noqa: E402

HOST = "127.0.0.1"
PS_MISSING = ("pydantic-settings not installed: skipped; pip install --target DIR pydantic-settings "
              "and put DIR on PYTHONPATH")


# ------------------------------------------------------------------------------------------ output
def table(headers: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def short(text: str, limit: int = 230) -> str:
    text = " ".join(line.strip() for line in str(text).splitlines()
                    if line.strip() and not line.strip().startswith("For further information"))
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------- 1. metrics HTTP server
def build_metrics():
    """A registry shaped like the learner's (counters, gauges, labelled gauges, histograms)."""
    from common.metrics import Metrics

    m = Metrics("learner", labels={"rank": "0"})
    step = m.histogram("scout_learner_step_seconds", "wall time of one learner step")
    m.counter("scout_learner_steps_total", "learner steps done").inc(120)
    m.gauge("scout_learner_policy_version", "current policy version").set(120)
    m.counter("scout_learner_tokens_total", "tokens trained on").inc(4_000_000)
    m.gauge("scout_learner_tokens_per_second", "tokens per second").set(8123.5)
    m.counter("scout_learner_groups_consumed_total", "groups trained on").inc(960)
    stat = m.gauge("scout_learner_loss_stat", "loss statistics of the last step", ("stat",))
    for i, s in enumerate(("loss", "kl", "clip_frac", "entropy", "ratio_mean", "ratio_max")):
        stat.labels(stat=s).set(0.1 * i)
    lat = m.histogram("scout_learner_sample_latency_seconds", "generation start to trained",
                      buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800))
    for i in range(200):
        step.observe(0.01 * i)
        lat.observe(0.3 * i)
    for reason in ("malformed", "invalid", "http_404", "http_timeout"):
        m.reject("ingest", reason)
    return m


def server_child(kind: str, port: int, ready, stop) -> None:
    """Child process: serve the registry with `kind` ("scout" | "prometheus_client") until `stop`."""
    m = build_metrics()
    if kind == "scout":
        m.serve(HOST, port, health=lambda: {"step": 120, "version": 120})
    else:
        from prometheus_client import start_http_server

        start_http_server(port, addr=HOST, registry=m.registry)
    ready.set()
    stop.wait()


def get(port: int, path: str = "/metrics") -> tuple[int, str, bytes, float]:
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        r = conn.getresponse()
        body = r.read()
        return r.status, r.getheader("Content-Type", ""), body, time.perf_counter() - t0
    finally:
        conn.close()


def load(port: int, clients: int, n: int) -> tuple[float, list[float], int]:
    """`clients` threads, `n` scrapes each: (scrapes/s, latencies, failures)."""
    lats: list[float] = []
    fails = [0]
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def worker():
        mine, bad = [], 0
        start.wait()
        for _ in range(n):
            try:
                status, _, _, dt = get(port)
                mine.append(dt)
                bad += status != 200
            except OSError:
                bad += 1
        with lock:
            lats.extend(mine)
            fails[0] += bad

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return clients * n / (time.perf_counter() - t0), lats, fails[0]


def slow_client(port: int, stall: float) -> dict:
    """Half a request line, then a stall; a normal scrape meanwhile; then is the staller still open?"""
    s = socket.create_connection((HOST, port))
    try:
        s.sendall(b"GET /metr")
        t0 = time.monotonic()
        time.sleep(min(0.5, stall / 2))
        try:
            status, _, _, dt = get(port)
            scrape = f"{status} in {dt * 1e3:.1f} ms"
        except OSError as e:
            scrape = f"failed: {type(e).__name__}"
        time.sleep(max(0.0, stall - (time.monotonic() - t0)))
        s.setblocking(False)
        try:
            dropped = s.recv(1) == b""
        except BlockingIOError:
            dropped = False
        if dropped:
            return {"scrape": scrape, "staller": f"dropped by the server within {stall:g} s"}
        s.setblocking(True)
        s.settimeout(5)
        s.sendall(b"ics HTTP/1.0\r\n\r\n")
        first = s.recv(64).split(b"\r\n", 1)[0].decode(errors="replace")
        return {"scrape": scrape, "staller": f"still open after {stall:g} s; finished request got {first!r}"}
    finally:
        s.close()


def handler_timeout(kind: str):
    if kind == "scout":
        from common.metrics import CountingHandler

        return CountingHandler.timeout
    from prometheus_client.exposition import _SilentHandler

    return _SilentHandler.timeout


def start_servers(kinds: list[str]):
    ctx = mp.get_context("spawn")
    stop, procs, ports = ctx.Event(), [], {}
    for kind in kinds:
        ready, port = ctx.Event(), free_tcp_port(HOST)
        p = ctx.Process(target=server_child, args=(kind, port, ready, stop), daemon=True)
        p.start()
        if not ready.wait(60):
            raise RuntimeError(f"{kind} server did not start")
        procs.append(p)
        ports[kind] = port
    return stop, procs, ports


def http_probe_rows(ports: dict[str, int], stall: float) -> list[list]:
    rows = []
    for kind, port in ports.items():
        _, mctype, body, _ = get(port, "/metrics")
        hstatus, hctype, hbody, _ = get(port, "/health")
        health = f"{hstatus} {hctype.split(';')[0]}: {short(hbody.decode(errors='replace'), 70)}"
        slow = slow_client(port, stall)
        rows.append([kind, f"{len(body)} B", health, slow["scrape"], slow["staller"], handler_timeout(kind)])
    return rows


def bench_http(requests: int, rounds: int, stall: float) -> str:
    import prometheus_client

    kinds = ["scout", "prometheus_client"]
    stop, procs, ports = start_servers(kinds)
    try:
        for port in ports.values():  # warm-up
            load(port, 1, 20)
        res = {(k, c): {"rate": [], "lat": [], "fail": 0} for k in kinds for c in (1, 8)}
        for r in range(rounds):
            for kind in (kinds if r % 2 == 0 else kinds[::-1]):
                for clients in (1, 8):
                    rate, lats, fails = load(ports[kind], clients, requests)
                    cell = res[(kind, clients)]
                    cell["rate"].append(rate)
                    cell["lat"] += lats
                    cell["fail"] += fails
        probes = http_probe_rows(ports, stall)
    finally:
        stop.set()
        for p in procs:
            p.join(5)
    rows = [[k, c, f"{statistics.median(v['rate']):.0f}", f"{pct(v['lat'], .5) * 1e3:.2f}",
             f"{pct(v['lat'], .99) * 1e3:.2f}", v["fail"]] for (k, c), v in res.items()]
    version = getattr(prometheus_client, "__version__", None) or _dist_version("prometheus_client")
    return "\n\n".join([
        f"### 1. Metrics HTTP server (prometheus_client {version}; {requests} GET /metrics per client "
        f"per round, {rounds} rounds, new connection each)",
        table(["server", "clients", "scrapes/s (median of rounds)", "p50 ms", "p99 ms", "failed"], rows),
        table(["server", "/metrics body", "GET /health", f"scrape during a {stall:g} s half-request stall",
               "the stalled connection", "handler socket timeout (s)"], probes)])


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


# --------------------------------------------------------------------------------- 2. config
def settings_class():
    """pydantic-settings version of ScoutConfig: init < CLI < env < TOML, as scout's order."""
    from typing import ClassVar

    from pydantic_settings import BaseSettings, CliSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

    from common.config import ScoutConfig

    class PSConfig(BaseSettings, ScoutConfig):
        model_config = SettingsConfigDict(env_prefix="SCOUT_", env_nested_delimiter="__", extra="forbid")
        bench_toml: ClassVar[str | None] = None
        bench_cli: ClassVar[list[str] | None] = None

        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                       file_secret_settings):
            sources = [init_settings]
            if cls.bench_cli is not None:
                sources.append(CliSettingsSource(settings_cls, cli_parse_args=cls.bench_cli,
                                                 cli_exit_on_error=False))
            sources.append(env_settings)
            if cls.bench_toml is not None:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=cls.bench_toml))
            return tuple(sources)

    return PSConfig


@contextlib.contextmanager
def scout_env(env: dict[str, str]):
    """os.environ with every SCOUT_* variable replaced by `env` (pydantic-settings reads os.environ)."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("SCOUT_")}
    for k in saved:
        del os.environ[k]
    os.environ.update(env)
    try:
        yield
    finally:
        for k in env:
            os.environ.pop(k, None)
        os.environ.update(saved)


def load_ps(cls, path, cli: list[str] | None, env: dict[str, str]):
    cls.bench_toml, cls.bench_cli = (None if path is None else str(path)), cli
    with scout_env(env):
        return cls()


def config_cases(tmp: Path) -> list[dict]:
    """(scout input, the pydantic-settings equivalent, what to read) for each behaviour."""
    good, bad = tmp / "good.toml", tmp / "bad.toml"
    good.write_text("[learner]\nlr = 3e-6\nmax_staleness = 2\n")
    bad.write_text("[learner\n")
    lr, betas = (lambda c: c.learner.lr), (lambda c: c.learner.adam_betas)
    qp, reward = (lambda c: c.retriever.query_prefix), (lambda c: c.actor.reward)
    return [
        dict(case="float from env SCOUT_LEARNER__LR=1e-4", env={"SCOUT_LEARNER__LR": "1e-4"}, read=lr),
        dict(case="list from env SCOUT_LEARNER__ADAM_BETAS=[0.9,0.99]",
             env={"SCOUT_LEARNER__ADAM_BETAS": "[0.9,0.99]"}, read=betas),
        dict(case="quoted string, trailing space: --set 'retriever.query_prefix=\"query: \"' "
                  "(pydantic-settings: --retriever.query_prefix='query: ')",
             sets=['retriever.query_prefix="query: "'], cli=["--retriever.query_prefix=query: "], read=qp),
        dict(case="same quoted string from env SCOUT_RETRIEVER__QUERY_PREFIX='\"query: \"'",
             env={"SCOUT_RETRIEVER__QUERY_PREFIX": '"query: "'}, read=qp),
        dict(case="TOML single-quoted literal --set actor.reward='f1' (same text to --actor.reward)",
             sets=["actor.reward='f1'"], cli=["--actor.reward='f1'"], read=reward),
        dict(case="bad value --set learner.lr=-1", sets=["learner.lr=-1"], cli=["--learner.lr=-1"], read=lr,
             key="learner.lr", src=("--set", "--learner.lr")),
        dict(case="bad value from env SCOUT_ACTOR__N_SAMPLES=many", env={"SCOUT_ACTOR__N_SAMPLES": "many"},
             read=lambda c: c.actor.n_samples, key="n_samples", src=("SCOUT_ACTOR__N_SAMPLES",) * 2),
        dict(case="unknown key --set learner.nope=1", sets=["learner.nope=1"], cli=["--learner.nope=1"],
             read=lr, key="nope", src=("--set", "--learner.nope")),
        dict(case="unknown key from env SCOUT_LEARNER__NOPE=1", env={"SCOUT_LEARNER__NOPE": "1"}, read=lr,
             key="nope", src=("SCOUT_LEARNER__NOPE",) * 2),
        dict(case="unknown section from env SCOUT_NOPE__X=1", env={"SCOUT_NOPE__X": "1"}, read=lr,
             key="nope", src=("SCOUT_NOPE__X",) * 2),
        dict(case="key in file (3e-6) and env (1e-5): env wins", path=good,
             env={"SCOUT_LEARNER__LR": "1e-5"}, read=lr),
        dict(case="env SCOUT_LEARNER__MAX_STALENESS=5 and --set learner.max_staleness=0: --set wins",
             path=good, env={"SCOUT_LEARNER__MAX_STALENESS": "5"}, sets=["learner.max_staleness=0"],
             cli=["--learner.max_staleness=0"], read=lambda c: c.learner.max_staleness),
        dict(case="bad TOML file '[learner'", path=bad, read=lr, src=("bad.toml",) * 2),
        dict(case="missing config file", path=tmp / "missing.toml", read=lr, src=("missing.toml",) * 2),
        dict(case="--set without '=' (nokey)", sets=["nokey"], cli=["nokey"], read=lr, key="nokey",
             src=("--set", "nokey")),
    ]


def run_one(fn) -> tuple[str, object, str]:
    """('ok', value, '') or ('error', None, message)."""
    try:
        return "ok", fn(), ""
    except (Exception, SystemExit) as e:  # noqa: BLE001 (every refusal is a result here)
        return "error", None, f"{type(e).__name__}: {short(str(e), 400)}"


def describe(kind: str, value, err: str, key: str | None, src: str | None) -> str:
    if kind == "ok":
        return f"`{value!r}`"
    names = []
    if key:
        names.append(f"key {'yes' if key.lower() in err.lower() else 'NO'}")
    if src:
        names.append(f"source {'yes' if src.lower() in err.lower() else 'NO'}")
    return f"error ({', '.join(names)}): {short(err, 200)}" if names else f"error: {short(err, 200)}"


def behaviour_rows(cls, tmp: Path) -> list[list]:
    from common.config import load_config

    rows = []
    for i, c in enumerate(config_cases(tmp), 1):
        env, sets, read = c.get("env", {}), c.get("sets", []), c["read"]
        s = run_one(lambda: read(load_config(c.get("path"), sets, environ=dict(env))))
        p = run_one(lambda: read(load_ps(cls, c.get("path"), c.get("cli", []), env)))
        src = c.get("src", (None, None))
        same = "yes" if (s[0], s[1]) == (p[0], p[1]) else "no"
        if s[0] == p[0] == "error":
            same = "both refuse"
        elif s[0] == "error":
            same = "no: pydantic-settings accepts it"
        elif p[0] == "error":
            same = "no: pydantic-settings refuses it"
        rows.append([i, c["case"], describe(*s, c.get("key"), src[0]), describe(*p, c.get("key"), src[1]), same])
    return rows


def median_time(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def config_timing_rows(cls, tmp: Path, n: int) -> list[list]:
    from common.config import load_config

    path = tmp / "timing.toml"
    path.write_text("[learner]\nlr = 3e-6\nmax_staleness = 2\n[retriever]\nmax_batch = 16\n")
    env = {"SCOUT_LEARNER__LR": "1e-5", "SCOUT_ACTOR__N_SAMPLES": "8"}
    sets = ["learner.max_staleness=0", "actor.reward='f1'"]
    cli = ["--learner.max_staleness=0", "--actor.reward=f1"]
    checks = [("scout load_config (file + 2 env + 2 --set)", lambda: load_config(path, sets, environ=env)),
              ("pydantic-settings (TOML + env + CLI source)", lambda: load_ps(cls, path, cli, env)),
              ("pydantic-settings (TOML + env, no CLI source)", lambda: load_ps(cls, path, None, env))]
    for _, fn in checks:  # same result before timing
        cfg = fn()
        assert (cfg.learner.lr, cfg.actor.n_samples, cfg.retriever.max_batch) == (1e-5, 8, 16), cfg
    return [[name, f"{median_time(fn, n) * 1e3:.3f}"] for name, fn in checks]


def proc_times(codes: dict[str, str], n: int, flags: tuple[str, ...] = ()) -> dict[str, float]:
    """Median wall time of fresh `python -c code` processes, the variants interleaved."""
    times: dict[str, list[float]] = {k: [] for k in codes}
    for _ in range(n):
        for name, code in codes.items():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def importtime_us(n: int) -> float:
    """-X importtime cumulative µs of `import pydantic_settings` after common.config is imported."""
    out = []
    for _ in range(n):
        r = subprocess.run([sys.executable, "-X", "importtime", "-c", "import common.config; import pydantic_settings"],
                           cwd=ROOT, capture_output=True, text=True, check=True)
        for line in r.stderr.splitlines():
            parts = [p.strip() for p in line.split("|")]
            if len(parts) == 3 and parts[2] == "pydantic_settings":
                out.append(float(parts[1]))
    return statistics.median(out)


def bench_config(loads: int, procs: int) -> str:
    try:
        import pydantic_settings
    except ImportError:
        return "### 2. Config handling\n\n" + PS_MISSING
    cls = settings_class()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        timing = config_timing_rows(cls, tmp, loads)
        rows = behaviour_rows(cls, tmp)
    t = proc_times({"common.config": "import common.config",
                    "+ pydantic_settings": "import common.config, pydantic_settings"}, procs)
    extra_ms = (t["+ pydantic_settings"] - t["common.config"]) * 1e3
    timing += [[f"fresh `python -c 'import common.config'` (median of {procs})", f"{t['common.config'] * 1e3:.1f}"],
               [f"fresh `python -c 'import common.config, pydantic_settings'` (median of {procs})",
                f"{t['+ pydantic_settings'] * 1e3:.1f} (+{extra_ms:.1f})"],
               [f"-X importtime cumulative of pydantic_settings after common.config (median of {procs})",
                f"{importtime_us(procs) / 1e3:.1f}"]]
    return "\n\n".join([
        f"### 2. Config handling (pydantic-settings {pydantic_settings.__version__})",
        table(["what", f"ms (load: median of {loads})"], timing),
        table(["#", "case", "scout load_config", "pydantic-settings", "same?"], rows)])


# ------------------------------------------------------------------------- 3. shard argument parsing
SHARD_ARGS = '["--index", "/tmp/idx", "--shard", "3", "--endpoint", "ipc:///tmp/x/shard", "--threads", "2"]'

ARGPARSE_CODE = f"""
import argparse
ap = argparse.ArgumentParser(description="scout retriever shard process")
ap.add_argument("--index", required=True)
ap.add_argument("--shard", type=int, required=True)
ap.add_argument("--endpoint", required=True)
ap.add_argument("--gpu", default=None)
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--params", default="")
ap.add_argument("--parent-pid", type=int, default=0)
ap.add_argument("--log-level", default="INFO")
a = ap.parse_args({SHARD_ARGS})
assert a.shard == 3 and a.threads == 2
"""

TYPER_CODE = f"""
import typer
app = typer.Typer(add_completion=False)
@app.command()
def main(index: str = typer.Option(...), shard: int = typer.Option(...), endpoint: str = typer.Option(...),
         gpu: str = typer.Option(None), threads: int = 1, params: str = "", parent_pid: int = 0,
         log_level: str = "INFO"):
    assert shard == 3 and threads == 2
app({SHARD_ARGS}, standalone_mode=False)
"""


def bench_args(n: int) -> str:
    import typer

    codes = {"interpreter only (`pass`)": "pass", "argparse: import + 8-option parser + parse": ARGPARSE_CODE,
             "typer: import + 8-option command + parse": TYPER_CODE,
             "context: `import retriever.shard` (numpy, zmq, scout modules)": "import retriever.shard"}
    try:
        import faiss  # noqa: F401

        codes["context: `import retriever.shard, faiss` (what a shard loads before its index)"] = \
            "import retriever.shard, faiss"
    except ImportError:
        pass
    t = proc_times(codes, n)
    base = t["interpreter only (`pass`)"]
    rows = [[name, f"{v * 1e3:.1f}", f"{(v - base) * 1e3:+.1f}"] for name, v in t.items()]
    return "\n\n".join([f"### 3. Shard child start-up: argparse vs typer {typer.__version__} "
                        f"(fresh processes, median of {n}, interleaved)",
                        table(["python -c ...", "wall ms", "over the bare interpreter, ms"], rows)])


# --------------------------------------------------------------------------------- 4. plotting
HAND_DRAWN = re.compile(r"ImageDraw|from PIL|<svg|<polyline|IHDR|zlib\.compress|[▁▂▃▄▅▆▇█]|turtle|curses")
MATPLOTLIB = re.compile(r"^\s*(import matplotlib|from matplotlib)", re.M)


def bench_plotting() -> str:
    me = Path(__file__).resolve()
    mpl, hand = [], []
    for f in sorted(ROOT.rglob("*.py")):
        rel = f.relative_to(ROOT)
        if f == me or rel.parts[0] in (".venv", ".git", "tests") or "site-packages" in rel.parts:
            continue
        text = f.read_text(errors="replace")
        if MATPLOTLIB.search(text):
            mpl.append(str(rel))
        hand += [f"{rel}:{text.count(chr(10), 0, m.start()) + 1} `{m.group(0)}`" for m in HAND_DRAWN.finditer(text)]
    verdict = ("no hand-drawn plotting: every plot goes through matplotlib" if not hand
               else "possible hand-drawn plotting found: see the list")
    return "\n\n".join(["### 4. Plotting (source scan, tests excluded)",
                        table(["check", "result"], [["files importing matplotlib", ", ".join(mpl) or "none"],
                                                    ["hand-drawing markers (PIL/SVG/PNG bytes/block chars)",
                                                     "; ".join(hand) or "none"],
                                                    ["verdict", verdict]])])


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small run (about 20 s)")
    ap.add_argument("--requests", type=int, default=None, help="GET /metrics per client per round (500)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per server (3)")
    ap.add_argument("--stall", type=float, default=None, help="seconds the slow client stalls (5)")
    args = ap.parse_args()
    requests = args.requests or (50 if args.quick else 500)
    rounds = args.rounds or (1 if args.quick else 3)
    stall = args.stall if args.stall is not None else (1.0 if args.quick else 5.0)
    loads, procs, arg_runs = (10, 3, 3) if args.quick else (50, 5, 7)
    load_avg = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    t0 = time.perf_counter()
    print(f"## Hand-written vs library (python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"load average {load_avg}{', --quick' if args.quick else ''})\n")
    for part in (lambda: bench_http(requests, rounds, stall), lambda: bench_config(loads, procs),
                 lambda: bench_args(arg_runs), bench_plotting):
        print(part(), end="\n\n", flush=True)
    print(f"(bench wall time {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
