"""Disk plumbing that needs no root: partition geometry and the data-only copy."""

import os
import subprocess

from pvelab.build.disk import copy_data, partition_extent

MIB = 2**20


def _disk(path, size_mib, script):
    with open(path, "wb") as fh:
        fh.truncate(size_mib * MIB)
    subprocess.run(
        ["sfdisk", "-q", "--no-reread", "--no-tell-kernel", str(path)], input=script, text=True, check=True
    )


def test_copy_data_moves_a_partition_and_keeps_its_holes(tmp_path):
    src, dst = tmp_path / "base.raw", tmp_path / "disk.raw"
    _disk(src, 64, "label: dos\nstart=2048, type=83\n")
    _disk(dst, 82, "label: gpt\nstart=2048, size=1MiB\nsize=15MiB\nsize=+\n")
    s_off, s_size = partition_extent(src, 1)
    d_off, d_size = partition_extent(dst, 3)
    assert (s_off, d_off) == (1 * MIB, 17 * MIB) and d_size >= s_size
    # data at the start, in the middle and at the very end of the source partition
    chunks = {0: b"A" * 4096, 20 * MIB: os.urandom(3 * MIB), s_size - 4096: b"Z" * 4096}
    with open(src, "r+b") as fh:
        for at, data in chunks.items():
            fh.seek(s_off + at)
            fh.write(data)
    copied = copy_data(src, s_off, s_size, dst, d_off)
    assert 3 * MIB < copied <= 3 * MIB + 3 * 64 * 1024  # the data (file-system block rounding), not 63 MiB
    with open(src, "rb") as a, open(dst, "rb") as b:
        a.seek(s_off)
        b.seek(d_off)
        assert a.read(s_size) == b.read(s_size)
    assert os.stat(dst).st_blocks * 512 < 8 * MIB  # the holes stayed holes
    # the partition table of the destination is untouched
    assert partition_extent(dst, 3) == (d_off, d_size)


def test_a_busy_mount_is_an_error_not_left_behind(tmp_path):
    """unmount() retries while the mount is busy and then says so: a mount left behind
    over a loop device and a FUSE export loses its last writes (a cached package layer
    once kept corosync enabled that way)."""
    import pytest

    from pvelab.build.disk import unmount
    from pvelab.core.run import StepError

    if os.geteuid() != 0:
        pytest.skip("needs root (mount)")
    where = tmp_path / "mnt"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(where)], check=True)
    try:
        with open(where / "held", "w"):
            os.chdir(where)  # busy: this process's working directory
            try:
                with pytest.raises(StepError, match=r"umount .*mnt: .*busy.* \(still mounted after 1s\)"):
                    unmount(where, wait=1.0)
            finally:
                os.chdir(tmp_path)
        unmount(where)
        assert not os.path.ismount(where)
    finally:
        subprocess.run(["umount", "--lazy", str(where)], capture_output=True)
