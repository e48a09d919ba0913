"""CurveZMQ authentication on every ZeroMQ socket of the real roles (issue #8, item 5).

    keys   `cli.py keys generate`: server pair + authorised "client" pair; a rogue folder whose
           client pair is valid CURVE but not authorised (it knows the real server public key)
    roles  `cli.py retriever` + `cli.py learner`, transport.curve_dir set (bench.fuzz's tiny world)
    per socket (retriever ROUTER, learner ingest ROUTER, learner weight-sync ROUTER):
           authorised client → answered;  plain client / rogue key → nothing at all
    rogue  Hello / TrajectoryGroup / SyncJoin impersonating the authorised actor: the learner
           accepts no group (counters, log, dispatcher), releases no prompt, adds no member;
           the authorised actor's groups are accepted afterwards and the learner trains on them
    HTTP   /metrics, /health, /retrieve are plain HTTP (not CURVE): loopback unless
           transport.allow_external_bind, and every role refuses a wider bind at start
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import time
import uuid

import pytest
import zmq

from bench.fuzz import N_SAMPLES, _group, get, metric, start_world
from common import protocol as P
from common import wire as W
from common.weightsync import messages as S
from common.config import TransportConfig
from common.wire import decode, encode
from common.transport import connect, generate_keys
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("auth")
    keys, rogue = base / "keys", base / "rogue"
    subprocess.run([sys.executable, "cli.py", "keys", "generate", str(keys)], cwd=ROOT, check=True,
                   capture_output=True, timeout=60)
    generate_keys(rogue)  # a well-formed key pair the learner and retriever never authorised
    shutil.copy(keys / "server.key", rogue / "server.key")  # ... that knows the real server's public key
    w, roles = start_world(base, actor=False, curve_dir=str(keys))
    w.update(keys=keys, rogue=rogue, roles=roles)
    try:
        yield w
    finally:
        roles.stop()


def endpoints(w) -> dict[str, str]:
    p = w["ports"]
    return {"retriever": f"tcp://127.0.0.1:{p['retriever']}", "ingest": f"tcp://127.0.0.1:{p['ingest']}",
            "sync": f"tcp://127.0.0.1:{p['sync']}"}


class Peer:
    """A DEALER as one kind of client: "authorised" (the real client key), "rogue" (a valid but
    unauthorised key) or "plain" (no CURVE at all)."""

    def __init__(self, w, kind: str, endpoint: str):
        self.ctx = zmq.Context()
        if kind == "plain":
            self.sock = self.ctx.socket(zmq.DEALER)
            self.sock.connect(endpoint)
        else:
            cfg = TransportConfig(curve_dir=str(w["keys" if kind == "authorised" else "rogue"]))
            self.sock = connect(self.ctx, zmq.DEALER, endpoint, cfg)
        self.sock.setsockopt(zmq.LINGER, 0)

    def ask(self, msg: W.Message, timeout_ms: int) -> W.Message | None:
        try:
            self.sock.send_multipart(encode(msg), flags=zmq.NOBLOCK)
        except zmq.Again:  # the handshake failed and the connection is gone: nothing can even be sent
            return None
        if not self.sock.poll(timeout_ms):
            return None
        return decode(self.sock.recv_multipart())

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def probes() -> dict[str, W.Message]:
    return {"retriever": P.RetrieveRequest(request_id="r1", queries=["capital"], topk=2),
            "ingest": P.Hello(role="actor", peer_id="probe", run_id=uuid.uuid4().hex),
            "sync": S.SyncJoin(peer_id="rogue-sync", run_id=uuid.uuid4().hex, version=-1, transports=["zmq"])}


def learner_metrics(w) -> str:
    return f"http://127.0.0.1:{w['ports']['learner_metrics']}/metrics"


def test_unauthorised_peers_get_nothing_from_any_socket(world):
    eps, msgs = endpoints(world), probes()
    for kind in ("plain", "rogue"):
        for name in ("retriever", "ingest", "sync"):
            peer = Peer(world, kind, eps[name])
            try:
                assert peer.ask(msgs[name], 1500) is None, f"{kind} client got an answer from {name}"
            finally:
                peer.close()
    log = world["roles"].logs["learner"].read_text()
    assert "rogue-sync" not in log and "probe" not in log, "an unauthorised message reached the learner"
    # the authorised client is served on the same sockets
    peer = Peer(world, "authorised", eps["retriever"])
    reply = peer.ask(msgs["retriever"], 30000)
    peer.close()
    assert isinstance(reply, P.RetrieveReply) and len(reply.results[0]) == 2
    peer = Peer(world, "authorised", eps["ingest"])
    assert isinstance(peer.ask(msgs["ingest"], 30000), P.HelloAck)
    peer.close()


def test_authorised_sync_member_receives_weights(world):
    from common.weightsync.client import SyncClient, follow_sync
    from common.weightsync.receiver import BucketReceiver

    client = SyncClient(endpoints(world)["sync"], "good-sync", uuid.uuid4().hex,
                        TransportConfig(curve_dir=str(world["keys"])), transports=("zmq",))
    receiver = BucketReceiver()
    loaded = []
    try:
        client.join(-1)
        deadline = time.monotonic() + 60
        while not loaded and time.monotonic() < deadline:
            res = follow_sync(client, client.poll(500), receiver.setup,
                              lambda h, d: loaded.extend(receiver.receive(h, d)))
            assert res is None or res["ok"], res
    finally:
        client.close()
    assert loaded and all(t.numel() for _, t in loaded), "no weights reached the authorised member"


def test_rogue_cannot_inject_trajectories(world):
    eps, rng = endpoints(world), random.Random(3)
    good = Peer(world, "authorised", eps["ingest"])
    run = uuid.uuid4().hex
    assert isinstance(good.ask(P.Hello(role="actor", peer_id="actor-a", run_id=run), 30000), P.HelloAck)
    work = good.ask(P.WorkRequest(peer_id="actor-a", run_id=run, max_prompts=2, version=-1), 30000)
    assert isinstance(work, P.WorkAssignment) and len(work.prompts) == 2
    groups = [_group(rng, world["vocab"], n=N_SAMPLES, prompt_id=p.prompt_id, version=work.version, peer="actor-a",
                     run=run) for p in work.prompts]
    url = learner_metrics(world)
    # the rogue impersonates actor-a: a restart announcement (would re-queue its prompts), its groups
    # (would fill its credits and train the learner), and the groups' ids (would mark them duplicates)
    for kind in ("rogue", "plain"):
        rogue = Peer(world, kind, eps["ingest"])
        try:
            assert rogue.ask(P.Hello(role="actor", peer_id="actor-a", run_id=uuid.uuid4().hex), 1500) is None
            for g in groups:
                assert rogue.ask(g, 1500) is None
        finally:
            rogue.close()
    assert metric(url, "scout_learner_groups_received_total") == 0
    assert metric(url, "scout_learner_prompts_requeued_total") == 0
    assert json.loads(get(f"http://127.0.0.1:{world['ports']['learner_metrics']}/health")[1])["step"] == 0
    # the real actor's groups are still fresh to the learner: accepted, and trained on
    for g in groups:
        ack = good.ask(g, 30000)
        assert isinstance(ack, P.GroupAck) and ack.accepted and ack.reason == "", ack
    good.close()
    assert metric(url, "scout_learner_groups_received_total", result="accepted") == 2
    deadline = time.monotonic() + 120
    while json.loads(get(f"http://127.0.0.1:{world['ports']['learner_metrics']}/health")[1])["step"] < 1:
        assert time.monotonic() < deadline, "the learner did not train on the authorised groups"
        time.sleep(0.5)


def test_http_endpoints_are_plain_http_on_loopback_only(world, tmp_path):
    """CURVE covers ZeroMQ only: /metrics, /health and /retrieve stay plain HTTP, so every role
    refuses to bind them beyond loopback unless transport.allow_external_bind is set."""
    p = world["ports"]
    assert get(f"http://127.0.0.1:{p['learner_metrics']}/health")[0] == 200  # no key needed: loopback only
    assert get(f"http://127.0.0.1:{p['retriever_metrics']}/metrics")[0] == 200
    cfg = str(world["cfg"])
    wide = [("retriever", ["--set", "retriever.http_host=0.0.0.0"]),
            ("retriever", ["--set", "metrics.host=0.0.0.0"]),
            ("actor", ["--set", "metrics.host=0.0.0.0"]),
            ("learner", ["--set", "metrics.host=0.0.0.0", "--set", "learner.ingest_endpoint=tcp://127.0.0.1:0",
                         "--set", "learner.sync_endpoint=tcp://127.0.0.1:0", "--set", "learner.store_port=0"])]
    for role, extra in wide:
        r = subprocess.run([sys.executable, "cli.py", role, "--config", cfg, *extra], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 2 and "allow_external_bind" in r.stdout + r.stderr, (role, extra, r.stderr[-2000:])


def test_roles_that_bound_with_curve_stop_promptly(world):
    """Last in the module: SIGTERM ends the learner and the retriever within seconds. The learner's
    weight-sync context was terminated with its CURVE authenticator still running, and
    `ctx.term()` waited for the authenticator's socket: the learner hung until SIGKILL."""
    import os
    import signal

    procs = world["roles"].procs
    for role in ("learner", "retriever"):
        os.killpg(procs[role].pid, signal.SIGTERM)
    for role in ("learner", "retriever"):
        try:
            rc = procs[role].wait(timeout=15)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{role} still running 15 s after SIGTERM\n{world['roles'].tail()}") from None
        assert rc == 0, (role, rc, world["roles"].tail())
