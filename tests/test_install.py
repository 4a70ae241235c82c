"""Installer ISOs: unattended install onto blank disks, the installed disks boot the
node (scenario green), and an installer facing a used disk refuses and writes nothing."""

import dataclasses
import hashlib
import os
import re
import shutil
import subprocess

import pytest

from pvelab.build.pipeline import build
from pvelab.checks.boottest import boot_test, choose_accel
from pvelab.checks.installtest import run_installers
from pvelab.core.logger import Progress
from pvelab.model.artefacts import Layout
from pvelab.model.media import FIRMWARES

pytestmark = [pytest.mark.boot, pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns, taps)")]


@pytest.fixture(scope="module")
def built(lab):
    layout = Layout(lab.name)
    if not all(layout.artefact(n.name, k).exists() for n in lab.nodes for k in ("installer", "netboot")):
        build(lab)
    return layout


# The nightly's two (medium, firmware) pairs: four installers, then the four installed disks
# run the lab's scenario. The network install is the same installer reached another way:
# one node of it (test_a_network_install_boots_under_secure_boot).
@pytest.mark.parametrize("media, firmware", [("install", "bios"), ("install", "uefi-sb")])
def test_installers_install_and_the_disks_boot(built, lab, media, firmware):
    """The installer ISOs as CDs; the installed disks then boot alone."""
    report = boot_test(lab, media=media, firmware=firmware, accel="auto")
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
    out = built.boot_test_dir(media, firmware)
    for n in names:
        console = (out / f"{n}-installer.console.log").read_text(errors="replace")
        assert f"pvelab-install: installed {n} on /dev/vda" in console


@pytest.fixture(scope="module")
def lone_installers(built, lab, tmp_path_factory):
    """The two one-VM installer runs at once (one VM keeps one of the two cores busy): pve-1
    installed over the network under Secure Boot onto a blank disk, and pbs-witness's CD
    installer facing a used disk. ``{"netinstall": (run, out, disk), "refuse": (run, disk,
    sha256 before)}``; a run that raised is its exception, for its own test to raise."""
    from concurrent.futures import ThreadPoolExecutor

    from pvelab.checks.installtest import blank_disk
    from pvelab.model.media import MEDIA

    def netinstall():
        node = lab.node("pve-1")
        accel, _ = choose_accel(lab, node, "auto")
        # in the build tree, as every boot test's: dnsmasq's TFTP (an unprivileged user) reads there
        out = built.root / "boot-test" / "single-netinstall-uefi-sb"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        disk = blank_disk(out / f"{node.name}.disk.qcow2", node.disk_gb)
        runs = run_installers(
            lab,
            (node,),
            {node.name: disk},
            FIRMWARES["uefi-sb"],
            accel,
            out,
            Progress("netinstall"),
            medium=MEDIA["netinstall"],
        )
        return runs[node.name], out, disk

    def refuse():
        node = lab.node("pbs-witness")
        tmp = tmp_path_factory.mktemp("refuse")
        raw = tmp / "used.raw"
        with open(raw, "wb") as fh:
            fh.truncate(node.disk_gb * 1024**3)
        subprocess.run(["sfdisk", "--quiet", str(raw)], input=b"label: gpt\n,,L\n", check=True)
        disk = tmp / "used.qcow2"
        subprocess.run(["qemu-img", "convert", "-q", "-O", "qcow2", str(raw), str(disk)], check=True)
        before = digest(disk)
        accel, _ = choose_accel(lab, node, "auto")
        runs = run_installers(
            lab, (node,), {node.name: disk}, FIRMWARES["bios"], accel, tmp, Progress("refuse")
        )
        return runs[node.name], disk, before

    with ThreadPoolExecutor(2) as pool:
        jobs = {"netinstall": pool.submit(netinstall), "refuse": pool.submit(refuse)}
    return {name: job.exception() or job.result() for name, job in jobs.items()}


def lone(results, name):
    got = results[name]
    if isinstance(got, BaseException):
        raise got
    return got


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_network_install_boots_under_secure_boot(lone_installers, built, lab):
    """The installer booted from the NIC with Secure Boot enforced: OVMF's PXE -> shim ->
    Debian's network GRUB (the node's menu, by MAC) -> the kernel, whose live-boot fetches
    the installer ISO over HTTP with its payload; the installed disk then boots alone
    under Secure Boot, its role serving, the install log on it."""
    from pvelab.checks.boottest import SECURE_BOOT, booted_lab
    from pvelab.model.media import MEDIA

    node = lab.node("pve-1")
    fw = FIRMWARES["uefi-sb"]
    say = Progress("netinstall")
    run, out, disk = lone(lone_installers, "netinstall")
    assert run.installed and run.seconds > 0, run.tail()
    assert "Install " in run.console and "over the network" in run.console  # GRUB's network menu
    http = (out / "http.log").read_text()
    assert f'"GET /{node.name}-installer.iso HTTP/1.1" 200' in http, http[-2000:]
    assert not (out / "netboot-root").exists()  # the serving root (links to the ISO) is gone
    with booted_lab(lab, (node,), MEDIA["install"], fw, "auto", out / "boot", say, {node.name: disk}) as b:
        m = b.machines[node.name]
        assert m.succeed("hostname").strip() == node.name
        m.wait_for_unit(node.role_def.unit)
        assert m.succeed(SECURE_BOOT).split()[-1] == "1"
        assert "Secure boot enabled" in m.sudo("dmesg")[1]
        log = m.sudo("cat /var/log/pvelab-install.log")[1]
        assert f"installed {node.name} on /dev/vda" in log, log[-1000:]
        assert m.succeed("systemctl --failed --no-legend --plain").strip() == ""


def test_installer_refuses_a_used_disk(lone_installers):
    """A disk with a partition table: the installer says why, writes nothing, powers off."""
    run, disk, before = lone(lone_installers, "refuse")
    assert run.refused and not run.installed, run.console[-2000:]
    assert "is not blank" in run.console and "nothing was written" in run.console
    assert digest(disk) == before  # every byte of the disk unchanged


def test_a_silent_installer_is_killed_retried_once_and_quoted(lab, tmp_path, monkeypatch):
    """An installer that never gets going (here: UEFI firmware with nothing bootable,
    trying its network boot entries, then waiting at its shell: its console changes, then
    goes quiet) is killed after the stall timeout, retried once on a fresh disk, then
    reported with its console's last lines: never a silent 30-minute wait."""
    from pvelab.checks.installtest import InstallError, blank_disk
    from pvelab.model import accel as accelerator
    from pvelab.model.artefacts import Layout

    node = lab.node("pbs-witness")
    accel, _ = choose_accel(lab, node, "auto")  # probes with the real build's kernel
    monkeypatch.setenv("PVELAB_BUILD_DIR", str(tmp_path / "build"))
    for a in list(accelerator.ACCELS.values()):
        monkeypatch.setitem(accelerator.ACCELS, a.name, dataclasses.replace(a, stall_timeout=20.0))
    fake = Layout(lab.name).artefact(node.name, "installer")
    fake.parent.mkdir(parents=True)
    fake.write_bytes(b"\0" * 2**20)  # boots nothing
    disk = blank_disk(tmp_path / "disk.qcow2", node.disk_gb)
    lines = []
    with pytest.raises(InstallError) as err:
        run_installers(lab, (node,), {node.name: disk}, FIRMWARES["uefi"], accel, tmp_path, lines.append)
    msg = str(err.value)
    # still in firmware (no userspace) after the stall timeout, or its console silent for it
    assert re.search(
        r"installer hung \((still in firmware or the boot loader|console silent for) \d+s", msg
    ), msg
    assert "attempt 2" in msg, msg
    assert "Shell>" in msg or "UEFI" in msg, msg  # the console's last lines are quoted
    assert any("HUNG" in line and "retrying once" in line for line in lines), lines
    assert (tmp_path / "pbs-witness-installer.hung.console.log").exists()
    assert not installtest_running(tmp_path)


def installtest_running(workdir):
    """A QEMU of this test still running (the runner must stop every VM it started)."""
    out = subprocess.run(["pgrep", "-af", "qemu-system"], capture_output=True, text=True).stdout
    return str(workdir) in out


def test_a_panicking_installer_kernel_is_named_and_retried_once(built, lab, tmp_path):
    """The installer's kernel booted with a command line made to fail panics at once
    (before any userspace, as the emulator's early faults do): the panic is named, the
    install is retried once on a fresh disk, the second panic stops the run with the
    node and the console's line, and the blank disk is never taken for an installed one."""
    from pvelab.checks.installtest import InstallError, blank_disk

    node = lab.node("pbs-witness")
    disk = blank_disk(tmp_path / "target.qcow2", node.disk_gb)
    said = []
    accel, _ = choose_accel(lab, node, "auto")
    with pytest.raises(InstallError) as err:
        run_installers(
            lab,
            (node,),
            {node.name: disk},
            FIRMWARES["bios"],
            accel,
            tmp_path,
            said.append,
            kernel_cmdline="console=ttyS0,115200 root=/dev/nonexistent init=/nonexistent rdinit=/nonexistent",
        )
    text = str(err.value)
    assert (
        text.startswith(f"{node.name}: installer's kernel panic (the emulator's): ") and "attempt 2" in text
    ), text
    assert "Kernel panic - not syncing: " in text and "the blank disk is not booted" in text
    assert [s for s in said if "retrying once" in s and "kernel panic" in s], said
    first = (tmp_path / f"{node.name}-installer.panic.console.log").read_text(errors="replace")
    assert "Kernel panic - not syncing: " in first
    info = subprocess.run(["qemu-img", "map", "--output=json", str(disk)], capture_output=True, text=True)
    assert '"data": true' not in info.stdout  # nothing was written to the target
