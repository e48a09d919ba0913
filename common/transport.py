"""ZeroMQ helpers shared by every role.

- `bind` / `connect` make sockets with high-water marks, send/receive timeouts, linger and
  reconnect intervals from `TransportConfig`; binds are loopback-only unless
  `transport.allow_external_bind` is set.
- With `transport.curve_dir` set (a folder made by `cli.py keys generate`), servers require
  CurveZMQ and accept only clients whose public key sits in `<curve_dir>/authorized/`; a peer
  without an authorised key completes no handshake and gets no reply.
- `send` / `recv` move `common.protocol` messages as zero-copy multipart frames.
"""

from __future__ import annotations

import ipaddress
import os
import random
import socket as pysocket
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from common.config import ConfigError, TransportConfig
from common.wire import Message, ProtocolError, decode, encode

_auth_lock = threading.Lock()
_authenticators: dict[int, ThreadAuthenticator] = {}


class TransportTimeout(TimeoutError):
    """No message arrived (or could be sent) within the configured timeout."""


_handed_out: set[int] = set()
_handed_lock = threading.Lock()
_port_rng = random.SystemRandom()  # not the global generator, which a caller may have seeded


def _ephemeral_low() -> int:
    """First port of the kernel's range for outgoing connections (Linux; 32768 elsewhere)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _binds(host: str, port: int) -> bool:
    with pysocket.socket(pysocket.AF_INET, pysocket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_tcp_port(host: str = "127.0.0.1", count: int = 1) -> int:
    """The first of `count` consecutive ports that bind now, for tests, benches and the demo.

    Chosen below the kernel's ephemeral range: a port handed out by `bind(0)` is one the kernel
    may next give an outgoing connection's local end, which then takes it before its user binds
    it (seen in CI: a worker's metrics port, actor_port + 1). Never the same port twice in one
    process. Falls back to the kernel's choice when that range starts too low to leave room.
    """
    low, high = 10000, _ephemeral_low() - count
    tries = 500 if high > low else 0  # no room below the ephemeral range: only the kernel's choice
    with _handed_lock:
        for _ in range(tries):
            base = _port_rng.randint(low, high)
            ports = range(base, base + count)
            if not _handed_out.intersection(ports) and all(_binds(host, p) for p in ports):
                _handed_out.update(ports)
                return base
        if count != 1:
            raise RuntimeError(f"no {count} consecutive free ports found on {host}")
        with pysocket.socket(pysocket.AF_INET, pysocket.SOCK_STREAM) as s:
            s.bind((host, 0))
            return s.getsockname()[1]


def is_loopback(host: str) -> bool:
    if host in ("localhost", "lo"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def local_address_towards(host: str, port: int) -> str | None:
    """The address of this machine's interface that traffic to host:port leaves from, or None
    when the host does not resolve or is unreachable. A UDP connect sends nothing: it only asks
    the routing table."""
    try:
        family, _, _, _, addr = pysocket.getaddrinfo(host.strip("[]"), port or 1, type=pysocket.SOCK_DGRAM)[0]
        with pysocket.socket(family, pysocket.SOCK_DGRAM) as s:
            s.connect(addr)
            return s.getsockname()[0]
    except (OSError, IndexError):
        return None


def gloo_bind_address(store: Any, loopback: bool) -> str | None:
    """The address a weight-sync gloo group on `store` (a torch TCPStore, or PrefixStores over
    one) binds and tells its peers: 127.0.0.1 on loopback; else, unless GLOO_SOCKET_IFNAME names
    the interface, the one this machine reaches the configured store host from. Not the host
    name's address, which torch would take: Debian's /etc/hosts maps it to 127.0.1.1, many
    containers to 127.0.0.1, and peers on other machines cannot reach that.
    None: torch's default device (also when the store's address gives nothing better)."""
    if loopback:
        return "127.0.0.1"
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return None
    while hasattr(store, "underlying_store"):
        store = store.underlying_store
    address = local_address_towards(getattr(store, "host", ""), getattr(store, "port", 0))
    return None if address is None or is_loopback(address) else address


def check_bind_address(addr: str, cfg: TransportConfig) -> None:
    """Refuse to bind beyond loopback unless the config explicitly allows it."""
    parsed = urlparse(addr)
    if parsed.scheme in ("ipc", "inproc"):
        return
    if parsed.scheme != "tcp":
        raise ConfigError(f"endpoint {addr!r}: expected tcp://host:port, ipc://path or inproc://name")
    host = addr[len("tcp://"):].rsplit(":", 1)[0]
    if not is_loopback(host) and not cfg.allow_external_bind:
        raise ConfigError(
            f"endpoint {addr!r} binds beyond loopback; set transport.allow_external_bind = true "
            "(and preferably transport.curve_dir) to allow it")


def check_host_bind(host: str, cfg: TransportConfig, what: str) -> None:
    if not is_loopback(host) and not cfg.allow_external_bind:
        raise ConfigError(f"{what} {host!r} binds beyond loopback; set transport.allow_external_bind = true")


# --------------------------------------------------------------------------- CURVE keys
def generate_keys(directory: str | Path, clients: tuple[str, ...] = ("client",)) -> dict[str, Path]:
    """Make a server key pair and client key pairs; authorise the clients' public keys."""
    d = Path(directory)
    (d / "authorized").mkdir(parents=True, exist_ok=True)
    out = {}
    for name in ("server", *clients):
        public, secret = zmq.auth.create_certificates(str(d), name)
        out[name] = Path(secret)
        if name != "server":
            dst = d / "authorized" / Path(public).name
            dst.write_bytes(Path(public).read_bytes())
    for p in d.glob("*.key_secret"):
        p.chmod(0o600)
    return out


def _load_secret(curve_dir: str, name: str) -> tuple[bytes, bytes]:
    path = Path(curve_dir) / f"{name}.key_secret"
    if not path.is_file():
        raise ConfigError(f"transport.curve_dir: {path} is missing (run `cli.py keys generate`)")
    public, secret = zmq.auth.load_certificate(str(path))
    if secret is None:
        raise ConfigError(f"transport.curve_dir: {path} holds no secret key")
    return public, secret


def _ensure_authenticator(ctx: zmq.Context, curve_dir: str) -> None:
    with _auth_lock:
        if id(ctx) in _authenticators:
            return
        authorized = Path(curve_dir) / "authorized"
        if not authorized.is_dir():
            raise ConfigError(f"transport.curve_dir: {authorized} is missing")
        auth = ThreadAuthenticator(ctx)
        auth.start()
        auth.configure_curve(domain="*", location=str(authorized))
        _authenticators[id(ctx)] = auth


def stop_authenticator(ctx: zmq.Context) -> None:
    with _auth_lock:
        auth = _authenticators.pop(id(ctx), None)
    if auth is not None:
        auth.stop()


def term_context(ctx: zmq.Context) -> None:
    """Stop the context's CURVE authenticator, then terminate it. `ctx.term()` alone waits for
    every socket to close, the authenticator's ZAP socket included, and that one is closed only
    by `auth.stop()`: a process that bound with CURVE hung at exit until it was killed."""
    stop_authenticator(ctx)
    ctx.term()


# --------------------------------------------------------------------------- sockets
def _apply_options(sock: zmq.Socket, cfg: TransportConfig) -> None:
    sock.setsockopt(zmq.SNDHWM, cfg.hwm)
    sock.setsockopt(zmq.RCVHWM, cfg.hwm)
    sock.setsockopt(zmq.SNDTIMEO, cfg.send_timeout_ms)
    sock.setsockopt(zmq.RCVTIMEO, cfg.recv_timeout_ms)
    sock.setsockopt(zmq.LINGER, cfg.linger_ms)
    sock.setsockopt(zmq.RECONNECT_IVL, cfg.reconnect_ivl_ms)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, cfg.reconnect_ivl_max_ms)
    sock.setsockopt(zmq.MAXMSGSIZE, 4 << 30)


def bind(ctx: zmq.Context, sock_type: int, addr: str, cfg: TransportConfig) -> zmq.Socket:
    check_bind_address(addr, cfg)
    sock = ctx.socket(sock_type)
    _apply_options(sock, cfg)
    if cfg.curve_dir:
        _ensure_authenticator(ctx, cfg.curve_dir)
        public, secret = _load_secret(cfg.curve_dir, "server")
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_server = True
    try:
        sock.bind(addr)
    except zmq.ZMQError as e:
        sock.close(0)
        raise ConfigError(f"cannot bind {addr}: {e}") from None
    return sock


def connect(ctx: zmq.Context, sock_type: int, addr: str, cfg: TransportConfig,
            client_key: str = "client") -> zmq.Socket:
    sock = ctx.socket(sock_type)
    _apply_options(sock, cfg)
    if cfg.curve_dir:
        public, secret = _load_secret(cfg.curve_dir, client_key)
        server_public = (Path(cfg.curve_dir) / "server.key")
        if not server_public.is_file():
            raise ConfigError(f"transport.curve_dir: {server_public} is missing")
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_serverkey = zmq.auth.load_certificate(str(server_public))[0]
    sock.connect(addr)
    return sock


def bound_endpoint(sock: zmq.Socket) -> str:
    """The concrete endpoint after binding tcp://host:0 or similar."""
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def send(sock: zmq.Socket, msg: Message, envelope: list[Any] | None = None, flags: int = 0) -> None:
    frames = encode(msg)
    try:
        sock.send_multipart([*(envelope or []), *frames], flags=flags, copy=False)
    except zmq.Again:
        raise TransportTimeout(f"send of {msg.TYPE} timed out") from None


def recv_frames(sock: zmq.Socket, timeout_ms: int | None = None) -> list[zmq.Frame]:
    if timeout_ms is not None and not sock.poll(timeout_ms, zmq.POLLIN):
        raise TransportTimeout(f"no message within {timeout_ms} ms")
    try:
        return sock.recv_multipart(copy=False)
    except zmq.Again:
        raise TransportTimeout("receive timed out") from None


def recv(sock: zmq.Socket, timeout_ms: int | None = None, expect=None) -> Message:
    """Receive one message on a socket without an envelope (DEALER/REQ/PULL/SUB)."""
    return decode(recv_frames(sock, timeout_ms), expect)


def split_envelope(frames: list[Any]) -> tuple[list[Any], list[Any]]:
    """ROUTER frames -> (identity envelope, message frames). Our DEALERs send no empty
    delimiter, so the envelope is the single identity frame."""
    if len(frames) < 2:
        raise ProtocolError("routed message without payload")
    return frames[:1], frames[1:]


def request(sock: zmq.Socket, msg: Message, timeout_ms: int, expect=None) -> Message:
    """Send on a DEALER and wait for one reply (the caller matches ids if it pipelines)."""
    send(sock, msg)
    return recv(sock, timeout_ms, expect)
