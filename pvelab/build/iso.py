"""Hybrid live ISO (BIOS + UEFI, CD + USB) assembled with pycdlib.

Layout::

    /isolinux/isolinux.bin, ldlinux.c32, isolinux.cfg   BIOS (El Torito entry 1, isohybrid MBR)
    /boot/efiboot.img                                    FAT ESP (entry 2): EFI/BOOT/BOOTX64.EFI (shim),
                                                         grubx64.efi (signed GRUB), mmx64.efi,
                                                         EFI/debian/grub.cfg (finds this ISO by label)
    /EFI/BOOT/..., /EFI/debian/grub.cfg                  the same on ISO 9660
    /boot/grub/grub.cfg                                  UEFI menu (GRUB)
    /live/vmlinuz, /live/initrd.img                      the image's own kernel + initrd (live-boot)
    /live/filesystem.squashfs                            shared base root file system
    /live/<node>.squashfs                                the node layer, stacked on top
    /live/filesystem.module                              stacking order for live-boot

pycdlib 1.22 writes an invalid hybrid GPT for ``add_isohybrid(efi=True)`` (the
partition-array CRC covers only the used entries, and the backup GPT carries other
GUIDs); :func:`fix_hybrid_gpt` rewrites both GPT copies consistently afterwards.
"""

from __future__ import annotations

import re
import struct
import subprocess
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import pycdlib
import pycdlib.dates
import pycdlib.headervd
import pycdlib.pycdlib
import pycdlib.udf

from pvelab.build.bootdisk import esp_files
from pvelab.build.signedboot import SignedBoot
from pvelab.core import repro
from pvelab.core.run import StepError, Steps

ISOLINUX_BIN = Path("/usr/lib/ISOLINUX/isolinux.bin")
LDLINUX_C32 = Path("/usr/lib/syslinux/modules/bios/ldlinux.c32")
MENU_C32 = tuple(
    Path("/usr/lib/syslinux/modules/bios") / m for m in ("menu.c32", "libutil.c32", "libcom32.c32")
)
EFI_IMG_KB = 8192

LIVE_CMDLINE = (
    "boot=live live-media-path=/live console=tty0 console=ttyS0,115200 nomodeset quiet systemd.show_status=1"
)


def volume_label(node: str) -> str:
    """Volume id: the node name in d-characters (Joliet allows at most 16 characters;
    the lab validator keeps node names that short)."""
    return re.sub(r"[^A-Z0-9_]", "_", node.upper())[:16]


# panic=10: a kernel panic in the unattended installer restarts the machine (and ends a
# test VM, which runs with -no-reboot) instead of freezing with the disk half written.
# systemd.unit: the installer's own target (overlays/installer), only what the install needs
INSTALL_TARGET = "pvelab-install.target"
INSTALL_ARG = f"pvelab.install=1 systemd.unit={INSTALL_TARGET} panic=10"
INSTALL_WAIT = 10  # seconds the installer's boot menu waits before it erases the disk


@dataclass(frozen=True)
class InstallerPayload:
    """What an installer ISO adds to the live ISO: its layer, /install files, the rule text."""

    layer: Path  # installer.squashfs (the installer program, its unit, install.json)
    files: tuple[tuple[Path, str], ...]  # (local file, name under /install on the ISO)
    erases: str  # what the boot menu says will be erased


def _isolinux_cfg(label: str, erases: str | None = None) -> str:
    live = f"""\
LABEL live
  SAY Booting {label} (pvelab live)
  KERNEL /live/vmlinuz
  APPEND initrd=/live/initrd.img {LIVE_CMDLINE}
"""
    if erases is None:
        return f"SERIAL 0 115200\nDEFAULT live\nPROMPT 0\nTIMEOUT 1\n{live}"
    # menu.c32 draws the menu and its countdown on the serial console too (plain SAY and
    # DISPLAY lines did not reach ttyS0 in the tests)
    return f"""\
SERIAL 0 115200
UI menu.c32
PROMPT 0
TIMEOUT {INSTALL_WAIT * 10}
MENU TITLE pvelab installer for {label}
MENU WIDTH 80
MENU MARGIN 1
DEFAULT install
LABEL install
  MENU LABEL Install: ERASES {erases}
  KERNEL /live/vmlinuz
  APPEND initrd=/live/initrd.img {LIVE_CMDLINE} {INSTALL_ARG}
{live.replace("LABEL live", "LABEL live" + chr(10) + "  MENU LABEL Cancel: the live system, no changes")}"""


def _grub_cfg(label: str, erases: str | None = None) -> str:
    head = """\
serial --speed=115200 --unit=0 --word=8 --parity=no --stop=1
terminal_input serial console
terminal_output serial console
"""
    live = f"""\
menuentry "{label} (pvelab live, no changes)" {{
    linux /live/vmlinuz {LIVE_CMDLINE}
    initrd /live/initrd.img
}}
"""
    if erases is None:
        return head + "set timeout=0\nset default=0\n" + live
    return (
        head
        + f"""\
set timeout={INSTALL_WAIT}
set default=0
echo "pvelab installer for {label}: in {INSTALL_WAIT} s it ERASES {erases} and installs {label} there."
echo "To cancel, choose the live system below."
menuentry "Install {label}: ERASES {erases}" {{
    linux /live/vmlinuz {LIVE_CMDLINE} {INSTALL_ARG}
    initrd /live/initrd.img
}}
"""
        + live
    )


def _esp_grub_cfg(label: str) -> str:
    """What the signed GRUB reads first (EFI/debian/grub.cfg): find the ISO, use its menu."""
    return (
        f"search --no-floppy --set=root --label {label}\n"
        "set prefix=($root)/boot/grub\nconfigfile ($root)/boot/grub/grub.cfg\n"
    )


def make_efiboot(work: Path, label: str, signed: SignedBoot, steps: Steps, seed: str = "") -> Path:
    """FAT image with Debian's signed boot chain (Secure Boot) and the GRUB hop to the ISO.
    Reproducible: the volume id comes from ``seed``, file times from SOURCE_DATE_EPOCH."""
    (work / "esp-grub.cfg").write_text(_esp_grub_cfg(label))
    img = work / "efiboot.img"
    img.unlink(missing_ok=True)
    volid = f"{repro.derived_u32(seed or label, 'efiboot'):08x}"
    steps.run(["mkfs.vfat", "--invariant", "-i", volid, "-C", "-n", "EFIBOOT", str(img), str(EFI_IMG_KB)])
    steps.run(["mmd", "-i", str(img), "::/EFI", "::/EFI/BOOT", "::/EFI/debian"])
    for src, dst in _esp_files(work, signed):
        steps.run(["mcopy", "-i", str(img), str(src), "::" + dst])
    return img


def _esp_files(work: Path, signed: SignedBoot) -> list[tuple[Path, str]]:
    return [(src, "/" + dst) for src, dst in esp_files(signed)] + [
        (work / "esp-grub.cfg", "/EFI/debian/grub.cfg")
    ]


# Long on purpose: the ISO's file list in one pycdlib session, one call per file.
def build_iso(
    out: Path,
    node: str,
    kernel: Path,
    initrd: Path,
    base_squashfs: Path,
    node_squashfs: Path,
    signed: SignedBoot,
    steps: Steps,
    installer: InstallerPayload | None = None,
    epoch: int = 0,
    seed: str = "",
) -> None:
    """Write the hybrid ISO to ``out`` (callers write aside and rename); with
    ``installer``, the installer ISO: the same live system plus its layer and payload.

    Reproducible: every date is ``epoch``; the MBR id and GPT GUIDs derive from ``seed``
    (lab/node/kind), so the same inputs give the same bytes."""
    label = volume_label(node)
    erases = installer.erases if installer else None
    seed = seed or node
    with (
        tempfile.TemporaryDirectory(prefix="pvelab-iso-") as tmp,
        repro.fixed_clock(epoch, pycdlib.dates, pycdlib.headervd, pycdlib.pycdlib, pycdlib.udf),
    ):
        work = Path(tmp)
        efiboot = make_efiboot(work, label, signed, steps, seed)
        (work / "isolinux.cfg").write_text(_isolinux_cfg(label, erases))

        (work / "grub.cfg").write_text(_grub_cfg(label, erases))
        layer = f"{node}.squashfs"
        modules = ["filesystem.squashfs", layer] + (["installer.squashfs"] if installer else [])
        (work / "filesystem.module").write_text("\n".join(modules) + "\n")

        iso = pycdlib.PyCdlib()
        iso.new(interchange_level=3, rock_ridge="1.09", joliet=3, vol_ident=label, app_ident_str="pvelab")
        # Rock Ridge/Joliet names as the loaders look them up: GRUB's prefix is /EFI/debian
        names = {"/EFI": "/EFI", "/EFI/BOOT": "/EFI/BOOT", "/EFI/DEBIAN": "/EFI/debian"}
        dirs = ["/ISOLINUX", "/BOOT", "/BOOT/GRUB", "/LIVE", "/EFI", "/EFI/BOOT", "/EFI/DEBIAN"]
        for d in dirs + (["/INSTALL"] if installer else []):
            real = names.get(d, d.lower())
            iso.add_directory(d, rr_name=real.rsplit("/", 1)[1], joliet_path=real)

        def add(local: Path, iso_path: str, rr_name: str) -> None:
            iso.add_file(str(local), iso_path=iso_path + ";1", rr_name=rr_name, joliet_path=iso_path.lower())

        add(ISOLINUX_BIN, "/ISOLINUX/ISOLINUX.BIN", "isolinux.bin")
        add(LDLINUX_C32, "/ISOLINUX/LDLINUX.C32", "ldlinux.c32")
        add(work / "isolinux.cfg", "/ISOLINUX/ISOLINUX.CFG", "isolinux.cfg")
        if erases:
            for module in MENU_C32:
                add(module, f"/ISOLINUX/{module.name.upper()}", module.name)
        add(efiboot, "/BOOT/EFIBOOT.IMG", "efiboot.img")
        add(work / "grub.cfg", "/BOOT/GRUB/GRUB.CFG", "grub.cfg")
        for src, dst in _esp_files(work, signed):
            iso.add_file(
                str(src), iso_path=dst.upper() + ";1", rr_name=dst.rsplit("/", 1)[1], joliet_path=dst
            )
        add(kernel, "/LIVE/VMLINUZ", "vmlinuz")
        add(initrd, "/LIVE/INITRD.IMG", "initrd.img")
        add(base_squashfs, "/LIVE/FILESYSTEM.SQUASHFS", "filesystem.squashfs")
        iso.add_file(
            str(node_squashfs), iso_path="/LIVE/NODE.SQUASHFS;1", rr_name=layer, joliet_path=f"/live/{layer}"
        )
        add(work / "filesystem.module", "/LIVE/FILESYSTEM.MODULE", "filesystem.module")
        if installer:
            add(installer.layer, "/LIVE/INSTALLER.SQUASHFS", "installer.squashfs")
            for i, (local, name) in enumerate(installer.files):
                iso.add_file(
                    str(local), iso_path=f"/INSTALL/F{i}.;1", rr_name=name, joliet_path=f"/install/{name}"
                )

        iso.add_eltorito(
            "/ISOLINUX/ISOLINUX.BIN;1",
            bootcatfile="/ISOLINUX/BOOT.CAT;1",
            rr_bootcatname="boot.cat",
            joliet_bootcatfile="/isolinux/boot.cat",
            boot_load_size=4,
            boot_info_table=True,
            media_name="noemul",
        )
        iso.add_eltorito(
            "/BOOT/EFIBOOT.IMG;1", efi=True, platform_id=0xEF, media_name="noemul", bootable=True
        )
        iso.add_isohybrid(efi=True, mbr_id=repro.derived_u32(seed, "mbr"))
        iso.write(str(out))
        iso.close()
    fix_hybrid_gpt(out, tuple(repro.derived_uuid(seed, part).bytes_le for part in ("disk", "iso", "efi")))


# ----------------------------------------------------------------------------- GPT repair

_HDR = struct.Struct("<8sIIIIQQQQ16sQIII")
_ENTRY = struct.Struct("<16s16sQQQ72s")
BASIC_DATA = bytes.fromhex("a2a0d0ebe5b9334487c068b6b72699c7")  # EBD0A0A2-B9E5-4433-87C0-68B6B72699C7
ESP_TYPE = bytes.fromhex("28732ac11ff8d211ba4b00a0c93ec93b")  # C12A7328-F81F-11D2-BA4B-00A0C93EC93B


def _mbr_entry(active: bool, ptype: int, start: int, count: int) -> bytes:
    chs = b"\xfe\xff\xff"  # LBA addressing: CHS fields saturated, as partitioning tools write
    return struct.pack("<B3sB3sII", 0x80 if active else 0, chs, ptype, chs, start, count)


# Long on purpose: one binary layout rewritten in place; the offsets it computes are shared by every write.
def fix_hybrid_gpt(path: Path, guids: tuple[bytes, ...] | None = None) -> None:
    """Rewrite pycdlib's hybrid tables into a valid GPT with a matching hybrid MBR.

    pycdlib 1.22 (``add_isohybrid(efi=True)``) writes GPT partitions that overlap (the
    ISO partition starts at LBA 0 and contains the EFI image), CRCs over only the used
    entries, and a backup GPT with other GUIDs. The result here:

    * GPT entry 1 "ISOHybrid ISO" (basic data) from the first usable LBA to just before
      the EFI image, entry 2 "EFI boot" (EFI System Partition type) exactly over
      ``efiboot.img``; identical primary and backup copies with full-array CRCs;
    * MBR (keeping pycdlib's isohybrid boot code, which chain-loads ISOLINUX by LBA):
      entry 1 type 0xEE protecting LBA 1 up to the EFI image, entry 2 type 0xEF
      (active) over the EFI image, so BIOS and UEFI firmware both find their way;
    * with ``guids`` (disk, ISO partition, EFI partition; mixed-endian bytes), those
      GUIDs instead of pycdlib's random ones.
    """
    size = path.stat().st_size
    if size % 512:
        raise StepError(f"{path}: size {size} is not a multiple of 512")
    last_lba = size // 512 - 1
    with open(path, "r+b") as fh:
        fh.seek(512)
        (
            sig,
            rev,
            hsize,
            _crc,
            _res,
            _my,
            _alt,
            first_usable,
            _last,
            guid,
            entries_lba,
            nparts,
            esize,
            _ecrc,
        ) = _HDR.unpack_from(fh.read(512))
        if sig != b"EFI PART" or esize != _ENTRY.size:
            raise StepError(f"{path}: no isohybrid GPT to repair")
        fh.seek(entries_lba * 512)
        old = fh.read(2 * esize)
        iso_guid = _ENTRY.unpack_from(old, 0)[1]
        _t, efi_guid, efi_first, efi_last, _a, _n = _ENTRY.unpack_from(old, esize)
        if guids is not None:
            guid, iso_guid, efi_guid = guids
        if not first_usable < efi_first <= efi_last < last_lba:
            raise StepError(f"{path}: EFI image at LBA {efi_first}-{efi_last} is outside the disk")

        array_sectors = (nparts * esize + 511) // 512
        backup_entries_lba = last_lba - array_sectors
        last_usable = backup_entries_lba - 1
        entries = bytearray(nparts * esize)
        _ENTRY.pack_into(
            entries,
            0,
            BASIC_DATA,
            iso_guid,
            first_usable,
            efi_first - 1,
            0,
            "ISOHybrid ISO".encode("utf-16-le"),
        )
        _ENTRY.pack_into(
            entries, esize, ESP_TYPE, efi_guid, efi_first, efi_last, 0, "EFI boot".encode("utf-16-le")
        )
        ecrc = zlib.crc32(entries) & 0xFFFFFFFF

        def header(my: int, alt: int, ent_lba: int) -> bytes:
            raw = _HDR.pack(
                b"EFI PART",
                rev,
                hsize,
                0,
                0,
                my,
                alt,
                first_usable,
                last_usable,
                guid,
                ent_lba,
                nparts,
                esize,
                ecrc,
            )
            crc = zlib.crc32(raw[:hsize]) & 0xFFFFFFFF
            raw = raw[:16] + struct.pack("<I", crc) + raw[20:]
            return raw + b"\0" * (512 - len(raw))

        fh.seek(446)
        fh.write(
            _mbr_entry(False, 0xEE, 1, efi_first - 1)
            + _mbr_entry(True, 0xEF, efi_first, efi_last - efi_first + 1)
            + b"\0" * 32
            + b"\x55\xaa"
        )
        fh.seek(512)
        fh.write(header(1, last_lba, entries_lba))
        fh.seek(entries_lba * 512)
        fh.write(entries)
        fh.seek(backup_entries_lba * 512)
        fh.write(entries)
        fh.seek(last_lba * 512)
        fh.write(header(last_lba, 1, backup_entries_lba))


def verify_gpt(path: Path) -> str:
    """``sgdisk -v`` report; raises StepError when it finds problems."""
    res = subprocess.run(["sgdisk", "-v", str(path)], capture_output=True, text=True)
    text = res.stdout + res.stderr
    if res.returncode != 0 or "No problems found" not in text:
        raise StepError(f"{path}: GPT does not verify:\n{text.strip()}")
    return text


def read_from_iso(iso: Path, rr_path: str, dest: Path) -> Path:
    """Copy one file (by its Rock Ridge path, e.g. ``/live/vmlinuz``) out of an ISO."""
    cd = pycdlib.PyCdlib()
    cd.open(str(iso))
    try:
        cd.get_file_from_iso(str(dest), rr_path=rr_path)
    finally:
        cd.close()
    return dest
