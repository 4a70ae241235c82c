"""Boot media and firmware, each defined once.

A medium names the artefact it boots (``<node>.<suffix>`` in the node's build folder),
the firmware it boots with, and how QEMU attaches it.  The boot test, the single-node
boot, publishing and the CLI look media up here; an unknown name is an error naming
the choices.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from .errors import PvelabError


class Firmware(enum.StrEnum):
    BIOS = "bios"
    UEFI = "uefi"


@dataclass(frozen=True)
class Medium:
    name: str
    artefact: str  # artefact kind it boots: "qcow2" | "iso"
    firmwares: tuple[Firmware, ...]
    description: str

    drive: tuple[str, ...]  # QEMU arguments; {path} is the file attached

    def drive_args(self, path: Path) -> list[str]:
        """QEMU arguments attaching ``path`` (for qcow2: the throwaway overlay)."""
        return [a.format(path=path) for a in self.drive]

    @property
    def copy_on_write(self) -> bool:
        """Booted from a throwaway overlay, so the built artefact is never written."""
        return self.artefact == "qcow2"


MEDIA: dict[str, Medium] = {
    m.name: m
    for m in (
        Medium(
            "qcow2",
            "qcow2",
            (Firmware.BIOS,),
            "the node's disk image (copy-on-write overlay)",
            ("-drive", "file={path},if=virtio,format=qcow2,cache=unsafe"),
        ),
        Medium(
            "iso",
            "iso",
            (Firmware.BIOS, Firmware.UEFI),
            "the live ISO as a CD",
            ("-drive", "file={path},media=cdrom,readonly=on,if=ide,index=0", "-boot", "d"),
        ),
        Medium(
            "usb",
            "iso",
            (Firmware.BIOS, Firmware.UEFI),
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
    )
}
# Artefact kinds each node's build produces, in the order they are listed and published.
ARTEFACT_KINDS = ("qcow2", "iso")


def medium(name: str) -> Medium:
    if name not in MEDIA:
        raise PvelabError(f"--media: {name!r}: unknown medium (known: {', '.join(MEDIA)})")
    return MEDIA[name]


def firmware(name: str) -> Firmware:
    try:
        return Firmware(name)
    except ValueError:
        raise PvelabError(
            f"--firmware: {name!r}: unknown firmware (known: {', '.join(f.value for f in Firmware)})"
        ) from None


def boot_combination(media_name: str, firmware_name: str) -> tuple[Medium, Firmware]:
    m, fw = medium(media_name), firmware(firmware_name)
    if fw not in m.firmwares:
        raise PvelabError(
            f"--firmware {fw.value}: the {m.name} medium boots with "
            f"{' or '.join(f.value for f in m.firmwares)} only"
        )
    return m, fw
