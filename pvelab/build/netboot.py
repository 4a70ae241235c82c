"""Network boot: each node's bundle, and the DHCP/TFTP/HTTP answers that serve it.

A node's bundle is one reproducible tar, ``<node>-netboot.tar``, laid out as the root a
TFTP and HTTP server serves, beside the node's ISOs (a release's folder, unpacked in
place)::

    bootx64.efi                  shim, signed by Microsoft's UEFI CA (UEFI PXE's boot file)
    grubx64.efi                  Debian's signed network GRUB (shim fetches it from the TFTP root)
    netboot/<node>/vmlinuz       the live kernel (Debian-signed) and initrd (live-boot)
    netboot/<node>/initrd.img
    netboot/<node>/live.ipxe     iPXE (BIOS PXE): the live system
    netboot/<node>/install.ipxe  iPXE: the installer, after a countdown
    netboot/<node>/live.cfg      GRUB (UEFI, Secure Boot): the same two
    netboot/<node>/install.cfg
    <node>.iso, <node>-installer.iso   (the node's own artefacts, not in the tar)

The kernel's live-boot fetches the whole ISO over HTTP (``fetch=``) into memory and boots
its squashfs layers as from a CD; the installer ISO brings its payload, so the network
installer applies the same disk rules and refusals as the installer ISO. Both scripts
name the server as the DHCP server's next-server (``${next-server}`` in iPXE,
``$net_default_server`` in GRUB): TFTP and HTTP are served from one host, and no address
is baked into a bundle. Which node boots what is the DHCP server's choice, keyed by MAC:
:func:`dnsmasq_options` (the boot test's dnsmasq) and :func:`dnsmasq_example` (the
release's ``netboot/dnsmasq.conf``) are made from one list; GRUB finds its node by MAC
too (:func:`grub_dispatch`).
"""

from __future__ import annotations

import enum
import io
import os
import shutil
import tarfile
from pathlib import Path

from pvelab.build.iso import INSTALL_ARG, INSTALL_WAIT, LIVE_CMDLINE
from pvelab.build.signedboot import SignedBoot
from pvelab.core.errors import PvelabError
from pvelab.model.artefacts import ArtefactKind
from pvelab.model.lab import Lab, Node

SHIM = "bootx64.efi"
GRUB = "grubx64.efi"
GRUB_PREFIX = "grub"  # Debian's signed network GRUB reads (tftp,<server>)/grub/grub.cfg
HTTP_PORT = 80


class NetbootError(PvelabError):
    pass


class Mode(enum.Enum):
    """What a node boots over the network."""

    LIVE = "live"
    INSTALL = "install"

    def is_install(self) -> bool:
        return self is Mode.INSTALL

    @property
    def iso_kind(self) -> ArtefactKind:
        """The artefact kind live-boot fetches."""
        return ArtefactKind.INSTALLER if self.is_install() else ArtefactKind.ISO


def node_dir(node: str) -> str:
    return f"netboot/{node}"


def _cmdline(lab: Lab, node: Node, mode: Mode, server: str) -> str:
    iso = lab.layout.artefact(node.name, mode.iso_kind).name
    extra = f" {INSTALL_ARG}" if mode.is_install() else ""
    return f"{LIVE_CMDLINE} fetch=http://{server}/{iso}{extra}"


def _ipxe_boot(lab: Lab, node: Node, mode: Mode) -> str:
    d = node_dir(node.name)
    return (
        f"kernel http://${{next-server}}/{d}/vmlinuz initrd=initrd.img {_cmdline(lab, node, mode, '${next-server}')}\n"
        f"initrd http://${{next-server}}/{d}/initrd.img\nboot\n"
    )


def ipxe_script(lab: Lab, node: Node, mode: Mode) -> str:
    if not mode.is_install():
        return f"#!ipxe\necho pvelab: {node.name} (live) from ${{next-server}}\n" + _ipxe_boot(
            lab, node, mode
        )
    erases = lab.install.disk.describe(node)
    return (
        "#!ipxe\n"
        f"echo pvelab installer for {node.name}: in {INSTALL_WAIT} s it ERASES {erases} and installs {node.name} there.\n"
        f"prompt --timeout {INSTALL_WAIT * 1000} Press any key to cancel (the live system starts instead) "
        "&& goto live || goto install\n"
        f":install\n{_ipxe_boot(lab, node, Mode.INSTALL)}:live\n{_ipxe_boot(lab, node, Mode.LIVE)}"
    )


def grub_cfg(lab: Lab, node: Node, mode: Mode) -> str:
    d = node_dir(node.name)

    def entry(title: str, m: Mode) -> str:
        return (
            f'menuentry "{title}" {{\n'
            f"    linux /{d}/vmlinuz {_cmdline(lab, node, m, '$net_default_server')}\n"
            f"    initrd /{d}/initrd.img\n}}\n"
        )

    live = entry(f"{node.name} (pvelab live over the network, no changes)", Mode.LIVE)
    if not mode.is_install():
        return "set timeout=0\nset default=0\n" + live
    erases = lab.install.disk.describe(node)
    return (
        f"set timeout={INSTALL_WAIT}\nset default=0\n"
        f'echo "pvelab installer for {node.name}: in {INSTALL_WAIT} s it ERASES {erases} and installs {node.name} there."\n'
        'echo "To cancel, choose the live system below."\n'
        + entry(f"Install {node.name}: ERASES {erases}", Mode.INSTALL)
        + live
    )


def grub_dispatch(lab: Lab, modes: dict[str, Mode]) -> str:
    """``grub/grub.cfg`` at the TFTP root: the serial console, then each node's menu by MAC."""
    lines = [
        "serial --speed=115200 --unit=0 --word=8 --parity=no --stop=1",
        "terminal_input serial console",
        "terminal_output serial console",
    ]
    for name, mode in modes.items():
        node = lab.node(name)
        lines += [
            f'if [ "$net_default_mac" = "{node.mac}" ]; then',
            f"    configfile /{node_dir(name)}/{mode.value}.cfg",
            "fi",
        ]
    lines.append('echo "pvelab: no node of lab ' + lab.name + ' has MAC $net_default_mac"')
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the bundle


def _files(
    lab: Lab, node: Node, kernel: Path, initrd: Path, signed: SignedBoot
) -> list[tuple[str, bytes | Path]]:
    d = node_dir(node.name)
    out: list[tuple[str, bytes | Path]] = [
        (SHIM, signed.shim),
        (GRUB, signed.grub_net),
        (f"{d}/vmlinuz", kernel),
        (f"{d}/initrd.img", initrd),
    ]
    for mode in Mode:
        out.append((f"{d}/{mode.value}.ipxe", ipxe_script(lab, node, mode).encode()))
        out.append((f"{d}/{mode.value}.cfg", grub_cfg(lab, node, mode).encode()))
    return out


def make_bundle(
    out: Path, lab: Lab, node: Node, kernel: Path, initrd: Path, signed: SignedBoot, epoch: int
) -> None:
    """Write ``<node>-netboot.tar`` to ``out``: sorted members, owner root, every time ``epoch``
    (the same inputs give the same bytes)."""
    files = sorted(_files(lab, node, kernel, initrd, signed))
    dirs = sorted({p for name, _ in files for p in _parents(name)})
    with tarfile.open(out, "w", format=tarfile.GNU_FORMAT) as tar:
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, epoch
            tar.addfile(info)
        for name, src in files:
            data = src if isinstance(src, bytes) else src.read_bytes()
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, epoch
            tar.addfile(info, io.BytesIO(data))


def _parents(name: str) -> list[str]:
    parts = name.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def unpack(bundle: Path, root: Path) -> None:
    """Unpack a bundle into a serving root (members checked: no absolute paths, links or ``..``)."""
    with tarfile.open(bundle) as tar:
        tar.extractall(root, filter="data")


# --------------------------------------------------------------------------- serving


def dnsmasq_options(lab: Lab, modes: dict[str, Mode], tftp_root: Path | str, server: str) -> list[str]:
    """dnsmasq options (command-line spelling) that network-boot each node in ``modes``:
    iPXE clients (QEMU's NIC ROM, or iPXE chain-loaded) get the node's script over HTTP,
    UEFI clients (x86-64, PXE or HTTP boot arch 7/9) get shim over TFTP. Nodes are told
    apart by the ``set:<node>`` tag of their ``dhcp-host`` line."""
    opts = [
        "--enable-tftp",
        f"--tftp-root={tftp_root}",
        "--dhcp-match=set:ipxe,175",
        "--dhcp-match=set:efi64,option:client-arch,7",
        "--dhcp-match=set:efi64,option:client-arch,9",
    ]
    for name, mode in modes.items():
        opts.append(
            f"--dhcp-boot=tag:{name},tag:ipxe,http://{server}/{node_dir(name)}/{mode.value}.ipxe,,{server}"
        )
    opts.append(f"--dhcp-boot=tag:!ipxe,tag:efi64,{SHIM},,{server}")
    return opts


def dnsmasq_example(lab: Lab) -> str:
    """The release's ``netboot/dnsmasq.conf``: every node live by default, its MAC from the
    lab file, for a provisioning team to adapt (addresses are placeholders to replace)."""
    modes = {n.name: Mode.LIVE for n in lab.nodes}
    head = [
        f"# pvelab: network boot for lab {lab.name} (generated; see README.md, 'Network boot').",
        "# Serve this release's folder, with every <node>-netboot.tar unpacked in it, over TFTP",
        "# (here) and HTTP (any web server, port 80, same host: the boot scripts fetch from the",
        "# DHCP server's next-server). Replace 192.0.2.10 with that host's address and the range",
        "# with your provisioning network's; to install a node instead of booting it live, change",
        "# its live.ipxe to install.ipxe, and in grub/grub.cfg its live.cfg to install.cfg.",
        "# BIOS machines whose PXE ROM is not iPXE: chain-load Debian's undionly.kpxe (package",
        "# ipxe) with  dhcp-boot=tag:!ipxe,tag:!efi64,undionly.kpxe",
        "port=0",
        "dhcp-range=192.0.2.100,192.0.2.150,255.255.255.0,1h",
    ]
    hosts = [f"dhcp-host={n.mac},set:{n.name},{n.name}" for n in lab.nodes]
    body = [o.removeprefix("--") for o in dnsmasq_options(lab, modes, "/srv/pvelab", "192.0.2.10")]
    return "\n".join(head + hosts + body) + "\n"


def serve_tree(lab: Lab, nodes: tuple[Node, ...], mode: Mode, root: Path) -> None:
    """Build ``root`` as a provisioning team would from a release: each node's bundle
    unpacked, its ISOs beside (hard links, or copies across file systems), ``grub/grub.cfg``."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    layout = lab.layout
    modes = {n.name: mode for n in nodes}
    for n in nodes:
        bundle = layout.artefact(n.name, ArtefactKind.NETBOOT)
        if not bundle.exists():
            raise NetbootError(
                f"{bundle} is missing: run `invoke build --lab {lab.path} --node {n.name}` first"
            )
        unpack(bundle, root)
        iso = layout.artefact(n.name, mode.iso_kind)
        try:
            os.link(iso, root / iso.name)
        except OSError:
            shutil.copyfile(iso, root / iso.name)
    (root / GRUB_PREFIX).mkdir(exist_ok=True)
    (root / GRUB_PREFIX / "grub.cfg").write_text(grub_dispatch(lab, modes))
