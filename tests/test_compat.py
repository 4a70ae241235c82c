"""The compat services over real sockets: exact bodies, errors, abuse, concurrency."""

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pvelab.build.render import compat_config

SPEC_STATUS = (
    '{"data":[{"type":"cluster","name":"pve-cluster","nodes":3,"quorate":1},'
    '{"type":"node","name":"pve-1","online":1,"id":"node/pve-1","nodeid":1},'
    '{"type":"node","name":"pve-2","online":1,"id":"node/pve-2","nodeid":2},'
    '{"type":"node","name":"pve-3","online":1,"id":"node/pve-3","nodeid":3}]}'
)


def ephemeral(cfg, **extra):
    cfg = json.loads(json.dumps(cfg))
    cfg.update(listen="127.0.0.1", **extra)
    return cfg


@pytest.fixture
def pve(lab, compat_modules):
    compat, pve_compat, _ = compat_modules
    cfg = ephemeral(compat_config(lab, lab.node("pve-2")), http_port=0, tcp_ports=[0, 0], udp_ports=[0])
    with compat.Service(pve_compat.build(cfg)) as svc:
        yield svc


@pytest.fixture
def witness(lab, compat_modules):
    compat, _, qdevice_compat = compat_modules
    cfg = ephemeral(compat_config(lab, lab.node("pbs-witness")), port=0, metrics_port=0)
    with compat.Service(qdevice_compat.build(cfg)) as svc:
        yield svc


def http(port, path, method="GET", data=None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method, data=data)
    try:
        with urllib.request.urlopen(req, timeout=5) as res:
            return res.status, res.headers, res.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def api_port(svc):
    return next(s for s in svc.servers if s.name == "api").port


def test_exact_json_bodies(pve):
    port = api_port(pve)
    assert (
        http(port, "/api2/json/version")[2]
        == b'{"data":{"version":"compat-1.0","release":"pve-compat","repoid":"pve-2"}}'
    )
    assert http(port, "/api2/json/cluster/status")[2].decode() == SPEC_STATUS
    status, headers, body = http(port, "/api2/json/nodes/pve-2/status")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert body == b'{"data":{"uptime":3600,"loadavg":["0.05","0.05","0.05"],"cpu":0.05}}'


def test_not_found_and_not_allowed(pve):
    port = api_port(pve)
    # Past the spec's three, the API wants a ticket, as Proxmox's (tests/test_api.py)
    status, _, body = http(port, "/api2/json/nodes/pve-1/status")  # not this node
    assert status == 401 and json.loads(body) == {"data": None, "message": "No ticket\n"}
    assert http(port, "/nope")[0] == 404
    status, headers, body = http(port, "/api2/json/version", method="POST", data=b"x=1")
    assert status == 401 and json.loads(body)["data"] is None  # a write without a ticket
    assert http(port, "/api2/json/version", method="DELETE")[0] == 401
    status, _, body = http(port, "/api2/json/version", method="BREW")
    assert status == 501 and json.loads(body)["data"] is None
    status, headers, body = http(port, "/api2/json/version", method="HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0


def test_query_string_and_trailing_slash(pve):
    port = api_port(pve)
    assert http(port, "/api2/json/version/?x=1")[0] == 200


def raw_exchange(port, payload, timeout=5):
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        chunks = []
        while True:
            try:
                data = s.recv(4096)
            except TimeoutError:
                break
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks)


def test_garbage_and_half_requests_do_not_kill_it(pve, compat_modules):
    compat_modules[0]
    port = api_port(pve)
    assert raw_exchange(port, b"\x00\xff\xfe garbage \r\n\r\n").startswith(b"HTTP/1.0 400")
    assert raw_exchange(port, b"GET /" + b"A" * 70000 + b" HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.0 414")
    # a half-sent request: the connection is held open without finishing the headers
    half = socket.create_connection(("127.0.0.1", port))
    half.sendall(b"GET /api2/json/version HTTP/1.1\r\nHost: x\r\n")
    silent = socket.create_connection(("127.0.0.1", port))  # connects, sends nothing
    try:
        assert http(port, "/api2/json/version")[0] == 200
    finally:
        half.close()
        silent.close()
    assert http(port, "/api2/json/cluster/status")[0] == 200


def test_whole_request_deadline_not_per_read(lab, compat_modules, monkeypatch):
    """A client trickling one byte every 0.2 s never hits a per-read timeout; the deadline
    for the whole request still cuts it off."""
    compat, pve_compat, _ = compat_modules
    monkeypatch.setattr(compat, "REQUEST_TIMEOUT", 1.0)
    cfg = ephemeral(compat_config(lab, lab.node("pve-1")), http_port=0, tcp_ports=[], udp_ports=[])
    with compat.Service(pve_compat.build(cfg)) as svc:
        port = svc.servers[0].port
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            t0 = time.monotonic()
            closed = False
            for b in b"GET /api2/json/version HTTP/1.1\r\nHost: x\r\nX-Slow: yes\r\n":
                try:
                    s.sendall(bytes([b]))
                except OSError:
                    closed = True
                    break
                time.sleep(0.2)
            if not closed:
                assert s.recv(100).startswith(b"HTTP/1.0 408")
            assert time.monotonic() - t0 < 4


def test_200_concurrent_connections(pve):
    port = api_port(pve)
    results, errors = [], []

    def client():
        try:
            results.append(http(port, "/api2/json/cluster/status")[0])
        except Exception as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=client) for _ in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors[:3]
    assert len(results) == 200 and set(results) <= {200, 503}
    assert results.count(200) >= 150
    assert http(port, "/api2/json/version")[0] == 200


def test_header_count_and_size_caps(pve):
    port = api_port(pve)
    many = b"GET /api2/json/version HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(100)) + b"\r\n"
    assert raw_exchange(port, many).startswith(b"HTTP/1.0 431")
    big = b"GET /api2/json/version HTTP/1.1\r\nX-Big: " + b"b" * 20000 + b"\r\n\r\n"
    assert raw_exchange(port, big).startswith(b"HTTP/1.0 431")
    assert http(port, "/api2/json/version")[0] == 200


def test_normal_clients_served_while_hundreds_are_slow(pve):
    """300 idle and 100 byte-a-second clients connected: plain GETs still answer at once."""
    from pvelab.checks.loadtest import measure, slow_clients

    port = api_port(pve)
    with slow_clients(port, idle=300, trickle=100, seconds=40) as attack:
        during = measure(port, requests=200, concurrency=4, deadline=30)
    assert attack["connections"] >= 350, attack
    assert during.ok == during.requests == 200, during
    assert during.p99_ms < 2000, during  # the old server made a GET wait 39 s here


def test_oversized_requests_stay_within_the_units_memory(lab, tmp_path):
    """64 clients sending 4 MiB of headers each, against the real service process:
    every one is refused, normal GETs keep working, and the high-water mark of resident
    memory stays far below the unit's MemoryMax=128M."""

    from pvelab.checks.loadtest import get, oversized

    port = free_port()
    proc = start_pve_compat(lab, tmp_path, port, f"{free_port()}")
    try:
        deadline = time.monotonic() + 10
        while get(port, timeout=1) != 200:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        statuses = oversized(port, clients=64, megabytes=4)
        assert len(statuses) == 64 and set(statuses) <= {431, 414, 0}, statuses
        assert statuses.count(431) + statuses.count(414) >= 32, statuses
        assert get(port) == 200
        status = open(f"/proc/{proc.pid}/status").read()
        hwm_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
        print(f"compat service VmHWM under oversized requests: {hwm_kb / 1024:.1f} MiB")
        assert hwm_kb < 64 * 1024, hwm_kb
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


def wait_accepted(listener, count, timeout=5.0):
    """The accept loop runs in its own thread: give it a moment to count the connections."""
    deadline = time.monotonic() + timeout
    while listener.accepted < count and time.monotonic() < deadline:
        time.sleep(0.05)


def test_corosync_ports_accept_tcp_and_udp(pve):
    tcp = [s for s in pve.servers if s.name.startswith("tcp-")]
    assert len(tcp) == 2
    for srv in tcp:
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", srv.port), timeout=2):
                pass
        wait_accepted(srv, 20)
        assert srv.accepted == 20
    udp = next(s for s in pve.servers if s.name.startswith("udp-"))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"knet?", ("127.0.0.1", udp.port))


def test_qdevice_port_and_metrics(witness):
    qnetd = next(s for s in witness.servers if s.name == "qnetd")
    metrics = next(s for s in witness.servers if s.name == "metrics")
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", qnetd.port), timeout=2):
            pass
    wait_accepted(qnetd, 3)
    status, headers, body = http(metrics.port, "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    lines = body.decode().splitlines()
    assert "qdevice_compat_up 1" in lines
    assert "qdevice_compat_connections_total 3" in lines
    assert http(metrics.port, "/")[0] == 404
    assert http(metrics.port, "/metrics", method="POST", data=b"")[0] == 405
    assert raw_exchange(qnetd.port, b"\x00" * 1000) == b""  # accepts, closes, stays up
    with socket.create_connection(("127.0.0.1", qnetd.port), timeout=2):
        pass


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_env():
    """In the image the role module sits beside the shared library in /usr/lib/pvelab."""
    import os

    from conftest import COMPAT_DIR

    return dict(os.environ, PYTHONPATH=str(COMPAT_DIR))


def start_pve_compat(lab, tmp_path, port, tcp_ports):
    """pve_compat.py as systemd runs it (config file, overrides), on loopback."""
    from conftest import ROLE_MODULE_DIRS

    cfg_path = tmp_path / "pve-compat.json"
    cfg_path.write_text(json.dumps(compat_config(lab, lab.node("pve-1"))))
    cmd = [
        sys.executable,
        str(ROLE_MODULE_DIRS[0] / "pve_compat.py"),
        "--config",
        str(cfg_path),
        "--listen",
        "127.0.0.1",
        "--http-port",
        str(port),
        "--tcp-ports",
        tcp_ports,
        "--udp-ports",
        "",
        "--quiet",
    ]
    return subprocess.Popen(cmd, env=image_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_service_process_from_config_file(lab, tmp_path, compat_modules):
    """The real entry point as systemd runs it: config file, overrides, SIGTERM."""

    port, p1, p2 = free_port(), free_port(), free_port()
    proc = start_pve_compat(lab, tmp_path, port, f"{p1},{p2}")
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                status, _, body = http(port, "/api2/json/version")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        assert status == 200 and b'"repoid":"pve-1"' in body
        socket.create_connection(("127.0.0.1", p2), timeout=2).close()
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert f"api listening on 127.0.0.1:{port}" in out


def test_bad_config_is_a_clear_error(tmp_path):
    from conftest import ROLE_MODULE_DIRS

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    res = subprocess.run(
        [sys.executable, str(ROLE_MODULE_DIRS[0] / "pve_compat.py"), "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=10,
        env=image_env(),
    )
    assert res.returncode != 0 and str(bad) in res.stderr


# captured from `invoke rehearse` (pve-3 powered off)
QUORUMTOOL_3_OF_4 = (Path(__file__).parent / "data/quorumtool-3-of-4.txt").read_text()


def fake_tool(tmp_path, text, status):
    tool = tmp_path / "corosync-quorumtool"
    (tmp_path / "out.txt").write_text(text)
    tool.write_text(f"#!/bin/sh\ncat {tmp_path / 'out.txt'}\nexit {status}\n")
    tool.chmod(0o755)
    return tool


def test_cluster_status_is_live_where_corosync_runs(lab, compat_modules, tmp_path):
    """With corosync installed the API reports votequorum's state; without, the rendered JSON."""
    _, pve_compat, _ = compat_modules
    cfg = compat_config(lab, lab.node("pve-1"))
    static = pve_compat.cluster_status_route(
        pve_compat.ClusterState(dict(cfg, quorumtool=str(tmp_path / "absent")))
    )()
    assert json.loads(static[2]) == {"data": cfg["cluster_status"]}
    live = pve_compat.cluster_status_route(
        pve_compat.ClusterState(dict(cfg, quorumtool=str(fake_tool(tmp_path, QUORUMTOOL_3_OF_4, 0))))
    )
    data = json.loads(live()[2])["data"]
    assert data[0] == dict(cfg["cluster_status"][0], quorate=1)
    assert {d["name"]: d["online"] for d in data[1:]} == {"pve-1": 1, "pve-2": 1, "pve-3": 0}
    # not quorate (exit 2), and corosync not running at all (exit 1): quorate 0
    for text, status in (
        (QUORUMTOOL_3_OF_4.replace("Quorate:          Yes", "Quorate:          No"), 2),
        ("Cannot initialize QUORUM service\n", 1),
    ):
        route = pve_compat.cluster_status_route(
            pve_compat.ClusterState(dict(cfg, quorumtool=str(fake_tool(tmp_path, text, status))))
        )
        assert json.loads(route()[2])["data"][0]["quorate"] == 0
