"""Boot tests: the four built nodes booted together under QEMU, the scenario run on them.

These are the gate for everything published. They take minutes under TCG.
"""

import dataclasses
import json
import os
import xml.etree.ElementTree as ET

import pytest

from pvelab.artefacts import Layout
from pvelab.boottest import boot_test
from pvelab.build import build
from pvelab.scenario import run_scenario

pytestmark = [pytest.mark.boot, pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns, taps)")]


@pytest.fixture(scope="module")
def built(lab):
    return {r.node: r for r in build(lab)}


def failures(report):
    return [
        (t.name, [a.last_output for a in t.assertions if not a.passed])
        for t in report.result.tests
        if not t.passed
    ]


def break_pve3(machines, report):
    """Stop pve-compat on pve-3 and run the same scenario again: the gate must fail."""
    status, out = machines["pve-3"].sudo("systemctl stop pve-compat.service")
    assert status == 0, out
    from pvelab.lab import load_lab
    from pvelab.paths import DEFAULT_LAB

    broken = run_scenario(
        load_lab(DEFAULT_LAB).scenario,
        lambda vm, cmd: machines[vm].execute(cmd, timeout=30),
        timeout=6,
        interval=2,
    )
    return dataclasses.asdict(broken)


def test_qcow2_lab_passes_and_gate_can_fail(built, lab):
    out = Layout(lab.name).boot_test_dir("qcow2", "bios")
    report = boot_test(lab, media="qcow2", firmware="bios", accel="auto", after=break_pve3)
    assert report.passed, failures(report)
    assert [t.name for t in report.result.tests] == [t.name for t in lab.scenario.custom_tests]
    names = [n.name for n in lab.nodes]
    # real DHCP: one distinct lease per VM from dnsmasq, none in the lab subnet
    leases = report.dhcp_leases
    assert len(set(leases.values())) == len(names)
    assert not any(ip.startswith("10.81.0.") for ip in leases.values())
    # host keys made on first boot, different per machine
    assert len(set(report.host_keys.values())) == len(names)
    # reports on disk
    data = json.loads((out / "report.json").read_text())
    assert data["summary"] == {"passed": 6, "failed": 0} and data["wall_seconds"] > 0
    assert data["lab"] == lab.name and data["result"]["scenario"] == lab.scenario.name
    assert ET.parse(out / "junit.xml").getroot().get("failures") == "0"
    # lean boot, nothing broken by it: no failed unit on any node
    assert report.failed_units == {n: "" for n in names}, report.failed_units
    for name in names:
        # the serial console was captured (systemd reports units there; the getty prompt may
        # come after SSH on a loaded host, so it is not required)
        console = (out / f"{name}.console.log").read_text(errors="replace")
        assert "Starting" in console or "Started" in console, name
    # the gate fails when a compat service is down
    broken = report.after
    assert broken["passed"] is False
    failed = {
        t["name"]: [a["on_vm"] for a in t["assertions"] if not a["passed"]]
        for t in broken["tests"]
        if not t["passed"]
    }
    assert "Cluster ports listen" in failed and set(failed["Cluster ports listen"]) == {"pve-3"}
    assert "Mesh reachability" in failed  # pve-1 can no longer reach pve-3:8006
    assert all(set(vms) <= {"pve-1", "pve-3"} for vms in failed.values()), failed


@pytest.mark.parametrize("firmware", ["bios", "uefi-sb"])
def test_iso_lab_passes(built, lab, firmware):
    """The live ISOs as CDs: BIOS, and UEFI with Secure Boot enforced (OVMF's Secure Boot
    build, Microsoft's keys enrolled): shim -> signed GRUB -> signed kernel."""
    report = boot_test(lab, media="iso", firmware=firmware, accel="auto")
    assert report.passed, failures(report)
    assert report.media == "iso" and report.firmware == firmware
    if firmware == "uefi-sb":
        assert report.secure_boot == {n.name: True for n in lab.nodes}, report.secure_boot


@pytest.mark.parametrize("firmware", ["bios", "uefi"])
def test_iso_boots_from_usb_stick(built, lab, firmware, tmp_path):
    """The hybrid ISO as a USB stick (isohybrid MBR for BIOS, GPT/EFI partition for UEFI)."""
    from pvelab.boottest import choose_accel
    from pvelab.labnet import LabNet
    from pvelab.machine import Machine
    from pvelab.media import MEDIA
    from pvelab.media import firmware as by_name
    from pvelab.qemu import VmSpec, prepare

    node = lab.node("pbs-witness")
    accel, _ = choose_accel(lab, node, "auto")
    usb, fw = MEDIA["usb"], by_name(firmware)
    with LabNet([node.name], tmp_path) as net:
        drive = prepare(usb, fw, built[node.name].iso, tmp_path, node.name)
        spec = VmSpec(
            node.name,
            node.ram_mb,
            usb,
            fw,
            accel,
            drive,
            tmp_path,
            tap=net.taps[node.name],
            mac=net.macs[node.name],
        )
        m = Machine(spec, net, user=lab.user.name, password=lab.user.login_password)
        try:
            m.start()
            m.wait_for_ssh(900)
            assert m.succeed("hostname").strip() == node.name
            m.wait_for_unit(node.role_def.unit)
            m.wait_for_open_port(5403)
            assert "boot=live" in m.succeed("cat /proc/cmdline")
        finally:
            m.stop()


def test_second_lab_side_by_side(built, lab, tmp_path):
    """A second lab with the same node names builds, boot-tests and publishes beside the first
    without touching a byte of the first lab's outputs (the shared base is reused)."""
    from pvelab.lab import load_lab
    from pvelab.paths import LABS
    from pvelab.publish import publish

    other = load_lab(LABS / "proxmox-2node-qdevice.yaml")
    first = Layout(lab.name).root

    def snapshot():
        return {
            p.relative_to(first).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in first.rglob("*")
            if p.is_file()
        }

    before = snapshot()
    results = build(other)
    assert {r.node for r in results} == {n.name for n in other.nodes}
    assert all(Layout(other.name).root in r.qcow2.parents for r in results)
    report = boot_test(other, media="qcow2", firmware="bios", accel="auto")
    assert report.passed, failures(report)
    assert report.lab == other.name and len(report.ssh_ready_seconds) == len(other.nodes)
    rel = publish(other, kinds=("qcow2",))
    assert sorted(rel.files) == sorted(f"{n.name}.qcow2" for n in other.nodes)
    assert rel.path.parent == Layout(other.name).releases
    assert snapshot() == before  # nothing of the first lab was touched
