"""Ports on the host's loopback address that reach a running lab's guests.

:func:`start` binds one listening socket per (node, service) on ``127.0.0.1`` (the
kernel picks a free port), then hands the sockets to a forwarder process that it starts
inside the lab's network namespace (``ip netns exec``): the listeners stay bound in
the host's namespace, where they were made, and each connection the forwarder accepts
is relayed to the guest's address from inside the lab network. Nothing listens on any
other host address. The forwarder runs in its own session, so it outlives ``invoke up``;
it dies with the namespace (``invoke down``).

Run as ``python -m pvelab.running.forward RUN_DIR FD:HOST:PORT ...`` (by :func:`start` only).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from pvelab.core.errors import PvelabError

LOOPBACK = "127.0.0.1"


def start(netns: str, targets: list[tuple[str, str, str, int]], workdir: Path) -> tuple[int, list[int]]:
    """(forwarder pid, host port per target) for targets (node, service, address, port);
    its log is ``workdir/forward.log`` and ``workdir`` is on its command line (so ``ps``
    tells whose forwarder it is)."""
    log = workdir / "forward.log"
    listeners = []
    try:
        for _ in targets:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LOOPBACK, 0))
            s.listen(64)
            listeners.append(s)
        specs = [
            f"{s.fileno()}:{addr}:{port}" for s, (_, _, addr, port) in zip(listeners, targets, strict=True)
        ]
        with open(log, "ab") as fh:
            proc = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    netns,
                    sys.executable,
                    "-m",
                    "pvelab.running.forward",
                    str(workdir),
                    *specs,
                ],
                pass_fds=[s.fileno() for s in listeners],
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
            )
        time.sleep(0.5)
        if proc.poll() is not None:
            raise PvelabError(f"the port forwarder exited at once ({proc.returncode}); see {log}")
        return proc.pid, [s.getsockname()[1] for s in listeners]
    finally:
        for s in listeners:
            s.close()  # the forwarder holds its own copies


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
            try:
                s.shutdown(how)
            except OSError:
                pass


def _relay(client: socket.socket, host: str, port: int) -> None:
    try:
        upstream = socket.create_connection((host, port), timeout=10)
    except OSError as exc:
        print(f"{host}:{port}: {exc}", flush=True)
        client.close()
        return
    upstream.settimeout(None)
    back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
    back.start()
    _pump(client, upstream)
    back.join()
    client.close()
    upstream.close()


def _serve(listener: socket.socket, host: str, port: int) -> None:
    while True:
        client, _ = listener.accept()
        threading.Thread(target=_relay, args=(client, host, port), daemon=True).start()


def main(argv: list[str]) -> int:
    threads = []
    for spec in argv[1:]:  # argv[0]: the run folder it serves
        fd, host, port = spec.split(":")
        listener = socket.socket(fileno=int(fd))
        t = threading.Thread(target=_serve, args=(listener, host, int(port)), daemon=True)
        t.start()
        threads.append(t)
        print(
            f"forwarding {listener.getsockname()[0]}:{listener.getsockname()[1]} -> {host}:{port}", flush=True
        )
    for t in threads:
        t.join()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
