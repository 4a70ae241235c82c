"""The disk every node boots from: GPT with a BIOS boot partition, an EFI system
partition and the root file system; boots under BIOS and under UEFI, Secure Boot on.

Made once per base from the DIB image (cached beside it as ``disk.raw``): the base's
root file system is copied block for block into partition 3, the ESP gets Debian's
signed chain (shim as ``EFI/BOOT/BOOTX64.EFI``, signed GRUB, MokManager) and a small
``EFI/debian/grub.cfg`` that finds the root by its file-system UUID and uses the
root's own ``/boot/grub/grub.cfg`` (the one ``update-grub`` maintains), and GRUB for
BIOS is installed from the image itself (``grub-install --target=i386-pc`` in a chroot)
into the BIOS boot partition. Each node then grows partition 3 to its disk size.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from pathlib import Path

from pvelab.build import cache
from pvelab.build.disk import copy_data, loop_disk, mounted, partition_extent
from pvelab.build.signedboot import SignedBoot
from pvelab.core.run import StepError, Steps

MIB = 1024**2
BIOS_BOOT_MIB, ESP_MIB = 1, 63  # partitions 1 and 2; the first starts at 1 MiB
ROOT_PARTITION = 3
ROOT_LABEL = "cloudimg-rootfs"  # the base's root file system label (DIB), in every fstab
ESP_PARTITION = 2
LAYOUT = f"""label: gpt
start=2048, size={BIOS_BOOT_MIB}MiB, type=21686148-6449-6E6F-744E-656564454649, name="BIOS boot"
size={ESP_MIB}MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="EFI system"
type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name="root"
"""


def esp_grub_cfg(root_uuid: str) -> str:
    """The signed GRUB's first config (EFI/debian/grub.cfg): the root's own menu."""
    return (
        f"search --no-floppy --fs-uuid --set=root {root_uuid}\n"
        "set prefix=($root)/boot/grub\nconfigfile $prefix/grub.cfg\n"
    )


def esp_files(signed: SignedBoot) -> list[tuple[Path, str]]:
    return [
        (signed.shim, "EFI/BOOT/BOOTX64.EFI"),
        (signed.grub, "EFI/BOOT/grubx64.efi"),
        (signed.mok, "EFI/BOOT/mmx64.efi"),
    ]


def base_disk(base_raw: Path, signed: SignedBoot, steps: Steps) -> Path:
    """The GPT boot disk made from the DIB base image (cached beside it)."""
    out = base_raw.with_name("disk.raw")
    with open(base_raw.parent.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not cache.usable(out.parent, [out.name], f"base {out.parent.name}", steps.say):
            with steps.stage("boot disk: GPT, BIOS boot + ESP (signed shim/GRUB) + root"):
                tmp = out.with_name("disk.raw.tmp")
                tmp.unlink(missing_ok=True)
                _make(base_raw, tmp, signed, steps)
                os.replace(tmp, out)
                cache.seal(out.parent, [out])
    return out


def _make(base_raw: Path, tmp: Path, signed: SignedBoot, steps: Steps) -> None:
    with open(tmp, "wb") as fh:
        fh.truncate(base_raw.stat().st_size + (BIOS_BOOT_MIB + ESP_MIB + 2) * MIB)
    steps.run(["sfdisk", "--no-reread", "--no-tell-kernel", str(tmp)], input=LAYOUT.encode())
    # the base's root file system into partition 3, its data extents only (not 2 GB of dd)
    src_offset, src_size = partition_extent(base_raw, 1)
    dst_offset, dst_size = partition_extent(tmp, ROOT_PARTITION)
    if dst_size < src_size:
        raise StepError(f"{tmp}: root partition ({dst_size} B) smaller than the base's ({src_size} B)")
    copied = copy_data(base_raw, src_offset, src_size, tmp, dst_offset)
    steps.log(
        f"copied {copied / 1e6:.0f} MB of data (of {src_size / 1e6:.0f} MB) into partition {ROOT_PARTITION}"
    )
    work = tmp.parent / "disk.mnt"
    with loop_disk(tmp, steps, partitions=ROOT_PARTITION) as dev:
        root, esp = f"{dev}p{ROOT_PARTITION}", f"{dev}p{ESP_PARTITION}"
        uuid = steps.capture(["blkid", "-s", "UUID", "-o", "value", root]).strip()
        steps.run(["mkfs.vfat", "-F", "32", "-n", "ESP", esp])
        # mtools, not a mount: FAT needs no kernel module on the build host
        cfg = work / "esp-grub.cfg"
        work.mkdir(parents=True, exist_ok=True)
        cfg.write_text(esp_grub_cfg(uuid))
        steps.run(["mmd", "-i", esp, "::/EFI", "::/EFI/BOOT", "::/EFI/debian"])
        for src_file, dst in [*esp_files(signed), (cfg, "EFI/debian/grub.cfg")]:
            steps.run(["mcopy", "-i", esp, str(src_file), f"::/{dst}"])
        with mounted(root, work / "root", steps) as mnt:
            bios_grub(mnt, dev, steps)
    shutil.rmtree(work, ignore_errors=True)


def bios_grub(root: Path, dev: str, steps: Steps) -> None:
    """The image's own GRUB for BIOS, into the BIOS boot partition of ``dev``."""
    binds = [d for d in ("dev", "proc", "sys")]
    try:
        for d in binds:
            subprocess.run(["mount", "--bind", f"/{d}", str(root / d)], check=True)
        steps.run(
            [
                "chroot",
                str(root),
                "grub-install",
                "--target=i386-pc",
                "--boot-directory=/boot",
                "--modules=part_gpt ext2 biosdisk",
                dev,
            ]
        )
    finally:
        for d in reversed(binds):
            subprocess.run(["umount", "-l", str(root / d)], check=False)


def install_payload(disk_raw: Path, steps: Steps) -> tuple[tuple[Path, str], ...]:
    """What an installer ISO carries besides the live system (cached beside the disk):
    the ESP as an image, /boot as a tarball, and the root file system's UUID, which the
    root's grub.cfg and the ESP's hop both look for."""
    out = disk_raw.parent / "install"
    names = ("esp.img.zst", "boot.tar.zst", "root.uuid")
    entry = disk_raw.parent
    if not cache.usable(entry, [f"install/{n}" for n in names], f"base {entry.name}", steps.say):
        with steps.stage("installer payload: ESP image, /boot, root UUID"):
            tmp = out.with_name(f"install.{os.getpid()}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            with loop_disk(disk_raw, steps, read_only=True, partitions=ROOT_PARTITION) as dev:
                steps.run(["sh", "-c", f"zstd -q -19 -T0 -c < {dev}p{ESP_PARTITION} > {tmp / 'esp.img.zst'}"])
                root = f"{dev}p{ROOT_PARTITION}"
                (tmp / "root.uuid").write_text(steps.capture(["blkid", "-s", "UUID", "-o", "value", root]))
                with mounted(root, tmp / "mnt", steps, read_only=True) as mnt:
                    steps.run(["tar", "--zstd", "-cpf", str(tmp / "boot.tar.zst"), "-C", str(mnt), "boot"])
                (tmp / "mnt").rmdir()
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
            cache.seal(entry, [out / n for n in names])
    return tuple((out / n, n) for n in names)
