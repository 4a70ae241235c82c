"""The running lab: one network, one machine per node, a lifecycle and a vocabulary of faults.

Modelled on the NixOS test driver: a :class:`Driver` owns the lab network
(:mod:`pvelab.running.labnet`) and one :class:`~pvelab.running.machine.Machine` per node, each booted on
a throwaway copy-on-write overlay of its artefact, so nothing is ever written to the
built files. The boot test, the rehearsal and ``invoke up`` all boot through it::

    with Driver(lab, nodes, medium, fw, accel, workdir, say) as d:   # booted, SSH on every node
        d.fault(Fault.CUT, ["pve-3"])
        ...                                                          # leaving: all torn down

A driver that is :meth:`Driver.detach`-ed is not torn down when the block ends: its VMs,
dnsmasq and the port forwarder run on in their own sessions, and what is needed to find
them again is the lab's :class:`RunState` (``build/<lab>/run/state.json``), from which
:meth:`Driver.attach` rebuilds the driver in another process (``invoke status``,
``fault``, ``ssh``, ``down``).

The faults (:class:`Fault`) are the words of the rehearsal's walk and of ``invoke fault``:
each is reversible and recorded in the run state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pvelab.build import netboot
from pvelab.core.locks import pid_alive, qemu_alive
from pvelab.core.logger import Progress
from pvelab.model import accel as accelerator
from pvelab.model.artefacts import (
    RecordError,
    _check_schema,
    _from_dict,
    _read_json,
    built,
    write_atomic,
)
from pvelab.model.faults import (
    SATURATE_MBIT,
    SATURATE_PORT,
    SATURATE_QUEUE_MS,
    DriverError,
    Fault,
    Target,
)
from pvelab.model.lab import Lab, Node
from pvelab.model.media import Firmware, Medium, boot_combination
from pvelab.running import serving, slots
from pvelab.running.labnet import LabNet, LabNetError
from pvelab.running.machine import GuestFaultError, Machine, MachineError
from pvelab.running.qemu import VmSpec, nic_id, prepare

RUN_SCHEMA = 1
KEY_NAME = "id_ed25519"  # the operator's key for a running lab, in its run folder
BULK_PIDS = "/run/pvelab-bulk.pids"  # in a guest: the process groups of the saturating transfers


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """SIGTERM (CI timeouts, kill) unwinds like Ctrl-C, so everything is cleaned up."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def parallel(machines: dict[str, Machine], fn: Callable[[Machine], Any]) -> tuple[dict, dict[str, str]]:
    """fn(machine) on every VM at once: (name -> result, name -> error text). A
    MachineError is its message; anything else (an SFTP or socket error) is named by its
    type too, never lost with its thread."""
    results: dict = {}
    errors: dict[str, str] = {}

    def run(m: Machine) -> None:
        try:
            results[m.name] = fn(m)
        except MachineError as exc:
            errors[m.name] = str(exc)
        except Exception as exc:  # reported as this machine's error, not lost with its thread
            errors[m.name] = f"{m.name}: {type(exc).__name__}: {exc}"

    threads = [threading.Thread(target=run, args=(m,), daemon=True) for m in machines.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


# --------------------------------------------------------------------------- faults


def parse_groups(lab: Lab, text: str) -> list[list[str]]:
    """``"pve-1,pve-2 pve-3,pbs-witness"`` (or ``/`` between groups): every node once."""
    names = [n.name for n in lab.nodes]
    groups = [[p for p in g.split(",") if p] for g in text.replace("/", " ").split()]
    flat = [n for g in groups for n in g]
    unknown = [n for n in flat if n not in names]
    twice = sorted({n for n in flat if flat.count(n) > 1})
    missing = [n for n in names if n not in flat]
    if unknown or twice or missing or len(groups) < 2:
        half = len(names) // 2
        example = f"{','.join(names[:half])} {','.join(names[half:])}"
        why = (
            f"unknown {', '.join(unknown)}"
            if unknown
            else f"{', '.join(twice)} named twice"
            if twice
            else f"{', '.join(missing)} in no group"
            if missing
            else "needs two groups or more"
        )
        raise DriverError(
            f"fault partition: {text!r}: {why} (groups of {', '.join(names)}, e.g. '{example}')"
        )
    return groups


def parse_nodes(lab: Lab, text: str, fault: str) -> list[str]:
    names = [n.name for n in lab.nodes]
    picked = [p for p in text.split(",") if p]
    bad = [p for p in picked if p not in names]
    if bad or not picked:
        raise DriverError(
            f"fault {fault}: {text!r}: {'unknown node ' + ', '.join(bad) if bad else 'no node named'}"
            f" (nodes: {', '.join(names)})"
        )
    return picked


def parse_link_target(lab: Lab, fault: Fault, text: str) -> tuple[list[str], int | None, tuple[float, ...]]:
    """``NODE[,NODE] [LINK]``, ``NODE LINK MS [JITTER_MS]`` or ``NODE LINK PERCENT``:
    (nodes, link, values); a bad word is one line (exit 2)."""
    words = text.split()
    usage = f"fault {fault.value}: {text!r}: say `{fault.value} {fault.target.value}`".rstrip()
    if fault.target is Target.NOTHING:
        if words not in ([], ["all"]):
            raise DriverError(f"fault {fault.value}: say `{fault.value} all` (it undoes every link fault)")
        return [], None, ()
    if not words:
        raise DriverError(usage)
    numbers = {x.number for x in lab.links}
    if fault.target is Target.LINK:  # saturate LINK [MBIT [QUEUE_MS]]
        return [], _link_number(lab, fault, words[0], numbers), _values(fault, words[1:], 0, 2, usage)
    nodes = parse_nodes(lab, words[0], fault.value)
    link: int | None = None
    if len(words) > 1:
        link = _link_number(lab, fault, words[1], numbers)
    wanted = {Target.NODES_LINK: (0, 0), Target.DELAY: (1, 2), Target.LOSS: (1, 1)}[fault.target]
    if link is None and wanted[0]:
        raise DriverError(usage)
    return nodes, link, _values(fault, words[2:], *wanted, usage)


def _link_number(lab: Lab, fault: Fault, word: str, numbers: set[int]) -> int:
    if not word.isdigit() or int(word) not in numbers:
        raise DriverError(
            f"fault {fault.value}: {word!r}: not a corosync link of {lab.name}"
            f" (links: {', '.join(str(n) for n in sorted(numbers))})"
        )
    return int(word)


def _values(fault: Fault, words: list[str], least: int, most: int, usage: str) -> tuple[float, ...]:
    try:
        values = tuple(float(w) for w in words)
    except ValueError:
        raise DriverError(usage) from None
    if not least <= len(values) <= most:
        raise DriverError(usage)
    if any(v < 0 for v in values) or (fault.target is Target.LOSS and values[0] > 100):
        raise DriverError(f"{usage} (milliseconds and percentages are 0 or more, at most 100 %)")
    if fault.target is Target.LINK and values and values[0] <= 0:
        raise DriverError(f"{usage} (a rate of more than 0 Mbit/s)")
    return values


def parse_votes(lab: Lab, text: str) -> tuple[list[str], tuple[float, ...]]:
    """``expected "NODE VOTES"``: one cluster member and a vote count of 1 or more."""
    words = text.split()
    usage = f"fault {Fault.EXPECTED.value}: {text!r}: say `expected {Target.VOTES.value}`"
    if len(words) != 2 or not words[1].isdigit() or int(words[1]) < 1:
        raise DriverError(usage)
    nodes = parse_nodes(lab, words[0], Fault.EXPECTED.value)
    if not lab.node(nodes[0]).is_member:
        raise DriverError(f"{usage} ({nodes[0]} is not a cluster member)")
    return nodes, (float(words[1]),)


# --------------------------------------------------------------------------- run state


@dataclass
class NodeRecord:
    name: str
    pid: int
    address: str  # what DHCP gives it on the lab network
    alias: str  # its lab address (the node adds it on top)
    mac: str
    tap: str
    console_log: str
    drive: str  # what QEMU boots: the overlay, the ISO, or the installed disk
    forwards: dict[str, int] = field(default_factory=dict)  # service -> port on 127.0.0.1


@dataclass
class RunState:
    """What finds a running lab again (``build/<lab>/run/state.json``)."""

    lab: str
    lab_file: str
    netns: str
    media: str
    firmware: str
    accel: str
    accel_reason: str
    workdir: str
    nodes: dict[str, NodeRecord]
    phase: str = "booting"  # booting (up still running) | up
    owner_pid: int = 0  # the process that is bringing the lab up
    started_at: str = ""
    up_seconds: float = 0.0
    cluster: bool = False  # real corosync + QDevice deployed
    forwarder_pid: int | None = None
    faults: list[dict[str, Any]] = field(default_factory=list)  # what was done, in order
    schema: int = RUN_SCHEMA

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, path: Path) -> RunState:
        data = _read_json(path)
        _check_schema(data, RUN_SCHEMA, path)
        data = dict(data)
        if isinstance(data.get("nodes"), dict):
            data["nodes"] = {
                k: _from_dict(NodeRecord, v, f"{path}: nodes.{k}") for k, v in data["nodes"].items()
            }
        return _from_dict(cls, data, str(path))

    def liveness(self) -> str:
        """'' when the lab runs, else why its state is stale (one phrase)."""
        if not Path(f"/run/netns/{self.netns}").exists():
            return f"its network namespace {self.netns} is gone (host rebooted, or removed by hand)"
        if self.phase == "booting" and not pid_alive(self.owner_pid):
            return f"the `invoke up` that was bringing it up (pid {self.owner_pid}) is gone"
        alive = [n for n, r in self.nodes.items() if qemu_alive(r.pid, n)]
        powered_off = {
            n for f in self.faults for n in f.get("nodes", []) if f["fault"] in ("power-off", "kill")
        }
        if not alive and not powered_off:
            return "none of its QEMU processes runs"
        return ""


def link_faults_in_force(faults: list[dict[str, Any]]) -> list[str]:
    """The link faults of a run's history that no ``replug`` or ``clear`` has undone, a
    ``pvecm expected`` still set (undone by a merge or ``restore-qdevice``) and a QDevice
    still out of a node's running config (undone by ``restore-qdevice``)."""
    by_hand = (Fault.EXPECTED.value, Fault.FORGET_QDEVICE.value)  # what `clear` leaves in force
    force: dict[tuple[str, ...], str] = {}
    for f in faults:
        kind, link = f["fault"], f.get("link")
        on = f" link{link}" if link is not None else ""
        if kind == Fault.CLEAR.value:
            force = {k: v for k, v in force.items() if k[0] in by_hand}
        elif kind in (Fault.HEAL.value, Fault.PARTITION.value):  # a merge takes the highest expected
            force = {k: v for k, v in force.items() if k[0] != Fault.EXPECTED.value}
        elif kind == Fault.SATURATE.value:
            shape = f"{'/'.join(f'{v:g}' for v in f.get('values', [])) or 'default'}"
            force[(kind, str(link))] = f"link{link} saturated ({shape})"
        for node in f.get("nodes", []):
            key = (kind, node, str(link))
            if kind == Fault.REPLUG.value:
                force = {
                    k: v
                    for k, v in force.items()
                    if not (
                        k[0] == Fault.UNPLUG.value and k[1] == node and (link is None or k[2] == str(link))
                    )
                }
            elif kind == Fault.EXPECTED.value:
                force[(kind, node)] = f"{node}: expected votes set to {f['values'][0]:g} by hand"
            elif kind == Fault.FORGET_QDEVICE.value:
                force[(kind, node)] = f"{node}: QDevice out of its running corosync config"
            elif kind == Fault.RESTORE_QDEVICE.value:  # corosync.conf read again: both undone
                force.pop((Fault.FORGET_QDEVICE.value, node), None)
                force.pop((Fault.EXPECTED.value, node), None)
            elif kind in (Fault.UNPLUG.value, Fault.DROP.value):
                force[key] = (
                    f"{node}{on or ' (every NIC)'} {'unplugged' if kind == Fault.UNPLUG.value else 'dropped'}"
                )
            elif kind in (Fault.DELAY.value, Fault.LOSS.value):
                unit = "ms" if kind == Fault.DELAY.value else "%"
                force[(Fault.DELAY.value, node, str(link))] = (
                    f"{node}{on} {kind} {'/'.join(f'{v:g}' for v in f.get('values', []))} {unit}"
                )
    return list(force.values())


def link_bridge(number: int) -> str:
    """The host-side bridge of corosync link ``number`` when it has NICs of its own."""
    return f"br-link{number}"


def link_nics(nodes: tuple[Node, ...]) -> dict[str, list[tuple[str, str]]]:
    """Per node, the (bridge, MAC) of each NIC its corosync links add, in :attr:`Node.nics`
    order. A NIC the lab file names only by interface name gets a MAC of the lab's prefix."""
    out: dict[str, list[tuple[str, str]]] = {}
    for i, n in enumerate(nodes):
        out[n.name] = [
            (link_bridge(link.number), link.nic.mac or f"52:54:00:81:{0x10 + link.number:02x}:{i + 1:02x}")
            for link in n.own_nic_links
        ]
    return out


def netns_name(lab: Lab) -> str:
    """``pvelab-<lab>-<6 hex>``: the hex from the run folder's path, so that two checkouts
    (or two PVELAB_BUILD_DIRs) running the same lab never touch each other's namespace."""
    where = hashlib.sha256(str(lab.layout.run_dir.resolve()).encode()).hexdigest()[:6]
    return f"pvelab-{lab.name[:40]}-{where}"


# corosync.conf read again, then the QDevice client started again. Without the device in
# the runtime config the client exits at once ("Can't read quorum.device.model cmap key"),
# systemd restarts it (Restart=on-failure) until its start limit: reset that, and start
# the client only once the reload has put the device back.
RESTORE_QDEVICE = (
    "corosync-cfgtool -R"
    " && for i in $(seq 30); do corosync-cmapctl -g quorum.device.model >/dev/null 2>&1 && break; sleep 1; done"
    " && corosync-cmapctl -g quorum.device.model"
    " && { systemctl reset-failed corosync-qdevice.service || true; }"
    " && systemctl restart corosync-qdevice.service"
)


# --------------------------------------------------------------------------- the driver


class Driver:
    """The running lab: its network, one Machine per node, and when each got SSH."""

    def __init__(
        self,
        lab: Lab,
        nodes: tuple[Node, ...],
        medium: Medium,
        fw: Firmware,
        accel: str,
        accel_reason: str,
        workdir: Path,
        say: Progress,
        disks: dict[str, Path] | None = None,
        netns: str | None = None,
        state_file: Path | None = None,
        bases: dict[str, Path] | None = None,
        wait_ssh: bool = True,
    ):
        self.lab, self.nodes, self.medium, self.fw = lab, nodes, medium, fw
        self.bases = bases or {}  # what a node's overlay backs onto instead of its artefact (a package layer)
        self.wait_ssh = wait_ssh  # False: start() returns once the VMs run; wait_all_ssh() is the caller's
        self.accel, self.accel_reason, self.outdir, self.say = accel, accel_reason, workdir, say
        self.disks = disks
        self.net = LabNet(
            [n.name for n in nodes],
            workdir,
            node_macs={n.name: n.mac for n in nodes},
            link_nics=link_nics(nodes),
        )
        self.serving: serving.Serving | None = None  # a network boot's TFTP/HTTP side
        if netns:
            self.net.name = netns
        self.machines: dict[str, Machine] = {}
        self.ssh_ready_seconds: dict[str, float] = {}
        self.guest_faults: list[dict[str, Any]] = []  # kernel panics seen on the way (guestfault)
        self.state_file = state_file  # set: the lab is findable by other processes
        self.state: RunState | None = None
        self.detached = False
        self._started = False
        self._unstarted: list[str] = []  # machines whose QEMU wait_all_ssh has yet to start
        self._saving = threading.Lock()

    # ---------------------------------------------------------------- lifecycle
    def __enter__(self) -> Driver:
        self._sigterm = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            self.start()
        except BaseException:
            self.stop()
            signal.signal(signal.SIGTERM, self._sigterm)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if not self.detached:
                self.say("stopping the VMs and the lab network")
                self.stop()
        finally:
            signal.signal(signal.SIGTERM, self._sigterm)

    def start(self) -> None:
        self.outdir.mkdir(parents=True, exist_ok=True)
        if self.medium.is_network_boot() and self.disks is None:
            self.serving = serving.Serving(
                self.lab, self.nodes, netboot.Mode(self.medium.netboot), self.outdir
            )
            self.say(self.serving.configure(self.net))
        self.net.__enter__()
        self._started = True
        if self.serving is not None:
            self.serving.start(self.net)
        if self.disks is not None:
            files = self.disks
        else:
            files = {
                n.name: self.bases.get(n.name) or built(self.lab, n, self.medium.artefact) for n in self.nodes
            }
        for n in self.nodes:
            drive = prepare(self.medium, self.fw, files[n.name], self.outdir, n.name, self.disks is None)
            self.machines[n.name] = Machine(
                self._spec(n, drive), self.net, self.lab.user.name, self.lab.user.login_password
            )
        # powered on by wait_all_ssh, at most slots.limit() booting at once
        self._unstarted = list(self.machines)
        self.say(
            f"{len(self.machines)} VM(s) ({self.medium.name}, {self.fw.value}){slots.phrase(len(self.machines))};"
            f" consoles in {self.outdir}"
        )
        if self.state_file is not None:
            self.state = self._new_state()
            self.save()
        if self.wait_ssh:
            self.ssh_ready_seconds = self.wait_all_ssh()

    def _power_on(self, m: Machine) -> None:
        """Start ``m``'s QEMU if :meth:`start` left it for later; the run state learns its pid."""
        with self._saving:
            if m.name not in self._unstarted:
                return
            self._unstarted.remove(m.name)
            m.start()
            if self.state is not None:
                self.save()

    def _spec(self, n: Node, drive: Path) -> VmSpec:
        return VmSpec(
            n.name,
            n.ram_mb,
            self.medium,
            self.fw,
            self.accel,
            drive,
            self.outdir,
            tap=self.net.taps[n.name],
            mac=self.net.macs[n.name],
            extra_nics=tuple((tap, mac) for tap, mac, _ in self.net.nics[n.name][1:]),
            console_socket=True,
        )

    def wait_all_ssh(self, names: list[str] | None = None) -> dict[str, float]:
        timeout = accelerator.of(self.accel).ssh_timeout

        def wait(m: Machine) -> float:
            with slots.booting():  # held until SSH: a booting VM keeps a core busy
                self._power_on(m)
                for attempt in (1, 2):  # a kernel panic that is the emulator's: booted once more
                    try:
                        seconds = round(m.wait_for_ssh(timeout) if attempt == 1 else m.restart(timeout), 1)
                        break
                    except GuestFaultError as exc:
                        retry = exc.fault.emulator and attempt == 1
                        self.guest_faults.append({"node": m.name, **exc.fault.to_dict(), "retried": retry})
                        if not retry:
                            raise
                        self.say(f"{m.name}: {exc.fault.describe()}; booting it again")
                        m.crash()
            self.say(f"{m.name}: SSH up after {seconds}s at {m.address}")
            if self.detached or self.state_file is not None:
                self.grant_access(m)
            return seconds

        results, errors = parallel({n: self.machines[n] for n in (names or self.machines)}, wait)
        if errors:
            raise DriverError("; ".join(errors.values()))
        return results

    def stop(self) -> None:
        """Every VM ended, its throwaway files removed; the lab network removed."""
        with self._saving:  # a boot still waiting for its slot never powers on now
            self._unstarted.clear()
        for m in self.machines.values():
            m.stop()
        if self.state and self.state.forwarder_pid and pid_alive(self.state.forwarder_pid):
            try:
                os.kill(self.state.forwarder_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if self.serving is not None:
            self.serving.stop()
        if self._started or Path(f"/run/netns/{self.net.name}").exists():
            self.net.down()
        for n in self.nodes:
            for leftover in (f"{n.name}.console.sock", f"{n.name}.qmp.sock", f"{n.name}.pid"):
                (self.outdir / leftover).unlink(missing_ok=True)
        if self.state_file is not None:
            for f in (self.state_file, self.outdir / KEY_NAME, self.outdir / f"{KEY_NAME}.pub"):
                f.unlink(missing_ok=True)

    # ---------------------------------------------------------------- detached
    def _new_state(self) -> RunState:
        return RunState(
            lab=self.lab.name,
            lab_file=str(self.lab.path),
            netns=self.net.name,
            media=self.medium.name,
            firmware=self.fw.value,
            accel=self.accel,
            accel_reason=self.accel_reason,
            workdir=str(self.outdir),
            nodes={
                n: NodeRecord(
                    n,
                    m.pid or 0,
                    self.net.addresses[n],
                    str(self.lab.node(n).alias.ip),
                    self.net.macs[n],
                    self.net.taps[n],
                    str(m.console_log),
                    str(m.spec.drive),
                )
                for n, m in self.machines.items()
            },
            owner_pid=os.getpid(),
            started_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )

    def save(self) -> None:
        assert self.state is not None and self.state_file is not None
        for n, m in self.machines.items():
            self.state.nodes[n].pid = m.pid or 0
        write_atomic(self.state_file, self.state.to_json())

    def detach(self, state_file: Path) -> RunState:
        """Leave the lab running when the ``with`` block ends: key login for the operator,
        loopback port forwards, the run state written (phase ``up``)."""
        if self.state_file is None:
            self.state_file = state_file
            self.state = self._new_state()
        assert self.state is not None
        self.detached = True
        for m in self.machines.values():
            if m.is_running():
                self.grant_access(m)
        self.start_forwarder()
        self.state.phase = "up"
        self.save()
        return self.state

    @property
    def key(self) -> Path:
        return self.outdir / KEY_NAME

    def grant_access(self, m: Machine) -> None:
        """The operator's key for the lab user, and sudo without a password: on the
        throwaway overlay only (the way Vagrant boxes are), never on a built artefact."""
        if not self.key.exists():
            subprocess.run(
                [
                    "ssh-keygen",
                    "-q",
                    "-t",
                    "ed25519",
                    "-N",
                    "",
                    "-C",
                    f"pvelab {self.lab.name}",
                    "-f",
                    str(self.key),
                ],
                check=True,
            )
        pub = (self.outdir / f"{KEY_NAME}.pub").read_text().strip()
        m.succeed(
            "umask 077 && mkdir -p ~/.ssh && touch ~/.ssh/authorized_keys"
            f" && (grep -qxF '{pub}' ~/.ssh/authorized_keys || echo '{pub}' >> ~/.ssh/authorized_keys)"
        )
        status, out = m.sudo(
            f"echo '{m.user} ALL=(ALL) NOPASSWD: ALL' > /etc/sudoers.d/90-pvelab-lab"
            " && chmod 0440 /etc/sudoers.d/90-pvelab-lab"
        )
        if status != 0:
            raise MachineError(f"{m.name}: granting the operator's sudo failed: {out.strip()[-300:]}")

    def start_forwarder(self) -> None:
        """127.0.0.1 ports to each node's SSH and to the services its role serves."""
        from pvelab.running.forward import start

        assert self.state is not None
        targets = []
        for n in self.nodes:
            for service, port in (("ssh", 22), *n.role_def.host_ports):
                targets.append((n.name, service, self.net.addresses[n.name], port))
        pid, ports = start(self.net.name, targets, self.outdir)
        self.state.forwarder_pid = pid
        for (node, service, _, _), port in zip(targets, ports, strict=True):
            self.state.nodes[node].forwards[service] = port

    @classmethod
    def attach(cls, lab: Lab, say: Progress) -> Driver:
        """The running lab of ``lab``, from its run state; DriverError when it is not up."""
        state_file = lab.layout.run_dir / "state.json"
        state = read_state(lab)
        if state is None:
            raise DriverError(f"lab {lab.name} is not up (start it: invoke up --lab {lab.path})")
        why = state.liveness()
        if why:
            raise DriverError(
                f"lab {lab.name} is not up: stale state, {why} (clean it: invoke down --lab {lab.path})"
            )
        medium, fw = boot_combination(state.media, state.firmware)
        nodes = tuple(lab.node(n) for n in state.nodes)
        d = cls(
            lab,
            nodes,
            medium,
            fw,
            state.accel,
            state.accel_reason,
            Path(state.workdir),
            say,
            netns=state.netns,
            state_file=state_file,
        )
        d.state, d.detached, d._started = state, True, True
        for n in nodes:
            spec = d._spec(n, Path(state.nodes[n.name].drive))
            m = Machine(spec, d.net, lab.user.name, lab.user.login_password, pid=state.nodes[n.name].pid)
            d.machines[n.name] = m
        return d

    def connect(self, names: list[str] | None = None, timeout: float = 20.0) -> dict[str, str]:
        """SSH to the running VMs (an attached driver starts unconnected): name -> error."""
        machines = {
            n: m for n, m in self.machines.items() if (names is None or n in names) and m.is_running()
        }
        _, errors = parallel(machines, lambda m: m.client or m.wait_for_ssh(timeout))
        return errors

    def record(
        self,
        fault: Fault,
        nodes: list[str] | None = None,
        groups: list[list[str]] | None = None,
        link: int | None = None,
        values: tuple[float, ...] = (),
    ) -> None:
        if self.state is None:
            return
        entry: dict[str, Any] = {"fault": fault.value, "at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
        if nodes:
            entry["nodes"] = nodes
        if groups:
            entry["groups"] = groups
        if link is not None:
            entry["link"] = link
        if values:
            entry["values"] = list(values)
        self.state.faults.append(entry)
        self.save()

    # ---------------------------------------------------------------- use
    def on_all(self, command: str, names: list[str] | None = None) -> dict[str, str]:
        """Run one command on the given (default: all) VMs at once; name -> output or error."""
        machines = {n: self.machines[n] for n in (names or self.machines)}
        results, errors = parallel(machines, lambda m: m.execute(command, timeout=60)[1].strip())
        return {n: results[n] if n in results else f"error: {errors.get(n, '')}" for n in machines}

    @property
    def witness(self) -> str | None:
        return self.lab.witness.name if self.lab.witness else None

    # ---------------------------------------------------------------- faults
    def nic_indexes(self, node: str, link: int | None) -> list[int]:
        """Which NICs of ``node`` carry corosync link ``link`` (None: every NIC it has)."""
        n = self.lab.node(node)
        if link is None:
            return list(range(len(n.nics)))
        if link not in {x.number for x in n.links}:
            known = ", ".join(str(x.number) for x in self.lab.links)
            raise DriverError(f"{node} is on no corosync link {link} (links of {self.lab.name}: {known})")
        return [n.nic_index(link)]

    def _where(self, node: str, link: int | None) -> str:
        return f"{node} link{link}" if link is not None else f"{node} (every NIC)"

    def link_fault(self, fault: Fault, nodes: list[str], link: int | None, values: tuple[float, ...]) -> str:
        """A cable pulled or put back, frames dropped, netem on a NIC, or all of it undone."""
        if fault is Fault.CLEAR:
            for m in self.machines.values():
                if m.is_running():
                    for i in range(len(self.net.nics[m.name])):
                        m.set_link(nic_id(i), True)
            self.net.undrop()
            self.net.unshape()
            for m in self.machines.values():
                if m.is_running() and m.client is not None:
                    m.sudo(
                        f"for p in $(cat {BULK_PIDS} 2>/dev/null); do kill -- -$p 2>/dev/null; done;"
                        f" rm -f {BULK_PIDS}; for d in $(ls /sys/class/net);"
                        " do tc qdisc del dev $d root 2>/dev/null; done; true"
                    )
            return "every link fault cleared: NICs plugged, nothing dropped, no netem, no bulk traffic"
        if fault is Fault.SATURATE:
            assert link is not None
            return self.saturate(link, *values)
        where = [self._where(n, link) for n in nodes]
        picked = {n: self.nic_indexes(n, link) for n in nodes}
        if fault in (Fault.UNPLUG, Fault.REPLUG):
            for n, indexes in picked.items():
                for i in indexes:
                    self.machines[n].set_link(nic_id(i), fault is Fault.REPLUG)
            return f"{', '.join(where)}: {'cable pulled (no carrier)' if fault is Fault.UNPLUG else 'plugged in again'}"
        if fault is Fault.DROP:
            self.net.drop([self.net.nics[n][i][0] for n, indexes in picked.items() for i in indexes])
            return f"{', '.join(where)}: every frame dropped at the bridge (link up; the runner's SSH passes)"
        # delay / loss: netem on what the guest sends on that NIC (the host kernel has no netem)
        if fault is Fault.DELAY:
            ms, jitter = values[0], values[1] if len(values) > 1 else 0.0
            shape = f"delay {ms:g}ms" + (f" {jitter:g}ms" if jitter else "")
        else:
            shape = f"loss {values[0]:g}%"
        for n, indexes in picked.items():
            for i in indexes:
                mac = self.net.nics[n][i][1]
                # a prio root: band 1 (the runner's SSH, TCP source port 22) unshaped, the rest netem
                status, out = self.machines[n].sudo(
                    f"dev=$(ip -o link | awk -F': ' '/link.ether {mac} /{{print $2; exit}}'); test -n \"$dev\""
                    ' && { tc qdisc del dev "$dev" root 2>/dev/null; true; }'
                    ' && tc qdisc add dev "$dev" root handle 1: prio bands 2'
                    " priomap 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1"
                    f' && tc qdisc add dev "$dev" parent 1:2 handle 20: netem {shape}'
                    ' && tc filter add dev "$dev" parent 1: protocol ip prio 1 u32'
                    " match ip protocol 6 0xff match ip sport 22 0xffff flowid 1:1"
                    ' && echo "$dev"'
                )
                if status != 0:
                    raise DriverError(f"{n}: netem {shape} on {mac} failed: {out.strip()[-300:]}")
        return f"{', '.join(where)}: netem {shape} on what it sends (its SSH excepted)"

    def saturate(self, link: int, mbit: float = SATURATE_MBIT, queue_ms: float = SATURATE_QUEUE_MS) -> str:
        """Link ``link`` rate-limited to ``mbit`` with ``queue_ms`` of queue at each member's
        port (the bridge side of its NIC; the runner's SSH excepted), and every member sending
        bulk TCP to the next one over it, as a backup or a migration would on a shared NIC."""
        members = [
            n for n in self.lab.members if n.name in self.machines and self.machines[n.name].is_running()
        ]
        if len(members) < 2:
            raise DriverError(f"fault saturate: link{link} needs two running members")
        taps = [self.net.nics[n.name][self.nic_indexes(n.name, link)[0]][0] for n in members]
        try:
            self.net.shape(taps, mbit, queue_ms)
        except LabNetError as exc:
            raise DriverError(f"fault saturate: link{link}: {exc}") from None
        for i, n in enumerate(members):
            peer = members[(i + 1) % len(members)].link(link).ip
            status, out = self.machines[n.name].sudo(
                f"setsid sh -c 'echo $$ >> {BULK_PIDS}; exec timeout 3600 nc -lk {SATURATE_PORT}'"
                " >/dev/null 2>&1 < /dev/null &"
                f" setsid sh -c 'echo $$ >> {BULK_PIDS}; while :; do dd if=/dev/zero bs=64k 2>/dev/null"
                f" | timeout 3600 nc -N {peer} {SATURATE_PORT}; sleep 1; done' >/dev/null 2>&1 < /dev/null &"
                " sleep 0.2; echo started"
            )
            if status != 0:
                raise DriverError(f"{n.name}: bulk traffic to {peer} did not start: {out.strip()[-300:]}")
        return (
            f"link{link}: {mbit:g} Mbit/s with {queue_ms:g} ms of queue at each member's port,"
            f" bulk TCP {' -> '.join(n.name for n in [*members, members[0]])}"
        )

    def fault(
        self,
        fault: Fault,
        nodes: list[str] | None = None,
        groups: list[list[str]] | None = None,
        boot_timeout: float | None = None,
        link: int | None = None,
        values: tuple[float, ...] = (),
    ) -> str:
        """Apply one fault; return its one-line account."""
        nodes = nodes or []
        if fault.is_link:
            line = self.link_fault(fault, nodes, link, values)
        elif fault is Fault.POWER_OFF:
            for n in nodes:
                self.machines[n].power_off()
            line = f"{', '.join(nodes)}: powered off (clean shutdown)"
        elif fault is Fault.KILL:
            for n in nodes:
                self.machines[n].crash()
            line = f"{', '.join(nodes)}: QEMU killed (no shutdown)"
        elif fault is Fault.POWER_ON:
            timeout = boot_timeout or accelerator.of(self.accel).ssh_timeout
            on = [n for n in nodes if not self.machines[n].is_running()]
            results, errors = parallel({n: self.machines[n] for n in on}, lambda m: m.restart(timeout))
            if errors:
                raise DriverError("; ".join(errors.values()))
            if self.detached:
                for n in on:
                    self.grant_access(self.machines[n])
            line = ", ".join(f"{n}: powered on, SSH up after {s:.1f}s" for n, s in results.items()) or (
                f"{', '.join(nodes)}: already running"
            )
        elif fault is Fault.CUT:
            for n in nodes:
                self.net.isolate(n)
            line = f"{', '.join(nodes)}: cut off from every other node"
        elif fault is Fault.PARTITION:
            assert groups
            self.net.partition(groups)
            line = "partitioned: " + " | ".join(",".join(g) for g in groups)
        elif fault is Fault.HEAL:
            targets: list[str | None] = list(nodes) or [None]
            for one in targets:
                self.net.rejoin(one)
            line = f"{', '.join(nodes) if nodes else 'every node'}: back on the lab network"
        elif fault is Fault.EXPECTED:
            votes = int(values[0])
            for n in nodes:
                status, out = self.machines[n].sudo(f"corosync-quorumtool -e {votes}", timeout=60)
                if status != 0:
                    raise DriverError(
                        f"{n}: corosync-quorumtool -e {votes} exited {status}: {out.strip()[-300:]}"
                    )
            line = f"{', '.join(nodes)}: expected votes set to {votes} (pvecm expected {votes})"
        elif fault in (Fault.FORGET_QDEVICE, Fault.RESTORE_QDEVICE):
            command = (
                "corosync-cmapctl -D quorum.device" if fault is Fault.FORGET_QDEVICE else RESTORE_QDEVICE
            )
            for n in nodes:
                status, out = self.machines[n].sudo(command, timeout=120)
                if status != 0:
                    raise DriverError(f"{n}: `{command}` exited {status}: {out.strip()[-300:]}")
            line = f"{', '.join(nodes)}: " + (
                "the QDevice removed from the running corosync configuration (corosync.conf unchanged)"
                if fault is Fault.FORGET_QDEVICE
                else "corosync.conf read again (corosync-cfgtool -R), the QDevice client restarted"
            )
        else:
            if self.witness is None:
                raise DriverError(f"fault {fault.value}: lab {self.lab.name} has no witness")
            verb = "stop" if fault is Fault.QNETD_STOP else "start"
            m = self.machines[self.witness]
            if m.client is None:
                m.wait_for_ssh(30)
            status, out = m.sudo(f"systemctl {verb} corosync-qnetd.service", timeout=120)
            if status != 0:
                raise DriverError(
                    f"{self.witness}: systemctl {verb} corosync-qnetd.service exited {status}: {out.strip()[-300:]}"
                )
            line = f"{self.witness}: corosync-qnetd {'stopped' if verb == 'stop' else 'started'}"
        self.record(fault, nodes, groups, link, values)
        return line


def read_state(lab: Lab) -> RunState | None:
    path = lab.layout.run_dir / "state.json"
    if not path.exists():
        return None
    try:
        return RunState.from_json(path)
    except RecordError:
        return None
