"""Issue #21, case 4: a network partition between an actor and the learner.

    `cli.py actor` ──DEALER──▶ Relay (tests/helpers/relay.py) ──▶ `cli.py learner` ingest ROUTER
          │                     blackhole(): nothing crosses, no connection is closed
          └── weight sync (control ROUTER + gloo/TCPStore): direct, outside the relay

- test_relay_holds_then_forwards / test_relay_drop_loses_bytes: the relay itself, with a plain
  TCP echo peer: a blackholed connection stays open and delivers nothing; at heal the held bytes
  arrive in order (drop mode: they are gone); a client that connected and gave up during the
  blackhole never reaches upstream.
- test_superseded_run_cannot_come_back: a real ingest socket; an actor run replaced by a newer
  run (the worker's new hello after a link loss) sends late messages (bytes a partition held
  back): they are refused, the newer run stays current and keeps its prompts.
- test_partition_between_actor_and_learner[15|30]: `cli.py learner` + `cli.py actor` (transformers
  engine, tiny model), the actor's learner endpoint on the relay. The learner's answers are cut
  first until one more group is accepted (its ack is then lost), then everything, for 15 s
  (`slow`; request_timeout_s 4, peer_timeout_s 8) or 30 s (`long`; 10 / 15). Asserts: the worker
  detects the silence (a new run id within the request deadline), the learner releases the silent
  run's prompts after peer_timeout_s, after the heal the worker's hello reaches the learner, its
  unacked groups are resent and the one the learner had accepted is answered "duplicate", no
  group_id is accepted twice, and the learner trains on the new run's groups.
"""

from __future__ import annotations

import re
import socket
import threading
import time
import urllib.request

import pytest
import zmq

from tests.helpers.relay import Relay

N_SAMPLES = 2


# --------------------------------------------------------------------------- the relay itself
@pytest.fixture
def echo():
    """A TCP server that echoes every byte back, one thread per connection."""
    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(c: socket.socket) -> None:
        with c:
            while data := c.recv(65536):
                c.sendall(data)

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=serve, args=(c,), daemon=True).start()

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    accepted = srv.getsockname()
    yield accepted
    stop.set()
    t.join(2)
    srv.close()


def _recv(c: socket.socket, n: int, timeout: float) -> bytes:
    c.settimeout(timeout)
    out = b""
    try:
        while len(out) < n:
            part = c.recv(n - len(out))
            if not part:
                break
            out += part
    except TimeoutError:
        pass
    return out


def _accepted(relay: Relay, n: int) -> None:
    deadline = time.monotonic() + 5
    while relay.stats["connections"] < n and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)  # its upstream connection is opened right after


def test_relay_holds_then_forwards(echo):
    relay = Relay(echo).start()
    try:
        c = socket.create_connection((relay.host, relay.port), timeout=5)
        c.sendall(b"before")
        assert _recv(c, 6, 5) == b"before"
        relay.blackhole()
        c.sendall(b"during")
        assert _recv(c, 6, 1.0) == b""  # nothing crosses, and the connection is not closed (no EOF)
        late = socket.create_connection((relay.host, relay.port), timeout=5)  # accepted, not yet upstream
        late.sendall(b"gave up")
        late.close()
        _accepted(relay, 2)
        time.sleep(0.2)  # ... and read its end
        c.sendall(b"!")
        relay.heal()
        assert _recv(c, 7, 5) == b"during!"  # held bytes arrive, in order
        c.close()
        time.sleep(0.5)
        assert relay.stats["connections"] == 2 and relay.stats["bytes_up"] == 13  # "gave up" never went upstream
    finally:
        relay.close()


def test_relay_drop_loses_bytes(echo):
    relay = Relay(echo).start()
    try:
        c = socket.create_connection((relay.host, relay.port), timeout=5)
        _accepted(relay, 1)  # established through the relay before the cut (drop applies to those)
        relay.blackhole(drop=True)
        c.sendall(b"lost")
        assert _recv(c, 4, 1.0) == b""
        relay.heal()
        c.sendall(b"kept")
        assert _recv(c, 4, 5) == b"kept"
        assert relay.stats["dropped"] == 4
    finally:
        relay.close()


# --------------------------------------------------------------------------- the learner's side
@pytest.fixture
def ingest(free_port):
    from common.config import load_config
    from learner.ingest import Dispatcher, IngestServer

    port = free_port()
    cfg = load_config(None, [f"learner.ingest_endpoint='tcp://127.0.0.1:{port}'", f"learner.n_samples={N_SAMPLES}",
                             "learner.groups_per_step=2", "learner.max_staleness=1"])
    rows = [{"question": f"q{i}?", "golden_answers": [f"a{i}"], "data_source": "t"} for i in range(10)]
    srv = IngestServer(cfg, Dispatcher(rows, seed=0), vocab_size=1000).start()
    yield srv, port
    srv.stop()


def test_superseded_run_cannot_come_back(ingest):
    from common.protocol import ErrorReply, Heartbeat, Hello, HelloAck, WorkAssignment, WorkRequest
    from common.transport import connect, recv, send

    srv, port = ingest
    ctx = zmq.Context()
    socks = [connect(ctx, zmq.DEALER, f"tcp://127.0.0.1:{port}", srv.cfg.transport) for _ in range(2)]
    try:
        old, new = socks  # two connections, as before and after the worker's link loss
        send(old, Hello(role="actor", peer_id="actor-p", run_id="run-old"))
        recv(old, 5000, HelloAck)
        send(new, Hello(role="actor", peer_id="actor-p", run_id="run-new"))
        recv(new, 5000, HelloAck)
        send(new, WorkRequest(peer_id="actor-p", run_id="run-new", max_prompts=2, version=0))
        assert len(recv(new, 5000, WorkAssignment).prompts) == 2
        # the old run's heartbeat, held back by the partition, arrives after the new run's hello
        send(old, Heartbeat(peer_id="actor-p", run_id="run-old", seq=7))
        reply = recv(old, 5000)
        assert isinstance(reply, ErrorReply) and "replaced by a newer run" in reply.message
        assert srv.peers["actor-p"].run_id == "run-new"
        assert srv.dispatcher.in_flight() == 2 and not srv.dispatcher.requeue  # the new run keeps its prompts
    finally:
        for s in socks:
            s.close(0)
        ctx.term()


# --------------------------------------------------------------------------- the partition, end to end
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from bench.faults import build_world

    return build_world(tmp_path_factory.mktemp("faults-partition-world"), questions=100)


def _counter(url: str, name: str, result: str, label: str = "result") -> int:
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    m = re.search(rf'^{name}{{[^}}]*{label}="{result}"[^}}]*}} ([0-9.e+]+)$', text, re.M)
    return int(float(m.group(1))) if m else 0


def _learner_counter(stack, result: str, name: str = "scout_learner_groups_received_total",
                     label: str = "result") -> int:
    return _counter(f"http://127.0.0.1:{stack.ports['learner_metrics']}/metrics", name, result, label)


def _worker_counter(stack, result: str) -> int:
    return _counter(f"http://127.0.0.1:{stack.ports['actor_metrics'] + 1}/metrics", "scout_actor_groups_total", result)


def partition(stack, relay: Relay, partition_s: float, timeout: float = 400.0) -> dict:
    """Warm up, cut the learner's answers until one more group is accepted, cut everything for
    `partition_s` (from the first cut), heal; follow the worker back. Returns the timeline."""
    watch = ("learner", "actor")
    stack.start("learner")
    stack.start("actor")
    stack.wait(lambda: len(stack.steps()) >= 2 and stack.health("actor", 0)["version"] >= 1, timeout,
               "2 steps and a worker holding broadcast weights", watch)
    old_run = stack.health("actor", 0)["run_id"]
    # cut while a group is being generated, so that one is sent (and accepted) with its ack held
    stack.wait(lambda: stack.health("actor", 0)["groups_in_flight"] >= 1, 60, "a group in flight", watch, poll_s=0.02)
    n0 = len(stack.groups())
    t_cut = relay.blackhole("down")  # the learner's answers stop first: an accepted group's ack is lost
    stack.wait(lambda: len(stack.groups()) > n0, 60, "a group accepted while its ack is held", watch, poll_s=0.05)
    relay.blackhole()
    new_run = stack.wait(lambda: (r := stack.health("actor", 0)["run_id"]) != old_run and r, 60,
                         "the worker's new run (partition detected)", watch, poll_s=0.05)
    t_detect = time.time()
    silent = f"(run {old_run}) silent for"
    swept = stack.wait(lambda: silent in stack.log("learner").read_text(errors="replace") and time.time(),
                       max(0.0, t_cut + partition_s - time.time()) + 30, "the learner releasing the silent run", watch)
    time.sleep(max(0.0, t_cut + partition_s - time.time()))
    steps_at_heal = len(stack.steps())
    t_heal = relay.heal()

    def latest() -> str:  # the worker's run id now (another link loss would have made a new one)
        return stack.health("actor", 0)["run_id"]

    def new_groups() -> list[float]:  # acceptance times (dump file mtimes) of the new run's groups
        run = latest()
        return [g["mtime"] for g in stack.groups() if str(g["run_id"]) == run and g["mtime"] >= t_heal]

    t_first = min(stack.wait(new_groups, timeout, "a group of the worker's new run accepted after the heal", watch))
    stack.wait(lambda: len(stack.steps()) >= steps_at_heal + 3, timeout, "3 steps after the heal", watch)
    repeated = lambda ids: len(set(ids)) < len(ids)  # noqa: E731
    stack.wait(lambda: _learner_counter(stack, "duplicate") or repeated([str(g["group_id"]) for g in stack.groups()]),
               30, "the resent group answered duplicate (or accepted again)", watch)
    return {"old_run": old_run, "new_run": new_run, "final_run": latest(), "t_cut": t_cut, "t_heal": t_heal,
            "detect_s": t_detect - t_cut, "silent_released_s": swept - t_cut, "heal_to_first_group_s": t_first - t_heal,
            "duplicates": _learner_counter(stack, "duplicate"), "resent": _worker_counter(stack, "resent"),
            "worker_duplicates": _worker_counter(stack, "duplicate"), "relay": dict(relay.stats),
            # late messages of the replaced run refused (bytes the partition held, after the new hello)
            "refused_late": _learner_counter(stack, "refused", "scout_learner_rejected_messages_total", "reason"),
            # groups of the old run the partition held back, accepted at the heal (before the new hello)
            "late_old_run_groups": sum(str(g["run_id"]) == old_run and g["mtime"] >= t_heal for g in stack.groups())}


@pytest.mark.parametrize("partition_s", [pytest.param(15.0, marks=pytest.mark.slow),
                                         pytest.param(30.0, marks=[pytest.mark.slow, pytest.mark.long])])
def test_partition_between_actor_and_learner(world, procs, tmp_path, partition_s):
    from bench.faults import Stack, check_group_whole

    # CI: deadlines scaled down with the partition (15 s); long: the 30 s
    request_timeout_s, peer_timeout_s = (4.0, 8.0) if partition_s < 30 else (10.0, 15.0)
    stack = Stack(tmp_path, world, start=procs.start)
    relay = Relay(("127.0.0.1", stack.ports["ingest"])).start()
    try:
        stack.write_config(actor={"no_search": True, "learner_endpoint": relay.endpoint, "heartbeat_s": 0.5,
                                  "request_timeout_s": request_timeout_s},
                           learner={"n_samples": N_SAMPLES, "peer_timeout_s": peer_timeout_s})
        r = partition(stack, relay, partition_s)
        print(f"\npartition: {r}")
    finally:
        relay.close()
    actor_log = stack.log("actor").read_text(errors="replace")
    learner_log = stack.log("learner").read_text(errors="replace")
    # detection within the request deadline (+ the heartbeat interval and scheduling slack), and a new run
    assert "learner link lost (no reply within" in actor_log
    assert r["detect_s"] <= request_timeout_s + 10, r
    assert r["new_run"] != r["old_run"]
    # the learner gave up on the silent run after peer_timeout_s and re-queued its prompts
    assert r["silent_released_s"] >= peer_timeout_s - 1, r
    # after the heal: the hello got through, the unacked groups went again, the accepted one once
    assert f"run {r['final_run']} said hello" in learner_log
    groups = stack.groups()
    ids = [str(g["group_id"]) for g in groups]
    assert len(ids) == len(set(ids)), "a group was accepted twice"
    assert "resending" in actor_log and r["resent"] >= 1 and r["duplicates"] >= 1, r
    for g in groups:
        check_group_whole(g, N_SAMPLES)
    # training goes on with the new run's groups
    steps = stack.steps()
    assert [s["step"] for s in steps] == list(range(1, len(steps) + 1))
    assert sum(str(g["run_id"]) == r["final_run"] and g["mtime"] >= r["t_heal"] for g in groups) >= 1
