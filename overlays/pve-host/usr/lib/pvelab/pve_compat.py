#!/usr/bin/python3
"""pve-compat: a Proxmox VE API look-alike for the pvelab rehearsal images.

8006 speaks two dialects on one port: plain HTTP with the spec's three read-only
endpoints, byte for byte, without authentication; and, for a TLS ClientHello and for
every other path, the Proxmox VE API real clients use (tickets, API tokens, the read
endpoints: :mod:`pve_api`).  Plus TCP listeners on 5404/5405 and a UDP sink on 5405
that prove the corosync ports are open.  Python stdlib only.
Config: /etc/pvelab/pve-compat.json (rendered per node from the lab file).

``/api2/json/cluster/status`` tells the truth: with no corosync on the node it serves
the lab's cluster status exactly as rendered; where corosync is installed (a
rehearsal), it reports votequorum's real state (``corosync-quorumtool -s``): the
cluster's ``quorate`` and each node's ``online``, in the same JSON shape.
"""

import os
import re
import ssl
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import compat
import pve_api

NODE_STATUS = {"uptime": 3600, "loadavg": ["0.05", "0.05", "0.05"], "cpu": 0.05}
QUORUMTOOL = "/usr/sbin/corosync-quorumtool"  # present only where corosync is installed
_MEMBER = re.compile(r"^\s*(\d+)\s+(\d+)\s")


def parse_quorumtool(text):
    """(quorate, set of member node ids) from ``corosync-quorumtool -s`` output."""
    quorate = bool(re.search(r"^Quorate:\s+Yes\s*$", text, re.M))
    members = set()
    if "Membership information" in text:
        for line in text.split("Membership information", 1)[1].splitlines():
            m = _MEMBER.match(line)
            if m and int(m.group(1)) != 0:  # nodeid 0 is the Qdevice line
                members.add(int(m.group(1)))
    return quorate, members


def live_status(rendered, tool=QUORUMTOOL, timeout=5):
    """The rendered cluster status, with ``quorate``/``online`` from votequorum."""
    res = subprocess.run([tool, "-s"], capture_output=True, text=True, timeout=timeout)
    # exit 0: quorate, 2: not quorate; anything else: corosync not running -> not quorate
    quorate, members = parse_quorumtool(res.stdout) if res.returncode in (0, 2) else (False, set())
    data = []
    for entry in rendered:
        entry = dict(entry)
        if entry.get("type") == "cluster":
            entry["quorate"] = 1 if quorate else 0
        elif entry.get("type") == "node":
            entry["online"] = 1 if entry.get("nodeid") in members else 0
        data.append(entry)
    return data


class ClusterState:
    """The cluster status list: as rendered while corosync is not installed; from
    votequorum (cached ``ttl`` s) where it is.  OSError when corosync cannot be asked."""

    def __init__(self, cfg, ttl=1.0):
        self.cfg, self.ttl = cfg, ttl
        self._at, self._entries, self._error = -ttl, None, None
        self._lock = threading.Lock()

    def live(self):
        return os.access(self.cfg.get("quorumtool", QUORUMTOOL), os.X_OK)

    def __call__(self):
        if not self.live():
            return self.cfg["cluster_status"]
        with self._lock:
            if time.monotonic() - self._at >= self.ttl:
                try:
                    self._entries = live_status(
                        self.cfg["cluster_status"], self.cfg.get("quorumtool", QUORUMTOOL)
                    )
                    self._error = None
                except (OSError, subprocess.SubprocessError) as exc:
                    self._error = f"{QUORUMTOOL}: {exc}"
                self._at = time.monotonic()
            if self._error:
                raise OSError(self._error)
            return self._entries


def cluster_status_route(state):
    """The spec's ``/api2/json/cluster/status``: the state's list, or 503 naming why not."""
    static = compat.json_route({"data": state.cfg["cluster_status"]})
    cache = {"key": None, "route": static}

    def route():
        if not state.live():
            return static
        try:
            entries = state()
        except OSError as exc:
            return compat.json_route({"data": None, "errors": {"quorum": str(exc)}}, status=503)
        if cache["key"] is not entries:
            cache["key"], cache["route"] = entries, compat.json_route({"data": entries})
        return cache["route"]

    return route


def routes(cfg, state):
    """The spec's three endpoints, served over plain HTTP without authentication."""
    node = cfg["node"]
    return {
        "/api2/json/version": compat.json_route(
            {"data": {"version": "compat-1.0", "release": "pve-compat", "repoid": node}}
        ),
        "/api2/json/cluster/status": cluster_status_route(state),
        f"/api2/json/nodes/{node}/status": compat.json_route({"data": NODE_STATUS}),
    }


def build(cfg):
    host = cfg["listen"]
    state = ClusterState(cfg)
    tls = None
    if cfg.get("tls_cert") and cfg.get("tls_key"):
        try:
            tls = pve_api.tls_context(cfg["tls_cert"], cfg["tls_key"])
        except (OSError, ssl.SSLError) as exc:
            compat.log.warning("pve-compat: no TLS (%s): plain HTTP only", exc)
    try:
        crypt = pve_api.Crypt()
    except (OSError, AttributeError) as exc:
        compat.log.warning("pve-compat: no libcrypt (%s): password logins refused", exc)
        crypt = None
    api = compat.BoundedHTTPServer(
        (host, int(cfg["http_port"])), pve_api.ApiHandler, routes(cfg, state), name="api", tls=tls
    )
    api.api = pve_api.Api(cfg, state, crypt=crypt)
    servers = [api]
    servers += [compat.TCPListener(host, int(p), name=f"tcp-{p}") for p in cfg["tcp_ports"]]
    servers += [compat.UDPSink(host, int(p), name=f"udp-{p}") for p in cfg.get("udp_ports", [])]
    return servers


def add_args(parser):
    parser.add_argument("--http-port", type=int)
    parser.add_argument("--tcp-ports", type=lambda s: [int(p) for p in s.split(",")])
    parser.add_argument("--udp-ports", type=lambda s: [int(p) for p in s.split(",") if p])


if __name__ == "__main__":
    sys.exit(compat.main("pve-compat", build, "/etc/pvelab/pve-compat.json", add_args))
