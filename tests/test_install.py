"""Installer ISOs: unattended install onto blank disks, the installed disks boot the
node (scenario green), and an installer facing a used disk refuses and writes nothing."""

import hashlib
import os
import subprocess

import pytest

from pvelab.artefacts import Layout
from pvelab.boottest import Progress, boot_test, choose_accel
from pvelab.build import build
from pvelab.installtest import run_installers
from pvelab.media import FIRMWARES

pytestmark = [pytest.mark.boot, pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns, taps)")]


@pytest.fixture(scope="module")
def built(lab):
    layout = Layout(lab.name)
    if not all(layout.artefact(n.name, "installer").exists() for n in lab.nodes):
        build(lab)
    return layout


@pytest.mark.parametrize("firmware", ["bios", "uefi-sb"])
def test_installers_install_and_the_disks_boot(built, lab, firmware):
    report = boot_test(lab, media="install", firmware=firmware, accel="auto")
    assert report.passed, [
        (t.name, [a.last_output for a in t.assertions if not a.passed])
        for t in report.result.tests
        if not t.passed
    ]
    names = [n.name for n in lab.nodes]
    assert sorted(report.install_seconds) == sorted(names) and all(
        s > 0 for s in report.install_seconds.values()
    )
    assert len(set(report.host_keys.values())) == len(names)  # made on each installed system's first boot
    assert report.failed_units == {n: "" for n in names}, report.failed_units
    if firmware == "uefi-sb":
        assert report.secure_boot == {n: True for n in names}
    out = built.boot_test_dir("install", firmware)
    for n in names:
        console = (out / f"{n}-installer.console.log").read_text(errors="replace")
        assert f"pvelab-install: installed {n} on /dev/vda" in console


def test_installer_refuses_a_used_disk(built, lab, tmp_path):
    """A disk with a partition table: the installer says why, writes nothing, powers off."""
    node = lab.node("pbs-witness")
    raw = tmp_path / "used.raw"
    with open(raw, "wb") as fh:
        fh.truncate(node.disk_gb * 1024**3)
    subprocess.run(["sfdisk", "--quiet", str(raw)], input=b"label: gpt\n,,L\n", check=True)
    disk = tmp_path / "used.qcow2"
    subprocess.run(["qemu-img", "convert", "-q", "-O", "qcow2", str(raw), str(disk)], check=True)

    def digest():
        return hashlib.sha256(disk.read_bytes()).hexdigest()

    before = digest()
    accel, _ = choose_accel(lab, node, "auto")
    runs = run_installers(
        lab, (node,), {node.name: disk}, FIRMWARES["bios"], accel, tmp_path, Progress("refuse")
    )
    run = runs[node.name]
    assert run.refused and not run.installed, run.console[-2000:]
    assert "is not blank" in run.console and "nothing was written" in run.console
    assert digest() == before  # every byte of the disk unchanged
