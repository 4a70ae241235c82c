"""The lab file: a lab YAML file read safely and validated into :mod:`pvelab.model.lab`'s model.

A bad file raises :class:`pvelab.model.lab.LabError` naming the file, the field path and the
offending value, before any work starts. The YAML is read with a loader that refuses
what a lab file never needs (deep nesting, alias bombs, huge files, control characters).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from pathlib import Path
from typing import Any, NoReturn

import yaml

from pvelab.model.assertions import ASSERTION_TYPES, Assertion
from pvelab.model.lab import (
    AFTER_INSTALL,
    ARCHES,
    DISABLED_TEST_CONFIG,
    EXISTING_DATA,
    FEATURES,
    FORBIDDEN_PACKAGES,
    FORBIDDEN_PREFIXES,
    RELEASES,
    STARTUP_AFTER,
    Api,
    ApiToken,
    Connection,
    CorosyncLink,
    CustomTest,
    DiskRule,
    Install,
    Lab,
    LabError,
    Nic,
    Node,
    NodeLink,
    QDevice,
    Scenario,
    Storage,
    User,
    default_mac,
    short_repr,
)
from pvelab.model.passwords import is_crypt_hash
from pvelab.model.roles import ROLES

_POSIX_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_STORAGE_TYPE = re.compile(r"[a-z]{2,16}")
_STORAGE_ID = re.compile(r"[a-z][a-z0-9_.-]{0,62}[a-z0-9]")
_STORAGE_KEY = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_HOSTNAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


# --------------------------------------------------------------------------- parsing


class _Reader:
    """Typed field access that turns every mistake into a LabError."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, where: str, value: Any, problem: str) -> NoReturn:
        raise LabError(self.path, where, value, problem)

    def mapping(self, obj: Any, where: str, allowed: set[str] | None = None) -> dict:
        if not isinstance(obj, dict):
            self.fail(where, obj, "must be a mapping")
        if allowed is not None:
            for key in obj:
                if key not in allowed:
                    self.fail(
                        f"{where}.{key}" if where else str(key),
                        obj[key],
                        f"unknown field (allowed: {', '.join(sorted(allowed))})",
                    )
        return obj

    def get(self, obj: dict, key: str, where: str, kind: type | tuple, default: Any = ...):
        path = f"{where}.{key}" if where else key
        if key not in obj:
            if default is ...:
                self.fail(path, None, "is required")
            return default
        value = obj[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            self.fail(path, value, f"must be {' or '.join(k.__name__ for k in kinds)}")
        if not isinstance(value, kinds):
            self.fail(path, value, f"must be {' or '.join(k.__name__ for k in kinds)}")
        return value

    def positive_int(self, obj: dict, key: str, where: str) -> int:
        value = self.get(obj, key, where, int)
        if value <= 0:
            self.fail(f"{where}.{key}", value, "must be a positive integer")
        return value

    def port(self, value: Any, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            self.fail(where, value, "must be a TCP/UDP port number 1-65535")
        return value

    def str_list(self, obj: dict, key: str, where: str, default: Any = ...) -> tuple[str, ...]:
        value = self.get(obj, key, where, list, default)
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item:
                self.fail(f"{where}.{key}[{i}]", item, "must be a non-empty string")
        return tuple(value)


MAX_DEPTH = 24  # nesting levels a lab file may use
MAX_ALIASES = 200  # alias uses (*name) a lab file may make
MAX_BYTES = 1 << 20  # a lab file is a few KB; refuse anything near a megabyte
_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]")


class _LimitError(yaml.YAMLError):
    def __init__(self, problem: str, mark: Any):
        super().__init__(problem)
        self.problem, self.problem_mark = problem, mark


class _LabLoader(yaml.SafeLoader):
    """SafeLoader with bounds: nesting depth, alias uses, and no duplicate keys."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise _LimitError(f"more than {MAX_ALIASES} alias uses", self.peek_event().start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _LimitError(f"nested deeper than {MAX_DEPTH} levels", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = key_node.value
            if key in seen:
                raise _LimitError(
                    f"duplicate key {short_repr(key)} (first on line {seen[key].line + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LabError(path, "(file)", str(path), f"cannot be read: {exc.strerror}") from None
    if len(data) > MAX_BYTES:
        raise LabError(path, "(file)", f"{len(data)} bytes", f"is larger than {MAX_BYTES} bytes")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise LabError(path, "(file)", data[:2].hex(), "is UTF-16 text; save it as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LabError(
            path, f"byte {exc.start}", data[exc.start : exc.start + 4].hex(), "is not UTF-8 text"
        ) from None


def _check_text(r: _Reader, obj: Any, where: str, seen: set[int]) -> None:
    """No control character (a newline included) in any key or value: they end up in
    file names, configuration files and scripts. Shared (aliased) values are walked once."""
    if isinstance(obj, str):
        if _CONTROL.search(obj):
            r.fail(where or "(top)", obj, "contains a control character (newline, tab, ...)")
    elif isinstance(obj, (dict, list)):
        if id(obj) in seen:
            return
        seen.add(id(obj))
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        for key, value in items:
            sub = f"{where}[{key}]" if isinstance(obj, list) else (f"{where}.{key}" if where else str(key))
            _check_text(r, key, sub, seen)
            _check_text(r, value, sub, seen)


def load_lab(path: str | Path) -> Lab:
    """Read and validate a lab file; raise LabError on the first problem found."""
    path = Path(path)
    text = _read_text(path)
    try:
        raw = yaml.load(text, Loader=_LabLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "(yaml)"
        raise LabError(path, where, getattr(exc, "problem", None) or str(exc), "is not valid YAML") from None
    except RecursionError:
        raise LabError(path, "(yaml)", "...", f"is nested too deeply (at most {MAX_DEPTH} levels)") from None
    _check_text(_Reader(path), raw, "", set())
    return parse_lab(raw, path)


def parse_lab(raw: Any, path: Path) -> Lab:
    r = _Reader(path)
    top = r.mapping(raw, "", {"lab", "node_defaults", "nodes", "connections", "scenarios", "install"})
    lab = r.mapping(
        r.get(top, "lab", "", dict),
        "lab",
        {
            "name",
            "subnet",
            "release",
            "cluster_name",
            "dns_servers",
            "user",
            "startup",
            "qdevice",
            "storage",
            "api",
            "links",
        },
    )
    name, subnet, release, cluster_name = _parse_identity(r, lab)
    qdevice = _parse_qdevice(r, lab) if "qdevice" in lab else None
    links = _parse_links(r, lab, subnet)
    nodes = _parse_nodes(r, top, subnet)
    nodes = _parse_node_links(r, top, nodes, links)
    if qdevice is None and any(n.role_def.is_witness() for n in nodes):
        r.fail(
            "lab.qdevice",
            None,
            "is required when a node runs the QDevice (role "
            + ", ".join(k for k, v in ROLES.items() if v.is_witness())
            + ")",
        )
    if qdevice is not None:
        _check_qdevice_votes(r, qdevice, sum(1 for n in nodes if n.is_member))
    names = {n.name for n in nodes}
    return Lab(
        path=path,
        name=name,
        subnet=subnet,
        release=release,
        cluster_name=cluster_name,
        dns_servers=_parse_dns(r, lab),
        user=_parse_user(r, lab),
        startup_after=_parse_startup(r, lab),
        qdevice=qdevice,
        storage=_parse_storage(r, lab),
        nodes=nodes,
        connections=_parse_connections(r, top, names),
        scenario=_parse_scenario(r, top, names),
        install=_parse_install(r, top),
        api=_parse_api(r, lab),
        links=links,
    )


API_ROLES = ("PVEAuditor", "NoAccess")  # the roles pve-compat knows (the lab serves reads only)
_TOKEN_ID = re.compile(r"[A-Za-z][A-Za-z0-9._-]{1,63}")


def _parse_api(r: _Reader, lab: dict) -> Api:
    if "api" not in lab:
        return Api()
    a = r.mapping(r.get(lab, "api", "lab", dict), "lab.api", {"role", "tokens"})
    role = r.get(a, "role", "lab.api", str, default="PVEAuditor")
    if role not in API_ROLES:
        r.fail("lab.api.role", role, f"unknown role (known: {', '.join(API_ROLES)})")
    tokens: list[ApiToken] = []
    for i, t in enumerate(r.get(a, "tokens", "lab.api", list, default=[])):
        where = f"lab.api.tokens[{i}]"
        t = r.mapping(t, where, {"id", "secret"})
        token = ApiToken(id=r.get(t, "id", where, str), secret=r.get(t, "secret", where, str))
        if not _TOKEN_ID.fullmatch(token.id):
            r.fail(
                f"{where}.id",
                token.id,
                "must be 2-64 letters, digits, '.', '_' or '-', starting with a letter",
            )
        if token.id in {x.id for x in tokens}:
            r.fail(f"{where}.id", token.id, "is declared twice")
        if len(token.secret) < 16 or any(c.isspace() for c in token.secret):
            r.fail(
                f"{where}.secret",
                "...",
                "must be at least 16 characters without spaces (a UUID, as Proxmox makes)",
            )
        tokens.append(token)
    return Api(role=role, tokens=tuple(tokens))


def _parse_identity(r: _Reader, lab: dict) -> tuple[str, ipaddress.IPv4Network, str, str]:
    name = r.get(lab, "name", "lab", str)
    if not _HOSTNAME.fullmatch(name.replace("_", "-")):
        r.fail("lab.name", name, "must be a short name of letters, digits and dashes")
    subnet_text = r.get(lab, "subnet", "lab", str)
    try:
        subnet = ipaddress.IPv4Network(subnet_text, strict=True)
    except ValueError as exc:
        r.fail("lab.subnet", subnet_text, f"is not an IPv4 network in CIDR form ({exc})")
    release = r.get(lab, "release", "lab", str)
    if release not in RELEASES:
        r.fail("lab.release", release, f"unsupported release (supported: {', '.join(RELEASES)})")
    cluster_name = r.get(lab, "cluster_name", "lab", str)
    if not re.fullmatch(r"[A-Za-z0-9-]{1,15}", cluster_name):
        r.fail("lab.cluster_name", cluster_name, "must be 1-15 letters, digits or dashes")
    return name, subnet, release, cluster_name


def _parse_dns(r: _Reader, lab: dict) -> tuple[str, ...]:
    dns = r.str_list(lab, "dns_servers", "lab")
    for i, server in enumerate(dns):
        try:
            ipaddress.ip_address(server)
        except ValueError:
            r.fail(f"lab.dns_servers[{i}]", server, "is not an IP address")
    if not dns:
        r.fail("lab.dns_servers", [], "needs at least one DNS server")
    return dns


def _parse_user(r: _Reader, lab: dict) -> User:
    u = r.mapping(
        r.get(lab, "user", "lab", dict), "lab.user", {"name", "password", "password_hash", "groups"}
    )
    user = User(
        name=r.get(u, "name", "lab.user", str),
        password=r.get(u, "password", "lab.user", str, default=None),
        password_hash=r.get(u, "password_hash", "lab.user", str, default=None),
        groups=r.str_list(u, "groups", "lab.user", default=[]),
    )
    if not _POSIX_NAME.fullmatch(user.name) or user.name == "root":
        r.fail("lab.user.name", user.name, "must be a non-root POSIX user name")
    if (user.password is None) == (user.password_hash is None):
        r.fail("lab.user", sorted(u), "needs exactly one of password and password_hash")
    if user.password is not None and not user.password:
        r.fail("lab.user.password", user.password, "must not be empty")
    if user.password_hash is not None and not is_crypt_hash(user.password_hash):
        r.fail(
            "lab.user.password_hash",
            user.password_hash[:12] + "...",
            "must be a yescrypt ($y$...) or SHA-512 crypt ($6$...) hash, as in /etc/shadow",
        )
    for i, group in enumerate(user.groups):
        if not _POSIX_NAME.fullmatch(group):
            r.fail(f"lab.user.groups[{i}]", group, "is not a POSIX group name")
    if "sudo" not in user.groups:
        r.fail(
            "lab.user.groups",
            list(user.groups),
            "must include sudo: the rehearsal and `invoke up --cluster` run corosync's tools "
            "on the nodes as root through sudo (root cannot log in over SSH)",
        )
    return user


def _parse_startup(r: _Reader, lab: dict) -> str:
    startup = r.mapping(r.get(lab, "startup", "lab", dict), "lab.startup", {"after"})
    after = startup.get("after")
    if not isinstance(after, str) or after != STARTUP_AFTER:
        r.fail("lab.startup.after", after, f"must be the single string {STARTUP_AFTER!r}")
    return after


def _parse_qdevice(r: _Reader, lab: dict) -> QDevice:
    q = r.mapping(
        r.get(lab, "qdevice", "lab", dict), "lab.qdevice", {"model", "votes", "tls", "algorithm", "port"}
    )
    qdevice = QDevice(
        model=r.get(q, "model", "lab.qdevice", str),
        votes=r.positive_int(q, "votes", "lab.qdevice"),
        tls=str(r.get(q, "tls", "lab.qdevice", (str, bool)))
        .lower()
        .replace("true", "on")
        .replace("false", "off"),
        algorithm=r.get(q, "algorithm", "lab.qdevice", str),
        port=r.port(q.get("port", 5403), "lab.qdevice.port"),
    )
    if qdevice.model != "net":
        r.fail("lab.qdevice.model", qdevice.model, "only model 'net' is supported")
    if qdevice.algorithm not in ("ffsplit", "lms"):
        r.fail("lab.qdevice.algorithm", qdevice.algorithm, "must be 'ffsplit' or 'lms'")
    if qdevice.tls not in ("on", "off", "required"):
        r.fail("lab.qdevice.tls", qdevice.tls, "must be on, off or required")
    return qdevice


def _check_qdevice_votes(r: _Reader, q: QDevice, members: int) -> None:
    """corosync-qdevice: ffsplit needs exactly 1 vote; lms gives at most N-1. A QDevice
    outvoting the members (a witness quorate on its own) is never accepted."""
    if q.algorithm == "ffsplit" and q.votes != 1:
        r.fail("lab.qdevice.votes", q.votes, "must be 1 with algorithm ffsplit (corosync-qdevice(8))")
    if q.votes >= members:
        r.fail(
            "lab.qdevice.votes",
            q.votes,
            f"must be below the {members} cluster members' votes "
            f"(lms gives the QDevice at most {members - 1})",
        )


def _parse_storage(r: _Reader, lab: dict) -> tuple[Storage, ...]:
    storage = []
    for i, s in enumerate(r.get(lab, "storage", "lab", list, default=[])):
        where = f"lab.storage[{i}]"
        s = r.mapping(s, where, {"type", "id", "properties"})
        props = r.mapping(r.get(s, "properties", where, dict), f"{where}.properties")
        for k, v in props.items():
            if not isinstance(k, str) or not _STORAGE_KEY.fullmatch(k):
                r.fail(f"{where}.properties", k, "is not a storage.cfg property name (a-z, 0-9, -, _)")
            if isinstance(v, (dict, list)) or v is None:
                r.fail(f"{where}.properties.{k}", v, "must be a scalar")
            if str(v) != str(v).strip() or not str(v):
                r.fail(f"{where}.properties.{k}", v, "must not be empty or start/end with blanks")
        for key, pattern, what in (
            ("type", _STORAGE_TYPE, "a storage type (a-z)"),
            ("id", _STORAGE_ID, "a storage id (a-z first, then a-z, 0-9, -, _, .)"),
        ):
            if not pattern.fullmatch(str(s.get(key, ""))):
                r.fail(f"{where}.{key}", s.get(key), f"is not {what}")
        storage.append(
            Storage(
                type=r.get(s, "type", where, str),
                id=r.get(s, "id", where, str),
                properties=tuple((str(k), str(v)) for k, v in props.items()),
            )
        )
    return tuple(storage)


def _parse_connections(r: _Reader, top: dict, names: set[str]) -> tuple[Connection, ...]:
    connections = []
    for i, c in enumerate(r.get(top, "connections", "", list, default=[])):
        where = f"connections[{i}]"
        c = r.mapping(c, where, {"from", "to", "ports"})
        ends = []
        for key in ("from", "to"):
            end = r.get(c, key, where, str)
            if end not in names:
                r.fail(f"{where}.{key}", end, "names no node of this lab")
            ends.append(end)
        ports = r.get(c, "ports", where, list)
        connections.append(
            Connection(ends[0], ends[1], tuple(r.port(p, f"{where}.ports[{j}]") for j, p in enumerate(ports)))
        )
    return tuple(connections)


_NODE_FIELDS = {
    "name",
    "role",
    "arch",
    "ram_mb",
    "disk_gb",
    "alias",
    "diagram",
    "features",
    "packages",
    "test_config",
    "mac",
    "links",
}
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


def _parse_nodes(r: _Reader, top: dict, subnet: ipaddress.IPv4Network) -> tuple[Node, ...]:
    nodes: list[Node] = []
    seen_names: dict[str, int] = {}
    seen_ips: dict[str, int] = {}
    seen_macs: dict[str, int] = {}
    for i, n in enumerate(r.get(top, "nodes", "", list)):
        where = f"nodes[{i}]"
        n = r.mapping(n, where, _NODE_FIELDS)
        name = r.get(n, "name", where, str)
        if not _HOSTNAME.fullmatch(name) or len(name) > 16:
            r.fail(
                f"{where}.name",
                name,
                "must be a host name of at most 16 characters "
                "(a-z, 0-9, dashes; it is also the ISO volume label)",
            )
        if name in seen_names:
            r.fail(f"{where}.name", name, f"duplicate node name (also nodes[{seen_names[name]}])")
        seen_names[name] = i
        alias = _parse_alias(r, n, where, subnet)
        if str(alias.ip) in seen_ips:
            r.fail(
                f"{where}.alias",
                str(alias),
                f"duplicate alias address (also nodes[{seen_ips[str(alias.ip)]}])",
            )
        seen_ips[str(alias.ip)] = i
        nodeid = sum(1 for m in nodes if m.is_member) + 1
        node = _parse_node(r, n, where, name, alias, nodeid)
        mac = r.get(n, "mac", where, str, default=default_mac(i))
        if not _MAC.fullmatch(mac) or int(mac[:2], 16) & 1:
            r.fail(f"{where}.mac", mac, "must be a unicast MAC address, lower case (52:54:00:12:34:56)")
        if mac in seen_macs:
            r.fail(f"{where}.mac", mac, f"duplicate MAC address (also nodes[{seen_macs[mac]}])")
        seen_macs[mac] = i
        nodes.append(dataclasses.replace(node, mac=mac))
    _check_roles(r, nodes)
    return tuple(nodes)


MAX_LINKS = 8  # knet's links per node (0-7)


def _parse_links(r: _Reader, lab: dict, subnet: ipaddress.IPv4Network) -> tuple[CorosyncLink, ...]:
    """``lab.links``: corosync's knet links. Default: link 0 on the lab subnet."""
    if "links" not in lab:
        return (CorosyncLink(0, subnet),)
    raw = r.get(lab, "links", "lab", list)
    if not raw or len(raw) > MAX_LINKS:
        r.fail("lab.links", raw, f"needs 1 to {MAX_LINKS} links")
    links: list[CorosyncLink] = []
    for i, item in enumerate(raw):
        where = f"lab.links[{i}]"
        item = r.mapping(item, where, {"number", "subnet", "priority"})
        number = r.get(item, "number", where, int)
        if isinstance(number, bool) or not 0 <= number < MAX_LINKS:
            r.fail(f"{where}.number", number, f"must be a knet link number, 0 to {MAX_LINKS - 1}")
        if number in {x.number for x in links}:
            r.fail(f"{where}.number", number, "is declared twice")
        text = r.get(item, "subnet", where, str)
        try:
            net = ipaddress.IPv4Network(text)
        except ValueError as exc:
            r.fail(f"{where}.subnet", text, f"is not an IPv4 subnet in CIDR form ({exc})")
        for other in links:
            if net.overlaps(other.subnet):
                r.fail(f"{where}.subnet", text, f"overlaps link {other.number}'s subnet {other.subnet}")
        if net != subnet and net.overlaps(subnet):
            r.fail(f"{where}.subnet", text, f"overlaps the lab subnet {subnet} without being it")
        priority = r.get(item, "priority", where, int, default=None)
        if priority is not None and (isinstance(priority, bool) or not 0 <= priority <= 255):
            r.fail(f"{where}.priority", priority, "must be a knet link priority, 0 to 255")
        links.append(CorosyncLink(number, net, priority))
    numbers = sorted(x.number for x in links)
    if numbers[0] != 0:
        r.fail("lab.links", numbers, f"link {numbers[0]} without a link 0 (corosync needs ring0_addr)")
    return tuple(sorted(links, key=lambda x: x.number))


def _parse_nic(r: _Reader, raw: Any, where: str, node: Node) -> Nic:
    """A NIC named by ``mac`` or ``name``; none given: the node's default NIC."""
    if raw is None:
        return Nic(mac=node.mac, default=True)
    nic = r.mapping(raw, where, {"mac", "name"})
    mac = r.get(nic, "mac", where, str, default="")
    name = r.get(nic, "name", where, str, default="")
    if not mac and not name:
        r.fail(where, raw, "names the NIC by mac or by name")
    if mac and (not _MAC.fullmatch(mac) or int(mac[:2], 16) & 1):
        r.fail(f"{where}.mac", mac, "must be a unicast MAC address, lower case (52:54:00:12:34:56)")
    if name and not _IFNAME.fullmatch(name):
        r.fail(f"{where}.name", name, "is not a Linux interface name (1-15 letters, digits, '-', '_', '.')")
    if mac == node.mac:
        return Nic(mac=node.mac, default=True)
    return Nic(mac=mac, name=name)


_IFNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,14}")


def _parse_node_links(
    r: _Reader, top: dict, nodes: tuple[Node, ...], links: tuple[CorosyncLink, ...]
) -> tuple[Node, ...]:
    """Each member's address and NIC per corosync link. A member that names none is on
    every link whose subnet holds its alias, by its default NIC."""
    out: list[Node] = []
    seen_ips: dict[tuple[int, str], str] = {}
    macs = {n.mac: f"nodes[{i}].mac" for i, n in enumerate(nodes)}
    for i, (raw, node) in enumerate(zip(r.get(top, "nodes", "", list), nodes, strict=True)):
        where = f"nodes[{i}].links"
        if not node.is_member:
            if "links" in raw:
                r.fail(where, raw["links"], "only cluster members (role pve-host) are on corosync links")
            out.append(node)
            continue
        declared = r.get(raw, "links", f"nodes[{i}]", list, default=None)
        mine: list[NodeLink] = []
        if declared is None:
            for link in links:
                if node.alias.ip not in link.subnet:
                    r.fail(
                        where, None, f"is missing: link {link.number} ({link.subnet}) does not hold the alias"
                    )
                mine.append(
                    NodeLink(
                        link.number,
                        ipaddress.IPv4Interface(f"{node.alias.ip}/{link.subnet.prefixlen}"),
                        Nic(mac=node.mac, default=True),
                    )
                )
        else:
            for j, item in enumerate(declared):
                mine.append(_parse_node_link(r, item, f"{where}[{j}]", node, links, mine, macs, seen_ips))
            missing = [x.number for x in links if x.number not in {m.number for m in mine}]
            if missing:
                r.fail(
                    where,
                    [m.number for m in mine],
                    f"is missing link {missing[0]} (every member is on every link)",
                )
        out.append(dataclasses.replace(node, links=tuple(sorted(mine, key=lambda x: x.number))))
    return tuple(out)


def _parse_node_link(
    r: _Reader,
    item: Any,
    w: str,
    node: Node,
    links: tuple[CorosyncLink, ...],
    mine: list[NodeLink],
    macs: dict[str, str],
    seen_ips: dict[tuple[int, str], str],
) -> NodeLink:
    """One entry of a member's ``links``: the link, the address on it and its NIC; ``mine``
    (the member's links so far), ``macs`` and ``seen_ips`` catch what is named twice."""
    item = r.mapping(item, w, {"number", "address", "nic"})
    number = r.get(item, "number", w, int)
    found = next((x for x in links if x.number == number), None)
    if found is None:
        r.fail(
            f"{w}.number",
            number,
            f"no such link in lab.links (links: {', '.join(str(x.number) for x in links)})",
        )
    link = found
    if number in {x.number for x in mine}:
        r.fail(f"{w}.number", number, "names the same link twice")
    text = r.get(item, "address", w, str)
    try:
        ip = ipaddress.IPv4Address(text.split("/")[0])
    except ValueError as exc:
        r.fail(f"{w}.address", text, f"is not an IPv4 address ({exc})")
    if ip not in link.subnet or ip in (
        link.subnet.network_address,
        link.subnet.broadcast_address,
    ):
        r.fail(f"{w}.address", text, f"is outside link {number}'s subnet {link.subnet}")
    nic = _parse_nic(r, item.get("nic"), f"{w}.nic", node)
    if nic.default and ip != node.alias.ip:
        r.fail(
            f"{w}.address",
            text,
            f"is on the default NIC, which carries the alias {node.alias.ip} only",
        )
    if not nic.default and ip == node.alias.ip:
        r.fail(
            f"{w}.nic",
            item.get("nic"),
            f"carries the alias {node.alias.ip}: that is the default NIC's",
        )
    for other in mine:
        if other.nic.default == nic.default and (
            nic.default or (nic.mac and nic.mac == other.nic.mac) or (nic.name and nic.name == other.nic.name)
        ):
            r.fail(
                f"{w}.nic",
                item.get("nic") or "(default)",
                f"is named for two links ({other.number} and {number}): one NIC per link",
            )
    if nic.mac and not nic.default:
        if nic.mac in macs:
            r.fail(f"{w}.nic.mac", nic.mac, f"duplicate MAC address (also {macs[nic.mac]})")
        macs[nic.mac] = f"{w}.nic.mac"
    if (number, str(ip)) in seen_ips:
        r.fail(
            f"{w}.address",
            text,
            f"duplicate address on link {number} (also {seen_ips[(number, str(ip))]})",
        )
    seen_ips[(number, str(ip))] = w
    return NodeLink(number, ipaddress.IPv4Interface(f"{ip}/{link.subnet.prefixlen}"), nic)


def _parse_alias(r: _Reader, n: dict, where: str, subnet: ipaddress.IPv4Network) -> ipaddress.IPv4Interface:
    alias_text = r.get(n, "alias", where, str)
    try:
        if "/" not in alias_text:
            raise ValueError("no prefix length")
        alias = ipaddress.IPv4Interface(alias_text)
    except ValueError as exc:
        r.fail(f"{where}.alias", alias_text, f"is not an IPv4 address in CIDR form ({exc})")
    if alias.ip not in subnet or alias.network != subnet:
        r.fail(f"{where}.alias", alias_text, f"is outside the lab subnet {subnet}")
    if alias.ip in (subnet.network_address, subnet.broadcast_address):
        r.fail(f"{where}.alias", alias_text, "is the subnet's network or broadcast address")
    return alias


def _parse_node(
    r: _Reader, n: dict, where: str, name: str, alias: ipaddress.IPv4Interface, nodeid: int
) -> Node:
    role = r.get(n, "role", where, str)
    if role not in ROLES:
        r.fail(f"{where}.role", role, f"unknown role (known: {', '.join(ROLES)})")
    arch = r.get(n, "arch", where, str)
    if arch not in ARCHES:
        r.fail(f"{where}.arch", arch, f"unsupported architecture (supported: {', '.join(ARCHES)})")
    d = r.mapping(r.get(n, "diagram", where, dict), f"{where}.diagram", {"x", "y"})
    diagram = (r.get(d, "x", f"{where}.diagram", int), r.get(d, "y", f"{where}.diagram", int))
    features = r.str_list(n, "features", where, default=list(FEATURES))
    for j, feat in enumerate(features):
        if feat not in FEATURES:
            r.fail(f"{where}.features[{j}]", feat, f"unknown feature (known: {', '.join(FEATURES)})")
    packages = r.str_list(n, "packages", where, default=[])
    for j, pkg in enumerate(packages):
        if pkg in FORBIDDEN_PACKAGES or pkg.startswith(FORBIDDEN_PREFIXES):
            r.fail(
                f"{where}.packages[{j}]",
                pkg,
                "is deployed at provisioning time and must never be installed at build time",
            )
        if not re.fullmatch(r"[a-z0-9][a-z0-9+.-]+", pkg):
            r.fail(f"{where}.packages[{j}]", pkg, "is not a Debian package name")
    test_config = n.get("test_config")
    if test_config != DISABLED_TEST_CONFIG:
        r.fail(
            f"{where}.test_config",
            test_config,
            'must be {"enabled": false, "tests": []} (per-node tests are disabled)',
        )
    return Node(
        name=name,
        role=role,
        arch=arch,
        ram_mb=r.positive_int(n, "ram_mb", where),
        disk_gb=r.positive_int(n, "disk_gb", where),
        alias=alias,
        diagram=diagram,
        features=features,
        packages=packages,
        test_config=dict(test_config),
        nodeid=nodeid if ROLES[role].is_member() else None,
    )


def _check_roles(r: _Reader, nodes: list[Node]) -> None:
    index = {n.name: i for i, n in enumerate(nodes)}
    members = [n for n in nodes if n.is_member]
    witnesses = [n for n in nodes if n.role_def.is_witness()]
    if witnesses and not members:
        r.fail(
            f"nodes[{index[witnesses[0].name]}].role",
            witnesses[0].role,
            "a QDevice witness needs cluster members to serve",
        )
    if len(members) < 2:
        r.fail("nodes", [n.name for n in members], "a cluster needs at least two pve-host nodes")
    if len(witnesses) > 1:
        r.fail(
            f"nodes[{index[witnesses[1].name]}].role",
            witnesses[1].role,
            "corosync supports one QDevice: at most one qdevice-witness node",
        )


def _parse_install(r: _Reader, top: dict) -> Install:
    if "install" not in top:
        return Install()
    i = r.mapping(r.get(top, "install", "", dict), "install", {"disk", "existing_data", "after"})
    d = r.mapping(
        r.get(i, "disk", "install", dict, default={}),
        "install.disk",
        {"path", "min_gb", "max_gb", "model", "serial"},
    )
    disk = DiskRule(
        path=r.get(d, "path", "install.disk", str, default=None),
        min_gb=r.positive_int(d, "min_gb", "install.disk") if "min_gb" in d else None,
        max_gb=r.positive_int(d, "max_gb", "install.disk") if "max_gb" in d else None,
        model=r.get(d, "model", "install.disk", str, default=None),
        serial=r.get(d, "serial", "install.disk", str, default=None),
    )
    if disk.path is not None and not re.fullmatch(r"/dev/[A-Za-z0-9/_.:-]+", disk.path):
        r.fail("install.disk.path", disk.path, "must be a device path under /dev/")
    if disk.min_gb and disk.max_gb and disk.min_gb > disk.max_gb:
        r.fail("install.disk.max_gb", disk.max_gb, f"is below min_gb {disk.min_gb}")
    existing = r.get(i, "existing_data", "install", str, default="refuse")
    if existing not in EXISTING_DATA:
        r.fail("install.existing_data", existing, f"must be one of {', '.join(EXISTING_DATA)}")
    after = r.get(i, "after", "install", str, default="poweroff")
    if after not in AFTER_INSTALL:
        r.fail("install.after", after, f"must be one of {', '.join(AFTER_INSTALL)}")
    return Install(disk, existing, after)


def _parse_scenario(r: _Reader, top: dict, names: set[str]) -> Scenario:
    scenarios = r.get(top, "scenarios", "", list)
    if len(scenarios) != 1:
        r.fail(
            "scenarios",
            [s.get("name") if isinstance(s, dict) else s for s in scenarios],
            "exactly one group scenario is allowed",
        )
    s = r.mapping(scenarios[0], "scenarios[0]", {"name", "tests", "custom_tests"})
    sname = r.get(s, "name", "scenarios[0]", str)
    if s.get("tests", []) != []:
        r.fail("scenarios[0].tests", s.get("tests"), "must stay empty; use custom_tests")
    tests = []
    for i, t in enumerate(r.get(s, "custom_tests", "scenarios[0]", list)):
        where = f"scenarios[0].custom_tests[{i}]"
        t = r.mapping(t, where, {"name", "assertions"})
        raw_assertions = r.get(t, "assertions", where, list)
        if not raw_assertions:
            r.fail(f"{where}.assertions", [], "needs at least one assertion")
        assertions = tuple(
            _parse_assertion(r, a, f"{where}.assertions[{j}]", names) for j, a in enumerate(raw_assertions)
        )
        tests.append(CustomTest(r.get(t, "name", where, str), assertions))
    return Scenario(sname, tuple(tests))


def _parse_assertion(r: _Reader, a: Any, aw: str, names: set[str]) -> Assertion:
    a = r.mapping(a, aw)
    atype = r.get(a, "type", aw, str)
    if atype not in ASSERTION_TYPES:
        r.fail(f"{aw}.type", atype, f"unsupported assertion type (allowed: {', '.join(ASSERTION_TYPES)})")
    kind = ASSERTION_TYPES[atype]
    r.mapping(a, aw, {"type", "on_vm"} | {f.name for f in kind.fields})
    if "on_vm" not in a:
        r.fail(f"{aw}.on_vm", None, "is required: every assertion names the VM it runs on")
    on_vm = r.get(a, "on_vm", aw, str)
    if on_vm not in names:
        r.fail(f"{aw}.on_vm", on_vm, "names no node of this lab")
    values: dict[str, Any] = {}
    for f in kind.fields:
        if f.name == "port":
            values["port"] = r.port(a.get("port"), f"{aw}.port")
        elif f.required:
            values[f.name] = r.get(a, f.name, aw, f.kind)
        else:
            values[f.name] = r.get(a, f.name, aw, f.kind, default=f.default)
    return Assertion(atype, on_vm, **values)
