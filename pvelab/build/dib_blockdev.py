"""DIB block-device plugin: partitioning without device-mapper.

DIB's stock ``partitioning`` plugin maps partitions with ``kpartx`` (device-mapper).
Kernels without device-mapper (containers, some CI sandboxes) cannot do that, but they
can expose loop-device partitions (``partx``/``losetup -P``) as ``/dev/loopXpN``.

This plugin is registered under the entry point group
``diskimage_builder.block_device.plugin`` as ``pvelab_partitioning``; pvelab writes a
block-device config naming it only when the host has no device-mapper
(:func:`needs_loop_partitions`), so hosts with device-mapper keep stock kpartx.
"""

from __future__ import annotations

import logging
import os
import time

from diskimage_builder.block_device.level1.partitioning import Partitioning
from diskimage_builder.block_device.utils import exec_sudo

logger = logging.getLogger(__name__)


def device_mapper_works() -> bool:
    """True when the kernel has device-mapper (kpartx works).

    A ``/dev/mapper/control`` node alone proves nothing: installing dmsetup creates it
    even on kernels without the driver, where opening it fails with ENODEV.  The
    kernel lists the driver in /proc/misc when it is there.
    """
    try:
        with open("/proc/misc") as fh:
            return any(line.split()[1:] == ["device-mapper"] for line in fh if line.strip())
    except OSError:
        return False


def needs_loop_partitions() -> bool:
    """True when device-mapper is unusable, so DIB's kpartx step would fail."""
    return not device_mapper_works()


def block_device_config(plugin: str) -> str:
    """DIB block-device YAML: one MBR disk, one bootable root partition."""
    return f"""\
- local_loop:
    name: image0
- {plugin}:
    base: image0
    label: mbr
    partitions:
      - name: root
        flags: [ boot, primary ]
        size: 100%
        mkfs:
          type: ext4
          label: cloudimg-rootfs
          mount:
            mount_point: /
            fstab:
              options: "defaults"
              fsck-passno: 1
"""


def _wait_for(path: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise RuntimeError(f"partition device {path} did not appear")
        time.sleep(0.1)


class LoopPartitioning(Partitioning):
    """Like DIB's Partitioning, but partitions appear as /dev/loopXpN via partx."""

    def create(self):
        self.number_of_partitions += 1
        if self.number_of_partitions > 1:
            return
        self.image_path = self.state["blockdev"][self.base]["image"]
        self.device_path = self.state["blockdev"][self.base]["device"]
        self.disk_size = self._size_of_block_dev(self.image_path)
        logger.info(
            "Creating partitions on [%s] [%s] (loop partitions, no device-mapper)", self.base, self.image_path
        )
        if self.label == "mbr":
            self._create_mbr()
        else:
            self._create_gpt()
        exec_sudo(["sync"])
        # Ask the kernel for the loop device's partitions (no kpartx/device-mapper).
        # --update, not --add: a partition left on this loop device by a killed run
        # would make --add fail with "busy"; --update replaces it.
        exec_sudo(["partx", "-u", "-v", self.device_path])
        # The parent recorded /dev/mapper/loopXpN; the kernel gives /dev/loopXpN.
        for part in self.partitions:
            entry = self.state["blockdev"][part.get_name()]
            entry["device"] = entry["device"].replace("/dev/mapper/", "/dev/")
            _wait_for(entry["device"])

    def umount(self):
        self.number_of_partitions -= 1
        if self.number_of_partitions == 0:
            exec_sudo(["partx", "-d", "-v", self.state["blockdev"][self.base]["device"]])
