"""Transport: real ZeroMQ sockets between processes, CURVE authentication, loopback binds."""

from __future__ import annotations

import subprocess

import pytest
import zmq

from common.config import ConfigError, TransportConfig
from common.protocol import ErrorReply, Heartbeat
from common.transport import TransportTimeout, bind, check_bind_address, connect, generate_keys, recv, send


def _start_server(procs, endpoint, curve_dir=None):
    args = ["-m", "tests.helpers.echo_server", endpoint] + ([str(curve_dir)] if curve_dir else [])
    p = procs.start(args, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def _ping(ctx, endpoint, cfg, seq=1, key="client", timeout_ms=3000):
    sock = connect(ctx, zmq.DEALER, endpoint, cfg, client_key=key)
    try:
        send(sock, Heartbeat(peer_id="c", run_id="r", seq=seq))
        return recv(sock, timeout_ms)
    finally:
        sock.close(0)


def test_request_reply_and_bad_input(procs, ipc_path):
    ep = ipc_path()
    _start_server(procs, ep)
    ctx = zmq.Context()
    cfg = TransportConfig()
    assert _ping(ctx, ep, cfg, seq=41).seq == 42
    raw = ctx.socket(zmq.DEALER)
    raw.connect(ep)
    raw.send_multipart([b"\x93garbage"])
    assert raw.poll(3000)
    from common.wire import decode
    err = decode(raw.recv_multipart())
    assert isinstance(err, ErrorReply) and err.code == "bad_request" and "msgpack" in err.message
    assert _ping(ctx, ep, cfg, seq=1).seq == 2  # still serving
    raw.close(0)
    ctx.term()


def test_curve_refuses_peer_without_authorised_key(procs, free_port, tmp_path):
    keys = tmp_path / "keys"
    generate_keys(keys, clients=("actor",))
    rogue = tmp_path / "rogue"
    generate_keys(rogue, clients=("actor",))  # a valid key pair, but not authorised by the server
    ep = f"tcp://127.0.0.1:{free_port()}"
    _start_server(procs, ep, keys)
    ctx = zmq.Context()
    good = TransportConfig(curve_dir=str(keys))
    assert _ping(ctx, ep, good, key="actor").seq == 2
    # same server public key, unauthorised client key: no handshake, no reply
    (rogue / "server.key").write_bytes((keys / "server.key").read_bytes())
    with pytest.raises(TransportTimeout):
        _ping(ctx, ep, TransportConfig(curve_dir=str(rogue)), key="actor", timeout_ms=1500)
    # a plain-text peer gets nothing either
    with pytest.raises(TransportTimeout):
        _ping(ctx, ep, TransportConfig(), timeout_ms=1500)
    # and the server keeps serving the authorised peer
    assert _ping(ctx, ep, good, seq=7, key="actor").seq == 8
    ctx.term()


def test_binds_are_loopback_only_by_default():
    cfg = TransportConfig()
    check_bind_address("tcp://127.0.0.1:5555", cfg)
    check_bind_address("ipc:///tmp/x", cfg)
    with pytest.raises(ConfigError, match="allow_external_bind"):
        check_bind_address("tcp://*:5555", cfg)
    with pytest.raises(ConfigError, match="allow_external_bind"):
        check_bind_address("tcp://0.0.0.0:5555", cfg)
    check_bind_address("tcp://0.0.0.0:5555", TransportConfig(allow_external_bind=True))
    with pytest.raises(ConfigError, match="expected tcp"):
        check_bind_address("udp://1.2.3.4:1", cfg)


def test_receive_times_out_instead_of_hanging(ipc_path):
    ctx = zmq.Context()
    sock = bind(ctx, zmq.ROUTER, ipc_path(), TransportConfig())
    with pytest.raises(TransportTimeout):
        recv(sock, 200)
    sock.close(0)
    ctx.term()


def test_free_ports_lie_below_the_ephemeral_range_and_are_never_repeated():
    """Tests hand out ports before their users bind them; a port from the kernel's ephemeral range
    can meanwhile become an outgoing connection's local end (a CI failure: actor_port + 1 taken).
    Runs of `count` ports are all free, and no port is handed out twice in one process."""
    import socket

    from common.transport import _ephemeral_low, free_tcp_port

    seen: set[int] = set()
    for count in (1, 1, 3, 9, 2):
        base = free_tcp_port(count=count)
        run = set(range(base, base + count))
        assert base + count - 1 < _ephemeral_low() and not run & seen
        seen |= run
        for port in run:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port))
