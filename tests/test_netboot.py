"""Network boot bundles and their serving configuration, judged without a VM: the
bundle's bytes are reproducible and its scripts name files that exist; the dnsmasq
configuration a release carries is accepted by dnsmasq itself; the VMs of a network
boot have no CD and no disk, and boot from their NIC."""

import shutil
import subprocess
import tarfile

import pytest

from pvelab.build import netboot
from pvelab.build.signedboot import SignedBoot
from pvelab.model.labfile import load_lab
from pvelab.model.media import FIRMWARES, MEDIA
from pvelab.running.qemu import VmSpec, qemu_command


@pytest.fixture
def parts(tmp_path):
    def blob(name, data):
        p = tmp_path / name
        p.write_bytes(data)
        return p

    signed = SignedBoot(
        blob("shim", b"shim"), blob("grub", b"grub"), blob("mok", b"mok"), {}, blob("grubnet", b"grubnet")
    )
    return blob("vmlinuz", b"kernel" * 1000), blob("initrd", b"initrd" * 1000), signed


def test_the_bundle_is_reproducible_and_its_scripts_name_its_files(lab, parts, tmp_path):
    kernel, initrd, signed = parts
    node = lab.node("pve-1")
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    netboot.make_bundle(a, lab, node, kernel, initrd, signed, epoch=1700000000)
    netboot.make_bundle(b, lab, node, kernel, initrd, signed, epoch=1700000000)
    assert a.read_bytes() == b.read_bytes()
    with tarfile.open(a) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert {m.uid for m in members.values()} == {0} and {m.mtime for m in members.values()} == {1700000000}
    root = tmp_path / "root"
    netboot.unpack(a, root)
    assert (root / "bootx64.efi").read_bytes() == b"shim"
    assert (root / "grubx64.efi").read_bytes() == b"grubnet"  # the network GRUB, not the disk one
    files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    for script in ("live.ipxe", "install.ipxe", "live.cfg", "install.cfg"):
        text = (root / "netboot/pve-1" / script).read_text()
        for path in ("netboot/pve-1/vmlinuz", "netboot/pve-1/initrd.img"):
            assert path in files and f"/{path}" in text, (script, path)
        iso = "pve-1-installer.iso" if script.startswith("install") else "pve-1.iso"
        assert f"/{iso}" in text, (script, text)
        assert ("pvelab.install=1" in text) == script.startswith("install"), script
        assert ("systemd.unit=pvelab-install.target" in text) == script.startswith("install"), script
    assert (root / "netboot/pve-1/live.ipxe").read_text().startswith("#!ipxe\n")
    # the installer says what it erases and waits, as the installer ISO does
    assert (
        "ERASES the only non-removable disk with min_gb=32"
        in (root / "netboot/pve-1/install.ipxe").read_text()
    )


def test_unpack_refuses_a_member_outside_the_root(tmp_path):
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        data = tmp_path / "x"
        data.write_text("x")
        tar.add(data, arcname="../escaped")
    with pytest.raises(tarfile.OutsideDestinationError):
        netboot.unpack(evil, tmp_path / "root")
    assert not (tmp_path / "escaped").exists()


@pytest.mark.skipif(shutil.which("dnsmasq") is None, reason="dnsmasq not installed (scripts/setup)")
def test_the_release_dnsmasq_configuration_is_accepted_by_dnsmasq(lab, tmp_path):
    conf = tmp_path / "dnsmasq.conf"
    conf.write_text(netboot.dnsmasq_example(lab))
    res = subprocess.run(["dnsmasq", "--test", f"--conf-file={conf}"], capture_output=True, text=True)
    assert res.returncode == 0 and "syntax check OK" in res.stderr, res.stderr
    text = conf.read_text()
    for n in lab.nodes:  # each node's MAC from the lab file, its own boot script
        assert f"dhcp-host={n.mac},set:{n.name},{n.name}" in text
        assert f"/netboot/{n.name}/live.ipxe" in text
    broken = tmp_path / "broken.conf"  # and the check can fail
    broken.write_text(
        text.replace("dhcp-range=192.0.2.100,192.0.2.150", "dhcp-range=192.0.2.100,192.0.2.999")
    )
    assert subprocess.run(["dnsmasq", "--test", f"--conf-file={broken}"], capture_output=True).returncode != 0


def test_grub_finds_every_node_by_its_mac(lab):
    modes = {n.name: netboot.Mode.LIVE for n in lab.nodes} | {"pve-2": netboot.Mode.INSTALL}
    cfg = netboot.grub_dispatch(lab, modes)
    for n in lab.nodes:
        expected = "install" if n.name == "pve-2" else "live"
        assert (
            f'"$net_default_mac" = "{n.mac}" ]; then\n    configfile /netboot/{n.name}/{expected}.cfg' in cfg
        )


def test_a_lab_file_mac_is_used(raw_lab, write_lab):
    raw_lab["nodes"][2]["mac"] = "02:00:00:00:00:33"
    lab = load_lab(write_lab(raw_lab))
    assert lab.nodes[2].mac == "02:00:00:00:00:33" and lab.nodes[0].mac == "52:54:00:81:00:01"
    assert "dhcp-host=02:00:00:00:00:33,set:pve-3,pve-3" in netboot.dnsmasq_example(lab)


@pytest.mark.parametrize("firmware", ["bios", "uefi-sb"])
def test_a_network_boot_vm_has_no_cd_or_disk_and_boots_from_its_nic(tmp_path, firmware):
    spec = VmSpec(
        "pve-1", 2048, MEDIA["netboot"], FIRMWARES[firmware], "tcg", tmp_path / "x.tar", tmp_path,
        tap="tap0", mac="52:54:00:81:00:01",
    )  # fmt: skip
    args = qemu_command(spec)
    drives = [args[i + 1] for i, a in enumerate(args) if a == "-drive"]
    assert all(d.startswith("if=pflash") for d in drives), drives
    nic = next(
        args[i + 1] for i, a in enumerate(args) if a == "-device" and args[i + 1].startswith("virtio-net")
    )
    assert "bootindex=0" in nic
    # UEFI boots with OVMF's own PXE (no unsigned iPXE ROM); SeaBIOS needs QEMU's iPXE ROM
    assert ("romfile=" in nic) == (firmware != "bios"), nic
