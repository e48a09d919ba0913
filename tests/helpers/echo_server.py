"""A tiny ROUTER server for transport tests: answers Heartbeat with Heartbeat, anything
malformed with ErrorReply. Run: python -m tests.helpers.echo_server ENDPOINT [CURVE_DIR]"""

from __future__ import annotations

import signal
import sys

import zmq

from common.config import TransportConfig
from common.wire import ProtocolError, decode
from common.protocol import ErrorReply, Heartbeat
from common.transport import bind, send, split_envelope


def main() -> None:
    endpoint = sys.argv[1]
    cfg = TransportConfig(curve_dir=sys.argv[2] if len(sys.argv) > 2 else None)
    ctx = zmq.Context()
    sock = bind(ctx, zmq.ROUTER, endpoint, cfg)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("ready", flush=True)
    while True:
        if not sock.poll(1000):
            continue
        env, frames = split_envelope(sock.recv_multipart(copy=False))
        try:
            msg = decode(frames, expect=Heartbeat)
            send(sock, Heartbeat(peer_id="server", run_id="s", seq=msg.seq + 1), envelope=env)
        except ProtocolError as e:
            send(sock, ErrorReply(code="bad_request", message=str(e)), envelope=env)


if __name__ == "__main__":
    main()
