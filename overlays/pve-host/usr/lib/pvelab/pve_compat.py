#!/usr/bin/python3
"""pve-compat: a Proxmox VE API look-alike for the pvelab rehearsal images.

HTTP on 8006 with three read-only endpoints, plus TCP listeners on 5404/5405 and a
UDP sink on 5405 that prove the corosync ports are open.  Python stdlib only.
Config: /etc/pvelab/pve-compat.json (rendered per node from the lab file).

``/api2/json/cluster/status`` tells the truth: with no corosync on the node it serves
the lab's cluster status exactly as rendered; where corosync is installed (a
rehearsal), it reports votequorum's real state (``corosync-quorumtool -s``): the
cluster's ``quorate`` and each node's ``online``, in the same JSON shape.
"""

import os
import re
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import compat

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


def cluster_status_route(cfg, ttl=1.0):
    """Static while corosync is not installed; live (cached ``ttl`` s) where it is."""
    static = compat.json_route({"data": cfg["cluster_status"]})
    cache = {"at": -ttl, "route": static}
    lock = threading.Lock()

    def route():
        tool = cfg.get("quorumtool", QUORUMTOOL)
        if not os.access(tool, os.X_OK):
            return static
        with lock:
            if time.monotonic() - cache["at"] >= ttl:
                try:
                    body = {"data": live_status(cfg["cluster_status"], tool)}
                    cache["route"] = compat.json_route(body)
                except (OSError, subprocess.SubprocessError) as exc:
                    cache["route"] = compat.json_route(
                        {"data": None, "errors": {"quorum": f"{QUORUMTOOL}: {exc}"}}, status=503
                    )
                cache["at"] = time.monotonic()
            return cache["route"]

    return route


def routes(cfg):
    node = cfg["node"]
    return {
        "/api2/json/version": compat.json_route(
            {"data": {"version": "compat-1.0", "release": "pve-compat", "repoid": node}}
        ),
        "/api2/json/cluster/status": cluster_status_route(cfg),
        f"/api2/json/nodes/{node}/status": compat.json_route({"data": NODE_STATUS}),
    }


def build(cfg):
    host = cfg["listen"]
    servers = [
        compat.BoundedHTTPServer((host, int(cfg["http_port"])), compat.Handler, routes(cfg), name="api")
    ]
    servers += [compat.TCPListener(host, int(p), name=f"tcp-{p}") for p in cfg["tcp_ports"]]
    servers += [compat.UDPSink(host, int(p), name=f"udp-{p}") for p in cfg.get("udp_ports", [])]
    return servers


def add_args(parser):
    parser.add_argument("--http-port", type=int)
    parser.add_argument("--tcp-ports", type=lambda s: [int(p) for p in s.split(",")])
    parser.add_argument("--udp-ports", type=lambda s: [int(p) for p in s.split(",") if p])


if __name__ == "__main__":
    sys.exit(compat.main("pve-compat", build, "/etc/pvelab/pve-compat.json", add_args))
