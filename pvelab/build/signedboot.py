"""Debian's signed UEFI boot chain for the media: shim, signed GRUB, MokManager.

The files come from the image's own release (trixie's ``shim-signed`` and
``grub-efi-amd64-signed``), resolved against the base image like any guest package
(:mod:`pvelab.build.guestpkgs`) and unpacked once per base. shim is signed by Microsoft's
UEFI CA and trusts Debian's CA, which signed GRUB and the image's kernel; so with
Secure Boot on, firmware -> shim -> GRUB -> kernel verifies at every step.
The signed GRUB reads its configuration from ``/EFI/debian/grub.cfg`` on the partition
it was loaded from.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pvelab.build import cache
from pvelab.build.guestpkgs import fetch
from pvelab.core.errors import PvelabError
from pvelab.core.run import Steps

PACKAGES = ("shim-signed", "grub-efi-amd64-signed")
FILES = {
    "shim": "usr/lib/shim/shimx64.efi.signed",
    "mok": "usr/lib/shim/mmx64.efi.signed",
    "grub": "usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed",
    "grub_net": "usr/lib/grub/x86_64-efi-signed/grubnetx64.efi.signed",
}
UNPACK = ("shim-signed_", "shim-helpers-amd64-signed_", "grub-efi-amd64-signed_")


@dataclass(frozen=True)
class SignedBoot:
    shim: Path  # -> EFI/BOOT/BOOTX64.EFI
    grub: Path  # -> EFI/BOOT/grubx64.efi (shim loads it from its own folder)
    mok: Path  # -> EFI/BOOT/mmx64.efi (shim's fallback when a signature fails)
    versions: dict[str, str]
    grub_net: Path  # network GRUB: prefix (tftp,<server>)/grub (pvelab.build.netboot)


def signed_boot(squashfs: Path, base_key: str, release: str, steps: Steps) -> SignedBoot:
    pset = fetch("signed-boot", PACKAGES, squashfs, base_key, release, steps)
    root = pset.debs[0].parent / "unpacked"
    if root.is_dir() and not cache.usable(root, list(FILES.values()), "signed boot files", steps.say):
        cache.move_aside(root)
    if not root.is_dir():
        tmp = root.with_name(f".unpacked.{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        for deb in pset.debs:
            if deb.name.startswith(UNPACK):
                subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True, capture_output=True)
        cache.seal(tmp, [tmp / v for v in FILES.values() if (tmp / v).is_file()])
        os.replace(tmp, root)
    paths = {k: root / v for k, v in FILES.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise PvelabError(
            f"signed boot files missing after unpacking {', '.join(PACKAGES)}: {', '.join(missing)}"
        )
    versions = {
        d.name.split("_")[0]: d.name.split("_")[1].replace("%3a", ":")
        for d in pset.debs
        if d.name.startswith(UNPACK)
    }
    return SignedBoot(paths["shim"], paths["grub"], paths["mok"], versions, paths["grub_net"])
