"""Shared core of the pvelab compat services (Python stdlib only).

Bounded threaded HTTP server with JSON errors, TCP "port proves it listens" listeners,
a UDP sink, config loading and a signal-aware main loop.  Runs on Debian trixie's
python3 and on the build host's.
"""

import argparse
import json
import logging
import signal
import socket
import socketserver
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

log = logging.getLogger("pvelab-compat")

MAX_WORKERS = 64  # concurrent HTTP requests served at once
REQUEST_TIMEOUT = 10.0  # seconds a client may take to send its request
SLOT_WAIT = 2.0  # seconds a new connection waits for a worker before 503


def dumps(obj):
    """Compact JSON, key order as given (the spec's bodies are byte-exact)."""
    return json.dumps(obj, separators=(",", ":"))


class BoundedHTTPServer(socketserver.ThreadingMixIn, HTTPServer):
    """One thread per request, at most ``max_workers`` at once; overflow gets 503."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, address, handler, routes, max_workers=MAX_WORKERS, name="http"):
        self.routes = routes
        self.name = name
        self._slots = threading.BoundedSemaphore(max_workers)
        super().__init__(address, handler)

    @property
    def port(self):
        return self.server_address[1]

    def process_request(self, request, client_address):
        if not self._slots.acquire(timeout=SLOT_WAIT):
            try:
                request.sendall(
                    b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address):
        log.warning("%s: error serving %s: %s", self.name, client_address[0], sys.exc_info()[1])


class Handler(BaseHTTPRequestHandler):
    """Serves ``server.routes``: path -> (status, content type, body bytes), or a callable
    returning that triple for each request (a live answer). GET/HEAD only."""

    server_version = "pvelab-compat/1.0"
    timeout = REQUEST_TIMEOUT
    allowed = "GET, HEAD"

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
        self.send_header("Connection", "close")
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
