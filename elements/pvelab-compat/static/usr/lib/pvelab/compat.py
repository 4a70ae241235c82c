"""Shared core of the pvelab compat services (Python stdlib only).

A small HTTP server built to stay available under slow, idle and oversized clients,
TCP "port proves it listens" listeners, a UDP sink, config loading and a signal-aware
main loop.  Runs on Debian trixie's python3 and on the build host's.

How the HTTP server stays up (one I/O thread, a few workers):

* one thread accepts and reads every connection without blocking (``selectors``): an
  idle or slow client costs a socket and a small buffer, never a thread, and accepting
  is never held up by busy workers;
* a request must arrive whole within ``REQUEST_TIMEOUT`` seconds of the connection
  (a deadline for the whole request, not per read): later, 408 and closed;
* the request head is capped at ``MAX_HEAD_BYTES`` (414/431) and ``MAX_HEADERS`` lines
  (431); a body is read only when its ``Content-Length`` is given and at most
  ``MAX_BODY_BYTES`` (413), within the same deadline (the body of a GET is not read);
* with a TLS context, each connection's first byte says which it speaks: a TLS
  handshake record (0x16) is answered with TLS, anything else is plain HTTP, on the same
  port.  The handshake runs on the I/O thread without blocking and within the request's
  deadline, so a client that stalls in it is just another slow client;
* at most ``MAX_CONNECTIONS`` connections are open: a new one evicts the oldest that
  has not finished its request, so slow clients cannot lock normal ones out;
* complete requests go to ``max_workers`` threads through a bounded queue (503 when
  full); answers are written back by the I/O thread, with their own deadline;
* a TLS connection carries up to ``KEEPALIVE_REQUESTS`` requests when the client asks
  for it (HTTP/1.1 without ``Connection: close``, no body on a GET), as pveproxy does
  and as a Proxmox client's session uses it: the next request has a new whole-request
  deadline, and a connection idle past it is closed quietly.  Plain HTTP (the spec's
  endpoints) stays one request per connection, ``Connection: close``.

Memory is bounded by ``MAX_CONNECTIONS * MAX_HEAD_BYTES`` (8 MiB) plus the queue.
"""

import argparse
import io
import json
import logging
import queue
import re
import resource
import selectors
import signal
import socket
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler

log = logging.getLogger("pvelab-compat")

MAX_WORKERS = 8  # threads answering complete requests (the answers are precomputed bytes)
REQUEST_TIMEOUT = 10.0  # seconds from connect to a complete request head
WRITE_TIMEOUT = 10.0  # seconds to take the answer
MAX_HEAD_BYTES = 8192  # request line + headers
MAX_HEADERS = 64  # header lines
MAX_CONNECTIONS = 1024  # open connections at once; the oldest unfinished one makes room
QUEUE_SIZE = 256  # complete requests waiting for a worker
MAX_BODY_BYTES = 65536  # a request body (a login form): larger is 413
TLS_RECORD = 0x16  # the first byte of a TLS handshake record (a ClientHello)
_CONTENT_LENGTH = re.compile(rb"^content-length:[ \t]*(\S*)[ \t]*\r?$", re.I | re.M)
LINGER = 2.0  # seconds to discard what a client still sends after its answer (no RST)
KEEPALIVE_REQUESTS = 100  # requests one TLS connection may carry, then Connection: close
_KEEP_ALIVE = b"\r\nConnection: keep-alive\r\n"  # in an answer's head: the connection stays open


def dumps(obj):
    """Compact JSON, key order as given (the spec's bodies are byte-exact)."""
    return json.dumps(obj, separators=(",", ":"))


def _raise_nofile(wanted=MAX_CONNECTIONS + 64):
    """Room for MAX_CONNECTIONS sockets (the unit's LimitNOFILE sets the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _status_line(code, reason):
    body = dumps({"data": None, "errors": {"request": reason}}).encode()
    return (
        f"HTTP/1.0 {code} {reason}\r\nContent-Type: application/json;charset=UTF-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


class _Conn:
    __slots__ = ("addr", "buf", "deadline", "keep", "out", "served", "sniffed", "sock", "state", "tls")

    def __init__(self, sock, addr, now):
        self.sock, self.addr = sock, addr
        self.buf = bytearray()
        self.deadline = now + REQUEST_TIMEOUT
        self.out = b""
        self.state = "reading"  # [handshake ->] reading -> working -> writing -> lingering
        self.sniffed = False  # the first byte has been looked at (TLS or plain)
        self.tls = False
        self.keep = False  # the request being answered may be followed by another
        self.served = 0  # requests answered on this connection


def keep_alive_asked(head):
    """Whether a complete request (head and any body) lets its connection carry the next
    one: HTTP/1.1, no ``Connection: close``, no ``Expect``, nothing the server does not
    read (a body on a GET or HEAD, a chunked body)."""
    line, _, headers = head.partition(b"\n")
    if not line.rstrip().endswith(b"HTTP/1.1"):
        return False
    fields = {}
    for raw in headers.split(b"\n"):
        name, sep, value = raw.partition(b":")
        if sep:
            fields[name.strip().lower()] = value.strip().lower()
    if b"close" in fields.get(b"connection", b"") or b"expect" in fields or b"transfer-encoding" in fields:
        return False
    return not (line.startswith((b"GET ", b"HEAD ")) and fields.get(b"content-length", b"0") != b"0")


def _body_length(head):
    """The declared body length of a request head (0 when none); ValueError if malformed."""
    m = _CONTENT_LENGTH.search(head)
    if not m:
        return 0
    value = m.group(1)
    if not value.isdigit():
        raise ValueError(value)
    return int(value)


class BoundedHTTPServer:
    """HTTP/1.0 server: ``routes`` maps a path to (status, content type, body) or to a
    callable returning that; ``handler`` (a BaseHTTPRequestHandler) makes the answers."""

    def __init__(self, address, handler, routes, max_workers=MAX_WORKERS, name="http", tls=None):
        self.routes, self.handler, self.name = routes, handler, name
        self.tls = tls  # an ssl.SSLContext (server side) or None: plain HTTP only
        self.max_workers = max_workers
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(address)
        self.sock.listen(1024)
        self.sock.setblocking(False)
        self.server_address = self.sock.getsockname()
        self._stop = threading.Event()
        self._work = queue.Queue(QUEUE_SIZE)
        self._done = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._conns = {}
        self._workers = []
        self.stats = {
            "accepted": 0,
            "answered": 0,
            "timed_out": 0,
            "evicted": 0,
            "too_large": 0,
            "busy": 0,
            "tls": 0,
            "tls_failed": 0,
        }

    @property
    def port(self):
        return self.server_address[1]

    # ------------------------------------------------------------------ I/O thread
    def serve_forever(self):
        _raise_nofile()
        for i in range(self.max_workers):
            t = threading.Thread(target=self._worker, name=f"{self.name}-w{i}", daemon=True)
            t.start()
            self._workers.append(t)
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ, "accept")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._sel = sel
        while not self._stop.is_set():
            for key, events in sel.select(timeout=0.25):
                if key.data == "accept":
                    self._accept()
                elif key.data == "wake":
                    self._drain_done()
                elif key.data.state == "handshake":
                    self._handshake(key.data)
                elif events & selectors.EVENT_READ:
                    if key.data.state == "lingering":
                        self._discard(key.data)
                    else:
                        self._read(key.data)
                else:
                    self._write(key.data)
            self._expire(time.monotonic())
        for c in list(self._conns.values()):
            self._close(c)
        sel.close()

    def _accept(self):
        while True:
            try:
                sock, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: make room, try later
                log.warning("%s: accept: %s", self.name, exc)
                self._evict_oldest()
                return
            if len(self._conns) >= MAX_CONNECTIONS:
                self._evict_oldest()
            sock.setblocking(False)
            # each answer goes out in one write, so Nagle's delay buys nothing; with it, on
            # kept-open TLS connections about 1 answer in 100 came ~45 ms late (p99 48 ms
            # against 7 ms without, measured on loopback)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c = _Conn(sock, addr, time.monotonic())
            self._conns[sock.fileno()] = c
            self._sel.register(sock, selectors.EVENT_READ, c)
            self.stats["accepted"] += 1

    def _evict_oldest(self):
        reading = [c for c in self._conns.values() if c.state in ("reading", "handshake")]
        if reading:
            self.stats["evicted"] += 1
            self._close(min(reading, key=lambda c: c.deadline))

    def _sniff(self, c):
        """Look at the first byte: start a TLS handshake for a ClientHello. False: no
        byte yet (or the connection is gone), nothing to do now."""
        try:
            first = c.sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            first = b""
        if not first:
            self._close(c)
            return False
        c.sniffed = True
        if first[0] == TLS_RECORD and self.tls is not None:
            self._sel.unregister(c.sock)
            raw = c.sock
            try:
                c.sock = self.tls.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            except (OSError, ValueError):
                self._conns.pop(raw.fileno(), None)
                raw.close()
                return False
            c.tls, c.state = True, "handshake"
            self._sel.register(c.sock, selectors.EVENT_READ, c)
            self._handshake(c)
            return False
        return True

    def _handshake(self, c):
        try:
            c.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._sel.modify(c.sock, selectors.EVENT_READ, c)
            return
        except ssl.SSLWantWriteError:
            self._sel.modify(c.sock, selectors.EVENT_WRITE, c)
            return
        except (OSError, ValueError) as exc:  # not TLS after all, no shared cipher, reset...
            self.stats["tls_failed"] += 1
            log.info("%s: TLS handshake with %s failed: %s", self.name, c.addr[0], exc)
            self._close(c)
            return
        self.stats["tls"] += 1
        c.state = "reading"
        self._sel.modify(c.sock, selectors.EVENT_READ, c)
        self._read(c)  # the request may already sit in the TLS buffer

    def _recv(self, c):
        """What the client sent, b"" at its end, None when nothing is there yet."""
        try:
            data = c.sock.recv(4096)
            if c.tls:
                while c.sock.pending():
                    data += c.sock.recv(4096)
            return data
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return None
        except OSError:
            return b""

    def _read(self, c):
        if not c.sniffed and not self._sniff(c):
            return
        data = self._recv(c)
        if data is None:
            return
        if not data:
            self._close(c)
            return
        c.buf += data
        self._parse(c)

    def _parse(self, c):
        """Hand a complete request in ``c.buf`` to a worker, answer a bad one, or wait."""
        end = c.buf.find(b"\r\n\r\n")
        if end < 0:
            end = c.buf.find(b"\n\n")
        if end < 0:
            if len(c.buf) > MAX_HEAD_BYTES:
                first_line = c.buf.split(b"\n", 1)
                code = (
                    (414, "URI Too Long")
                    if len(first_line) == 1
                    else (431, "Request Header Fields Too Large")
                )
                self.stats["too_large"] += 1
                self._answer(c, _status_line(*code))
            return
        head = bytes(c.buf[: end + 4])
        if head.count(b"\n") > MAX_HEADERS + 2:
            self.stats["too_large"] += 1
            self._answer(c, _status_line(431, "Request Header Fields Too Large"))
            return
        if not head.startswith((b"GET ", b"HEAD ")):
            try:
                length = _body_length(head)
            except ValueError:
                self._answer(c, _status_line(400, "Bad Content-Length"))
                return
            if length > MAX_BODY_BYTES:
                self.stats["too_large"] += 1
                self._answer(c, _status_line(413, "Payload Too Large"))
                return
            if len(c.buf) < len(head) + length:
                return  # the rest of the body, within the same deadline
            head = bytes(c.buf[: len(head) + length])
        del c.buf[: len(head)]  # what follows is the client's next request (keep-alive)
        c.keep = c.tls and c.served + 1 < KEEPALIVE_REQUESTS and keep_alive_asked(head)
        c.state = "working"
        self._sel.unregister(c.sock)
        try:
            self._work.put_nowait((c, head))
        except queue.Full:
            self.stats["busy"] += 1
            self._sel.register(c.sock, selectors.EVENT_WRITE, c)
            c.state = "writing"
            c.out = _status_line(503, "Service Unavailable")
            c.deadline = time.monotonic() + WRITE_TIMEOUT

    def _answer(self, c, data):
        """Switch ``c`` (registered for reading) to writing ``data``."""
        c.out, c.state = data, "writing"
        c.deadline = time.monotonic() + WRITE_TIMEOUT
        self._sel.modify(c.sock, selectors.EVENT_WRITE, c)

    def _drain_done(self):
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        while True:
            try:
                c, data = self._done.get_nowait()
            except queue.Empty:
                return
            if c.sock.fileno() < 0:
                continue
            c.out, c.state = data, "writing"
            c.deadline = time.monotonic() + WRITE_TIMEOUT
            self._sel.register(c.sock, selectors.EVENT_WRITE, c)

    def _write(self, c):
        try:
            sent = c.sock.send(c.out)
        except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return
        except OSError:
            self._close(c)
            return
        c.out = c.out[sent:]
        if not c.out:
            self.stats["answered"] += 1
            if c.keep:
                self._next_request(c)
            else:
                self._linger(c)

    def _next_request(self, c):
        """Keep-alive: the connection waits for its next request, with a new deadline."""
        c.served += 1
        c.keep, c.state, c.deadline = False, "reading", time.monotonic() + REQUEST_TIMEOUT
        self._sel.modify(c.sock, selectors.EVENT_READ, c)
        if c.buf:
            self._parse(c)  # it came with the last one (pipelined)
        elif c.sock.pending():
            self._read(c)  # it sits in the TLS buffer: the selector would not say so

    def _linger(self, c):
        """Half-close and discard what the client still sends, so the answer is not lost
        to a TCP reset (a client still sending an oversized request, a GET with a body).
        On a TLS connection the TLS layer is dropped first (``SSLSocket.shutdown``): what
        still comes is discarded unread."""
        try:
            c.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(c)
            return
        c.state, c.deadline = "lingering", time.monotonic() + LINGER
        self._sel.modify(c.sock, selectors.EVENT_READ, c)

    def _discard(self, c):
        try:
            if c.sock.recv(65536):
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self._close(c)

    def _expire(self, now):
        for c in [c for c in self._conns.values() if c.deadline < now and c.state != "working"]:
            if c.state == "reading" and c.buf:
                self.stats["timed_out"] += 1
                try:  # best effort: a client still listening learns why
                    c.sock.send(_status_line(408, "Request Timeout"))
                except OSError:
                    pass
            elif c.state == "handshake" or (c.state == "reading" and not c.served):
                self.stats["timed_out"] += 1  # (an idle keep-alive connection just closes)
            self._close(c)

    def _close(self, c):
        self._conns.pop(c.sock.fileno(), None)
        try:
            self._sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        try:
            c.sock.close()
        except OSError:
            pass

    # ------------------------------------------------------------------ workers
    def _worker(self):
        while not self._stop.is_set():
            try:
                c, head = self._work.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                data = self.handler.respond(self, head, c.addr, secure=c.tls, keep=c.keep)
            except Exception as exc:  # one bad request never stops the service
                log.warning("%s: error serving %s: %s", self.name, c.addr[0], exc)
                data = _status_line(500, "Internal Server Error")
            # the answer's own head says whether the connection stays open (an error closes it)
            c.keep = c.keep and _KEEP_ALIVE in data[: data.find(b"\r\n\r\n") + 2]
            self._done.put((c, data))
            try:
                self._wake_w.send(b"x")
            except (BlockingIOError, OSError):
                pass

    # ------------------------------------------------------------------ control
    def shutdown(self):
        self._stop.set()

    def server_close(self):
        self.sock.close()
        self._wake_r.close()
        self._wake_w.close()


class _Request:
    """What BaseHTTPRequestHandler wants as a request: the head (and any body) already read."""

    def __init__(self, head, secure=False, keep=False):
        self.head = head
        self.secure = secure  # it came over TLS
        self.keep = keep  # the connection may carry the next request (keep-alive)


class Handler(BaseHTTPRequestHandler):
    """Serves ``server.routes``: path -> (status, content type, body bytes), or a callable
    returning that triple for each request (a live answer). GET/HEAD only."""

    server_version = "pvelab-compat/1.0"
    allowed = "GET, HEAD"

    @classmethod
    def respond(cls, server, head, client_address, secure=False, keep=False):
        """The whole answer (bytes) to one complete request (its head, then any body);
        ``keep``: answer with ``Connection: keep-alive`` (HTTP/1.1) unless it fails."""
        out = io.BytesIO()
        cls(_Request(head, secure, keep), client_address, server, out)
        return out.getvalue()

    def __init__(self, request, client_address, server, out=None):
        self._out = out if out is not None else io.BytesIO()
        super().__init__(request, client_address, server)

    def setup(self):
        self.rfile = io.BytesIO(self.request.head)
        self.wfile = self._out
        self.secure = self.request.secure
        if self.request.keep:
            self.protocol_version = "HTTP/1.1"

    def connection_header(self):
        """The answer's ``Connection`` field: keep-alive when the server keeps it open."""
        return "keep-alive" if self.request.keep and not self.close_connection else "close"

    def handle(self):
        self.handle_one_request()  # exactly one: the server's loop owns the connection

    def finish(self):
        pass

    def version_string(self):
        return self.server_version

    def _lookup(self):
        path = self.path.split("?", 1)[0].split("#", 1)[0]
        if len(path) > 1:
            path = path.rstrip("/")
        return self.server.routes.get(path)

    def _send(self, status, ctype, body, head=False, extra=()):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", self.connection_header())
        for key, value in extra:
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _get(self, head=False):
        route = self._lookup()
        if route is None:
            body = dumps({"data": None, "errors": {"path": "no such path: " + self.path[:200]}})
            self._send(404, "application/json;charset=UTF-8", body.encode(), head)
            return
        status, ctype, body = route() if callable(route) else route
        self._send(status, ctype, body, head)

    def do_GET(self):
        self._get()

    def do_HEAD(self):
        self._get(head=True)

    def _not_allowed(self):
        body = dumps({"data": None, "errors": {"method": self.command + " not allowed"}}).encode()
        self._send(405, "application/json;charset=UTF-8", body, extra=(("Allow", self.allowed),))

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    def send_error(self, code, message=None, explain=None):
        # JSON instead of the stock HTML page (400, 408, 414, 501 ...).
        try:
            self.close_connection = True
            self.request_version = "HTTP/1.0"  # always answer with a status line, never HTTP/0.9
            body = dumps({"data": None, "errors": {"request": message or str(code)}}).encode()
            self.send_response(code, message)
            self.send_header("Content-Type", "application/json;charset=UTF-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD" and code >= 200 and code not in (204, 304):
                self.wfile.write(body)
        except OSError:
            pass

    def log_message(self, fmt, *args):
        log.info("%s %s", self.address_string(), fmt % args)


def json_route(obj, status=200):
    return (status, "application/json;charset=UTF-8", dumps(obj).encode())


class _Socket:
    """A bound socket served by a loop in a thread, stoppable like socketserver servers."""

    kind = socket.SOCK_STREAM

    def __init__(self, host, port, name):
        self.name = name
        self.sock = socket.socket(socket.AF_INET, self.kind)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.settimeout(0.5)
        self._stop = threading.Event()

    @property
    def port(self):
        return self.sock.getsockname()[1]

    def shutdown(self):
        self._stop.set()

    def server_close(self):
        self.sock.close()


class TCPListener(_Socket):
    """Accepts TCP connections and closes them: proves a port listens (no protocol)."""

    def __init__(self, host, port, name="tcp"):
        super().__init__(host, port, name)
        self.accepted = 0
        self.sock.listen(256)

    def serve_forever(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:  # timeout (poll the stop flag) or closed
                continue
            self.accepted += 1
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()


class UDPSink(_Socket):
    """Binds a UDP port and discards datagrams (knet speaks UDP on 5405)."""

    kind = socket.SOCK_DGRAM

    def __init__(self, host, port, name="udp"):
        super().__init__(host, port, name)

    def serve_forever(self):
        while not self._stop.is_set():
            try:
                self.sock.recvfrom(65535)
            except OSError:
                continue


class Service:
    """A set of servers started in threads and stopped together."""

    def __init__(self, servers):
        self.servers = servers
        self.threads = []

    def start(self):
        for srv in self.servers:
            t = threading.Thread(target=srv.serve_forever, name=srv.name, daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def stop(self):
        for srv in self.servers:
            srv.shutdown()
        for t in self.threads:
            t.join(timeout=5)
        for srv in self.servers:
            srv.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def load_config(path, overrides):
    try:
        with open(path) as fh:
            cfg = json.load(fh)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"{path}: cannot read config: {exc}") from None
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return cfg


def main(name, build, default_config, add_args=None, argv=None):
    """Parse args, load config, build servers with ``build(cfg)``, serve until a signal."""
    parser = argparse.ArgumentParser(prog=name)
    parser.add_argument("--config", default=default_config)
    parser.add_argument("--listen", help="address to bind (default from config)")
    parser.add_argument("--node", help="node name (default from config)")
    if add_args:
        add_args(parser)
    parser.add_argument("--quiet", action="store_true", help="do not log requests")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format=f"{name}: %(message)s",
        stream=sys.stderr,
    )
    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "quiet")}
    cfg = load_config(args.config, overrides)
    try:
        service = Service(build(cfg))
    except (KeyError, TypeError) as exc:
        raise SystemExit(f"{args.config}: missing or bad field {exc}") from None
    except OSError as exc:
        raise SystemExit(f"{name}: cannot bind: {exc}") from None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    service.start()
    for srv in service.servers:
        print(f"{name}: {srv.name} listening on {cfg['listen']}:{srv.port}", flush=True)
    stop.wait()
    service.stop()
    return 0
