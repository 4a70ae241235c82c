#!/usr/bin/python3
"""pve-compat: a Proxmox VE API look-alike for the pvelab rehearsal images.

HTTP on 8006 with three read-only endpoints, plus TCP listeners on 5404/5405 and a
UDP sink on 5405 that prove the corosync ports are open.  Python stdlib only.
Config: /etc/pvelab/pve-compat.json (rendered per node from the lab file).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import compat

NODE_STATUS = {"uptime": 3600, "loadavg": ["0.05", "0.05", "0.05"], "cpu": 0.05}


def routes(cfg):
    node = cfg["node"]
    return {
        "/api2/json/version": compat.json_route(
            {"data": {"version": "compat-1.0", "release": "pve-compat", "repoid": node}}
        ),
        "/api2/json/cluster/status": compat.json_route({"data": cfg["cluster_status"]}),
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
