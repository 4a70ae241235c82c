"""`invoke nightly`: build, boot-test every medium, rehearse, publish; any failure publishes nothing.

The installer ISOs are boot-tested by installing (``--media install``): a release carries
them only when that install test passed on exactly their bytes (the publish gate)."""

from __future__ import annotations

from pathlib import Path

from .boottest import boot_test
from .build import build
from .errors import PvelabError
from .lab import Lab
from .publish import Release, publish
from .rehearse import rehearse

# (media, firmware) every release is boot-tested on; the rehearsal runs on the disk images.
BOOT_TESTS = (
    ("qcow2", "bios"),
    ("iso", "bios"),
    ("iso", "uefi-sb"),
    ("install", "bios"),
    ("install", "uefi-sb"),
)
REHEARSAL_MEDIA = "qcow2"


class NightlyFailed(PvelabError):
    exit_code = 1


def nightly(lab: Lab, dest: str | Path | None, keep: int | None, accel: str, gpg_key: str | None) -> Release:
    build(lab)
    for media, firmware in BOOT_TESTS:
        if not boot_test(lab, media=media, firmware=firmware, accel=accel).passed:
            raise NightlyFailed(f"nightly: boot test {media}/{firmware} FAILED; nothing published")
    if not rehearse(lab, media=REHEARSAL_MEDIA, accel=accel).passed:
        raise NightlyFailed("nightly: rehearsal FAILED; nothing published")
    return publish(lab, dest, keep=keep, gpg_key=gpg_key)
