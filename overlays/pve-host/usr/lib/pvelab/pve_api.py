"""pve_api: the Proxmox VE API dialect of pve-compat, for real Proxmox clients.

What a client of a real node gets on 8006, as far as a lab without Proxmox can answer:

* **Authentication as Proxmox does it.** ``POST /access/ticket`` (form or JSON) checks
  ``user@pam`` against the node's own ``/etc/shadow`` (yescrypt or SHA-512 crypt,
  verified by libcrypt through ctypes: trixie's Python has no ``crypt`` module) for the
  users the lab file lets in, and answers ``ticket``, ``CSRFPreventionToken``,
  ``username``, ``cap`` and ``clustername``.  A ticket (``PVE:user@realm:HEXTIME::SIG``,
  signed with the node's own key made at first boot) is valid two hours and comes back
  as the ``PVEAuthCookie`` cookie, or as the password of a renewal.  API tokens come as
  ``Authorization: PVEAPIToken=USER@REALM!TOKENID=SECRET``; only a salted PBKDF2 hash of
  each secret is on the node.  Failed logins are limited per client address.
* **The read endpoints automation uses**, from the node's own files (``corosync.conf``,
  ``storage.cfg``, ``/proc``) and, where corosync runs, votequorum's live state.
* **Proxmox's error shape**: the message is the HTTP reason and ``{"data":null,
  "message":"..."}`` the body: 401 for a missing or bad ticket, token or password, 403 for
  a missing privilege, 501 for a write or an unknown path.

Python standard library only.  No secret is ever written by this module.
"""

import base64
import collections
import ctypes
import ctypes.util
import hashlib
import hmac
import http.cookies
import json
import os
import re
import socket
import ssl
import threading
import time
import urllib.parse

import compat

TICKET_LIFETIME = 2 * 3600  # seconds, as Proxmox's
TICKET_GRACE = 300  # a ticket stamped up to 5 minutes in the future (clock skew) is accepted
LOGIN_FAILURES = 5  # failed logins from one address within LOGIN_WINDOW; more are refused
LOGIN_WINDOW = 60.0
API_PREFIX = "/api2/json"
VERSION = {"release": "9.0", "repoid": "compat-1.0", "version": "9.0.0"}  # the API it follows
QDEVICE_SOCKET = "/var/run/corosync-qdevice/corosync-qdevice.sock"
QDEVICE_KEYS = ("Algorithm", "Echo reply", "Last poll call", "Model", "QNetd host", "State", "Tie-breaker")

# Roles as Proxmox defines them (pve-access-control), for the ones a lab grants.
ROLES = {
    "PVEAuditor": (
        "Datastore.Audit",
        "Mapping.Audit",
        "Pool.Audit",
        "SDN.Audit",
        "Sys.Audit",
        "VM.Audit",
        "VM.GuestAgent.Audit",
    ),
    "NoAccess": (),
}
# compute_api_permission's grouping of privileges into the ticket's ``cap``
CAP_GROUPS = {
    "vms": re.compile(r"VM\.|Permissions\.Modify"),
    "access": re.compile(r"(User|Group)\.|Permissions\.Modify"),
    "storage": re.compile(r"Datastore\.|Permissions\.Modify"),
    "nodes": re.compile(r"Sys\.|Permissions\.Modify"),
    "sdn": re.compile(r"SDN\.|Permissions\.Modify"),
    "dc": re.compile(r"Sys\.Audit|Sys\.Modify|SDN\."),
    "mapping": re.compile(r"Mapping\.|Permissions.Modify"),
}
STORAGE_FLAGS = {"sparse", "shared", "disable", "mkdir", "krbd", "is_mountpoint", "nocow"}


class ApiError(Exception):
    """An answer in Proxmox's error shape."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status, self.message = status, message


def credential(path):
    """``path``, or systemd's copy of it (``LoadCredential=<basename>:<path>``) when the
    service runs with one: the service's own user cannot read /etc/pve."""
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds and path:
        copy = os.path.join(creds, os.path.basename(path))
        if os.path.exists(copy):
            return copy
    return path


def read_text(path):
    with open(credential(path), encoding="utf-8") as fh:
        return fh.read()


# ---------------------------------------------------------------------- the node's files
def parse_corosync_conf(text):
    """``corosync.conf`` as PVE::Corosync::parse_conf reads it: sections as dicts, ``node``
    and ``interface`` as lists, then nodes keyed by name and interfaces by link number."""
    text = re.sub(r"#.*$", "", text, flags=re.M)
    tokens = text.split()
    conf = {}
    section, stack = conf, []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else None
        if nxt == "{":
            new = {}
            if token in ("node", "interface"):
                section.setdefault(token, []).append(new)
            elif token not in section:
                section[token] = new
            else:
                raise ValueError(f"section '{token}' already exists and not marked as array")
            stack.append(section)
            section = new
            i += 2
            continue
        if token == "}":
            if not stack:
                raise ValueError("parse error - unexpected '}'")
            section = stack.pop()
            i += 1
            continue
        if not token.endswith(":") or nxt is None:
            raise ValueError(f"parse error at '{token}'")
        section[token[:-1]] = nxt
        i += 2
    totem = conf.setdefault("totem", {})
    nodelist = conf.setdefault("nodelist", {})
    nodelist["node"] = {n.get("name", n.get("ring0_addr")): n for n in nodelist.get("node", [])}
    totem["interface"] = {f.get("linknumber", f.get("ringnumber")): f for f in totem.get("interface", [])}
    return conf


def parse_storage_cfg(text):
    """``storage.cfg`` sections: ``type: id`` then tab-indented ``key value`` lines."""
    out, entry = [], None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line[0].isspace():
            kind, _, sid = line.partition(":")
            entry = {"storage": sid.strip(), "type": kind.strip()}
            out.append(entry)
        elif entry is not None:
            key, _, value = line.strip().partition(" ")
            value = value.strip()
            entry[key] = int(value) if key in STORAGE_FLAGS and value.isdigit() else value
    return out


# ---------------------------------------------------------------------- authentication
class Crypt:
    """libcrypt's ``crypt(3)`` (every hash /etc/shadow holds), one call at a time."""

    def __init__(self):
        name = ctypes.util.find_library("crypt") or "libcrypt.so.1"
        self._fn = ctypes.CDLL(name).crypt
        self._fn.restype = ctypes.c_char_p
        self._fn.argtypes = (ctypes.c_char_p, ctypes.c_char_p)
        self._lock = threading.Lock()

    def matches(self, password, stored):
        if not stored or stored[0] in "!*" or "$" not in stored:
            return False  # locked, disabled or no password
        with self._lock:
            out = self._fn(password.encode(), stored.encode())
        return out is not None and hmac.compare_digest(out, stored.encode())


def shadow_hash(shadow_path, user):
    try:
        with open(shadow_path, encoding="utf-8") as fh:
            for line in fh:
                fields = line.rstrip("\n").split(":")
                if len(fields) > 1 and fields[0] == user:
                    return fields[1]
    except OSError:
        return None
    return None


def token_hash(secret, salt, iterations=20000):
    """How a token secret is kept on the node: ``pbkdf2-sha256$ITER$SALT$HEX``."""
    digest = hashlib.pbkdf2_hmac("sha256", secret.encode(), salt.encode(), iterations)
    return f"pbkdf2-sha256${iterations}${salt}${digest.hex()}"


def token_matches(secret, stored):
    try:
        kind, iterations, salt, _ = stored.split("$")
    except ValueError:
        return False
    if kind != "pbkdf2-sha256" or not iterations.isdigit():
        return False
    return hmac.compare_digest(token_hash(secret, salt, int(iterations)), stored)


class Tickets:
    """Proxmox-shaped tickets and CSRF tokens, signed with this node's key (HMAC-SHA256:
    Proxmox signs with an RSA key; a client only ever passes the ticket back)."""

    def __init__(self, key):
        self._key = key

    def _sign(self, text):
        mac = hmac.new(self._key, text.encode(), hashlib.sha256).digest()
        return base64.b64encode(mac).decode().rstrip("=")

    def issue(self, user, now=None):
        data = f"PVE:{user}:{int(now if now is not None else time.time()):08X}"
        return f"{data}::{self._sign(data)}"

    def verify(self, ticket, now=None):
        """The user a valid, unexpired ticket names, else None."""
        m = re.fullmatch(r"(PVE:([^:\s]+@[^:\s]+):([0-9A-F]{8}))::([A-Za-z0-9+/]+)", ticket or "")
        if not m or not hmac.compare_digest(self._sign(m.group(1)), m.group(4)):
            return None
        age = (now if now is not None else time.time()) - int(m.group(3), 16)
        return m.group(2) if -TICKET_GRACE <= age <= TICKET_LIFETIME else None

    def csrf(self, user, now=None):
        stamp = f"{int(now if now is not None else time.time()):08X}"
        return f"{stamp}:{self._sign(f'{stamp}:{user}')}"


class LoginLimiter:
    """At most LOGIN_FAILURES failed logins per client address in LOGIN_WINDOW seconds;
    while over it, logins from there are refused without looking at the password."""

    def __init__(self, failures=LOGIN_FAILURES, window=LOGIN_WINDOW):
        self.failures, self.window = failures, window
        self._seen = collections.defaultdict(collections.deque)
        self._lock = threading.Lock()

    def _trim(self, seen, now):
        while seen and seen[0] <= now - self.window:
            seen.popleft()

    def blocked(self, addr, now=None):
        now = time.monotonic() if now is None else now
        with self._lock:
            seen = self._seen.get(addr)
            if not seen:
                return False
            self._trim(seen, now)
            return len(seen) >= self.failures

    def failed(self, addr, now=None):
        now = time.monotonic() if now is None else now
        with self._lock:
            seen = self._seen[addr]
            self._trim(seen, now)
            seen.append(now)
            if len(self._seen) > 4096:  # bounded: forget the quietest addresses
                for old in [a for a, s in self._seen.items() if not s][:1024]:
                    del self._seen[old]


def fingerprint(pem_text):
    """SHA-256 of a certificate, as Proxmox shows it (``AA:BB:...``)."""
    der = ssl.PEM_cert_to_DER_cert(pem_text)
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


def tls_context(cert, key):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(credential(cert), credential(key))
    return ctx


# ---------------------------------------------------------------------- what the node knows
class NodeFacts:
    """Live facts of this node from /proc and /sys (cpu use measured between calls)."""

    def __init__(self):
        self._cpu = (None, None)
        self._lock = threading.Lock()

    def cpu(self):
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
        total, idle = sum(fields[:8]), fields[3] + fields[4]
        with self._lock:
            last_total, last_idle = self._cpu
            self._cpu = (total, idle)
        if last_total is None or total <= last_total:
            return 0.0
        return round(1.0 - (idle - last_idle) / (total - last_total), 4)

    @staticmethod
    def meminfo():
        info = {}
        with open("/proc/meminfo") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                info[key] = int(rest.split()[0]) * 1024
        return info

    @staticmethod
    def uptime():
        with open("/proc/uptime") as fh:
            return int(float(fh.read().split()[0]))

    @staticmethod
    def rootfs():
        st = os.statvfs("/")
        total, free, avail = st.f_blocks * st.f_frsize, st.f_bfree * st.f_frsize, st.f_bavail * st.f_frsize
        return {"total": total, "used": total - free, "free": free, "avail": avail}

    @staticmethod
    def boot_info():
        if not os.path.isdir("/sys/firmware/efi"):
            return {"mode": "legacy-bios"}
        secure = 0
        var = "/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c"
        try:
            with open(var, "rb") as fh:
                secure = fh.read()[-1]
        except (OSError, IndexError):
            pass
        return {"mode": "efi", "secureboot": 1 if secure == 1 else 0}

    @staticmethod
    def cpuinfo():
        model, sockets = "unknown", set()
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "physical id":
                    sockets.add(value.strip())
        cpus = os.cpu_count() or 1
        return {"cpus": cpus, "cores": cpus, "sockets": max(1, len(sockets)), "model": model, "hvm": "1"}


def qdevice_status(path=QDEVICE_SOCKET, timeout=2.0):
    """``corosync-qdevice`` status as /cluster/config/qdevice gives it: {} where it does
    not run (or this service may not ask it)."""
    if not os.path.exists(path):
        return {}
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(b"status verbose\n")
            chunks = []
            while True:
                data = s.recv(4096)
                if not data:
                    break
                chunks.append(data)
    except OSError:
        return {}
    out = {}
    for line in b"".join(chunks).decode(errors="replace").splitlines():
        key, _, value = line.partition(":")
        if key.strip() in QDEVICE_KEYS:
            out[key.strip()] = value.strip()
    return out


# ---------------------------------------------------------------------- the API
class Api:
    """Authentication and the GET endpoints of the Proxmox dialect, for one node.

    ``cluster_state()`` returns the spec-shaped cluster status list (rendered, or live from
    votequorum where corosync runs); everything else is read from ``cfg``'s files."""

    def __init__(self, cfg, cluster_state, crypt=None, facts=None):
        self.cfg, self.cluster_state = cfg, cluster_state
        self.node = cfg["node"]
        self.cluster_name = cfg.get("cluster_name", "")
        self.users = dict(cfg.get("users", {}))  # user@realm -> role (user.cfg + acl.cfg)
        self.shadow = cfg.get("shadow", "/etc/shadow")
        self.crypt = crypt
        self.facts = facts or NodeFacts()
        self.limiter = LoginLimiter()
        self.tokens = self._load_tokens(cfg.get("tokens"))
        self._verified, self._verified_lock = set(), threading.Lock()
        self.tickets = Tickets(self._load_key(cfg.get("authkey")))
        self.fingerprint = None
        if cfg.get("tls_cert"):
            try:
                self.fingerprint = fingerprint(read_text(cfg["tls_cert"]))
            except (OSError, ValueError):
                pass
        self.routes = [
            (re.compile(r"/version"), None, self.version),
            (re.compile(r"/cluster/status"), "Sys.Audit", self.cluster_status),
            (re.compile(r"/cluster/resources"), None, self.resources),
            (re.compile(r"/cluster/config/nodes"), "Sys.Audit", self.config_nodes),
            (re.compile(r"/cluster/config/totem"), "Sys.Audit", self.config_totem),
            (re.compile(r"/cluster/config/qdevice"), "Sys.Audit", lambda: qdevice_status()),
            (re.compile(r"/nodes"), None, self.nodes),
            (re.compile(r"/nodes/(?P<node>[\w.-]+)/status"), "Sys.Audit", self.node_status),
            (re.compile(r"/nodes/(?P<node>[\w.-]+)/storage"), "Datastore.Audit", self.node_storage),
            (re.compile(r"/storage"), "Datastore.Audit", self.storage),
            (re.compile(r"/storage/(?P<storage>[\w.-]+)"), "Datastore.Audit", self.storage_one),
            (re.compile(r"/access/permissions"), None, self.permissions),
        ]

    # ------------------------------------------------------------ keys and secrets
    @staticmethod
    def _load_key(path):
        try:
            with open(credential(path), "rb") as fh:
                key = fh.read()
            if len(key) >= 32:
                return key
        except (OSError, TypeError):
            pass
        compat.log.warning("pve-api: no ticket key at %s: tickets last until a restart", path)
        return os.urandom(32)

    @staticmethod
    def _load_tokens(path):
        if not path:
            return {}
        try:
            return json.loads(read_text(path))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            compat.log.warning("pve-api: %s: %s (no API token is accepted)", path, exc)
            return {}

    # ------------------------------------------------------------ who is asking
    def privileges(self, user):
        return set(ROLES.get(self.users.get(user, "NoAccess"), ()))

    def caps(self, user):
        privs = self.privileges(user)
        return {group: {p: 1 for p in sorted(privs) if rx.match(p)} for group, rx in CAP_GROUPS.items()}

    def authenticate(self, headers):
        """The user a request speaks for, from its token or ticket cookie; ApiError(401)."""
        auth = headers.get("Authorization", "")
        if auth.startswith("PVEAPIToken"):
            m = re.fullmatch(r"PVEAPIToken[= ]([^!\s=]+@[^!\s=]+)!([\w.-]+)=(\S+)", auth.strip())
            if not m:
                raise ApiError(401, "invalid token value")
            user, tokenid, secret = m.groups()
            entry = self.tokens.get(f"{user}!{tokenid}")
            if not entry or user not in self.users or not self._token_ok(secret, entry.get("hash", "")):
                raise ApiError(401, "invalid token value")
            return user
        cookie = http.cookies.SimpleCookie()
        try:
            cookie.load(headers.get("Cookie", ""))
        except http.cookies.CookieError:
            raise ApiError(401, "invalid ticket") from None
        if "PVEAuthCookie" not in cookie:
            raise ApiError(401, "No ticket")
        user = self.tickets.verify(urllib.parse.unquote(cookie["PVEAuthCookie"].value))
        if user is None or user not in self.users:
            raise ApiError(401, "invalid ticket")
        return user

    def _token_ok(self, secret, stored):
        """PBKDF2 once per secret: a client sends its token with every request. Only a
        digest of secrets already verified is remembered (bounded), never a secret."""
        seen = hashlib.sha256(f"{stored}\0{secret}".encode()).digest()
        if seen in self._verified:
            return True
        if not token_matches(secret, stored):
            return False
        with self._verified_lock:
            if len(self._verified) >= 256:
                self._verified.clear()
            self._verified.add(seen)
        return True

    def login(self, form, addr):
        """POST /access/ticket: a new ticket for a password (or a still valid ticket)."""
        user = (form.get("username") or "").strip()
        if form.get("realm") and "@" not in user:
            user = f"{user}@{form['realm']}"
        password = form.get("password") or ""
        if self.limiter.blocked(addr):
            compat.log.warning("pve-api: login of %r from %s refused: too many failures", user, addr)
            raise ApiError(401, "authentication failure")
        ok = user in self.users and (
            self.tickets.verify(password) == user
            or (
                user.endswith("@pam")
                and self.crypt is not None
                and self.crypt.matches(password, shadow_hash(self.shadow, user[: -len("@pam")]) or "")
            )
        )
        if not ok:
            self.limiter.failed(addr)
            compat.log.warning("pve-api: authentication failure; rhost=%s user=%s", addr, user)
            raise ApiError(401, "authentication failure")
        data = {
            "username": user,
            "ticket": self.tickets.issue(user),
            "CSRFPreventionToken": self.tickets.csrf(user),
            "cap": self.caps(user),
        }
        if self.cluster_name and "Sys.Audit" in self.privileges(user):
            data["clustername"] = self.cluster_name
        return data

    # ------------------------------------------------------------ dispatch
    def get(self, rel, query, user):
        """The ``data`` of GET ``rel`` for ``user``; ApiError for anything else."""
        for pattern, priv, fn in self.routes:
            m = pattern.fullmatch(rel)
            if m:
                if priv and priv not in self.privileges(user):
                    raise ApiError(403, f"Permission check failed (/, {priv})")
                kwargs = m.groupdict()
                if fn in (self.resources, self.permissions):
                    kwargs.update(query=query, user=user)
                return fn(**kwargs)
        raise ApiError(501, f"Method 'GET {rel}' not implemented")

    # ------------------------------------------------------------ the node's config files
    def corosync(self):
        return parse_corosync_conf(read_text(self.cfg["corosync_conf"]))

    def storage_entries(self):
        raw = read_text(self.cfg["storage_cfg"])
        digest = hashlib.sha1(raw.encode()).hexdigest()
        return [dict(e, digest=digest) for e in parse_storage_cfg(raw)]

    def _local(self, node, what):
        if node != self.node:
            members = [e["name"] for e in self.cluster_state() if e.get("type") == "node"]
            if node not in members:
                raise ApiError(500, f"hostname lookup '{node}' failed - no such lab node")
            raise ApiError(
                501,
                f"Method 'GET /nodes/{node}/{what}' not implemented on {self.node}: "
                f"the lab does not proxy, ask {node}",
            )

    # ------------------------------------------------------------ endpoints
    def version(self):
        return dict(VERSION)

    def cluster_status(self):
        conf = self.corosync()
        ips = {name: n.get("ring0_addr") for name, n in conf["nodelist"]["node"].items()}
        out = []
        for entry in self.cluster_state():
            entry = dict(entry)
            if entry.get("type") == "cluster":
                entry["id"] = "cluster"
                entry["version"] = int(conf["totem"].get("config_version", 1))
            elif entry.get("type") == "node":
                entry["ip"] = ips.get(entry["name"], "")
                entry["local"] = 1 if entry["name"] == self.node else 0
                entry["level"] = ""
            out.append(entry)
        return out

    def _node_entry(self, entry):
        node = entry["name"]
        out = {
            "node": node,
            "id": f"node/{node}",
            "type": "node",
            "status": "online" if entry.get("online") else "offline",
            "level": "",
        }
        if node == self.node:
            mem, root = self.facts.meminfo(), self.facts.rootfs()
            out.update(
                cpu=self.facts.cpu(),
                maxcpu=os.cpu_count() or 1,
                mem=mem["MemTotal"] - mem["MemAvailable"],
                maxmem=mem["MemTotal"],
                disk=root["used"],
                maxdisk=root["total"],
                uptime=self.facts.uptime(),
            )
            if self.fingerprint:
                out["ssl_fingerprint"] = self.fingerprint
        return out

    def nodes(self):
        return [self._node_entry(e) for e in self.cluster_state() if e.get("type") == "node"]

    def node_status(self, node):
        self._local(node, "status")
        mem, uname = self.facts.meminfo(), os.uname()
        with open("/proc/loadavg") as fh:
            load = fh.read().split()[:3]
        return {
            "uptime": self.facts.uptime(),
            "loadavg": load,
            "cpu": self.facts.cpu(),
            "wait": 0,
            "idle": 0,
            "cpuinfo": self.facts.cpuinfo(),
            "memory": {
                "total": mem["MemTotal"],
                "used": mem["MemTotal"] - mem["MemAvailable"],
                "free": mem["MemFree"],
                "available": mem["MemAvailable"],
            },
            "swap": {
                "total": mem.get("SwapTotal", 0),
                "used": mem.get("SwapTotal", 0) - mem.get("SwapFree", 0),
                "free": mem.get("SwapFree", 0),
            },
            "ksm": {"shared": 0},
            "rootfs": self.facts.rootfs(),
            "kversion": " ".join((uname.sysname, uname.release, uname.version)),
            "current-kernel": {
                "sysname": uname.sysname,
                "release": uname.release,
                "version": uname.version,
                "machine": uname.machine,
            },
            "boot-info": self.facts.boot_info(),
            "pveversion": f"pve-manager/{VERSION['version']}/{VERSION['repoid']}",
        }

    def config_nodes(self):
        return [dict(n, node=name) for name, n in self.corosync()["nodelist"]["node"].items()]

    def config_totem(self):
        return self.corosync()["totem"]

    def storage(self):
        return self.storage_entries()

    def storage_one(self, storage):
        for entry in self.storage_entries():
            if entry["storage"] == storage:
                return entry
        raise ApiError(500, f"storage '{storage}' does not exist")

    def _node_storage(self):
        # The lab's nodes have no pool or disk behind a storage: declared, enabled, not active.
        return [
            {
                "storage": e["storage"],
                "type": e["type"],
                "content": e.get("content", ""),
                "shared": int(e.get("shared", 0)),
                "enabled": 0 if e.get("disable") else 1,
                "active": 0,
                "total": 0,
                "used": 0,
                "avail": 0,
                "used_fraction": 0,
            }
            for e in self.storage_entries()
        ]

    def node_storage(self, node):
        self._local(node, "storage")
        return self._node_storage()

    def resources(self, query, user):
        kind = query.get("type")
        if kind not in (None, "vm", "storage", "node", "sdn", "pool"):
            raise ApiError(400, "Parameter verification failed.")
        out = []
        if kind in (None, "node"):
            out += self.nodes()
        if kind in (None, "storage") and "Datastore.Audit" in self.privileges(user):
            for s in self._node_storage():
                out.append(
                    {
                        "id": f"storage/{self.node}/{s['storage']}",
                        "type": "storage",
                        "node": self.node,
                        "storage": s["storage"],
                        "plugintype": s["type"],
                        "content": s["content"],
                        "shared": s["shared"],
                        "status": "unknown",
                        "disk": 0,
                        "maxdisk": 0,
                    }
                )
        return out

    def permissions(self, query, user):
        who = query.get("userid") or user
        if who != user and "Sys.Audit" not in self.privileges(user):
            raise ApiError(403, "Permission check failed (/access, Sys.Audit)")
        who = who.split("!", 1)[0]  # a lab token has its user's privileges (privsep 0)
        privs = {p: 1 for p in sorted(self.privileges(who))}
        paths = ["/", "/access", "/nodes", "/storage", "/vms", "/sdn", "/mapping", "/pool"]
        want = query.get("path")
        return {p: dict(privs) for p in paths if want in (None, p)}


# ---------------------------------------------------------------------- HTTP
def error_answer(status, message):
    body = compat.dumps({"data": None, "message": message + "\n"}).encode()
    return status, message, body


class ApiHandler(compat.Handler):
    """pve-compat's HTTP handler: the spec's routes as they always were over plain HTTP,
    the Proxmox dialect (``server.api``) for everything else and for every TLS request."""

    allowed = "GET, HEAD, POST"

    def _reply(self, status, data=None, head=False, reason=None, body=None):
        if body is None:
            body = compat.dumps({"data": data}).encode()
        self.send_response(status, reason)
        self.send_header("Content-Type", "application/json;charset=UTF-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", self.connection_header())
        self.send_header("Cache-Control", "max-age=0")
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _fail(self, err, head=False):
        status, reason, body = error_answer(err.status, err.message)
        self._reply(status, head=head, reason=reason.replace("\r", " ").replace("\n", " ")[:200], body=body)

    def _form(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype == "application/json":
            try:
                data = json.loads(raw or b"{}")
            except ValueError:
                raise ApiError(400, "Parameter verification failed.") from None
            if not isinstance(data, dict):
                raise ApiError(400, "Parameter verification failed.")
            return {k: str(v) for k, v in data.items()}
        return {k: v[-1] for k, v in urllib.parse.parse_qs(raw.decode(errors="replace")).items()}

    def _api(self, method):
        head = method == "HEAD"
        path, _, qs = self.path.partition("?")
        path = path.split("#", 1)[0]
        if len(path) > 1:
            path = path.rstrip("/")
        if not self.secure and method in ("GET", "HEAD") and path in self.server.routes:
            self._get(head)  # the spec's endpoints over plain HTTP: byte for byte as before
            return
        if not (path == API_PREFIX or path.startswith(API_PREFIX + "/")):
            self._get(head)  # outside the API: 404, as before
            return
        rel = path[len(API_PREFIX) :] or "/"
        api = self.server.api
        try:
            if rel == "/access/ticket" and method == "POST":
                self._reply(200, api.login(self._form(), self.client_address[0]))
                return
            user = api.authenticate(self.headers)
            if method not in ("GET", "HEAD"):
                raise ApiError(501, f"Method '{method} {rel}' not implemented")
            query = {k: v[-1] for k, v in urllib.parse.parse_qs(qs).items()}
            self._reply(200, api.get(rel, query, user), head)
        except ApiError as err:
            self._fail(err, head)
        except (OSError, ValueError, KeyError) as exc:
            compat.log.warning("pve-api: %s %s: %s", method, rel, exc)
            self._fail(ApiError(500, f"{type(exc).__name__}: {exc}"), head)

    def do_GET(self):
        self._api("GET")

    def do_HEAD(self):
        self._api("HEAD")

    def do_POST(self):
        self._api("POST")

    def do_PUT(self):
        self._api("PUT")

    def do_DELETE(self):
        self._api("DELETE")

    def do_PATCH(self):
        self._api("PATCH")

    def do_OPTIONS(self):
        self._api("OPTIONS")
