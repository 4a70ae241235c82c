"""Boot tests: the four built nodes booted together under QEMU, the scenario run on them.

These are the gate for everything published. They take minutes under TCG.
"""

import dataclasses
import json
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pvelab.build.pipeline import build
from pvelab.checks.boottest import boot_test
from pvelab.checks.scenario import run_scenario
from pvelab.model.artefacts import ArtefactKind, Layout

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
    from pvelab.core.paths import DEFAULT_LAB
    from pvelab.model.labfile import load_lab

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
    # and so is each PVE node's API certificate (pve-ssl.service): its fingerprint is reported
    fps = report.api_fingerprints
    assert set(fps) == {n.name for n in lab.members} and len(set(fps.values())) == len(fps), fps
    assert all(len(fp) == 95 for fp in fps.values()), fps
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


# The four nodes from the NIC under UEFI with Secure Boot; BIOS's chain (QEMU's iPXE ROM,
# the node's iPXE script) boots one node in test_single_node_boots.
@pytest.mark.parametrize("firmware", ["uefi-sb"])
def test_netboot_lab_passes(built, lab, firmware):
    """No CD and no disk: every VM boots from its NIC. The lab network's dnsmasq answers
    PXE: BIOS (QEMU's iPXE ROM) gets the node's iPXE script over HTTP, UEFI with Secure
    Boot gets shim over TFTP, then Debian's signed network GRUB, which picks the node's
    menu by MAC; the kernel's live-boot fetches the node's ISO over HTTP. Then the scenario."""
    report = boot_test(lab, media="netboot", firmware=firmware, accel="auto")
    assert report.passed, failures(report)
    assert {n: Path(r.path).name for n, r in report.artefacts.items()} == {
        n.name: f"{n.name}-netboot.tar" for n in lab.nodes
    }
    out = Layout(lab.name).boot_test_dir("netboot", firmware)
    http = (out / "http.log").read_text()
    dhcp = (out / "dnsmasq.log").read_text()
    for n in lab.nodes:
        assert f'"GET /{n.name}.iso HTTP/1.1" 200' in http, http[-2000:]
        if firmware == "bios":
            assert f'"GET /netboot/{n.name}/live.ipxe HTTP/1.1" 200' in http
        else:
            assert f"netboot-root/netboot/{n.name}/vmlinuz to {report.dhcp_leases[n.mac]}" in dhcp
    if firmware == "uefi-sb":
        assert "netboot-root/bootx64.efi to" in dhcp and "netboot-root/grubx64.efi to" in dhcp
        assert report.secure_boot == {n.name: True for n in lab.nodes}, report.secure_boot
    assert not (out / "netboot-root").exists()  # the serving root (links to the ISOs) is gone


# One node on each of these (medium, firmware) pairs; the five boot at once (one VM each:
# together they keep both cores busy), each in a namespace of its own.
SINGLE = [("usb", "bios"), ("usb", "uefi"), ("qcow2", "uefi"), ("qcow2", "uefi-sb"), ("netboot", "bios")]


@pytest.fixture(scope="class")
def single_boots(built, lab):
    """``{(media, firmware): (driver, error or None)}``: pbs-witness booted on every pair of SINGLE."""
    from concurrent.futures import ThreadPoolExecutor
    from contextlib import ExitStack

    from pvelab.checks.boottest import Progress, booted_lab
    from pvelab.model.media import boot_combination

    node = lab.node("pbs-witness")
    with ExitStack() as stack:
        drivers = {}
        for i, (media, firmware) in enumerate(SINGLE):
            medium, fw = boot_combination(media, firmware)
            out = Layout(lab.name).root / "boot-test" / f"single-{media}-{firmware}"
            drivers[(media, firmware)] = stack.enter_context(
                booted_lab(
                    lab,
                    (node,),
                    medium,
                    fw,
                    "auto",
                    out,
                    Progress(f"{media}-{firmware}"),
                    netns=f"pvelab-{os.getpid()}-single{i}",
                    wait_ssh=False,
                )
            )
        with ThreadPoolExecutor(len(drivers)) as pool:
            waits = {pair: pool.submit(d.wait_all_ssh) for pair, d in drivers.items()}
        errors = {}
        for pair, wait in waits.items():
            try:
                drivers[pair].ssh_ready_seconds = wait.result()
            except Exception as exc:  # the pair's own test reports it
                errors[pair] = f"{type(exc).__name__}: {exc}"
        yield {pair: (d, errors.get(pair)) for pair, d in drivers.items()}


class TestSingleNode:
    """The five single-node boots share one class, so their VMs stop after its last test."""

    @pytest.mark.parametrize("media, firmware", SINGLE)
    def test_single_node_boots(self, single_boots, lab, media, firmware):
        """One node on the other media and firmware: the hybrid ISO as a USB stick (isohybrid
        MBR for BIOS, the GPT's EFI partition for UEFI), the qcow2's GPT disk under UEFI,
        with and without Secure Boot (shim -> signed GRUB from its ESP -> signed kernel), and
        the NIC under BIOS (QEMU's iPXE ROM -> the node's iPXE script -> live-boot over HTTP)."""
        from pvelab.checks.boottest import SECURE_BOOT
        from pvelab.model.media import boot_combination

        node = lab.node("pbs-witness")
        medium, fw = boot_combination(media, firmware)
        out = Layout(lab.name).root / "boot-test" / f"single-{media}-{firmware}"
        booted, error = single_boots[(media, firmware)]
        assert error is None, error
        m = booted.machines[node.name]
        assert m.succeed("hostname").strip() == node.name
        m.wait_for_unit(node.role_def.unit)
        m.wait_for_open_port(5403)
        cmdline = m.succeed("cat /proc/cmdline")
        # the initramfs runs without address-space randomisation (scripts/init-top/pvelab-aslr);
        # the booted system must have it back
        assert m.succeed("cat /proc/sys/kernel/randomize_va_space").strip() == "2"
        # coldplug ran its three triggers, network interfaces first (install.d/60-pvelab-system);
        # the interface carries its predictable name, the serial console's device unit is up,
        # the disks have their links and every driver for the hardware present is loaded
        trigger = m.succeed("systemctl show -p ExecStart --value systemd-udev-trigger.service")
        assert trigger.count("udevadm trigger") == 3, trigger
        assert len(re.findall(r"code=exited ; status=0 ", trigger)) == 3, trigger
        assert trigger.index("--subsystem-match=net --settle") < trigger.index("--subsystem-nomatch"), trigger
        assert any(n.startswith("en") for n in m.succeed("ls /sys/class/net").split())
        assert m.succeed("systemctl is-active serial-getty@ttyS0.service").strip() == "active"
        assert m.succeed("ls /dev/disk/by-uuid").split()
        drivers = m.succeed(  # each device's modalias resolved to modules (less the blacklist)
            "bl=$(/usr/sbin/modprobe -c | awk '$1 == \"blacklist\" {print $2}');"
            " for a in $(cat /sys/bus/*/devices/*/modalias | sort -u); do"
            " /usr/sbin/modprobe -R $a 2>/dev/null; done | sort -u | while read -r mod; do"
            ' echo "$bl" | grep -qx "$mod" || { [ -d /sys/module/$mod ] && echo "loaded $mod" || echo "MISSING $mod"; }; done'
        ).split("\n")
        assert "loaded virtio_net" in drivers, drivers
        assert not [d for d in drivers if d.startswith("MISSING")], drivers
        if medium.is_network_boot():
            disks = [d for d in m.succeed("ls /sys/block").split() if d.startswith(("sd", "sr", "vd"))]
            assert "boot=live" in cmdline and disks == []  # no CD, no disk
            http = (out / "http.log").read_text()
            assert f'"GET /netboot/{node.name}/live.ipxe HTTP/1.1" 200' in http, http[-2000:]
            assert f'"GET /{node.name}.iso HTTP/1.1" 200' in http, http[-2000:]
        elif medium.artefact == "iso":
            assert "boot=live" in cmdline
        else:  # the installed layout: GPT, BIOS boot + ESP + root grown to the disk
            parts = [
                p.strip() for p in m.succeed("lsblk -no PARTTYPENAME /dev/vda").splitlines() if p.strip()
            ]
            assert parts == ["BIOS boot", "EFI System", "Linux filesystem"], parts
            assert m.succeed("findmnt -no SOURCE /").strip() == "/dev/vda3"
        if fw.is_uefi():
            enforced = m.succeed(SECURE_BOOT).split()[-1]
            assert enforced == ("1" if fw.secure_boot else "0")
        if fw.secure_boot:
            assert "Secure boot enabled" in m.sudo("dmesg")[1]


def test_second_lab_side_by_side(built, lab, tmp_path, fixture_role):
    """A second lab with the same node names builds, boot-tests and publishes beside the first
    without touching a byte of the first lab's outputs (the shared base is reused). It also
    carries a node of a role defined only in a test fixture (its registry entry and its
    overlay folder): that node builds, boots, serves its port and is released and drawn."""
    import yaml

    from pvelab.core.paths import LABS
    from pvelab.model.labfile import load_lab
    from pvelab.release.publish import publish

    raw = yaml.safe_load((LABS / "proxmox-2node-qdevice.yaml").read_text())
    raw["nodes"].append(
        dict(
            raw["nodes"][-1],
            name="backup-1",
            role=fixture_role.name,
            alias="10.82.0.30/24",
            diagram={"x": 470, "y": 280},
        )
    )
    raw["connections"].append({"from": "pve-1", "to": "backup-1", "ports": [8007]})
    raw["scenarios"][0]["custom_tests"].append(
        {
            "name": "The fixture role serves",
            "assertions": [
                {"type": "port_listening", "on_vm": "backup-1", "port": 8007},
                {
                    "type": "http_responds",
                    "on_vm": "pve-1",
                    "url": "http://10.82.0.30:8007/",
                    "expected_status": 200,
                },
            ],
        }
    )
    path = tmp_path / "proxmox-2node-qdevice.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    other = load_lab(path)
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
    assert all(Layout(other.name).root in r.artefacts[ArtefactKind.QCOW2].parents for r in results)
    report = boot_test(other, media="qcow2", firmware="bios", accel="auto")
    assert report.passed, failures(report)
    assert report.lab == other.name and len(report.ssh_ready_seconds) == len(other.nodes)
    fixture_test = next(t for t in report.result.tests if t.name == "The fixture role serves")
    assert fixture_test.passed and len(fixture_test.assertions) == 2
    rel = publish(other, kinds=("qcow2",))
    assert sorted(rel.files) == sorted(f"{n.name}.qcow2" for n in other.nodes)
    assert "backup-1.qcow2" in rel.files
    assert rel.path.parent == Layout(other.name).releases
    page, svg = (rel.path / "index.html").read_text(), (rel.path / "topology.svg").read_text()
    assert all(fixture_role.colour in t and "backup-1" in t for t in (page, svg))
    assert snapshot() == before  # nothing of the first lab was touched


def test_a_killed_boot_test_is_cleaned_up_by_the_next_run(built, lab):
    """SIGKILL cannot be trapped: a boot test killed while its VMs boot leaves QEMU, the
    namespace with its bridge, taps and dnsmasq. The next task on the lab (any: here a
    build) finds them through the lab's lock record, says so in one line and removes them."""
    import signal
    import subprocess
    import sys
    import time

    from pvelab.core import locks
    from pvelab.core.locks import qemu_alive
    from pvelab.core.paths import ROOT

    proc = subprocess.Popen(
        [sys.executable, "-m", "invoke", "boot-test", "--node", "pve-1", "--node", "pve-2"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    holder = None
    while holder is None or len(holder.qemu) < 2 or not holder.netns:
        assert proc.poll() is None and time.monotonic() < deadline, "the boot test never started its VMs"
        time.sleep(0.2)
        holder = locks.Holder.parse(locks.lock_path(lab.name).read_text())
    time.sleep(2)  # QEMU and dnsmasq running
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ns = holder.netns[0]
    assert all(qemu_alive(pid, name) for name, pid in holder.qemu.items())
    assert ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    res = subprocess.run(
        [sys.executable, "-m", "invoke", "build", "--node", "pve-1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    said = [line for line in res.stdout.splitlines() if "lock taken over" in line]
    assert len(said) == 1, res.stdout
    assert f"pid {proc.pid}" in said[0] and f"namespace {ns} (bridge, taps, dnsmasq) removed" in said[0]
    for name, pid in holder.qemu.items():
        assert f"QEMU of {name} (pid {pid}) killed" in said[0]
    time.sleep(1)
    assert not any(qemu_alive(pid, name) for name, pid in holder.qemu.items())
    assert ns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "dnsmasq" not in subprocess.run(["pgrep", "-a", "-f", ns], capture_output=True, text=True).stdout
