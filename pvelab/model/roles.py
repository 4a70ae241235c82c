"""Node roles, each defined once: what a role adds to a node and what it serves.

A role names its overlay layer (``overlays/<role>/``: templates and static files that
land only in that role's images, its systemd unit among them), the unit it enables,
the directories it creates, whether it is a corosync cluster
member or the QDevice witness, and the data of its compat service
(``/etc/pvelab/<service>.json``).  Adding a role is one entry here plus its overlay
folder; an unknown role name is a validation error in :mod:`pvelab.model.lab`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pvelab.model.lab import Lab, Node


@dataclass(frozen=True)
class Role:
    name: str
    unit: str  # systemd unit enabled on the role's nodes (in its overlay)
    service: str  # compat service name: /etc/pvelab/<service>.json
    cluster_member: bool  # a corosync node with one vote
    qdevice_host: bool  # runs the QDevice daemon (qnetd) for the cluster
    dirs: tuple[str, ...]  # directories created (mode 0750, owned by the lab user)
    compat_config: Callable[[Lab, Node], dict[str, Any]]
    host_ports: tuple[tuple[str, int], ...] = ()  # service -> guest port a running lab forwards
    api_cert: str = ""  # the TLS certificate its API serves (made at first boot), if it serves one
    colour: str = "#eeeeee"  # its boxes' fill in the topology picture and on the release page

    def is_member(self) -> bool:
        """A corosync cluster member with one vote."""
        return self.cluster_member

    def is_witness(self) -> bool:
        """Hosts the QDevice daemon (qnetd) that gives the cluster its tie-breaking vote."""
        return self.qdevice_host


def _pve_host_config(lab: Lab, node: Node) -> dict[str, Any]:
    # The files below are read through systemd credentials (pve-compat.service's
    # LoadCredential=): the service's dynamic user cannot read /etc/pve itself.
    return {
        "node": node.name,
        "listen": "0.0.0.0",
        "http_port": 8006,
        "tcp_ports": [5404, 5405],
        "udp_ports": [5405],
        "nodes": [n.name for n in lab.members],
        "cluster_status": lab.cluster_status(),
        "cluster_name": lab.cluster_name,
        "users": {f"{lab.user.name}@pam": lab.api.role},
        "shadow": "/etc/shadow",
        "tls_cert": PVE_API_CERT,
        "tls_key": "/etc/pve/local/pve-ssl.key",
        "authkey": PVE_AUTHKEY,
        "tokens": PVE_TOKENS,
        "corosync_conf": "/etc/pve/corosync.conf",
        "storage_cfg": "/etc/pve/storage.cfg",
    }


PVE_API_CERT = "/etc/pve/local/pve-ssl.pem"  # as Proxmox VE keeps it
PVE_AUTHKEY = "/etc/pve/priv/pvelab-authkey.key"  # the node's ticket key, made at first boot
PVE_TOKENS = "/etc/pve/priv/pvelab-tokens.json"  # API token id -> salted hash of its secret


def _witness_config(lab: Lab, node: Node) -> dict[str, Any]:
    assert lab.qdevice is not None  # the validator requires lab.qdevice for this role
    return {
        "node": node.name,
        "listen": "0.0.0.0",
        "port": lab.qdevice.port,
        "metrics_port": 9165,
        "cluster_name": lab.cluster_name,
        "algorithm": lab.qdevice.algorithm,
    }


ROLES: dict[str, Role] = {
    r.name: r
    for r in (
        Role(
            name="pve-host",
            unit="pve-compat.service",
            service="pve-compat",
            cluster_member=True,
            qdevice_host=False,
            dirs=(
                "/etc/pve",
                "/etc/pve/nodes",
                "/etc/pve/nodes/{node}",
                "/etc/pve/storage",
                "/etc/pve/qemu-server",
                "/etc/pve/lxc",
                "/etc/pve/priv",
            ),
            compat_config=_pve_host_config,
            host_ports=(("api", 8006),),
            api_cert=PVE_API_CERT,
            colour="#e8f1fb",
        ),
        Role(
            name="qdevice-witness",
            unit="qdevice-compat.service",
            service="qdevice-compat",
            cluster_member=False,
            qdevice_host=True,
            dirs=(),
            compat_config=_witness_config,
            colour="#fdf3e1",
        ),
    )
}


def role(name: str) -> Role:
    return ROLES[name]
