"""The project's DIB block-device plugin partitions a real loop device without kpartx."""

import os
import subprocess
from importlib.metadata import entry_points

import pytest
import yaml

from pvelab.build import dib_blockdev

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for loop devices")


def test_registered_as_dib_plugin():
    eps = {e.name: e.value for e in entry_points(group="diskimage_builder.block_device.plugin")}
    assert eps["pvelab_partitioning"] == "pvelab.build.dib_blockdev:LoopPartitioning"
    assert "partitioning" in eps  # DIB's own, still used where device-mapper works


def test_config_names_the_plugin():
    cfg = yaml.safe_load(dib_blockdev.block_device_config("pvelab_partitioning"))
    assert list(cfg[0]) == ["local_loop"] and list(cfg[1]) == ["pvelab_partitioning"]
    part = cfg[1]["pvelab_partitioning"]
    assert part["label"] == "mbr" and part["partitions"][0]["mkfs"]["mount"]["mount_point"] == "/"


def test_device_mapper_detection_reads_the_kernel(monkeypatch, tmp_path):
    misc = tmp_path / "misc"
    misc.write_text(" 236 device-mapper\n 183 hw_random\n")
    real_open = open
    monkeypatch.setattr(
        "builtins.open", lambda p, *a, **k: real_open(misc if p == "/proc/misc" else p, *a, **k)
    )
    assert dib_blockdev.device_mapper_works() and not dib_blockdev.needs_loop_partitions()
    misc.write_text(" 183 hw_random\n")
    assert not dib_blockdev.device_mapper_works() and dib_blockdev.needs_loop_partitions()


@needs_root
def test_partitions_a_loop_device(tmp_path):
    from diskimage_builder.block_device.level1.partitioning import Partitioning  # noqa: F401

    image = tmp_path / "disk.raw"
    with open(image, "wb") as fh:
        fh.truncate(64 * 1024 * 1024)
    dev = subprocess.run(
        ["losetup", "--find", "--show", str(image)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        state = {"blockdev": {"image0": {"image": str(image), "device": dev}}}
        config = {
            "base": "image0",
            "label": "mbr",
            "partitions": [{"name": "root", "base": "image0", "flags": ["boot", "primary"], "size": "100%"}],
        }
        plugin = dib_blockdev.LoopPartitioning(config, {}, state)
        for node in plugin.get_nodes():
            node.create()
        part = state["blockdev"]["root"]["device"]
        assert part == f"{dev}p1" and os.path.exists(part)
        subprocess.run(["mkfs.ext4", "-q", part], check=True)
        for node in plugin.get_nodes():
            node.umount()
        assert not os.path.exists(part)
    finally:
        subprocess.run(["partx", "-d", dev], capture_output=True)
        subprocess.run(["losetup", "-d", dev], check=True)
