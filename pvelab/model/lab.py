"""The lab model: a lab definition, typed and validated.

Everything downstream (overlays, recipes, images, boot test, publishing) reads the
:class:`Lab` that :func:`pvelab.model.labfile.load_lab` returns; nothing else parses the
YAML. The model's rules (the default MAC, the forbidden packages, quorum's figures)
live here, the lab file's syntax and its one-line errors in :mod:`pvelab.model.labfile`.
"""

from __future__ import annotations

import ipaddress
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pvelab.core.errors import PvelabError
from pvelab.model.artefacts import Layout
from pvelab.model.assertions import Assertion
from pvelab.model.passwords import login_password, sha512_crypt
from pvelab.model.roles import ROLES, Role

FEATURES = ("headless", "ssh")
STARTUP_AFTER = "network-online.target"
RELEASES = ("trixie",)
ARCHES = ("x86_64",)
# Deployed at provisioning time from their own ISOs, never baked into an image.
FORBIDDEN_PACKAGES = (
    "pve-manager",
    "corosync",
    "pve-cluster",
    "pmxcfs",
    "proxmox-backup-server",
    "ceph",
    "truenas-scale",
)
FORBIDDEN_PREFIXES = (
    "pve-",
    "proxmox-",
    "corosync",
    "ceph",
    "libpve",
    "libcorosync",
    "pmxcfs",
    "truenas",
    "qemu-server",
    "libknet",
)
DISABLED_TEST_CONFIG = {"enabled": False, "tests": []}


class LabError(PvelabError):
    """A lab file problem: names the file, the field path and the value."""

    def __init__(self, path: Path | str, field_path: str, value: Any, problem: str):
        self.path, self.field, self.value, self.problem = str(path), field_path, value, problem
        super().__init__(f"{self.path}: {field_path}: {short_repr(value)}: {problem}")


_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlevel = 60, 60, 2
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 4


def short_repr(value: Any) -> str:
    """A value as one short line, however large or deep (an alias bomb stays one line)."""
    text = _REPR.repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


@dataclass(frozen=True)
class User:
    name: str
    password: str | None  # plain, when the lab file gives it
    password_hash: str | None  # crypt hash, when the lab file gives it
    groups: tuple[str, ...]

    def crypt_hash(self) -> str:
        """What /etc/shadow gets: the given hash, or the plain password hashed (SHA-512 crypt)."""
        if self.password_hash:
            return self.password_hash
        assert self.password is not None
        return sha512_crypt(self.password, self.name)

    @property
    def login_password(self) -> str:
        return login_password(self.password)


@dataclass(frozen=True)
class QDevice:
    model: str
    votes: int
    tls: str
    algorithm: str
    port: int


@dataclass(frozen=True)
class ApiToken:
    """An API token of the lab user (``<user>@pam!<id>``) on every PVE node's API. The
    secret is in the lab file; the node keeps only its salted PBKDF2 hash."""

    id: str
    secret: str

    def token_id(self, user: str) -> str:
        return f"{user}@pam!{self.id}"


@dataclass(frozen=True)
class Api:
    """Who may use the nodes' Proxmox API: the lab user (``<user>@pam``, its password) and
    its tokens, with one role (the lab answers reads: PVEAuditor)."""

    role: str = "PVEAuditor"
    tokens: tuple[ApiToken, ...] = ()


@dataclass(frozen=True)
class Storage:
    type: str
    id: str
    properties: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Nic:
    """A network interface of a node, as a provisioning team knows it on a real server: by
    its MAC address, or by its interface name. ``default``: the node's first NIC, which
    takes DHCP and the default route and carries the lab alias."""

    mac: str = ""
    name: str = ""
    default: bool = False

    def describe(self) -> str:
        return f"the NIC {self.name or self.mac}" + (" (the default NIC)" if self.default else "")


@dataclass(frozen=True)
class CorosyncLink:
    """One corosync (knet) link of the lab: its number (``ring<N>_addr``, ``linknumber``),
    its subnet and optionally its knet priority (higher is preferred in passive mode)."""

    number: int
    subnet: ipaddress.IPv4Network
    priority: int | None = None


@dataclass(frozen=True)
class NodeLink:
    """A cluster member on one corosync link: its address there and the NIC that carries it."""

    number: int
    address: ipaddress.IPv4Interface
    nic: Nic

    @property
    def ip(self) -> str:
        return str(self.address.ip)


@dataclass(frozen=True)
class Node:
    name: str
    role: str
    arch: str
    ram_mb: int
    disk_gb: int
    alias: ipaddress.IPv4Interface
    diagram: tuple[int, int]
    features: tuple[str, ...]
    packages: tuple[str, ...]
    test_config: dict
    nodeid: int | None = None  # corosync node id, pve-hosts only (1-based, file order)
    mac: str = ""  # the default NIC's MAC: the network boot's DHCP answers are keyed by it
    links: tuple[NodeLink, ...] = ()  # corosync links, members only (default: link 0 on the alias)

    @property
    def ip(self) -> str:
        return str(self.alias.ip)

    @property
    def role_def(self) -> Role:
        return ROLES[self.role]

    @property
    def is_member(self) -> bool:
        """A corosync cluster member (one vote)."""
        return self.role_def.is_member()

    @property
    def own_nic_links(self) -> tuple[NodeLink, ...]:
        """The corosync links carried by NICs of their own (not the default NIC), in link order."""
        return tuple(link for link in self.links if not link.nic.default)

    @property
    def nics(self) -> tuple[Nic, ...]:
        """Every NIC of the node, the default first, then those its links add, in link order."""
        return (Nic(mac=self.mac, default=True), *(link.nic for link in self.own_nic_links))

    def nic_index(self, number: int) -> int:
        """Which of :attr:`nics` carries corosync link ``number`` (0: the default NIC)."""
        link = self.link(number)
        return 0 if link.nic.default else 1 + self.own_nic_links.index(link)

    def link(self, number: int) -> NodeLink:
        for link in self.links:
            if link.number == number:
                return link
        raise KeyError(f"{self.name} is on no corosync link {number}")


@dataclass(frozen=True)
class Connection:
    source: str
    target: str
    ports: tuple[int, ...]


@dataclass(frozen=True)
class CustomTest:
    name: str
    assertions: tuple[Assertion, ...]


@dataclass(frozen=True)
class Scenario:
    name: str
    custom_tests: tuple[CustomTest, ...]

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "tests": [],
            "custom_tests": [
                {"name": t.name, "assertions": [a.to_dict() for a in t.assertions]} for t in self.custom_tests
            ],
        }


EXISTING_DATA = ("refuse", "wipe")
AFTER_INSTALL = ("poweroff", "reboot")


@dataclass(frozen=True)
class DiskRule:
    """Which disk an installer ISO writes to: every given field must match."""

    path: str | None = None
    min_gb: int | None = None  # default: the node's disk_gb
    max_gb: int | None = None
    model: str | None = None
    serial: str | None = None

    def for_node(self, node: Node) -> dict[str, Any]:
        rule = {k: getattr(self, k) for k in ("path", "min_gb", "max_gb", "model", "serial")}
        if rule["min_gb"] is None and rule["path"] is None:
            rule["min_gb"] = node.disk_gb
        return rule

    def describe(self, node: Node) -> str:
        rule = self.for_node(node)
        parts = [f"{k}={v}" for k, v in rule.items() if v is not None]
        base = "the only non-removable disk" if self.path is None else "the disk"
        return f"{base} with {', '.join(parts)}" if parts else base


@dataclass(frozen=True)
class Install:
    """The lab's ``install:`` section: what the installer ISOs do."""

    disk: DiskRule = field(default_factory=DiskRule)
    existing_data: str = "refuse"  # refuse | wipe
    after: str = "poweroff"  # poweroff | reboot


@dataclass(frozen=True)
class Lab:
    path: Path
    name: str
    subnet: ipaddress.IPv4Network
    release: str
    cluster_name: str
    dns_servers: tuple[str, ...]
    user: User
    startup_after: str
    qdevice: QDevice | None
    storage: tuple[Storage, ...]
    nodes: tuple[Node, ...]
    connections: tuple[Connection, ...]
    scenario: Scenario
    install: Install = field(default_factory=lambda: Install())
    api: Api = field(default_factory=lambda: Api())
    links: tuple[CorosyncLink, ...] = ()  # corosync links (the parser fills in the default link 0)

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    @property
    def layout(self) -> Layout:
        """Where this lab's outputs are (``build/<lab>/``): every path is asked of it."""
        return Layout(self.name)

    @property
    def is_redundant(self) -> bool:
        """More than one corosync link: knet fails over between them."""
        return len(self.links) > 1

    def link_networks(self) -> tuple[CorosyncLink, ...]:
        """The links carried by NICs of their own (each gets its own bridge on the lab's
        host side); a link on the default NIC shares the lab network."""
        return tuple(
            link for link in self.links if any(not n.link(link.number).nic.default for n in self.members)
        )

    @property
    def members(self) -> tuple[Node, ...]:
        return tuple(n for n in self.nodes if n.is_member)

    @property
    def witness(self) -> Node | None:
        return next((n for n in self.nodes if n.role_def.is_witness()), None)

    @property
    def expected_votes(self) -> int:
        """One vote per PVE node plus the QDevice's votes when a witness exists."""
        qvotes = self.qdevice.votes if (self.qdevice and self.witness) else 0
        return len(self.members) + qvotes

    @property
    def quorum(self) -> int:
        """votequorum's strict majority of expected_votes."""
        return self.expected_votes // 2 + 1

    def cluster_status(self) -> list[dict]:
        """The `/api2/json/cluster/status` data list every PVE node serves."""
        data: list[dict] = [
            {"type": "cluster", "name": self.cluster_name, "nodes": len(self.members), "quorate": 1}
        ]
        for n in self.members:
            data.append(
                {"type": "node", "name": n.name, "online": 1, "id": f"node/{n.name}", "nodeid": n.nodeid}
            )
        return data

    def select(self, names: list[str] | tuple[str, ...] | None) -> tuple[Node, ...]:
        """Nodes by name (all when empty); unknown names are a LabError."""
        if not names:
            return self.nodes
        known = [n.name for n in self.nodes]
        for name in names:
            if name not in known:
                raise LabError(
                    self.path,
                    "--node",
                    name,
                    f"no such node in lab {self.name!r} (nodes: {', '.join(known)})",
                )
        return tuple(self.node(name) for name in names)


def default_mac(index: int) -> str:
    """The MAC of the lab's ``index``-th node when the lab file names none (QEMU's
    locally administered prefix; the lab network's VMs get these)."""
    return f"52:54:00:81:00:{index + 1:02x}"
