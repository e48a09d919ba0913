"""A TCP relay for partition tests: client ──▶ relay (listen port) ──▶ upstream (host, port).

    relay = Relay(("127.0.0.1", learner_ingest_port)).start()
    actor's learner_endpoint = relay.endpoint
    relay.blackhole()          # nothing crosses, no connection is closed
    relay.blackhole("down")    # only upstream → client (e.g. the learner's answers) stops
    relay.heal()               # everything held so far is forwarded, in order

A blackholed direction is simply not read: the bytes stay in the kernel's buffers (then the
sender's), as with a real partition that TCP retransmits across once it heals; with
`drop=True` they are read and thrown away instead (lost for good). A client that connects
while the upstream direction is cut is accepted, but its upstream connection is only opened at
heal (its SYN would not get through either); one that gave up (closed) before the heal never
reaches upstream at all. End of stream on one side is passed on (shutdown
of the other side's writing) once that direction flows again. One thread, `selectors`, no
pickling; `close()` ends every connection.
"""

from __future__ import annotations

import selectors
import socket
import threading
import time

UP, DOWN = "up", "down"  # up: client → upstream, down: upstream → client
CHUNK = 65536
BUF_MAX = 8 << 20  # bytes held per direction; beyond it the kernel's buffers (then the sender) hold the rest


class _Pipe:
    """One direction of one relayed connection."""

    def __init__(self, src: socket.socket, dst: socket.socket | None, direction: str):
        self.src, self.dst, self.direction = src, dst, direction
        self.buf = bytearray()  # read, not yet written to dst
        self.eof = False  # src sent FIN
        self.shut = False  # dst's writing side was shut down after eof


class Relay:
    def __init__(self, upstream: tuple[str, int], host: str = "127.0.0.1", port: int = 0):
        self.upstream = upstream
        self.listener = socket.create_server((host, port))
        self.listener.setblocking(False)
        self.host, self.port = self.listener.getsockname()[:2]
        self.endpoint = f"tcp://{self.host}:{self.port}"
        self.cut: set[str] = set()
        self.drop = False
        self.conns: list[list[_Pipe]] = []  # [up, down] per client
        self.stats = {"connections": 0, "bytes_up": 0, "bytes_down": 0, "dropped": 0}
        self.events: list[tuple[float, str]] = []  # (time.time(), what): for the test's timeline
        self._lock = threading.Lock()
        self._sel = selectors.DefaultSelector()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="relay", daemon=True)

    # ------------------------------------------------------------------ switches
    def start(self) -> "Relay":
        self._sel.register(self.listener, selectors.EVENT_READ, None)
        self._thread.start()
        return self

    def blackhole(self, directions: str = "both", drop: bool = False) -> float:
        """Stop forwarding `directions` ("both", "up" or "down"); no connection is closed."""
        with self._lock:
            self.cut |= {UP, DOWN} if directions == "both" else {directions}
            self.drop = drop
        return self._event(f"blackhole {directions}{' (drop)' if drop else ''}")

    def heal(self) -> float:
        with self._lock:
            self.cut.clear()
        return self._event("heal")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for pipes in self.conns:
            for p in pipes:
                _close(p.src)
        self.listener.close()
        self._sel.close()

    def _event(self, what: str) -> float:
        t = time.time()
        self.events.append((t, what))
        return t

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                cut, drop = set(self.cut), self.drop
            self._update_interest(cut, drop)
            for key, mask in self._sel.select(0.05):
                with self._lock:  # the switches as they are now, not as before select()
                    cut, drop = set(self.cut), self.drop
                if key.data is None:
                    self._accept(cut)
                else:
                    self._service(key.data, mask, cut, drop)
            with self._lock:
                cut = set(self.cut)
            self._connect_deferred(cut)
            self._reap()

    def _accept(self, cut: set[str]) -> None:
        try:
            client, _ = self.listener.accept()
        except BlockingIOError:
            return
        client.setblocking(False)
        self.stats["connections"] += 1
        up, down = _Pipe(client, None, UP), _Pipe(None, client, DOWN)
        self.conns.append([up, down])
        if UP not in cut:
            self._open_upstream(up, down)

    def _open_upstream(self, up: _Pipe, down: _Pipe) -> None:
        try:
            s = socket.create_connection(self.upstream, timeout=5)
        except OSError:  # upstream is down: the client sees its connection end
            up.eof = down.eof = True
            _close(up.src)
            return
        s.setblocking(False)
        up.dst, down.src = s, s

    def _connect_deferred(self, cut: set[str]) -> None:
        if UP in cut:
            return
        for pipes in list(self.conns):
            up, down = pipes
            if up.dst is not None or up.src is None:
                continue
            while not up.eof and self._read(up, discard=False):  # see whether it has ended meanwhile
                pass
            if up.eof:  # the client gave up during the partition: its connection never got through
                _unregister(self._sel, up.src)
                _close(up.src)
                self.conns.remove(pipes)
            else:
                self._open_upstream(up, down)

    def _update_interest(self, cut: set[str], drop: bool) -> None:
        wanted: dict[socket.socket, list[_Pipe]] = {}
        for pipes in self.conns:
            for p in pipes:
                if p.src is None:
                    continue
                # read what flows (or is dropped); a connection not yet upstream is read to see it end
                readable = p.direction not in cut or drop or p.dst is None
                if not p.eof and readable and len(p.buf) < BUF_MAX:
                    wanted.setdefault(p.src, []).append(p)
                if p.buf and p.dst is not None and p.direction not in cut:
                    wanted.setdefault(p.dst, []).append(p)
        registered = {k.fileobj for k in self._sel.get_map().values() if k.data is not None}
        for s in registered - wanted.keys():
            self._sel.unregister(s)
        for s, pipes in wanted.items():
            ev = (selectors.EVENT_READ if any(p.src is s for p in pipes) else 0) | \
                 (selectors.EVENT_WRITE if any(p.dst is s for p in pipes) else 0)
            if s in registered:
                self._sel.modify(s, ev, s)
            else:
                self._sel.register(s, ev, s)

    def _service(self, s: socket.socket, mask: int, cut: set[str], drop: bool) -> None:
        for pipes in self.conns:
            for p in pipes:
                if mask & selectors.EVENT_READ and p.src is s and not p.eof:
                    self._read(p, discard=p.direction in cut and drop and p.dst is not None)
                if mask & selectors.EVENT_WRITE and p.dst is s and p.direction not in cut:
                    self._write(p)

    def _read(self, p: _Pipe, discard: bool) -> bool:
        """One recv into p.buf (or the bin); False when nothing was waiting."""
        try:
            data = p.src.recv(CHUNK)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            p.eof = True
        elif discard:
            self.stats["dropped"] += len(data)
        else:
            p.buf += data
        return True

    def _write(self, p: _Pipe) -> None:
        try:
            n = p.dst.send(p.buf)
        except BlockingIOError:
            return
        except OSError:  # the receiver is gone: this connection ends
            p.buf.clear()
            p.eof = True
            return
        del p.buf[:n]
        self.stats["bytes_up" if p.direction == UP else "bytes_down"] += n

    def _reap(self) -> None:
        """Pass on end of stream; close a connection once both directions have ended."""
        with self._lock:
            cut = set(self.cut)
        for pipes in list(self.conns):
            for p in pipes:
                if p.eof and not p.buf and not p.shut and p.dst is not None and p.direction not in cut:
                    p.shut = True
                    try:
                        p.dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
            if all(p.eof and not p.buf for p in pipes) and not (pipes[0].dst is None and UP in cut):
                for p in pipes:
                    if p.src is not None:
                        _unregister(self._sel, p.src)
                        _close(p.src)
                self.conns.remove(pipes)


def _close(s: socket.socket | None) -> None:
    if s is not None:
        try:
            s.close()
        except OSError:
            pass


def _unregister(sel: selectors.BaseSelector, s: socket.socket) -> None:
    try:
        sel.unregister(s)
    except (KeyError, ValueError):
        pass
