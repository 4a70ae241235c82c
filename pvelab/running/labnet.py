"""The lab's L2 segment: a network namespace with a bridge, one tap per VM and dnsmasq.

Everything lives in a namespace the boot test creates and always removes. The
namespace has no uplink, so nothing a guest sends (its DNS queries to public
resolvers included) can leave it. dnsmasq serves DHCP on a subnet distinct from the
lab's 10.81.0.0/24, with a fixed lease per VM MAC and the bridge as default gateway;
the guests then add their lab alias on top, as on real hardware.

The runner reaches guests from inside the namespace: :func:`connect` opens a TCP
socket from a thread that has joined the namespace (``setns``); the socket stays
bound to the namespace and can be used from any thread afterwards.
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pvelab.core import locks
from pvelab.core.errors import PvelabError
from pvelab.core.locks import remove_netns
from pvelab.model.lab import default_mac

CLONE_NEWNET = 0x40000000
DEFAULT_SUBNET = "172.31.81.0/24"
# ARP on the lab bridge, where the runner polls guests that are still booting
NEIGH_PROBING = {"retrans_time_ms": 100, "mcast_solicit": 10}


class LabNetError(PvelabError):
    pass


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise LabNetError(f"{' '.join(cmd)}: {res.stderr.strip()}")
    return res


BRIDGE_MAC = "52:54:00:81:00:fe"  # the lab bridge (guests: 52:54:00:81:00:01 onwards)


@dataclass
class LabNet:
    """Context manager: ``with LabNet(["pve-1", ...], logdir) as net: net.tap("pve-1")``."""

    vms: list[str]
    logdir: Path
    subnet: str = DEFAULT_SUBNET
    name: str = field(default_factory=lambda: f"pvelab-{os.getpid()}")
    bridge: str = "br-lab"
    dnsmasq: subprocess.Popen | None = None
    boot_options: tuple[str, ...] = ()  # further dnsmasq options: network boot (pvelab.build.netboot)
    node_macs: dict[str, str] = field(default_factory=dict)  # the lab's MACs (default: lab.default_mac)
    # the NICs of corosync links on networks of their own: vm -> [(bridge, mac)]
    link_nics: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    def __post_init__(self):
        net = ipaddress.IPv4Network(self.subnet)
        hosts = list(net.hosts())
        self.gateway = str(hosts[0])
        self.prefix = net.prefixlen
        self.addresses = {vm: str(hosts[10 + i]) for i, vm in enumerate(self.vms)}
        self.macs = {vm: self.node_macs.get(vm) or default_mac(i) for i, vm in enumerate(self.vms)}
        self.taps = {vm: f"tap{i}" for i, vm in enumerate(self.vms)}
        # every tap of a VM, its default NIC's first: (tap, mac, the bridge it belongs on)
        self.nics: dict[str, list[tuple[str, str, str]]] = {
            vm: [(self.taps[vm], self.macs[vm], self.bridge)]
            + [(f"tap{i}n{k}", mac, br) for k, (br, mac) in enumerate(self.link_nics.get(vm, []), 1)]
            for i, vm in enumerate(self.vms)
        }
        self.home = {tap: br for nics in self.nics.values() for tap, _, br in nics}
        self.link_bridges = sorted({br for br in self.home.values() if br != self.bridge})
        self._range = (str(hosts[100]), str(hosts[150]))

    # -------------------------------------------------------------- lifecycle
    def __enter__(self) -> LabNet:
        self.logdir.mkdir(parents=True, exist_ok=True)
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> None:
        if self.name in _ip("ip", "netns", "list").stdout.split():
            raise LabNetError(f"network namespace {self.name} already exists")
        _ip("ip", "netns", "add", self.name)
        locks.leave(netns=self.name)  # a killed run's namespace is found by the next run
        ns = self.name
        _ip("ip", "link", "set", "lo", "up", ns=ns)
        # a fixed MAC: a bridge left to itself takes its lowest port's, and changes it when
        # a cut moves that port away (every guest's ARP entry for the gateway goes stale)
        _ip("ip", "link", "add", self.bridge, "address", BRIDGE_MAC, "type", "bridge", ns=ns)
        _ip("ip", "addr", "add", f"{self.gateway}/{self.prefix}", "dev", self.bridge, ns=ns)
        _ip("ip", "link", "set", self.bridge, "up", ns=ns)
        # Neighbour probing for the runner's polls: an ARP request every 100 ms, ten
        # of them, instead of one a second, three times. A connect to a guest that has
        # no address yet waits out ARP; with the kernel's defaults a guest that takes its
        # DHCP address just after a request went unanswered is noticed up to a second
        # late, which every "SSH up after" figure then carries.
        probing = [f"net.ipv4.neigh.{self.bridge}.{k}={v}" for k, v in NEIGH_PROBING.items()]
        _ip("sysctl", "-q", "-w", *probing, ns=ns)
        for br in self.link_bridges:  # a corosync link's own network: no address, no DHCP
            _ip("ip", "link", "add", br, "type", "bridge", ns=ns)
            _ip("ip", "link", "set", br, "up", ns=ns)
        for tap, br in self.home.items():
            _ip("ip", "tuntap", "add", "dev", tap, "mode", "tap", ns=ns)
            _ip("ip", "link", "set", tap, "master", br, ns=ns)
            _ip("ip", "link", "set", tap, "up", ns=ns)
        leases = self.logdir / "dnsmasq.leases"
        leases.unlink(missing_ok=True)
        args = [
            "ip",
            "netns",
            "exec",
            ns,
            "dnsmasq",
            "--keep-in-foreground",
            "--port=0",
            f"--interface={self.bridge}",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            f"--dhcp-range={self._range[0]},{self._range[1]},{ipaddress.IPv4Network(self.subnet).netmask},1h",
            f"--dhcp-option=option:router,{self.gateway}",
            f"--dhcp-leasefile={leases}",
            "--log-dhcp",
            "--dhcp-authoritative",
            f"--log-facility={self.logdir / 'dnsmasq.log'}",
            f"--pid-file={self.logdir / 'dnsmasq.pid'}",
        ]
        for vm in self.vms:
            # the tag names the VM for the network boot's per-node answers
            args.append(f"--dhcp-host={self.macs[vm]},set:{vm},{self.addresses[vm]},{vm}")
        args += self.boot_options
        # its own session and a log file for stderr: a lab brought up by `invoke up` outlives
        # the process that started dnsmasq
        with open(self.logdir / "dnsmasq.stderr", "wb") as err:
            self.dnsmasq = subprocess.Popen(
                args, stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True
            )
        time.sleep(0.3)
        if self.dnsmasq.poll() is not None:
            text = (self.logdir / "dnsmasq.stderr").read_text(errors="replace").strip()
            raise LabNetError(f"dnsmasq failed to start: {text}")

    def down(self) -> None:
        if self.dnsmasq and self.dnsmasq.poll() is None:
            self.dnsmasq.send_signal(signal.SIGTERM)
            try:
                self.dnsmasq.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.dnsmasq.kill()
        remove_netns(self.name)  # leftover processes in it (a QEMU that ignored SIGTERM) die with it

    # -------------------------------------------------------------- faults
    def segments(self) -> dict[str, str]:
        """VM -> the bridge its tap is on now (read from the kernel, not remembered)."""
        out = {}
        links = json.loads(_ip("ip", "-j", "link", "show", ns=self.name).stdout or "[]")
        by_name = {link["ifname"]: link.get("master", "") for link in links}
        for vm, tap in self.taps.items():
            out[vm] = by_name.get(tap, "")
        return out

    def separated(self) -> list[list[str]]:
        """The groups of VMs that are off the lab bridge, one list per island bridge."""
        groups: dict[str, list[str]] = {}
        for vm, bridge in self.segments().items():
            if bridge and bridge != self.bridge:
                groups.setdefault(bridge, []).append(vm)
        return [sorted(g) for _, g in sorted(groups.items())]

    def island(self, vms: list[str]) -> str:
        """Move ``vms`` onto a bridge of their own: they reach each other and nothing else.

        The island bridge has the lab bridge's MAC and gateway address (a /32) and a
        host route to each of its VMs, so the runner's SSH sessions to them survive;
        frames between islands (corosync, qnetd) have no way across. A corosync link's
        own network gets an island of the same number (``<bridge>s<n>``) for its NICs."""
        ns = self.name
        used = set(self.segments().values())
        n = next(i for i in range(1, 64) if f"br-seg{i}" not in used)
        island = f"br-seg{n}"
        _ip("ip", "link", "add", island, "address", BRIDGE_MAC, "type", "bridge", ns=ns)
        _ip("ip", "addr", "add", f"{self.gateway}/32", "dev", island, ns=ns)
        _ip("ip", "link", "set", island, "up", ns=ns)
        for br in self.link_bridges:
            _ip("ip", "link", "add", f"{br}s{n}", "type", "bridge", ns=ns)
            _ip("ip", "link", "set", f"{br}s{n}", "up", ns=ns)
        for vm in vms:
            for tap, _, br in self.nics[vm]:
                _ip("ip", "link", "set", tap, "master", island if br == self.bridge else f"{br}s{n}", ns=ns)
            _ip("ip", "route", "replace", f"{self.addresses[vm]}/32", "dev", island, ns=ns)
        return island

    def isolate(self, vm: str) -> None:
        """Cut ``vm`` off from every other VM (an island of one)."""
        self.rejoin(vm)
        self.island([vm])

    def partition(self, groups: list[list[str]]) -> None:
        """The first group stays on the lab bridge, each further group gets an island."""
        self.rejoin()
        for group in groups[1:]:
            self.island(group)

    def rejoin(self, vm: str | None = None) -> None:
        """Undo :meth:`isolate`/:meth:`partition` for ``vm`` (default: every VM); an
        island left with no VM is removed."""
        ns = self.name
        seg = self.segments()
        masters = self._masters()
        for name in self.vms:
            if vm not in (None, name):
                continue
            for tap, _, br in self.nics[name]:
                if masters.get(tap, br) != br:
                    _ip("ip", "link", "set", tap, "master", br, ns=ns)
            bridge = seg.get(name, "")
            if bridge and bridge != self.bridge:
                _ip("ip", "route", "del", f"{self.addresses[name]}/32", "dev", bridge, ns=ns, check=False)
        left = set(self._masters().values())
        homes = set(self.home.values())
        links = json.loads(_ip("ip", "-j", "link", "show", "type", "bridge", ns=ns).stdout or "[]")
        for link in links:
            if link["ifname"] not in homes and link["ifname"] not in left:
                _ip("ip", "link", "del", link["ifname"], ns=ns)

    def _masters(self) -> dict[str, str]:
        links = json.loads(_ip("ip", "-j", "link", "show", ns=self.name).stdout or "[]")
        return {link["ifname"]: link.get("master", "") for link in links if link["ifname"] in self.home}

    # -------------------------------------------------------------- silent drops
    DROP_TABLE = "pvelab_drop"

    def drop(self, taps: list[str]) -> None:
        """Frames to and from ``taps`` are silently dropped by the bridge, the link stays up
        (an iptables DROP, corosync issue 569's case); on the lab network the runner's SSH
        (TCP 22) and ARP still pass, so the lab stays observable."""
        t = f"bridge {self.DROP_TABLE}"
        script = [f"add table {t}"]
        for chain in ("forward", "input", "output"):
            script.append(f"add chain {t} {chain} {{ type filter hook {chain} priority 0; policy accept; }}")
        for tap in taps:
            for chain in ("forward", "input", "output"):
                for side in ("iifname", "oifname"):
                    if (chain, side) in (("input", "oifname"), ("output", "iifname")):
                        continue  # no such direction on that hook
                    match = f"add rule {t} {chain} {side} {tap}"
                    if self.home[tap] == self.bridge:
                        script += [f"{match} ether type arp accept", f"{match} tcp sport 22 accept"]
                        script.append(f"{match} tcp dport 22 accept")
                    script.append(f"{match} drop")
        self._feed(["nft", "-f", "-"], script, "nft")

    def undrop(self) -> None:
        _ip("nft", "delete", "table", "bridge", self.DROP_TABLE, ns=self.name, check=False)

    # -------------------------------------------------------------- rate limits
    def shape(self, taps: list[str], mbit: float, queue_ms: float) -> None:
        """What ``taps`` pass to their guests limited to ``mbit`` Mbit/s behind a queue of
        ``queue_ms`` at that rate (htb + bfifo: the host kernel has no netem); TCP to port
        22, the runner's SSH, passes unshaped."""
        limit = max(int(mbit * 1e6 / 8 * queue_ms / 1000), 3000)
        for tap in taps:
            script = [
                f"qdisc replace dev {tap} root handle 1: htb default 20",
                f"class add dev {tap} parent 1: classid 1:10 htb rate 1gbit",
                f"class add dev {tap} parent 1: classid 1:20 htb rate {mbit:g}mbit ceil {mbit:g}mbit",
                f"qdisc add dev {tap} parent 1:20 handle 20: bfifo limit {limit}",
                f"filter add dev {tap} parent 1: protocol ip prio 1 u32"
                " match ip protocol 6 0xff match ip dport 22 0xffff flowid 1:10",
            ]
            self._feed(["tc", "-batch", "-"], script, f"tc on {tap}")

    def shaped_bytes(self) -> dict[str, int]:
        """tap -> bytes its rate-limited class has passed (taps under :meth:`shape` only)."""
        out = {}
        for tap in self.home:  # (this tc prints no JSON for htb classes)
            res = _ip("tc", "-s", "class", "show", "dev", tap, ns=self.name, check=False)
            sent = re.search(r"^class htb 1:20 .*\n\s*Sent (\d+) bytes", res.stdout, re.M)
            if sent:
                out[tap] = int(sent.group(1))
        return out

    def unshape(self) -> None:
        for tap in self.home:
            _ip("tc", "qdisc", "del", "dev", tap, "root", ns=self.name, check=False)

    def _feed(self, command: list[str], script: list[str], what: str) -> None:
        """``command`` in the namespace with ``script`` on its standard input (nft, tc)."""
        res = subprocess.run(
            [*self.exec_args(), *command], input="\n".join(script) + "\n", capture_output=True, text=True
        )
        if res.returncode != 0:
            raise LabNetError(f"{what}: {res.stderr.strip()[-300:]}")

    # -------------------------------------------------------------- use
    def exec_args(self) -> list[str]:
        """Prefix that runs a command inside the namespace."""
        return ["ip", "netns", "exec", self.name]

    def leases(self) -> dict[str, str]:
        """MAC -> IP from dnsmasq's lease file (what DHCP really handed out)."""
        out = {}
        try:
            for line in (self.logdir / "dnsmasq.leases").read_text().splitlines():
                parts = line.split()
                if len(parts) >= 3:
                    out[parts[1]] = parts[2]
        except OSError:
            pass
        return out

    def connect(self, host: str, port: int, timeout: float = 5.0) -> socket.socket:
        return connect_in_ns(self.name, host, port, timeout)


def connect_in_ns(ns: str, host: str, port: int, timeout: float = 5.0) -> socket.socket:
    """A TCP socket connected from inside network namespace ``ns``."""
    result: dict = {}

    def worker():
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        try:
            with open(f"/run/netns/{ns}") as fh:
                if libc.setns(fh.fileno(), CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns({ns}) failed")
            sock = socket.create_connection((host, port), timeout=timeout)
            result["sock"] = sock
        except BaseException as exc:  # handed to the caller's thread
            result["error"] = exc

    t = threading.Thread(target=worker, daemon=True)
    t.start()
    t.join(timeout + 5)
    if "error" in result:
        raise result["error"]
    if "sock" not in result:
        raise TimeoutError(f"connect to {host}:{port} in {ns} timed out")
    return result["sock"]
