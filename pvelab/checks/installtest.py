"""The installer ISOs, run for real: each installs its node onto a blank disk of the
node's size, unattended, and powers off; the boot test then boots the installed disks
alone (:func:`pvelab.checks.boottest.boot_test` with ``--media install``). Also used to show
a refusal: an installer facing a disk that is not blank writes nothing.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pvelab.build import netboot
from pvelab.build.disk import QCOW2_FORMAT
from pvelab.build.iso import read_from_iso
from pvelab.core.errors import PvelabError
from pvelab.model import accel as accelerator
from pvelab.model.lab import Lab, Node
from pvelab.model.media import INSTALLER, Firmware, Medium
from pvelab.running import serving, slots
from pvelab.running.guestfault import ANSI, USERSPACE
from pvelab.running.labnet import LabNet
from pvelab.running.machine import Machine
from pvelab.running.qemu import DirectKernel, VmSpec, prepare

# Each accelerator's waits are in pvelab.model.accel. An installer whose console has not changed
# for its stall timeout is hung (a healthy TCG install prints at least every ~40 s: boot
# menu countdown, systemd status, the installer's steps). A healthy installer's systemd
# greets on the console within ~60 s of power-on under TCG; one still in firmware or the
# boot loader after the stall timeout is hung even if its console keeps changing (seen:
# GRUB's menu redrawn for 15 minutes, the countdown never ending).


def hang(console_changed: float, powered_on: float, now: float, stall: float, userspace: bool) -> str | None:
    """Why a running installer counts as hung now, or None: its console unchanged for
    ``stall`` seconds, or no userspace on it ``stall`` seconds after power-on."""
    if now - console_changed >= stall:
        return f"console silent for {now - console_changed:.0f}s"
    if not userspace and now - powered_on >= stall:
        return f"still in firmware or the boot loader {now - powered_on:.0f}s after power-on"
    return None


class InstallError(PvelabError):
    pass


@dataclass
class InstallRun:
    node: str
    disk: Path
    seconds: float  # power-on to power-off
    exit_code: int | None
    console: str

    @property
    def installed(self) -> bool:
        return self.exit_code == 0 and f"pvelab-install: installed {self.node} on" in self.console

    hung: bool = False  # killed: console unchanged for STALL_TIMEOUT, or the deadline passed
    attempts: int = 1
    faults: list[dict] = field(default_factory=list)  # kernel panics of earlier attempts (retried)

    @property
    def refused(self) -> bool:
        return "pvelab-install: REFUSED:" in self.console

    @property
    def verdict(self) -> str:
        if self.installed:
            return "installed"
        if self.refused:
            return "REFUSED"
        return "HUNG" if self.hung else "FAILED"

    def tail(self, lines: int = 12) -> str:
        """The console's last non-empty lines, escape sequences removed (for error messages)."""
        text = [line.rstrip() for line in ANSI.sub("", self.console).splitlines() if line.strip()]
        return "\n    ".join(text[-lines:]) or "(no console output)"


def blank_disk(path: Path, size_gb: int) -> Path:
    path.unlink(missing_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", QCOW2_FORMAT, str(path), f"{size_gb}G"], check=True)
    return path


def _installer_vm(
    lab: Lab,
    node: Node,
    disk: Path,
    fw: Firmware,
    accel: str,
    workdir: Path,
    cmdline: str | None = None,
    medium: Medium = INSTALLER,
    net: LabNet | None = None,
) -> Machine:
    path = lab.layout.artefact(node.name, medium.artefact)
    if not path.exists():
        raise InstallError(f"{path} is missing: run `invoke build --lab {lab.path} --node {node.name}` first")
    drive = prepare(medium, fw, path, workdir, f"{node.name}-installer")
    kernel = None
    if cmdline is not None:
        kernel = DirectKernel(
            read_from_iso(path, "/live/vmlinuz", workdir / f"{node.name}-installer.vmlinuz"),
            read_from_iso(path, "/live/initrd.img", workdir / f"{node.name}-installer.initrd"),
            cmdline,
        )
    return Machine(
        VmSpec(
            f"{node.name}-installer",
            node.ram_mb,
            medium,
            fw,
            accel,
            drive,
            workdir,
            tap=net.taps[node.name] if net else None,
            mac=net.macs[node.name] if net else None,
            target_disk=disk,
            direct_kernel=kernel,
        ),
        net,
    )


@contextmanager
def _install_network(
    lab: Lab, nodes: tuple[Node, ...], medium: Medium, workdir: Path, say
) -> Iterator[LabNet | None]:
    """A network installer's lab network (DHCP, TFTP, HTTP: :class:`serving.Serving`); None for a CD."""
    if not medium.is_network_boot():
        yield None
        return
    net = LabNet([n.name for n in nodes], workdir, node_macs={n.name: n.mac for n in nodes})
    served = serving.Serving(lab, nodes, netboot.Mode(medium.netboot), workdir)
    say(served.configure(net))
    try:
        with net:
            served.start(net)
            yield net
    finally:
        served.stop()


def run_installers(
    lab: Lab,
    nodes: tuple[Node, ...],
    disks: dict[str, Path],
    fw: Firmware,
    accel: str,
    workdir: Path,
    say,
    retry_hung: bool = True,
    kernel_cmdline: str | None = None,
    medium: Medium = INSTALLER,
) -> dict[str, InstallRun]:
    """Boot each node's installer (``medium``: the ISO as a CD, or over the network) with
    its target disk attached; wait until each powers off. At most
    :func:`pvelab.running.slots.limit` installers run at once; the next powers on when one
    has powered off. Each one's seconds, and its deadline, count from its own power-on.

    An installer whose console stops changing for ``STALL_TIMEOUT``, or that shows no
    userspace that long after power-on (:func:`hang`), is hung, and one
    whose kernel panicked (:mod:`pvelab.running.guestfault`; QEMU then exits as if powered off,
    or hangs) is named: with ``retry_hung`` a hang, or a panic that is the emulator's,
    is started once more on a fresh blank disk (the run records the attempt; the first
    attempt's console stays in ``<node>-installer.<hung|panic>.console.log``). A second
    one, a panic of the guest's own, or its deadline is an :class:`InstallError`
    quoting the console. ``kernel_cmdline`` boots the ISO's kernel directly with that
    command line (the panic test makes one that fails).
    """
    by_name = {n.name: n for n in nodes}
    with _install_network(lab, nodes, medium, workdir, say) as net:

        def vm(name: str) -> Machine:
            return _installer_vm(
                lab, by_name[name], disks[name], fw, accel, workdir, kernel_cmdline, medium, net
            )

        return _watch(_Watch(nodes, disks, fw, accel, workdir, say, retry_hung), vm)


@dataclass(frozen=True)
class _Watch:
    """What the installers' watch loop needs besides how to start one (``vm``)."""

    nodes: tuple[Node, ...]
    disks: dict[str, Path]
    fw: Firmware
    accel: str
    workdir: Path
    say: Callable[[str], object]
    retry_hung: bool


# Long on purpose: one polling loop with its deadline, stall watch, panic watch, one retry and cleanup.
def _watch(job: _Watch, vm: Callable[[str], Machine]) -> dict[str, InstallRun]:
    disks, accel, workdir, say, retry_hung = job.disks, job.accel, job.workdir, job.say, job.retry_hung
    by_name = {n.name: n for n in job.nodes}
    fw = job.fw
    machines = {n.name: vm(n.name) for n in job.nodes}
    t0 = time.monotonic()
    say(
        f"installing {len(machines)} node(s) ({fw.name}){slots.phrase(len(machines))};"
        f" consoles {workdir}/<node>-installer.console.log"
    )
    waiting = list(machines)  # not powered on yet: each waits for a boot slot (pvelab.running.slots)
    holding: set[str] = set()
    install_timeout = accelerator.of(accel).install_timeout
    stall = accelerator.of(accel).stall_timeout
    seen = {name: (-1, t0) for name in machines}  # console size, when it last changed
    first_on = dict.fromkeys(machines, t0)  # its first power-on: its deadline and its seconds count from it
    powered_on = dict.fromkeys(machines, t0)
    userspace = dict.fromkeys(machines, False)  # systemd or live-boot seen on this attempt's console
    attempts = dict.fromkeys(machines, 1)
    faults: dict[str, list[dict]] = {name: [] for name in machines}
    runs: dict[str, InstallRun] = {}
    try:
        while len(runs) < len(machines):
            now = time.monotonic()
            while waiting and slots.try_take():
                name = waiting.pop(0)
                holding.add(name)
                machines[name].start()
                first_on[name] = powered_on[name] = now
                seen[name] = (-1, now)
            for name, m in machines.items():
                if name in runs or name in waiting:
                    continue
                deadline = first_on[name] + install_timeout
                fault = m.guest_fault()
                running = m.is_running()
                if fault is not None and (fault.kind.is_fatal() or not running):
                    m.stop()
                    retry = retry_hung and fault.emulator and attempts[name] == 1 and now < deadline
                    faults[name].append({**fault.to_dict(), "retried": retry})
                    if not retry:
                        raise InstallError(
                            f"{name}: installer's {fault.describe()} (attempt {attempts[name]}) after "
                            f"{now - first_on[name]:.0f}s; the blank disk is not booted; consoles in {workdir}"
                        )
                    m.console_log.replace(workdir / f"{name}-installer.panic.console.log")
                    say(f"{name}: installer's {fault.describe()}; retrying once on a fresh disk")
                elif not running:
                    assert m.proc is not None
                    runs[name] = InstallRun(
                        name,
                        disks[name],
                        round(now - first_on[name], 1),
                        m.proc.returncode,
                        m.console_text(),
                        attempts=attempts[name],
                        faults=faults[name],
                    )
                    say(f"{name}: installer powered off after {runs[name].seconds}s ({runs[name].verdict})")
                    holding.discard(name)
                    slots.give()
                    continue
                else:
                    size = m.console_log.stat().st_size if m.console_log.exists() else 0
                    if size != seen[name][0]:
                        seen[name] = (size, now)
                        userspace[name] = userspace[name] or bool(USERSPACE.search(m.console_text()))
                    why = hang(seen[name][1], powered_on[name], now, stall, userspace[name])
                    if why is None and now < deadline:
                        continue
                    m.stop()
                    hung = InstallRun(
                        name,
                        disks[name],
                        round(now - first_on[name], 1),
                        None,
                        m.console_text(),
                        hung=True,
                        attempts=attempts[name],
                    )
                    why = why or "deadline passed"
                    if not retry_hung or attempts[name] > 1 or now >= deadline:
                        raise InstallError(
                            f"{name}: installer hung ({why}; attempt {attempts[name]}) after {hung.seconds}s; "
                            f"consoles in {workdir}; last console lines:\n    {hung.tail()}"
                        )
                    m.console_log.replace(workdir / f"{name}-installer.hung.console.log")
                    say(
                        f"{name}: installer HUNG ({why}), retrying once on a fresh disk; last lines:\n"
                        f"    {hung.tail(4)}"
                    )
                blank_disk(disks[name], by_name[name].disk_gb)
                machines[name] = vm(name)
                machines[name].start()
                attempts[name] += 1
                seen[name] = (-1, now)
                powered_on[name], userspace[name] = now, False
            time.sleep(2)
    finally:
        for m in machines.values():
            m.stop()
        for _ in holding:
            slots.give()
    return runs
