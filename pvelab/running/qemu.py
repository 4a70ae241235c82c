"""QEMU: which accelerator really works, the files a guest needs, and its command line.

:func:`qemu_command` is pure: it turns a :class:`VmSpec` into arguments and creates
nothing; :func:`prepare` makes the throwaway files a boot needs (the copy-on-write
overlay of a qcow2, a private copy of the UEFI variables).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pvelab.build.disk import overlay_command
from pvelab.core.errors import PvelabError
from pvelab.model import accel as accelerator
from pvelab.model.media import Firmware, Medium

QEMU = "qemu-system-x86_64"


class MachineError(PvelabError):
    pass


# --------------------------------------------------------------------------- acceleration

# one answer per process: whether KVM runs a guest is the host's, not the kernel's
_accel_cache: dict[str, tuple[str, str]] = {}

# QEMU's own words when KVM stops a guest it started: QEMU then pauses (it does not
# exit), so the probe stops at them instead of waiting out its timeout
KVM_FAILED = (b"KVM internal error", b"failed to set MSR", b"kvm run failed", b"Could not access KVM")


# Long on purpose: one guarded QEMU run: start, watch the console, kill, read the verdict.
def probe_kvm(kernel: Path, timeout: float = 30.0) -> tuple[bool, str]:
    """Does KVM really run a guest here? Boot ``kernel`` (no root fs) until it panics.

    A working KVM gets the kernel to "Kernel panic ... Unable to mount root fs" in
    seconds and QEMU exits (-no-reboot). Broken KVM layers abort at start ("failed to
    set MSR") or stop with "KVM internal error" (QEMU then pauses the guest: the probe
    ends on those words, about 3 s here, not at its timeout); either is the reason.
    """
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is missing or not accessible"
    if shutil.which(QEMU) is None:
        raise MachineError(f"{QEMU} not found (run scripts/setup)")
    with tempfile.TemporaryDirectory(prefix="pvelab-kvm-") as tmp:
        console = Path(tmp) / "console"
        said = Path(tmp) / "qemu.out"
        with open(said, "wb") as out:
            proc = subprocess.Popen(
                [
                    QEMU,
                    "-accel",
                    accelerator.KVM.name,
                    "-cpu",
                    accelerator.KVM.cpu,
                    "-m",
                    "256",
                    "-display",
                    "none",
                    "-no-reboot",
                    "-nic",
                    "none",
                    "-monitor",
                    "none",
                    "-serial",
                    f"file:{console}",
                    "-kernel",
                    str(kernel),
                    "-append",
                    "console=ttyS0 panic=-1 loglevel=4",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

        def panicked() -> bool:
            return console.exists() and b"Kernel panic" in console.read_bytes()

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            if panicked() or any(m in said.read_bytes() for m in KVM_FAILED):
                break
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if panicked():
            return True, "kernel booted under KVM"
        reason = said.read_bytes().decode(errors="replace").strip().splitlines()
        return False, (reason[0] if reason else f"no kernel output within {timeout:.0f}s")


def resolve_accel(requested: str, kernel: Callable[[], Path | None]) -> tuple[str, str]:
    """(accelerator, why) for --accel auto|kvm|tcg; auto probes KVM once per process,
    with the kernel ``kernel()`` gives (asked only then)."""
    if requested in accelerator.ACCELS:
        return requested, "requested"
    if requested != accelerator.AUTO:
        raise MachineError(f"--accel: {requested!r}: must be one of {accelerator.choices()}")
    key = QEMU
    if key not in _accel_cache:
        probe = kernel()
        if probe is None:
            return accelerator.TCG.name, "no kernel to probe KVM with"
        ok, why = probe_kvm(probe)
        _accel_cache[key] = (
            (accelerator.KVM.name, why) if ok else (accelerator.TCG.name, f"KVM unusable: {why}")
        )
    return _accel_cache[key]


def first_existing(paths: tuple[Path, ...]) -> Path:
    for p in paths:
        if p.exists():
            return p
    raise MachineError(f"none of {', '.join(map(str, paths))} exists (install ovmf: scripts/setup)")


# --------------------------------------------------------------------------- one guest


@dataclass(frozen=True)
class DirectKernel:
    """Boot this kernel and initrd with this command line instead of the medium's boot
    loader (QEMU ``-kernel``): for debugging a boot, and for the test whose kernel
    command line is made to fail."""

    kernel: Path
    initrd: Path
    cmdline: str


@dataclass(frozen=True)
class VmSpec:
    """Everything one guest's command line needs."""

    name: str
    ram_mb: int
    medium: Medium
    firmware: Firmware
    accel: str
    drive: Path  # what is attached: the qcow2 overlay or the ISO
    workdir: Path
    tap: str | None = None  # lab network tap (None: QEMU user net, restricted)
    mac: str | None = None
    extra_nics: tuple[tuple[str, str], ...] = ()  # (tap, mac) of the NICs corosync links add
    target_disk: Path | None = None  # a second, writable disk (the installer's target)
    icount: bool = False  # TCG: guest time from the instruction count (bench --icount)
    console_socket: bool = False  # the serial console also on a socket `invoke console` attaches to
    direct_kernel: DirectKernel | None = None

    @property
    def console_sock(self) -> Path:
        """The console socket, named relative to ``workdir`` (QEMU runs there): a UNIX
        socket path is limited to 107 bytes, a checkout's path is not."""
        return Path(f"{self.name}.console.sock")

    @property
    def qmp_sock(self) -> Path:
        """QEMU's QMP socket (NIC link state: a cable pull), named relative to ``workdir``."""
        return Path(f"{self.name}.qmp.sock")

    @property
    def console_log(self) -> Path:
        return self.workdir / f"{self.name}.console.log"

    @property
    def vars_file(self) -> Path:
        return self.workdir / f"{self.name}.OVMF_VARS.fd"

    @property
    def overlay(self) -> Path:
        return self.workdir / f"{self.name}.overlay.qcow2"


def prepare(
    medium: Medium, firmware: Firmware, artefact: Path, workdir: Path, name: str, copy_on_write: bool = True
) -> Path:
    """Create the throwaway files of one boot; return the file to attach as the drive
    (``copy_on_write=False``: the file itself, written by the guest, e.g. an installed disk)."""
    workdir.mkdir(parents=True, exist_ok=True)
    drive = artefact.resolve()
    if medium.copy_on_write and copy_on_write:
        drive = workdir / f"{name}.overlay.qcow2"
        drive.unlink(missing_ok=True)
        subprocess.run(overlay_command(artefact.resolve(), drive), check=True)
    if firmware.is_uefi():
        shutil.copyfile(first_existing(firmware.vars), workdir / f"{name}.OVMF_VARS.fd")
    return drive


def nic_id(index: int) -> str:
    """QEMU's device id of a guest's ``index``-th NIC (0: the default NIC): QMP's
    ``set_link`` names it."""
    return f"nic{index}"


def _nic_boot(spec: VmSpec) -> str:
    """A network boot's NIC boots first. Under UEFI, with no option ROM: OVMF's own PXE
    then starts shim, as a server's firmware does (QEMU's iPXE ROM is unsigned, and
    BIOS needs it: SeaBIOS has no PXE of its own)."""
    if not spec.medium.is_network_boot():
        return ""
    return ",bootindex=0" + (",romfile=" if spec.firmware.is_uefi() else "")


# Long on purpose: one command line built argument by argument (the formatter puts each on a line).
def qemu_command(spec: VmSpec, interactive: bool = False) -> list[str]:
    # -nodefaults: no VGA, floppy, parallel port or default NIC; fewer devices for the
    # guest to probe (udev coldplug is a large part of an emulated boot)
    args = [
        QEMU,
        "-name",
        spec.name,
        "-machine",
        spec.firmware.machine,
        "-nodefaults",
        "-m",
        str(spec.ram_mb),
        "-smp",
        "1",
        "-accel",
        spec.accel,
        "-no-reboot",
        "-display",
        "none",
        "-device",
        "virtio-rng-pci",
        "-pidfile",
        str(spec.workdir / f"{spec.name}.pid"),
    ]
    if spec.icount and accelerator.of(spec.accel).counts_instructions:
        # one instruction = 1 ns of guest time, no waiting for the host clock: a guest's own
        # timings (systemd-analyze) count instructions, the same in every run
        args += ["-icount", "shift=0,sleep=off"]
    args += ["-cpu", accelerator.of(spec.accel).cpu]
    args += spec.medium.drive_args(spec.drive)
    if spec.target_disk is not None:
        args += ["-drive", f"file={spec.target_disk},if=virtio,format=qcow2,cache=unsafe"]
    if spec.direct_kernel is not None:
        k = spec.direct_kernel
        args += ["-kernel", str(k.kernel), "-initrd", str(k.initrd), "-append", k.cmdline]
    if spec.firmware.is_uefi():
        args += [
            "-drive",
            f"if=pflash,format=raw,readonly=on,file={first_existing(spec.firmware.code)}",
            "-drive",
            f"if=pflash,format=raw,file={spec.vars_file}",
            *spec.firmware.extra,
        ]
    if spec.tap:
        args += [
            "-netdev",
            f"tap,id=n0,ifname={spec.tap},script=no,downscript=no",
            "-device",
            f"virtio-net-pci,netdev=n0,mac={spec.mac},id={nic_id(0)}" + _nic_boot(spec),
        ]
        for index, (tap, mac) in enumerate(spec.extra_nics, 1):
            args += [
                "-netdev",
                f"tap,id=n{index},ifname={tap},script=no,downscript=no",
                "-device",
                f"virtio-net-pci,netdev=n{index},mac={mac},id={nic_id(index)}",
            ]
    else:
        args += ["-nic", "user,restrict=on,model=virtio-net-pci"]
    if interactive:
        args += ["-serial", "mon:stdio"]
    elif spec.console_socket:
        args += [
            "-chardev",
            # a socket a terminal can attach to at any time; everything also goes to the log
            f"socket,id=ser0,path={spec.console_sock},server=on,wait=off,"
            f"logfile={spec.console_log},logappend=on",
            "-serial",
            "chardev:ser0",
            "-monitor",
            "none",
            "-qmp",
            f"unix:{spec.qmp_sock},server=on,wait=off",
        ]
    else:
        args += [
            "-chardev",
            # append: a guest powered on again keeps its earlier boots in the same log
            f"file,id=ser0,path={spec.console_log},append=on",
            "-serial",
            "chardev:ser0",
            "-monitor",
            "none",
        ]
    return args
