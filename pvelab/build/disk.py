"""Disk plumbing without device-mapper: loop devices, partitions, mounts, squashfs."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pvelab.core.run import StepError, Steps

QCOW2_FORMAT = "qcow2"  # qemu-img's name of the disk format (-f, -O)


def overlay_command(backing: Path, path: Path) -> list[str]:
    """``qemu-img create`` of a qcow2 at ``path`` over the qcow2 ``backing``, which is only read."""
    return ["qemu-img", "create", "-q", "-f", QCOW2_FORMAT, "-F", QCOW2_FORMAT, "-b", str(backing), str(path)]


@contextmanager
def loop_disk(image: Path, steps: Steps, read_only: bool = False, partitions: int = 1) -> Iterator[str]:
    """Attach a disk image and yield its loop device, partitions at /dev/loopXpN.

    ``losetup --partscan`` is not honoured everywhere (not on this project's CI
    sandbox); ``partx --update`` asks the kernel for the partitions explicitly and
    also replaces a stale loopXpN that a killed run left on the same loop device.
    """
    args = ["losetup", "--find", "--show"] + (["--read-only"] if read_only else [])
    dev = steps.capture([*args, str(image)]).strip()
    try:
        steps.capture(["partx", "--update", dev])
        deadline = time.monotonic() + 10
        while not all(os.path.exists(f"{dev}p{n}") for n in range(1, partitions + 1)):
            if time.monotonic() > deadline:
                raise StepError(f"{dev}p1..p{partitions} did not appear after partx --update {dev}")
            time.sleep(0.1)
        yield dev
    finally:
        subprocess.run(["partx", "--delete", dev], check=False, capture_output=True)
        subprocess.run(["losetup", "--detach", dev], check=False)


@contextmanager
def loop_partition(image: Path, steps: Steps, read_only: bool = False, number: int = 1) -> Iterator[str]:
    """Attach a disk image and yield one partition's device (/dev/loopXpN)."""
    with loop_disk(image, steps, read_only, partitions=number) as dev:
        yield f"{dev}p{number}"


@contextmanager
def mounted(device: str, mountpoint: Path, steps: Steps, read_only: bool = False):
    mountpoint.mkdir(parents=True, exist_ok=True)
    # ro,noload: nothing at all is written to the device (no journal replay either)
    steps.capture(["mount"] + (["-o", "ro,noload"] if read_only else []) + [device, str(mountpoint)])
    try:
        yield mountpoint
    finally:
        unmount(mountpoint)


def unmount(mountpoint: Path, wait: float = 10.0) -> None:
    """Unmount, retried while busy; StepError if it stays mounted. Whatever sits under a
    mount that is left behind (a loop device over a FUSE export that then goes away)
    loses its last writes: a layer was once cached with half its changes."""
    deadline = time.monotonic() + wait
    while True:
        res = subprocess.run(["umount", str(mountpoint)], capture_output=True, text=True)
        if res.returncode == 0 or not os.path.ismount(mountpoint):
            return
        if time.monotonic() > deadline:
            raise StepError(f"umount {mountpoint}: {res.stderr.strip()} (still mounted after {wait:.0f}s)")
        time.sleep(0.2)


def grow_disk(raw: Path, size_gb: int, steps: Steps, partition: int = 1) -> None:
    """Grow the raw disk to size_gb and one (the last, root) partition to the end.

    A GPT's backup header sits at the old end: it moves to the new end first."""
    if raw.stat().st_size > size_gb * 1024**3:
        raise StepError(f"{raw}: base image is larger than the node's disk ({size_gb} GB)")
    os.truncate(raw, size_gb * 1024**3)
    label = steps.capture(["sfdisk", "--dump", str(raw)])
    if "label: gpt" in label:
        steps.run(["sfdisk", "--no-reread", "--no-tell-kernel", "--relocate", "gpt-bak-std", str(raw)])
    steps.run(["sfdisk", "--no-reread", "--no-tell-kernel", "-N", str(partition), str(raw)], input=b", +\n")


def resize_fs(part: str, steps: Steps) -> None:
    res = subprocess.run(
        ["e2fsck", "-f", "-y", part], capture_output=True, text=True, env=dict(os.environ, **steps.env)
    )
    steps.log(res.stdout + res.stderr)
    if res.returncode not in (0, 1):
        raise StepError(f"e2fsck {part} exited {res.returncode}")
    steps.run(["resize2fs", part])


def partition_extent(image: Path, number: int) -> tuple[int, int]:
    """(offset, size) in bytes of partition ``number`` of a disk image, from its table."""
    res = subprocess.run(["sfdisk", "--json", str(image)], capture_output=True, text=True, check=True)
    table = json.loads(res.stdout)["partitiontable"]
    sector = int(table.get("sectorsize", 512))
    for part in table["partitions"]:
        if part["node"] == f"{table['device']}{number}":
            return int(part["start"]) * sector, int(part["size"]) * sector
    raise StepError(f"{image}: no partition {number}")


def copy_data(src: Path, src_offset: int, length: int, dst: Path, dst_offset: int) -> int:
    """Copy ``length`` bytes of ``src`` from ``src_offset`` into ``dst`` at ``dst_offset``,
    the data only: holes are skipped (SEEK_DATA/SEEK_HOLE), so a 2 GB file system with
    400 MB in it costs 400 MB of copy_file_range, not 2 GB of reads as with dd. The range
    in ``dst`` must be a hole already (a freshly truncated file). Returns the bytes copied."""
    copied = 0
    end = src_offset + length
    with open(src, "rb") as fin, open(dst, "r+b") as fout:
        i, o = fin.fileno(), fout.fileno()
        pos = src_offset
        while pos < end:
            try:
                data = os.lseek(i, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            if data >= end:
                break
            hole = min(os.lseek(i, data, os.SEEK_HOLE), end)
            off = data
            while off < hole:
                n = os.copy_file_range(i, o, hole - off, off, dst_offset + off - src_offset)
                if n == 0:
                    raise StepError(f"{src}: copy_file_range stopped at {off}")
                off += n
            copied += hole - data
            pos = hole
        os.fsync(o)
    return copied


def copy_sparse(src: Path, dst: Path) -> None:
    """``cp`` keeping holes; its stderr rides on the error (a full disk is told by it)."""
    subprocess.run(
        ["cp", "--sparse=always", "--reflink=auto", str(src), str(dst)],
        check=True,
        capture_output=True,
        text=True,
    )


def squash(tree: Path, out: Path, steps: Steps, fast: bool = False, all_time: int | None = None) -> None:
    """mksquashfs with zstd; the base layer is compressed harder than the tiny node layers.

    /boot is left out: the live ISO carries the kernel and initrd in /live already.
    Reproducible: the file system's time is SOURCE_DATE_EPOCH when ``steps.env`` has it;
    ``all_time`` also sets every file's time (node layers, written moments ago).
    """
    # zstd 9, not 15: the base squashfs in 1.8 s instead of 10.2 s for 4.5 % more bytes
    # (129 vs 124 MB); unpacking speed is the same at every level
    level = "3" if fast else "9"
    epoch = steps.env.get("SOURCE_DATE_EPOCH")
    times = (["-mkfs-time", epoch] if epoch else []) + (
        ["-all-time", str(all_time)] if all_time is not None else []
    )
    steps.run(
        [
            "mksquashfs",
            str(tree),
            str(out),
            "-noappend",
            "-comp",
            "zstd",
            "-Xcompression-level",
            level,
            "-no-progress",
            "-quiet",
            "-wildcards",
            "-e",
            "boot/*",
            "lost+found",
            *times,
        ]
    )
