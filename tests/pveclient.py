"""A real Proxmox VE client (proxmoxer, pinned in constraints.txt) against a lab node:
log in with a ticket or an API token, over HTTPS with verification off or with the
node's certificate pinned by its SHA-256 fingerprint, and read every endpoint the lab
answers. Used on loopback (test_api) and against a booted node (test_running_lab)."""

from __future__ import annotations

import ssl
from pathlib import Path

from proxmoxer import ProxmoxAPI

from pvelab.running import apicert

# Every read endpoint pve-compat answers in the Proxmox dialect ({node}: the node asked)
READS = (
    "version",
    "cluster/status",
    "nodes",
    "nodes/{node}/status",
    "cluster/config/nodes",
    "cluster/config/totem",
    "cluster/config/qdevice",
    "storage",
    "storage/{storage}",
    "nodes/{node}/storage",
    "cluster/resources",
    "access/permissions",
)


def pinned_cert(host: str, port: int, fingerprint: str, dest: Path) -> Path:
    """The server's certificate written to ``dest`` if its SHA-256 fingerprint is
    ``fingerprint`` (else AssertionError): given as the only trust anchor (``verify_ssl``),
    it makes every later connection accept that certificate and no other."""
    pem = ssl.get_server_certificate((host, port), timeout=30)
    got = fingerprint_of_pem(pem)
    assert got == fingerprint, f"{host}:{port} presents {got}, expected {fingerprint}"
    dest.write_text(pem)
    return dest


def connect(
    host: str,
    port: int,
    user: str,
    *,
    password: str | None = None,
    token: tuple[str, str] | None = None,
    trust: Path | None = None,
    timeout: float = 30,
) -> ProxmoxAPI:
    """proxmoxer's ProxmoxAPI on https://host:port: verification off, or only ``trust``."""
    kwargs: dict = {"host": f"{host}:{port}", "user": user, "timeout": timeout}
    kwargs["verify_ssl"] = str(trust) if trust else False
    if token:
        kwargs.update(token_name=token[0], token_value=token[1])
    return ProxmoxAPI(password=password, **kwargs)


def read_all(api: ProxmoxAPI, node: str, storage: str) -> dict[str, object]:
    """path -> data of every endpoint in READS."""
    out = {}
    for path in READS:
        p = path.format(node=node, storage=storage)
        out[p] = api(p).get()
    return out


def fingerprint_of_pem(pem: str) -> str:
    """A certificate's SHA-256 fingerprint as Proxmox shows it (AA:BB:...)."""
    return apicert.parse(pem)
