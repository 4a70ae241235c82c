"""Load and abuse on loopback, bounded in count and time: normal GETs timed while slow,
idle or oversized clients are connected. Used by the compat tests and `invoke bench`.
Every connection goes to 127.0.0.1 only."""

from __future__ import annotations

import socket
import ssl
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

HOST = "127.0.0.1"


def get(
    port: int,
    path: str = "/api2/json/version",
    timeout: float = 10.0,
    tls: ssl.SSLContext | None = None,
    headers: str = "",
) -> int:
    """One GET, plain or over TLS (a new connection and a full handshake each time, as a
    client without keep-alive makes them); the HTTP status (0 when the connection failed)."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as raw:
            s = tls.wrap_socket(raw, server_hostname=HOST) if tls else raw
            s.sendall(
                f"GET {path} HTTP/1.1\r\nHost: localhost\r\n{headers}Connection: close\r\n\r\n".encode()
            )
            head = s.recv(64)
            return int(head.split()[1]) if head.startswith(b"HTTP/") else 0
    except (OSError, ValueError, IndexError):
        return 0


class Session:
    """One connection kept open for request after request (HTTP/1.1 keep-alive), as a
    Proxmox client's session (proxmoxer on requests) uses the API; it connects again when
    the server closes. ``get`` gives the HTTP status (0 when the request failed)."""

    def __init__(self, port: int, tls: ssl.SSLContext | None = None, timeout: float = 10.0):
        self.port, self.tls, self.timeout = port, tls, timeout
        self.sock: socket.socket | None = None
        self.connections = 0

    def _connect(self) -> socket.socket:
        raw = socket.create_connection((HOST, self.port), timeout=self.timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as urllib3 (requests) sets it
        self.connections += 1
        return self.tls.wrap_socket(raw, server_hostname=HOST) if self.tls else raw

    def get(self, path: str = "/api2/json/version", headers: str = "") -> int:
        try:
            if self.sock is None:
                self.sock = self._connect()
            self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n{headers}\r\n".encode())
            buf = b""
            while b"\r\n\r\n" not in buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("closed before the answer")
                buf += chunk
            head, _, body = buf.partition(b"\r\n\r\n")
            fields = {
                k.strip().lower(): v.strip().lower()
                for k, _, v in (line.partition(b":") for line in head.split(b"\r\n")[1:])
            }
            size = int(fields.get(b"content-length", b"0"))
            while len(body) < size:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("closed in the body")
                body += chunk
            if fields.get(b"connection") != b"keep-alive":
                self.close()
            return int(head.split()[1])
        except (OSError, ValueError, IndexError):
            self.close()
            return 0

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def insecure_client() -> ssl.SSLContext:
    """A TLS client context that accepts a lab node's self-signed certificate (loopback only)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@dataclass
class Latency:
    requests: int
    ok: int
    seconds: float
    p50_ms: float
    p99_ms: float
    max_ms: float

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0


def measure(
    port: int,
    requests: int = 400,
    concurrency: int = 8,
    deadline: float = 60.0,
    tls: ssl.SSLContext | None = None,
    headers: str = "",
    keep_alive: bool = False,
) -> Latency:
    """``requests`` GETs from ``concurrency`` threads; latency percentiles of each. Each
    GET on a new connection, or with ``keep_alive`` each thread's on its own
    :class:`Session` (its connection, and its handshake, counted in its first GET)."""
    times: list[float] = []
    ok = [0]
    lock = threading.Lock()
    todo = iter(range(requests))
    stop = time.monotonic() + deadline

    def client() -> None:
        session = Session(port, tls) if keep_alive else None
        while time.monotonic() < stop:
            with lock:
                if next(todo, None) is None:
                    break
            t0 = time.monotonic()
            status = session.get(headers=headers) if session else get(port, tls=tls, headers=headers)
            with lock:
                times.append(time.monotonic() - t0)
                ok[0] += status == 200
        if session:
            session.close()

    t0 = time.monotonic()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(deadline + 5)
    took = time.monotonic() - t0
    ms = sorted(t * 1000 for t in times) or [0.0]
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return Latency(len(times), ok[0], took, statistics.median(ms), p99, ms[-1])


@contextmanager
# Long on purpose: two small client loops and their start/stop, kept together as one context.
def slow_clients(port: int, idle: int = 300, trickle: int = 100, seconds: float = 30.0) -> Iterator[dict]:
    """``idle`` connections that send nothing and ``trickle`` ones that send a request one
    byte at a time, for at most ``seconds``; they reconnect when the server drops them."""
    stop = threading.Event()
    counts = {"connections": 0, "dropped": 0}
    request = b"GET /api2/json/version HTTP/1.1\r\nHost: localhost\r\nX-Pad: " + b"a" * 200 + b"\r\n\r\n"

    def idler() -> None:
        while not stop.is_set():
            try:
                s = socket.create_connection((HOST, port), timeout=5)
                counts["connections"] += 1
                s.settimeout(0.5)
                while not stop.is_set():
                    try:
                        if s.recv(1) == b"":
                            break
                    except TimeoutError:
                        continue
                counts["dropped"] += 1
                s.close()
            except OSError:
                stop.wait(0.2)

    def trickler() -> None:
        while not stop.is_set():
            try:
                s = socket.create_connection((HOST, port), timeout=5)
                counts["connections"] += 1
                for b in request:
                    if stop.is_set():
                        break
                    s.sendall(bytes([b]))
                    stop.wait(1.0)
                counts["dropped"] += 1
                s.close()
            except OSError:
                stop.wait(0.2)

    threads = [threading.Thread(target=idler, daemon=True) for _ in range(idle)]
    threads += [threading.Thread(target=trickler, daemon=True) for _ in range(trickle)]
    for t in threads:
        t.start()
    timer = threading.Timer(seconds, stop.set)
    timer.start()
    time.sleep(1.0)  # let them connect
    try:
        yield counts
    finally:
        stop.set()
        timer.cancel()
        for t in threads:
            t.join(2)


def oversized(port: int, clients: int = 64, megabytes: int = 4) -> list[int]:
    """``clients`` at once each try to send ``megabytes`` MiB of headers; their statuses."""
    results: list[int] = []
    chunk = b"X-Junk: " + b"j" * 60000 + b"\r\n"  # just under http.server's 64 KiB line limit

    def one() -> None:
        try:
            with socket.create_connection((HOST, port), timeout=10) as s:
                s.sendall(b"GET /api2/json/version HTTP/1.1\r\nHost: localhost\r\n")
                sent = 0
                try:
                    while sent < megabytes << 20:
                        s.sendall(chunk)
                        sent += len(chunk)
                except OSError:
                    pass  # the server closed on us: expected
                try:
                    head = s.recv(64)
                except OSError:
                    head = b""
                results.append(int(head.split()[1]) if head.startswith(b"HTTP/") else 0)
        except OSError:
            results.append(0)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results
