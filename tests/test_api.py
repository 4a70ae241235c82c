"""The Proxmox dialect of pve-compat on loopback, judged by a real client (proxmoxer):
HTTPS on the spec's port, tickets, API tokens, pinning, errors, limits, and slow TLS."""

import json
import re
import socket
import ssl
import time
import urllib.request

import pytest
import requests
from proxmoxer import AuthenticationError, ResourceException
from pveclient import READS, connect, fingerprint_of_pem, pinned_cert, read_all

from pvelab.build.render import api_tokens, compat_config, render_files
from pvelab.running.apicert import make_self_signed

HOST = "127.0.0.1"
NODE = "pve-2"


def make_cert(dest, cn="pve-2", san="DNS:pve-2,IP:127.0.0.1"):
    return make_self_signed(dest, cn, san)


@pytest.fixture
def node_files(lab, tmp_path):
    """What a booted pve-2 has: its overlay's files, a certificate and ticket key made as at
    first boot, and /etc/shadow with the lab user's hash."""
    files = {f.path: f.content for f in render_files(lab, lab.node(NODE))}
    for name in ("corosync.conf", "storage.cfg"):
        (tmp_path / name).write_text(files[f"/etc/pve/{name}"])
    (tmp_path / "pvelab-tokens.json").write_text(json.dumps(api_tokens(lab)))
    (tmp_path / "pvelab-authkey.key").write_bytes(b"k" * 32)
    (tmp_path / "shadow").write_text(
        f"root:*:20000:0:99999:7:::\n{lab.user.name}:{lab.user.crypt_hash()}:20000:0:99999:7:::\n"
    )
    cert, key = make_cert(tmp_path)
    return tmp_path, cert, key


@pytest.fixture
def api(lab, compat_modules, node_files):
    compat, pve_compat, _ = compat_modules
    d, cert, key = node_files
    cfg = json.loads(json.dumps(compat_config(lab, lab.node(NODE))))
    cfg.update(
        listen=HOST,
        http_port=0,
        tcp_ports=[],
        udp_ports=[],
        shadow=str(d / "shadow"),
        tls_cert=str(cert),
        tls_key=str(key),
        authkey=str(d / "pvelab-authkey.key"),
        tokens=str(d / "pvelab-tokens.json"),
        corosync_conf=str(d / "corosync.conf"),
        storage_cfg=str(d / "storage.cfg"),
    )
    with compat.Service(pve_compat.build(cfg)) as svc:
        server = svc.servers[0]
        server.cert = cert
        yield server


def login(lab, server, **kw):
    return connect(HOST, server.port, f"{lab.user.name}@pam", password=lab.user.login_password, **kw)


def token(lab):
    t = lab.api.tokens[0]
    return (t.id, t.secret)


def check_shapes(data, lab):
    """Field names and types as Proxmox's API documents them."""
    assert set(data["version"]) >= {"version", "release", "repoid"}
    status = data["cluster/status"]
    cluster = next(e for e in status if e["type"] == "cluster")
    assert cluster["name"] == lab.cluster_name and cluster["quorate"] == 1 and cluster["nodes"] == 3
    assert isinstance(cluster["version"], int) and cluster["id"] == "cluster"
    nodes = {e["name"]: e for e in status if e["type"] == "node"}
    assert set(nodes) == {n.name for n in lab.members}
    for n in lab.members:
        e = nodes[n.name]
        assert e["ip"] == str(n.alias.ip) and e["nodeid"] == n.nodeid and e["online"] == 1
        assert e["local"] == (1 if n.name == NODE else 0) and e["id"] == f"node/{n.name}"
    listed = {e["node"]: e for e in data["nodes"]}
    assert set(listed) == set(nodes) and all(e["status"] == "online" for e in listed.values())
    me = listed[NODE]
    for key in ("uptime", "maxcpu", "mem", "maxmem", "disk", "maxdisk"):
        assert isinstance(me[key], int) and me[key] >= 0, key
    assert isinstance(me["cpu"], float) and re.fullmatch(
        r"([0-9A-F]{2}:){31}[0-9A-F]{2}", me["ssl_fingerprint"]
    )
    st = data[f"nodes/{NODE}/status"]
    assert (
        isinstance(st["uptime"], int)
        and len(st["loadavg"]) == 3
        and all(isinstance(x, str) for x in st["loadavg"])
    )
    assert st["memory"]["total"] > st["memory"]["free"] >= 0 and st["rootfs"]["total"] > 0
    assert st["cpuinfo"]["cpus"] >= 1 and st["current-kernel"]["sysname"] == "Linux"
    assert st["boot-info"]["mode"] in ("efi", "legacy-bios")
    config_nodes = {e["node"]: e for e in data["cluster/config/nodes"]}
    assert config_nodes["pve-1"] == {
        "node": "pve-1",
        "name": "pve-1",
        "nodeid": "1",
        "quorum_votes": "1",
        "ring0_addr": "10.81.0.11",
    }
    totem = data["cluster/config/totem"]
    assert totem["cluster_name"] == lab.cluster_name and totem["interface"] == {"0": {"linknumber": "0"}}
    assert totem["secauth"] == "on" and totem["transport"] == "knet"
    assert data["cluster/config/qdevice"] == {}  # no corosync-qdevice on this host's loopback service
    (storage,) = data["storage"]
    assert storage["storage"] == "rpool-data" and storage["type"] == "zfspool" and storage["sparse"] == 1
    assert (
        storage["pool"] == "rpool/data"
        and storage["content"] == "images,rootdir"
        and len(storage["digest"]) == 40
    )
    assert data["storage/rpool-data"] == storage
    (ns,) = data[f"nodes/{NODE}/storage"]
    assert ns["storage"] == "rpool-data" and ns["enabled"] == 1 and ns["active"] == 0
    kinds = {e["type"] for e in data["cluster/resources"]}
    assert kinds == {"node", "storage"}
    assert data["access/permissions"]["/"]["Sys.Audit"] == 1
    assert "Sys.Modify" not in data["access/permissions"]["/"]  # PVEAuditor: reads only


def test_proxmoxer_reads_every_endpoint_with_a_ticket_and_with_a_token(lab, api):
    before = dict(api.stats)
    with_ticket = read_all(login(lab, api), NODE, "rpool-data")
    assert set(with_ticket) == {p.format(node=NODE, storage="rpool-data") for p in READS}
    check_shapes(with_ticket, lab)
    user = f"{lab.user.name}@pam"
    with_token = read_all(connect(HOST, api.port, user, token=token(lab)), NODE, "rpool-data")
    check_shapes(with_token, lab)
    # proxmoxer's session keeps its connection (keep-alive): a login and 24 reads over TLS,
    # each session on one connection with one handshake
    assert api.stats["answered"] - before["answered"] == 1 + 2 * len(READS)
    assert api.stats["tls"] - before["tls"] <= 3, (before, api.stats)


def test_the_certificate_pinned_by_its_fingerprint(lab, api, tmp_path):
    fp = fingerprint_of_pem(api.cert.read_text())
    trust = pinned_cert(HOST, api.port, fp, tmp_path / "trust.pem")
    pinned = login(lab, api, trust=trust)
    assert pinned.nodes.get()[0]["node"]
    assert {n["node"]: n.get("ssl_fingerprint") for n in pinned.nodes.get()}[NODE] == fp
    other, _ = make_cert(tmp_path / "..", cn="impostor")  # a different key
    with pytest.raises(requests.exceptions.SSLError):
        login(lab, api, trust=other)
    with pytest.raises(AssertionError, match="presents"):
        pinned_cert(HOST, api.port, "00:" * 31 + "00", tmp_path / "x.pem")


def test_wrong_password_wrong_token_and_writes(lab, api):
    user = f"{lab.user.name}@pam"
    with pytest.raises(AuthenticationError, match="code: 401"):
        connect(HOST, api.port, user, password="not-the-password")
    with pytest.raises(AuthenticationError, match="code: 401"):
        connect(HOST, api.port, "root@pam", password=lab.user.login_password)  # not a lab API user
    bad = connect(HOST, api.port, user, token=(token(lab)[0], "0" * 36))
    with pytest.raises(ResourceException) as err:
        bad.version.get()
    assert err.value.status_code == 401
    with pytest.raises(ResourceException) as err:
        connect(HOST, api.port, user, token=("nosuch", token(lab)[1])).version.get()
    assert err.value.status_code == 401
    ok = login(lab, api)
    for call in (
        lambda: ok.nodes.post(node="x"),
        lambda: ok("cluster/status").put(),
        lambda: ok.storage.delete(),
    ):
        with pytest.raises(ResourceException) as err:
            call()
        assert err.value.status_code == 501 and "not implemented" in str(err.value)
    with pytest.raises(ResourceException) as err:
        ok("nodes/pve-2/qemu").get()  # a path the lab does not answer
    assert err.value.status_code == 501


def raw(port, method, path, headers=None, body=None, tls=True):
    req = urllib.request.Request(
        f"{'https' if tls else 'http'}://{HOST}:{port}{path}", method=method, data=body, headers=headers or {}
    )
    ctx = ssl._create_unverified_context()
    try:
        with urllib.request.urlopen(req, timeout=10, context=ctx if tls else None) as res:
            return res.status, res.reason, res.read()
    except urllib.error.HTTPError as e:
        return e.code, e.reason, e.read()


def test_error_shapes_and_the_spec_over_plain_http(lab, api):
    status, reason, body = raw(api.port, "GET", "/api2/json/version")
    assert (status, reason) == (401, "No ticket") and json.loads(body) == {
        "data": None,
        "message": "No ticket\n",
    }
    status, reason, body = raw(
        api.port, "GET", "/api2/json/nodes", {"Cookie": "PVEAuthCookie=PVE:ops@pam:00000000::AAAA"}
    )
    assert status == 401 and reason == "invalid ticket"
    form = f"username={lab.user.name}@pam&password={lab.user.login_password}".encode()
    status, _, body = raw(api.port, "POST", "/api2/json/access/ticket", body=form)
    data = json.loads(body)["data"]
    assert status == 200 and data["username"] == "ops@pam" and data["clustername"] == lab.cluster_name
    assert data["ticket"].startswith("PVE:ops@pam:") and re.fullmatch(
        r"[0-9A-F]{8}:\S+", data["CSRFPreventionToken"]
    )
    assert data["cap"]["nodes"] == {"Sys.Audit": 1} and set(data["cap"]) >= {"vms", "storage", "access", "dc"}
    status, reason, body = raw(
        api.port, "POST", "/api2/json/nodes", {"Cookie": f"PVEAuthCookie={data['ticket']}"}, b""
    )
    assert status == 501 and reason == "Method 'POST /nodes' not implemented"
    assert json.loads(body) == {"data": None, "message": "Method 'POST /nodes' not implemented\n"}
    # JSON login; a ticket renews itself (as proxmoxer does after an hour)
    js = json.dumps({"username": "ops@pam", "password": data["ticket"]}).encode()
    status, _, body = raw(
        api.port, "POST", "/api2/json/access/ticket", {"Content-Type": "application/json"}, js
    )
    assert status == 200 and json.loads(body)["data"]["ticket"].startswith("PVE:ops@pam:")
    # Plain HTTP: the spec's bodies byte for byte, no ticket needed; new paths need one
    assert raw(api.port, "GET", "/api2/json/version", tls=False)[2] == (
        b'{"data":{"version":"compat-1.0","release":"pve-compat","repoid":"pve-2"}}'
    )
    assert raw(api.port, "GET", "/api2/json/nodes/pve-2/status", tls=False)[2] == (
        b'{"data":{"uptime":3600,"loadavg":["0.05","0.05","0.05"],"cpu":0.05}}'
    )
    assert raw(api.port, "GET", "/api2/json/storage", tls=False)[0] == 401
    cookie = {"Cookie": f"PVEAuthCookie={data['ticket']}"}
    status, _, body = raw(api.port, "GET", "/api2/json/storage", cookie, tls=False)
    assert status == 200 and json.loads(body)["data"][0]["storage"] == "rpool-data"
    status, _, _ = raw(api.port, "POST", "/api2/json/access/ticket", body=b"x" * 70000)
    assert status == 413


def test_tickets_expire_and_are_bound_to_the_node_key(compat_modules):
    import pve_api

    t = pve_api.Tickets(b"a" * 32)
    ticket = t.issue("ops@pam", now=1_000_000)
    assert t.verify(ticket, now=1_000_000 + 7200) == "ops@pam"
    assert t.verify(ticket, now=1_000_000 + 7201) is None
    assert t.verify(ticket, now=1_000_000 - 301) is None  # from too far in the future
    assert pve_api.Tickets(b"b" * 32).verify(ticket, now=1_000_000) is None
    assert t.verify(ticket.replace("ops@pam", "root@pam"), now=1_000_000) is None


def test_token_hash_made_on_the_host_is_checked_on_the_node(lab, compat_modules):
    import pve_api

    from pvelab.model.passwords import token_hash, token_salt

    stored = token_hash("s3cret-s3cret-s3cret", token_salt(lab.name, "automation"))
    assert pve_api.token_matches("s3cret-s3cret-s3cret", stored)
    assert not pve_api.token_matches("s3cret-s3cret-s3creT", stored)
    assert stored == pve_api.token_hash("s3cret-s3cret-s3cret", stored.split("$")[2])
    assert "s3cret" not in json.dumps(api_tokens(lab)) and lab.api.tokens[0].secret not in json.dumps(
        api_tokens(lab)
    )


def test_failed_logins_are_rate_limited(lab, api):
    form = lambda pw: f"username=ops@pam&password={pw}".encode()  # noqa: E731
    for _ in range(5):
        assert raw(api.port, "POST", "/api2/json/access/ticket", body=form("wrong"))[0] == 401
    # the right password from the same address is now refused too, without being checked
    assert raw(api.port, "POST", "/api2/json/access/ticket", body=form(lab.user.login_password))[0] == 401
    # a token still works: only logins are limited
    user = f"{lab.user.name}@pam"
    assert connect(HOST, api.port, user, token=token(lab)).version.get()["release"]


def test_clients_stalled_in_the_tls_handshake_are_slow_clients(lab, api, compat_modules, monkeypatch):
    compat = compat_modules[0]
    stalled = []
    for i in range(200):
        s = socket.create_connection((HOST, api.port))
        s.sendall(b"\x16\x03\x01\x02\x00\x01" if i % 2 else b"\x16")  # half a ClientHello, then nothing
        stalled.append(s)
    t0 = time.monotonic()
    assert login(lab, api).nodes.get()  # served while 200 handshakes hang
    took = time.monotonic() - t0
    assert took < compat.REQUEST_TIMEOUT, took
    deadline = time.monotonic() + compat.REQUEST_TIMEOUT + 5
    while api.stats["timed_out"] < 200 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert api.stats["timed_out"] >= 200, api.stats  # each dropped at its deadline
    for s in stalled:
        s.close()
    # garbage after the TLS byte is a failed handshake, not a crash
    with socket.create_connection((HOST, api.port), timeout=5) as s:
        s.sendall(b"\x16garbage-not-tls\r\n\r\n" * 10)
        try:
            assert s.recv(100) == b""  # closed, or reset: no answer to garbage
        except ConnectionResetError:
            pass
    assert login(lab, api).version.get()
    assert api.stats["tls_failed"] >= 1


def exchange(sock, requests_bytes, answers, wait=0.3):
    """Send ``requests_bytes``, read ``answers`` whole answers (heads by Content-Length);
    [(status line, Connection field, body)], then whether the server closed the connection
    within ``wait`` seconds."""
    sock.sendall(requests_bytes)
    buf, out = b"", []
    while len(out) < answers:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            head = buf[:end].decode()
            fields = dict(line.split(": ", 1) for line in head.split("\r\n")[1:])
            size = int(fields["Content-Length"])
            if len(buf) >= end + 4 + size:
                out.append((head.split("\r\n")[0], fields["Connection"], buf[end + 4 : end + 4 + size]))
                buf = buf[end + 4 + size :]
                continue
        chunk = sock.recv(65536)
        assert chunk, (out, buf)
        buf += chunk
    sock.settimeout(wait)
    try:
        closed = sock.recv(1) == b""
    except TimeoutError:
        closed = False
    except (ConnectionResetError, ssl.SSLError):
        closed = True
    return out, closed


def get_req(path="/api2/json/version", extra=""):
    return f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n{extra}\r\n".encode()


def test_keep_alive_over_tls_the_spec_dialect_closes(lab, api, compat_modules, monkeypatch):
    """A TLS connection carries request after request (HTTP/1.1), pipelined ones too, API
    errors (401, 501) included, until the client says close, a request is malformed, or
    KEEPALIVE_REQUESTS; an idle one is closed at its deadline without counting as a timeout.
    Plain HTTP stays one request, then close."""
    compat = compat_modules[0]
    ctx = ssl._create_unverified_context()
    tid, secret = token(lab)
    cookie = f"Authorization: PVEAPIToken={lab.user.name}@pam!{tid}={secret}\r\n"

    def tls():
        return ctx.wrap_socket(socket.create_connection((HOST, api.port), timeout=10))

    accepted = api.stats["accepted"]
    with tls() as s:
        for _ in range(3):  # one after the other
            (one,), closed = exchange(s, get_req(extra=cookie), 1)
            assert one[0] == "HTTP/1.1 200 OK" and one[1] == "keep-alive" and not closed
            assert json.loads(one[2])["data"]["release"]
        # two at once (pipelined), then a POST whose body the 501 leaves unread, then a GET
        answers, closed = exchange(
            s,
            get_req(extra=cookie) * 2
            + f"POST /api2/json/nodes HTTP/1.1\r\nHost: x\r\n{cookie}Content-Length: 6\r\n\r\nnode=x".encode()
            + get_req(f"/api2/json/nodes/{NODE}/status", cookie),
            4,
        )
        assert [a[0].split()[1] for a in answers] == ["200", "200", "501", "200"], answers
        assert json.loads(answers[3][2])["data"]["uptime"] >= 0 and not closed
        (last,), closed = exchange(s, get_req(extra=cookie + "Connection: close\r\n"), 1, wait=5)
        assert last[1] == "close" and closed
    with tls() as s:  # an API error is an answer like any other; a malformed request closes
        (denied,), closed = exchange(s, get_req("/api2/json/storage"), 1)  # no credentials
        assert denied[0].split()[1] == "401" and denied[1] == "keep-alive" and not closed
        (bad,), closed = exchange(s, b"BREW /api2/json/version HTTP/1.1\r\nHost: x\r\n\r\n", 1, wait=5)
        assert bad[0].split()[1] == "501" and bad[1] == "close" and closed
    assert api.stats["accepted"] == accepted + 2
    # plain HTTP: the spec's endpoints as always, one request per connection
    with socket.create_connection((HOST, api.port), timeout=10) as s:
        (plain,), closed = exchange(s, get_req(), 1, wait=5)
        assert plain[0] == "HTTP/1.0 200 OK" and plain[1] == "close" and closed
    # at most KEEPALIVE_REQUESTS on one connection; an idle one closes quietly at its deadline
    monkeypatch.setattr(compat, "KEEPALIVE_REQUESTS", 3)
    monkeypatch.setattr(compat, "REQUEST_TIMEOUT", 1.0)
    with tls() as s:
        answers, closed = exchange(s, get_req(extra=cookie) * 3, 3, wait=5)
        assert [a[1] for a in answers] == ["keep-alive", "keep-alive", "close"] and closed
    timed_out = api.stats["timed_out"]
    with tls() as s:
        (one,), _ = exchange(s, get_req(extra=cookie), 1)
        assert one[1] == "keep-alive"
        s.settimeout(10)
        t0 = time.monotonic()
        assert s.recv(1) == b"" and time.monotonic() - t0 < 5  # closed by the server, idle
    assert api.stats["timed_out"] == timed_out
