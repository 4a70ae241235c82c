"""Image tests: open the real built artefacts (no boot) and check what they contain.

The session builds the lab with `pvelab.build.pipeline.build` (reusing the cached base when its
inputs are unchanged), then opens each qcow2 through a raw copy + loop partition and
each ISO with xorriso, sgdisk and unsquashfs.
"""

import dataclasses
import json
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

from pvelab.build import iso as isomod
from pvelab.build.bootdisk import ROOT_PARTITION
from pvelab.build.disk import loop_partition, mounted
from pvelab.build.pipeline import build
from pvelab.build.render import render_files
from pvelab.core.paths import DEFAULT_LAB, OVERLAYS
from pvelab.core.run import Steps
from pvelab.model.artefacts import ArtefactKind, Layout
from pvelab.model.lab import FORBIDDEN_PACKAGES, FORBIDDEN_PREFIXES
from pvelab.model.labfile import load_lab
from pvelab.model.roles import ROLES

pytestmark = [pytest.mark.image, pytest.mark.skipif(os.geteuid() != 0, reason="needs root for loop mounts")]
NODES = [n.name for n in load_lab(DEFAULT_LAB).nodes]


@pytest.fixture(scope="session")
def built(lab):
    results = {r.node: r for r in build(lab)}
    assert sorted(results) == sorted(NODES)
    return results


@pytest.fixture(scope="session")
def roots(built, tmp_path_factory):
    """node -> mounted (read-only) root file system of its qcow2."""
    opened, stack = {}, []
    work = tmp_path_factory.mktemp("images")
    steps = Steps("image-tests", work / "log")
    for name, res in built.items():
        raw = work / f"{name}.raw"
        subprocess.run(
            [
                "qemu-img",
                "convert",
                "-f",
                "qcow2",
                "-O",
                "raw",
                str(res.artefacts[ArtefactKind.QCOW2]),
                str(raw),
            ],
            check=True,
        )
        cm_part = loop_partition(raw, steps, read_only=True, number=ROOT_PARTITION)
        part = cm_part.__enter__()
        cm_mount = mounted(part, work / f"{name}-root", steps, read_only=True)
        opened[name] = cm_mount.__enter__()
        stack += [cm_part, cm_mount]
    yield opened
    for cm in reversed(stack):
        cm.__exit__(None, None, None)


def installed(root):
    status = (root / "var/lib/dpkg/status").read_text()
    out = set()
    for stanza in status.split("\n\n"):
        name = re.search(r"^Package: (\S+)$", stanza, re.M)
        if name and re.search(r"^Status: install ok installed$", stanza, re.M):
            out.add(name.group(1))
    return out


@pytest.mark.parametrize("name", NODES)
def test_qcow2_format_and_size(built, lab, name):
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(built[name].artefacts[ArtefactKind.QCOW2])],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == lab.node(name).disk_gb * 1024**3


def test_boot_disk_layout(built, tmp_path):
    """GPT: BIOS boot, EFI system (FAT, Debian's signed shim and GRUB, the hop to the
    root's grub.cfg), root; a valid GPT whose backup header sits at the grown disk's end."""
    raw = tmp_path / "disk.raw"
    subprocess.run(
        ["qemu-img", "convert", "-O", "raw", str(built["pve-1"].artefacts[ArtefactKind.QCOW2]), str(raw)],
        check=True,
    )
    dump = subprocess.run(["sfdisk", "--json", str(raw)], capture_output=True, text=True, check=True).stdout
    parts = json.loads(dump)["partitiontable"]["partitions"]
    assert [p["type"] for p in parts] == [
        "21686148-6449-6E6F-744E-656564454649",
        "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
        "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
    ]
    assert (
        "No problems found"
        in subprocess.run(["sgdisk", "-v", str(raw)], capture_output=True, text=True).stdout
    )
    esp = f"{raw}@@{parts[1]['start'] * 512}"
    listing = subprocess.run(["mdir", "-i", esp, "-/", "::/EFI"], capture_output=True, text=True).stdout
    for name in ("BOOTX64 EFI", "grubx64 efi", "mmx64   efi", "grub     cfg"):
        assert name.split()[0].lower() in listing.lower(), listing
    cfg = subprocess.run(
        ["mtype", "-i", esp, "::/EFI/debian/grub.cfg"], capture_output=True, text=True
    ).stdout
    assert "search --no-floppy --fs-uuid --set=root" in cfg and "configfile $prefix/grub.cfg" in cfg


@pytest.mark.parametrize("name", NODES)
def test_root_fs_uses_the_disk(roots, lab, name):
    st = os.statvfs(roots[name])
    assert st.f_blocks * st.f_frsize > 0.9 * lab.node(name).disk_gb * 1024**3


def test_kernel_payload_is_pruned_and_indexed(roots):
    """Module trees no node loads never reach the image (dpkg path-exclude), and the
    kernel's own depmod indexed what is there: the storage and NIC drivers resolve."""
    (kdir,) = (roots["pve-1"] / "usr/lib/modules").iterdir()
    for gone in ("sound", "drivers/gpu", "drivers/net/wireless", "drivers/media"):
        assert not list((kdir / "kernel" / gone).rglob("*.ko*")), gone  # (empty folders may stay)
    dep = (kdir / "modules.dep").read_text()
    assert "kernel/sound/" not in dep and "kernel/drivers/gpu/" not in dep
    for needed in ("virtio_blk", "virtio_net", "ahci", "nvme", "megaraid_sas", "usb-storage"):
        assert re.search(rf"/{needed}\.ko(\.xz|\.zst)?:", dep), needed


@pytest.mark.parametrize("name", NODES)
def test_spec_files_modes_owners(roots, lab, name):
    root = roots[name]
    node = lab.node(name)
    for f in render_files(lab, node):
        path = root / f.path.lstrip("/")
        assert path.read_text() == f.content, f.path
        st = path.stat()
        assert stat.S_IMODE(st.st_mode) == f.mode, f.path
    assert (root / "etc/hostname").read_text() == f"{name}\n"
    ops_uid = next(
        int(l.split(":")[2]) for l in (root / "etc/passwd").read_text().splitlines() if l.startswith("ops:")
    )
    if node.is_member:
        for d in (f"nodes/{name}", "storage", "qemu-server", "lxc", "priv"):
            st = (root / "etc/pve" / d).stat()
            assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o750, d
            assert st.st_uid == ops_uid and st.st_gid == ops_uid, d
        assert (
            root / "etc/pve/storage.cfg"
        ).read_text() == "zfspool: rpool-data\n\tpool rpool/data\n\tcontent images,rootdir\n\tsparse 1\n"
        assert (root / "etc/pve/corosync.conf").stat().st_uid == ops_uid
    else:
        assert not (root / "etc/pve").exists()
        assert "pvecm qdevice setup 10.81.0.20" in (root / "root/qdevice-runbook.md").read_text()


@pytest.mark.parametrize("name", NODES)
def test_units_enabled(roots, lab, name):
    wants = roots[name] / "etc/systemd/system/multi-user.target.wants"
    role = lab.node(name).role_def
    role_unit = role.unit
    others = [r.unit for r in ROLES.values() if r is not role]
    for unit in (role_unit, "pvelab-alias.service", "ssh.service", "systemd-networkd.service"):
        link = wants / unit
        assert link.is_symlink(), unit
        assert (roots[name] / os.readlink(link).lstrip("/")).is_file(), unit
    for other in others:  # another role's service is not even in this image
        assert not (wants / other).exists()
        assert not (roots[name] / f"usr/lib/systemd/system/{other}").exists()
    assert (
        roots[name] / "etc/systemd/system/network-online.target.wants/systemd-networkd-wait-online.service"
    ).is_symlink()
    unit = (roots[name] / f"usr/lib/systemd/system/{role_unit}").read_text()
    assert "DynamicUser=yes" in unit and "Restart=on-failure" in unit
    # byte-compiled at build time: the DynamicUser service cannot write __pycache__
    # (the shared library; a role's own small module is compiled at its start)
    cache = roots[name] / "usr/lib/pvelab/__pycache__"
    assert sorted(p.name.split(".")[0] for p in cache.glob("*.pyc")) == ["compat"]
    modules = sorted(p.name for p in (roots[name] / "usr/lib/pvelab").glob("*.py"))
    own = [p.name for p in (OVERLAYS / role.name / "usr/lib/pvelab").glob("*.py")]
    assert role.service.replace("-", "_") + ".py" in own
    assert modules == sorted(["compat.py", *own])


@pytest.mark.parametrize("name", NODES)
def test_packages(roots, lab, name):
    pkgs = installed(roots[name])
    assert set(lab.node(name).packages) <= pkgs
    bad = sorted(p for p in pkgs if p in FORBIDDEN_PACKAGES or p.startswith(FORBIDDEN_PREFIXES))
    assert bad == []
    assert not pkgs & {"nftables", "iptables", "ufw", "firewalld"}
    sources = "".join(
        p.read_text()
        for p in (roots[name] / "etc/apt").rglob("*")
        if p.is_file() and (p.suffix in (".list", ".sources"))
    )
    assert "proxmox" not in sources.lower()


@pytest.mark.parametrize("name", NODES)
def test_no_plain_password_anywhere(roots, built, lab, name):
    """The lab password reaches the image only as a crypt hash: no file holds it in plain
    text (DIB records its environment in /etc/dib-manifests), and the build says so too."""
    from pvelab.model.artefacts import BuildManifest
    from pvelab.model.passwords import scan_tree

    assert scan_tree(roots[name], lab.user.password) == []
    assert BuildManifest.from_json(built[name].manifest).password_found == []
    recorded = roots[name] / "etc/dib-manifests/dib_environment"
    if recorded.exists():
        env = recorded.read_text()
        assert "DIB_PVELAB_PASSWORD_HASH" in env and lab.user.password not in env


@pytest.mark.parametrize("name", NODES)
def test_identity_hygiene(roots, name):
    root = roots[name]
    resolv = root / "etc/resolv.conf"
    assert not resolv.is_symlink()
    assert [l for l in resolv.read_text().splitlines() if not l.startswith("#")] == [
        "nameserver 1.1.1.1",
        "nameserver 8.8.8.8",
    ]
    assert (root / "etc/machine-id").read_text() == ""
    assert list((root / "etc/ssh").glob("ssh_host_*")) == []
    assert not (root / "etc/systemd/system/multi-user.target.wants/ssh-keygen.service").exists()
    shadow = {l.split(":")[0]: l.split(":")[1] for l in (root / "etc/shadow").read_text().splitlines()}
    assert re.match(r"^\$(y|6|gy)\$", shadow["ops"]) and "pve-cluster-ops" not in shadow["ops"]
    sudo = next(l for l in (root / "etc/group").read_text().splitlines() if l.startswith("sudo:"))
    assert "ops" in sudo.split(":")[3].split(",")
    sshd = (root / "etc/ssh/sshd_config.d/50-pvelab.conf").read_text()
    assert "PasswordAuthentication yes" in sshd
    grub = (root / "boot/grub/grub.cfg").read_text()
    assert "console=ttyS0" in grub and re.search(r"set timeout=0\b", grub)


def initrd_files(path: Path) -> dict[str, bytes]:
    """Files in an initramfs: concatenated newc cpio archives, each plain, gzip or zstd."""
    import gzip

    data, files = path.read_bytes(), {}
    while data := data.lstrip(b"\0"):
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)  # the compressed main archive ends the file
            continue
        if data[:4] == b"\x28\xb5\x2f\xfd":
            data = subprocess.run(["zstd", "-dc"], input=data, capture_output=True, check=True).stdout
            continue
        assert data[:6] == b"070701", f"{path}: not a newc cpio/gzip/zstd segment: {data[:8]!r}"
        off = 0
        while True:
            size, namesize = int(data[off + 54 : off + 62], 16), int(data[off + 94 : off + 102], 16)
            name = data[off + 110 : off + 110 + namesize - 1].decode()
            off = (off + 110 + namesize + 3) & ~3
            body = data[off : off + size]
            off = (off + size + 3) & ~3
            if name == "TRAILER!!!":
                break
            files[name] = body
        data = data[off:]
    return files


def test_lean_disk_boot_and_live_initramfs(roots, built, tmp_path):
    """Disks boot a lean initramfs with a quiet kernel; only the ISO's has live-boot."""
    root = roots["pve-1"]
    grub = (root / "boot/grub/grub.cfg").read_text()
    linux = [l for l in grub.splitlines() if l.strip().startswith("linux")]
    assert linux and " quiet" in linux[0], linux  # the default entry (recovery stays verbose)
    disk = sorted((root / "boot").glob("initrd.img-*"))
    assert len(disk) == 1 and not (root / "boot/pvelab-live").exists()
    files = initrd_files(disk[0])
    names = list(files)
    assert any(n.endswith("/virtio_blk.ko.xz") for n in names)
    assert any(n.endswith("/ext4.ko.xz") for n in names)
    assert not any("live" in n.split("/")[-1] or "/live/" in n for n in names), "live-boot in disk initrd"
    assert "usr/lib/udev/hwdb.bin" not in names and "usr/sbin/iscsistart" not in names
    # no udev in the disk's initramfs: drivers by modalias, /dev handed over at the end
    assert "usr/lib/systemd/systemd-udevd" not in names and "usr/bin/udevadm" not in names
    assert {
        "scripts/init-top/pvelab-coldplug",
        "scripts/local-block/pvelab-coldplug",
        "scripts/init-bottom/pvelab-move-dev",
        "scripts/init-top/pvelab-aslr",  # no ASLR while the initramfs runs, restored at the end
        "scripts/init-bottom/pvelab-aslr",
    } <= set(names)
    assert b"\x28\xb5\x2f\xfd" in disk[0].read_bytes()[: 4 << 20], "disk initramfs not zstd"
    pkgs = installed(root)
    assert not pkgs & {"live-boot", "live-boot-initramfs-tools", "open-iscsi"}
    assert {"e2fsprogs", "zstd"} <= pkgs  # fsck.ext4 for the root; the initramfs compressor
    # what the first boot would redo is stamped done; no generator or unit we masked runs
    assert (root / "etc/.updated").is_file() and (root / "var/.updated").is_file()
    for gen in ("systemd-ssh-generator", "systemd-gpt-auto-generator"):
        assert os.readlink(root / "etc/systemd/system-generators" / gen) == "/dev/null"
    assert os.readlink(root / "etc/systemd/system/sys-kernel-debug.mount") == "/dev/null"
    assert "ExecStartPre=\n" in (root / "etc/systemd/system/ssh.service.d/10-pvelab.conf").read_text()
    # udev coldplug names network interfaces first, then serial consoles, then the devices
    # whose add event does something; Debian's one line (which it replaces) is quoted
    trigger = (root / "etc/systemd/system/systemd-udev-trigger.service.d/10-pvelab.conf").read_text()
    upstream = (root / "usr/lib/systemd/system/systemd-udev-trigger.service").read_text()
    debian = next(l for l in upstream.splitlines() if l.startswith("ExecStart="))
    assert "--type=all" in debian and debian.removeprefix("ExecStart=") in trigger
    lines = [l for l in trigger.splitlines() if l.startswith("ExecStart=")]
    assert lines[:3] == [
        "ExecStart=",
        "ExecStart=-udevadm trigger --type=devices --action=add --subsystem-match=net --settle",
        "ExecStart=-udevadm trigger --type=devices --action=add --subsystem-match=tty"
        " --sysname-match=tty[a-zA-Z]* --sysname-match=hvc*",
    ]
    rest = lines[3].split()
    assert len(lines) == 4 and rest[:4] == ["ExecStart=-udevadm", "trigger", "--type=devices", "--action=add"]
    skipped = {w.removeprefix("--subsystem-nomatch=") for w in rest if w.startswith("--subsystem-nomatch=")}
    assert {"tty", "vc", "memory", "wakeup"} <= skipped
    assert not skipped & {"block", "net", "pci", "acpi", "platform", "virtio", "input", "scsi", "usb", "cpu"}
    # the ISO boots live-boot's initramfs
    _xorriso(
        built["pve-1"].artefacts[ArtefactKind.ISO],
        "-osirrox",
        "on",
        "-extract",
        "/live/initrd.img",
        str(tmp_path / "i"),
    )
    live_files = initrd_files(tmp_path / "i")
    live = list(live_files)
    assert "usr/bin/live-boot" in live and any(n.endswith("/squashfs.ko.xz") for n in live)
    assert "usr/lib/systemd/systemd-udevd" in live
    assert not any(p in n for n in live for p in ("pvelab-coldplug", "pvelab-move-dev", "pvelab-no-udev"))
    assert {"scripts/init-top/pvelab-aslr", "scripts/init-bottom/pvelab-aslr"} <= set(live)
    # no network drivers (but virtio_net) and no iSCSI: the live media are a CD or a USB stick
    net = [n for n in live if "/drivers/net/" in n and ".ko" in n]
    assert sorted(n.split("/")[-1] for n in net) == ["net_failover.ko.xz", "virtio_net.ko.xz"], net
    assert not [n for n in live if "iscsi" in n.split("/")[-1] and ".ko" in n]
    assert "usr/sbin/iscsistart" not in live and "scripts/local-top/iscsi" not in live
    # no modprobe for the kernel's requests before /init; the first init-top script puts it back
    for image, first_user in ((files, "pvelab-coldplug"), (live_files, "udev")):
        assert "usr/sbin/modprobe" not in image and "usr/sbin/modprobe.pvelab-late" in image
        order = [
            l.split()[0].rsplit("/", 1)[-1]
            for l in image["scripts/init-top/ORDER"].decode().splitlines()
            if l.startswith("/scripts/")
        ]
        assert order.index("pvelab-modprobe") < order.index(first_user), order


def _xorriso(iso, *args):
    res = subprocess.run(["xorriso", "-indev", str(iso), *args], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return res.stdout + res.stderr


@pytest.mark.parametrize("name", NODES)
def test_iso_boot_records_and_gpt(built, name):
    iso = built[name].artefacts[ArtefactKind.ISO]
    report = _xorriso(iso, "-report_el_torito", "plain")
    assert re.search(r"El Torito boot img :\s+1\s+BIOS\s+y\s+none", report), report
    assert re.search(r"El Torito boot img :\s+2\s+UEFI\s+y\s+none", report), report
    assert isomod.volume_label(name) in _xorriso(iso, "-pvd_info")
    assert "No problems found" in isomod.verify_gpt(iso)
    mbr = iso.read_bytes()[:512] if iso.stat().st_size < 0 else open(iso, "rb").read(512)
    assert mbr[510:512] == b"\x55\xaa"
    ptypes = [mbr[446 + 16 * i + 4] for i in range(4)]
    assert 0xEF in ptypes  # EFI system partition for USB/UEFI boot


def test_iso_esp_carries_the_signed_boot_chain(built, tmp_path):
    """The ESP (the El Torito UEFI image) holds trixie's shim (Microsoft-signed), Debian's
    signed GRUB and the hop to the ISO's menu; the kernel is Debian-signed too."""
    iso = built["pbs-witness"].artefacts[ArtefactKind.ISO]
    _xorriso(
        iso,
        "-osirrox",
        "on",
        "-extract",
        "/boot/efiboot.img",
        str(tmp_path / "esp.img"),
        "-extract",
        "/live/vmlinuz",
        str(tmp_path / "vmlinuz"),
    )
    for src, dst in (
        ("::/EFI/BOOT/BOOTX64.EFI", "shim"),
        ("::/EFI/BOOT/grubx64.efi", "grub"),
        ("::/EFI/BOOT/mmx64.efi", "mok"),
        ("::/EFI/debian/grub.cfg", "grub.cfg"),
    ):
        subprocess.run(["mcopy", "-i", str(tmp_path / "esp.img"), src, str(tmp_path / dst)], check=True)

    def issuers(path):
        res = subprocess.run(["sbverify", "--list", str(path)], capture_output=True, text=True)
        return res.stdout

    assert "Microsoft Corporation UEFI CA" in issuers(tmp_path / "shim")
    assert "Debian Secure Boot CA" in issuers(tmp_path / "grub")
    assert "Debian Secure Boot CA" in issuers(tmp_path / "vmlinuz")
    cfg = (tmp_path / "grub.cfg").read_text()
    assert f"--label {isomod.volume_label('pbs-witness')}" in cfg and "configfile" in cfg


def test_installer_iso_menus_and_payload(built, lab, tmp_path):
    """The installer ISO: the live system plus its layer and payload; both menus say what
    will be erased and wait before they install; the live ISO has none of it."""
    layout = Layout(lab.name)
    node = lab.node("pve-2")
    installer = layout.artefact(node.name, "installer")
    files = _xorriso(installer, "-find", "/", "-type", "f")
    for path in (
        "/live/installer.squashfs",
        "/install/esp.img.zst",
        "/install/boot.tar.zst",
        "/install/root.uuid",
        "/isolinux/menu.c32",
    ):
        assert path in files, path
    assert "/install" not in _xorriso(
        built[node.name].artefacts[ArtefactKind.ISO], "-find", "/", "-type", "f"
    )
    _xorriso(
        installer,
        "-osirrox",
        "on",
        "-extract",
        "/isolinux",
        str(tmp_path / "isolinux"),
        "-extract",
        "/boot/grub/grub.cfg",
        str(tmp_path / "grub.cfg"),
        "-extract",
        "/live",
        str(tmp_path / "live"),
    )
    rule = lab.install.disk.describe(node)
    cfg = (tmp_path / "isolinux/isolinux.cfg").read_text()
    assert "UI menu.c32" in cfg and f"MENU LABEL Install: ERASES {rule}" in cfg and "DEFAULT install" in cfg
    assert "TIMEOUT 100" in cfg and "pvelab.install=1" in cfg and "MENU LABEL Cancel: the live system" in cfg
    grub = (tmp_path / "grub.cfg").read_text()
    assert "set timeout=10" in grub and f"ERASES {rule}" in grub and grub.count("menuentry") == 2
    # the install entry boots the installer's own target; the live ("Cancel") entry does not
    for text in (cfg, grub):
        lines = [line for line in text.splitlines() if "/live/vmlinuz" in line or "APPEND" in line]
        install = [line for line in lines if "pvelab.install=1" in line]
        assert install and all("systemd.unit=pvelab-install.target" in line for line in install), text
        assert all("systemd.unit" not in line for line in lines if line not in install), text
    assert (tmp_path / "live/filesystem.module").read_text().split() == [
        "filesystem.squashfs",
        f"{node.name}.squashfs",
        "installer.squashfs",
    ]
    layer = subprocess.run(
        ["unsquashfs", "-l", str(tmp_path / "live/installer.squashfs")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "squashfs-root/usr/lib/pvelab/installer.py" in layer
    assert "squashfs-root/etc/systemd/system/multi-user.target.wants/pvelab-install.service" in layer
    assert "squashfs-root/usr/lib/systemd/system/pvelab-install.target" in layer


@pytest.mark.parametrize("name", NODES)
def test_iso_squashfs_layers(built, lab, name, tmp_path):
    iso = built[name].artefacts[ArtefactKind.ISO]
    _xorriso(iso, "-osirrox", "on", "-extract", "/live", str(tmp_path / "live"))
    live = tmp_path / "live"
    assert (live / "filesystem.module").read_text().split() == ["filesystem.squashfs", f"{name}.squashfs"]
    layer = subprocess.run(
        ["unsquashfs", "-lln", str(live / f"{name}.squashfs")], capture_output=True, text=True, check=True
    ).stdout
    base = subprocess.run(
        ["unsquashfs", "-l", str(live / "filesystem.squashfs")], capture_output=True, text=True, check=True
    ).stdout
    assert "squashfs-root/usr/lib/pvelab/compat.py" in base
    module = lab.node(name).role_def.service.replace("-", "_") + ".py"
    assert f"squashfs-root/usr/lib/pvelab/{module}" in layer
    assert "_compat.py" not in base.replace("/compat.py", "")  # no role's module in the shared base
    assert "ssh_host_" not in base + layer
    if lab.node(name).is_member:
        assert re.search(r"^drwxr-x--- 1000/1000 .* squashfs-root/etc/pve/priv$", layer, re.M), layer
        assert "squashfs-root/etc/pve/corosync.conf" in layer
    assert (
        re.search(r"^drwx------ 0/0 .* squashfs-root/root$", layer, re.M) or "squashfs-root/root" not in layer
    )
    assert "squashfs-root/etc/fstab" in layer


@pytest.mark.parametrize("name", NODES)
def test_sbom_validates_and_lists_every_package(built, roots, lab, name):
    """CycloneDX 1.6 per node, valid per the official schema (cyclonedx-python-lib's
    validator), naming every installed package and the artefacts' checksums."""
    from pvelab.build import sbom

    text = Layout(lab.name).sbom(name).read_text()
    assert sbom.validate(text) is None
    assert sbom.validate(text.replace('"specVersion": "1.6"', '"specVersion": 1.6')) is not None
    doc = json.loads(text)
    manifest = json.loads(Layout(lab.name).manifest(name).read_text())
    debs = {c["name"]: c for c in doc["components"] if c.get("purl", "").startswith("pkg:deb/debian/")}
    assert sorted(debs) == sorted(p.split(":")[0] for p in installed(roots[name]))
    assert all(debs[p.split(":")[0]]["version"] == v for p, v in manifest["packages"].items())
    files = {c["name"]: c["hashes"][0]["content"] for c in doc["components"] if c["type"] == "file"}
    assert files == {n: a["sha256"] for n, a in manifest["artefacts"].items()}
    licensed = [c for c in debs.values() if c.get("licenses")]
    assert len(licensed) > len(debs) // 2  # most Debian packages have DEP-5 copyright files
    assert {"license": {"id": "GPL-2.0-or-later"}} in debs["bash"]["licenses"]


def test_rebuild_gives_identical_bytes(built, lab, monkeypatch):
    """Same base, same lab: rebuilding a node reproduces its qcow2, ISO and installer ISO
    bit for bit (fixed clock, derived identifiers, debugfs instead of a kernel mount).
    The second rebuild runs after Debian "published" (the archive's state is changed):
    the node stays on the base its siblings stand on, with no DIB run, so the lab stays
    on one base (a rehearsal refuses a lab of two)."""
    from pvelab.build import archive_state as archive
    from pvelab.core.run import Steps

    layout = Layout(lab.name)
    files = [layout.artefact("pve-1", kind) for kind in ArtefactKind]
    before = {p.name: _sha(p) for p in files}
    build(lab, ["pve-1"])
    assert {p.name: _sha(p) for p in files} == before
    manifest = json.loads(layout.manifest("pve-1").read_text())
    assert {name: a["sha256"] for name, a in manifest["artefacts"].items()} == before
    assert manifest["archive"] and all(s["index_sha256"] for s in manifest["archive"].values())
    sbom_before = _sha(layout.sbom("pve-1"))
    real_state, real_run = archive.fetch_state, Steps.run

    def moved(release):
        return {s: dataclasses.replace(v, index_sha256="0" * 64) for s, v in real_state(release).items()}

    def no_dib(self, cmd, *args, **kwargs):
        assert cmd[0] != "disk-image-create", "a build of one node rebuilt the lab's base"
        return real_run(self, cmd, *args, **kwargs)

    monkeypatch.setattr(archive, "fetch_state", moved)
    monkeypatch.setattr(Steps, "run", no_dib)
    build(lab, ["pve-1"])
    assert _sha(layout.sbom("pve-1")) == sbom_before  # the SBOM too
    keys = {json.loads(layout.manifest(n.name).read_text())["base_key"] for n in lab.nodes}
    assert len(keys) == 1, keys
    assert "the base the lab's other nodes were built from" in layout.base_log.read_text()


@pytest.mark.parametrize("sig", ["SIGINT", "SIGKILL"])
def test_interrupted_build_keeps_the_last_good_artefacts(built, lab, sig):
    import signal as signals

    ndir = Layout(lab.name).node_dir("pve-2")
    files = (ndir / "pve-2.qcow2", ndir / "pve-2.iso")
    before = {p.name: _sha(p) for p in files}
    _interrupt_at_the_qcow2_stage(["build", "--node", "pve-2"], ndir / "build.log", getattr(signals, sig))
    after = {p.name: _sha(p) for p in files}
    assert after == before  # the previous good artefacts are untouched
    manifest = json.loads((ndir / "manifest.json").read_text())
    assert manifest["artefacts"]["pve-2.qcow2"]["sha256"] == after["pve-2.qcow2"]
    if sig == "SIGINT":  # clean interruption: nothing left behind
        assert not (ndir / ".work").exists()
        assert str(ndir) not in subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    # the next build cleans up whatever a killed one left and succeeds
    rebuilt = build(lab, ["pve-2"])[0]
    assert rebuilt.artefacts[ArtefactKind.QCOW2].exists() and not (ndir / ".work").exists()
    assert {p.name: _sha(p) for p in (ndir / "pve-2.qcow2", ndir / "pve-2.iso")} == before  # same bytes
    assert str(ndir) not in subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout


def test_interrupted_parallel_build_replaces_nothing_and_leaves_nothing(built, lab):
    """All four nodes build side by side (worker processes); Ctrl-C while they run stops
    every worker, starts no queued node, replaces no artefact and leaves no .work folder,
    mount or loop device, whatever each worker was doing at the moment."""
    import signal as signals

    layout = Layout(lab.name)
    files = [layout.artefact(n, kind) for n in NODES for kind in ("qcow2", "iso")]
    before = {p.name: _sha(p) for p in files}
    err = _interrupt_at_the_qcow2_stage(["build"], layout.build_log("pve-1"), signals.SIGINT)
    assert "built " not in err, err[-2000:]  # no node finished after the interrupt
    assert {p.name: _sha(p) for p in files} == before
    assert not [n for n in NODES if (layout.node_dir(n) / ".work").exists()]
    assert str(layout.root) not in subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert str(layout.root) not in Path("/proc/mounts").read_text()


def _interrupt_at_the_qcow2_stage(args, log, sig):
    """Run `invoke ARGS`, send ``sig`` once ``log`` shows the qcow2 stage; return its
    stderr once it has failed.

    The build gets SIGINT's default disposition, as from a terminal: a job started in
    the background by a non-interactive shell (`cmd &`, as a CI wrapper or `nohup`
    does) inherits SIGINT *ignored*, Python then installs no KeyboardInterrupt
    handler, and the build would finish as if never interrupted."""
    import signal
    import sys
    import time

    from pvelab.core.paths import ROOT

    log.write_text("")  # no earlier build's stage line
    proc = subprocess.Popen(
        [sys.executable, "-m", "invoke", *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while "== qcow2" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, "build ended before the qcow2 stage"
        time.sleep(0.02)
    proc.send_signal(sig)
    err = proc.communicate(timeout=60)[1].decode()
    assert proc.returncode != 0, f"the build ended {proc.returncode} though interrupted: {err[-1000:]}"
    return err


def _sha(p):
    import hashlib

    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def test_loop_partition_replaces_a_stale_partition(tmp_path):
    """A loopXp1 left behind by a killed run must not be mounted with stale geometry."""
    steps = Steps("stale", tmp_path / "log")
    old, new = tmp_path / "old.raw", tmp_path / "new.raw"
    for img, size_mb, start in ((old, 16, 2048), (new, 24, 4096)):
        with open(img, "wb") as fh:
            fh.truncate(size_mb * 2**20)
        subprocess.run(["sfdisk", "-q", str(img)], input=f"{start},,L\n", text=True, check=True)
    # leave a partition on a loop device without deleting it (what a SIGKILL can do)
    dev = subprocess.run(
        ["losetup", "--find", "--show", str(old)], capture_output=True, text=True, check=True
    ).stdout.strip()
    subprocess.run(["partx", "--add", dev], check=True)
    subprocess.run(["losetup", "--detach", dev], check=True)
    try:
        with loop_partition(new, steps) as part:
            assert part == f"{dev}p1", "losetup --find chose another loop device"
            name = Path(part).name
            sysfs = Path(f"/sys/class/block/{name}")
            assert int((sysfs / "start").read_text()) == 4096
            assert int((sysfs / "size").read_text()) == 24 * 2048 - 4096
    finally:
        subprocess.run(["partx", "--delete", dev], capture_output=True)


def test_two_builds_of_one_lab_at_once(built, lab):
    """A nightly and an operator building the same lab at once: the second waits for the
    first (saying who holds the lab), both succeed, and the bytes are a clean build's."""
    import sys

    from pvelab.core.paths import ROOT

    layout = Layout(lab.name)
    files = [layout.artefact("pve-1", kind) for kind in ArtefactKind]
    before = {p.name: _sha(p) for p in files}
    cmd = [sys.executable, "-m", "invoke", "build", "--node", "pve-1"]
    procs = [
        subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in (1, 2)
    ]
    outs = [p.communicate(timeout=900)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert not any("Traceback" in o for o in outs), outs
    waited = [o for o in outs if f"lab {lab.name} is busy" in o]
    assert len(waited) == 1 and "waiting for it to finish" in waited[0]
    assert {p.name: _sha(p) for p in files} == before


def test_damaged_cache_is_said_moved_aside_and_remade(built, lab):
    """The base's squashfs truncated to 100 MB, a signed-boot .deb with one bit flipped,
    and a bit flipped in the squashfs with its time put back (found only by --verify):
    each is said in one line, moved aside and made again; the artefacts are a clean build's bytes."""
    import sys

    from pvelab.build.cache import SEAL
    from pvelab.core.paths import ROOT, cache_dir

    layout = Layout(lab.name)
    files = [layout.artefact(n, kind) for n in ("pve-1",) for kind in ArtefactKind]
    before = {p.name: _sha(p) for p in files}
    key = json.loads(layout.manifest("pve-1").read_text())["base_key"]
    entry = cache_dir() / "base" / key
    squashfs = entry / "filesystem.squashfs"
    debs = cache_dir() / "guest-packages" / key / "signed-boot"
    deb = sorted(debs.glob("shim-signed_*.deb"))[0]
    assert (entry / SEAL).exists() and (debs / SEAL).exists()

    def flip(path, keep_time=False):
        st = path.stat()
        with open(path, "r+b") as fh:
            fh.seek(st.st_size // 2)
            b = fh.read(1)
            fh.seek(st.st_size // 2)
            fh.write(bytes([b[0] ^ 0x10]))
        if keep_time:
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))

    def build_pve1(*extra):
        res = subprocess.run(
            [sys.executable, "-m", "invoke", "build", "--node", "pve-1", *extra],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-3000:]
        return [line for line in res.stderr.splitlines() if "cache:" in line]

    os.truncate(squashfs, 100 * 1024 * 1024)
    flip(deb)
    said = build_pve1()
    assert len(said) == 2, said
    assert any("filesystem.squashfs: 104857600 bytes, sealed with" in s and "moved aside" in s for s in said)
    assert any(f"{deb.name}: sha256" in s and "moved aside" in s for s in said)
    assert (entry / "filesystem.squashfs.damaged").stat().st_size == 100 * 1024 * 1024
    assert (debs.with_name("signed-boot.damaged") / deb.name).exists()
    assert {p.name: _sha(p) for p in files} == before

    flip(squashfs, keep_time=True)
    assert build_pve1() == []  # a per-use check trusts an unchanged time on a large file
    said = build_pve1("--verify")
    assert len(said) == 1 and "filesystem.squashfs: sha256" in said[0], said
    assert {p.name: _sha(p) for p in files} == before


def test_full_disk_at_the_node_stage_keeps_the_previous_artefacts(built, lab, tmp_path):
    """The lab's build folder on a file system of its own holding the last good pve-1;
    the build passes its free-space check, then something else fills the disk while the
    node stage runs: one line names the file system and the stage, exit 1, the previous
    artefacts are untouched and no half-made file or work folder is left."""
    import shutil
    import signal
    import sys
    import time

    from pvelab.core.paths import ROOT, cache_dir

    small = tmp_path / "small"
    small.mkdir()
    src = Layout(lab.name).node_dir("pve-1")
    used = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    size_mib = used // (1 << 20) + 6 * 1024 + 256  # passes the build's 6 GiB check
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(small)], check=True)
    try:
        node = small / lab.name / "pve-1"
        shutil.copytree(src, node, ignore=shutil.ignore_patterns(".work"))
        before = {p.name: _sha(p) for p in node.iterdir() if p.suffix in (".qcow2", ".iso")}
        log = node / "build.log"
        log.write_text("")
        proc = subprocess.Popen(
            [sys.executable, "-m", "invoke", "build", "--node", "pve-1"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, PVELAB_BUILD_DIR=str(small), PVELAB_CACHE_DIR=str(cache_dir())),
            start_new_session=True,
        )
        deadline = time.monotonic() + 300
        while "== disk: copy base" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, "build ended before its node stage"
            time.sleep(0.02)
        # The node stage takes a few seconds on a fast host, filling the disk takes longer:
        # the build (and the tools it runs) is held while the other job's file takes what
        # is left, so the disk is full before the stage writes on, however fast the host.
        os.killpg(proc.pid, signal.SIGSTOP)
        try:
            with open(small / "filler", "wb") as fh:  # another job's file takes what is left
                try:
                    os.posix_fallocate(fh.fileno(), 0, max(0, shutil.disk_usage(small).free - (64 << 20)))
                except OSError:
                    pass
                fh.seek(0, 2)
                chunk = b"\xff" * (1 << 20)
                try:
                    while True:
                        fh.write(chunk)
                        fh.flush()
                except OSError:
                    pass
            assert shutil.disk_usage(small).free < (1 << 20)
        finally:
            os.killpg(proc.pid, signal.SIGCONT)
        err = proc.communicate(timeout=900)[1]
        assert proc.returncode == 1, err[-3000:]
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        print(errors, proc.returncode)
        assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
        assert f"{small} (" in errors[0] and "is full" in errors[0] and "pve-1: " in errors[0], errors[0]
        assert {p.name: _sha(p) for p in node.iterdir() if p.suffix in (".qcow2", ".iso")} == before
        assert not (node / ".work").exists()
        assert not [p for p in node.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
        assert str(small) not in subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)
