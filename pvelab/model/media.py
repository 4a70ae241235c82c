"""Boot media and firmware, each defined once.

A medium names the artefact it boots (``<node>.<suffix>`` in the node's build folder),
the firmware it boots with, and how QEMU attaches it. A firmware names the QEMU machine
and the OVMF code and variable files it needs: ``uefi-sb`` is OVMF's Secure Boot build
on a ``q35`` machine with SMM, its variables with Microsoft's keys enrolled, so only a
signed boot chain starts. The boot test, the single-node boot, the rehearsal,
publishing and the CLI look both up here; an unknown name is an error naming the choices.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from pvelab.core.errors import PvelabError
from pvelab.model.artefacts import ArtefactKind

OVMF = Path("/usr/share/OVMF")


@dataclass(frozen=True)
class Firmware:
    name: str
    machine: str  # QEMU -machine
    code: tuple[Path, ...] = ()  # OVMF code (read-only pflash): the first that exists
    vars: tuple[Path, ...] = ()  # OVMF variables template, copied for every boot
    extra: tuple[str, ...] = ()  # further QEMU arguments
    secure_boot: bool = False

    @property
    def value(self) -> str:
        return self.name

    def is_uefi(self) -> bool:
        return bool(self.code)


BIOS = Firmware("bios", "pc,usb=off")
UEFI = Firmware(
    "uefi",
    "pc,usb=off",
    (OVMF / "OVMF_CODE_4M.fd", OVMF / "OVMF_CODE.fd"),
    (OVMF / "OVMF_VARS_4M.fd", OVMF / "OVMF_VARS.fd"),
)
UEFI_SB = Firmware(
    "uefi-sb",
    "q35,smm=on,usb=off",
    (OVMF / "OVMF_CODE_4M.secboot.fd",),
    (OVMF / "OVMF_VARS_4M.ms.fd",),
    ("-global", "driver=cfi.pflash01,property=secure,value=on"),
    secure_boot=True,
)
FIRMWARES: dict[str, Firmware] = {f.name: f for f in (BIOS, UEFI, UEFI_SB)}


@dataclass(frozen=True)
class Medium:
    name: str
    artefact: ArtefactKind  # the artefact kind it boots
    firmwares: tuple[Firmware, ...]
    description: str
    drive: tuple[str, ...]  # QEMU arguments; {path} is the file attached
    netboot: str = ""  # boots from its NIC: a pvelab.build.netboot.Mode value ("" for none)
    installs_first: bool = False  # an installer onto a blank disk, whose disk then boots
    copy_on_write: bool = False  # booted from a throwaway overlay: the artefact is never written

    def drive_args(self, path: Path) -> list[str]:
        """QEMU arguments attaching ``path`` (for qcow2: the throwaway overlay)."""
        return [a.format(path=path) for a in self.drive]

    def installs(self) -> bool:
        """Boots an installer onto a blank disk; the installed disk then boots alone."""
        return self.installs_first

    def is_network_boot(self) -> bool:
        """No CD and no disk of its own: the NIC boots first (DHCP, TFTP, HTTP)."""
        return bool(self.netboot)


MEDIA: dict[str, Medium] = {
    m.name: m
    for m in (
        Medium(
            "qcow2",
            ArtefactKind.QCOW2,
            (BIOS, UEFI, UEFI_SB),
            "the node's disk image (copy-on-write overlay)",
            ("-drive", "file={path},if=virtio,format=qcow2,cache=unsafe"),
            copy_on_write=True,
        ),
        Medium(
            "iso",
            ArtefactKind.ISO,
            (BIOS, UEFI, UEFI_SB),
            "the live ISO as a CD",
            ("-drive", "file={path},media=cdrom,readonly=on,if=ide,index=0", "-boot", "d"),
        ),
        Medium(
            "install",
            ArtefactKind.INSTALLER,
            (BIOS, UEFI, UEFI_SB),
            "the installer ISO as a CD, installing onto a blank disk",
            ("-drive", "file={path},media=cdrom,readonly=on,if=ide,index=0", "-boot", "d"),
            installs_first=True,
        ),
        Medium(
            "usb",
            ArtefactKind.ISO,
            (BIOS, UEFI, UEFI_SB),
            "the hybrid live ISO as a USB stick",
            (
                "-device",
                "qemu-xhci,id=xhci",
                "-drive",
                "if=none,id=stick,format=raw,readonly=on,file={path}",
                "-device",
                "usb-storage,bus=xhci.0,drive=stick,bootindex=0",
            ),
        ),
        Medium(
            "netboot",
            ArtefactKind.NETBOOT,
            (BIOS, UEFI, UEFI_SB),
            "the network boot bundle: iPXE or shim + GRUB, the live ISO fetched over HTTP",
            (),
            netboot="live",
        ),
        Medium(
            "netinstall",
            ArtefactKind.NETBOOT,
            (BIOS, UEFI, UEFI_SB),
            "the network boot bundle's installer (the installer ISO fetched over HTTP), onto a blank disk",
            (),
            netboot="install",
            installs_first=True,
        ),
    )
}
DEFAULT_MEDIUM = MEDIA["qcow2"]  # what every task boots unless --media says otherwise
INSTALLED_DISK = MEDIA["qcow2"]  # how a disk an installer wrote boots (no overlay: it is the throwaway)
INSTALLER = MEDIA["install"]  # the installer ISO, installing onto a blank disk
DEFAULT_FIRMWARE = BIOS
# What every nightly release is boot-tested on (medium, firmware); the installer ISOs by
# installing. The rehearsal runs on REHEARSAL_MEDIUM.
NIGHTLY_BOOT_TESTS: tuple[tuple[Medium, Firmware], ...] = (
    (MEDIA["qcow2"], BIOS),
    (MEDIA["iso"], BIOS),
    (MEDIA["iso"], UEFI_SB),
    (MEDIA["install"], BIOS),
    (MEDIA["install"], UEFI_SB),
)
REHEARSAL_MEDIUM = MEDIA["qcow2"]


def medium(name: str) -> Medium:
    if name not in MEDIA:
        raise PvelabError(f"--media: {name!r}: unknown medium (known: {', '.join(MEDIA)})")
    return MEDIA[name]


def firmware(name: str) -> Firmware:
    if name not in FIRMWARES:
        raise PvelabError(f"--firmware: {name!r}: unknown firmware (known: {', '.join(FIRMWARES)})")
    return FIRMWARES[name]


def boot_combination(media_name: str, firmware_name: str) -> tuple[Medium, Firmware]:
    m, fw = medium(media_name), firmware(firmware_name)
    if fw not in m.firmwares:
        raise PvelabError(
            f"--firmware {fw.name}: the {m.name} medium boots with {' or '.join(f.name for f in m.firmwares)} only"
        )
    return m, fw


def medium_for(kind: str) -> Medium:
    """The medium that boots artefacts of ``kind`` as they are handed over (first in MEDIA)."""
    return next(m for m in MEDIA.values() if m.artefact == kind)


def boot_test_command(lab_path: Path | str, m: Medium, fw: Firmware = DEFAULT_FIRMWARE) -> str:
    """The exact ``invoke boot-test`` that writes the boot report of ``m`` under ``fw``
    (what every gate message tells the operator to run)."""
    args = ["invoke", "boot-test", "--lab", str(lab_path)]
    if m is not DEFAULT_MEDIUM:
        args += ["--media", m.name]
    if fw is not DEFAULT_FIRMWARE:
        args += ["--firmware", fw.name]
    return shlex.join(args)
