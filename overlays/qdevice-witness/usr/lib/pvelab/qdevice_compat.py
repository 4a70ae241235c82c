#!/usr/bin/python3
"""qdevice-compat: stands in for corosync-qnetd on the pvelab witness image.

Accepts TCP connections on 5403 (no qnetd protocol) and serves Prometheus text
metrics on 9165 at /metrics.  Python stdlib only.
Config: /etc/pvelab/qdevice-compat.json (rendered from the lab file).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import compat

METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class MetricsHandler(compat.Handler):
    """/metrics is computed per request (connection counter); the rest is static."""

    def _lookup(self):
        route = super()._lookup()
        if route == "metrics":
            return 200, METRICS_TYPE, self.server.metrics().encode()
        return route


def build(cfg):
    host = cfg["listen"]
    qnetd = compat.TCPListener(host, int(cfg["port"]), name="qnetd")

    def metrics():
        return (
            "# HELP qdevice_compat_up Whether the qdevice-compat service is up.\n"
            "# TYPE qdevice_compat_up gauge\n"
            "qdevice_compat_up 1\n"
            "# HELP qdevice_compat_connections_total TCP connections accepted on the QDevice port.\n"
            "# TYPE qdevice_compat_connections_total counter\n"
            f"qdevice_compat_connections_total {qnetd.accepted}\n"
        )

    http = compat.BoundedHTTPServer(
        (host, int(cfg["metrics_port"])), MetricsHandler, {"/metrics": "metrics"}, name="metrics"
    )
    http.metrics = metrics
    return [qnetd, http]


def add_args(parser):
    parser.add_argument("--port", type=int)
    parser.add_argument("--metrics-port", type=int)


if __name__ == "__main__":
    sys.exit(compat.main("qdevice-compat", build, "/etc/pvelab/qdevice-compat.json", add_args))
