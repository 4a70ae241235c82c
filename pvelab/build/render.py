"""Render one node's overlay: ``overlays/common`` plus its role's ``overlays/<role>``.

Each ``*.j2`` file renders (Jinja2) to the same path without the suffix; any other file
is copied verbatim (a role's service module and unit).  Modes and owners come from
:data:`FILE_MODES`; the node stage bakes the files in with them.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import jinja2

from pvelab.build import bootdisk
from pvelab.core.paths import OVERLAYS
from pvelab.model.deploy import actions
from pvelab.model.lab import Lab, Node
from pvelab.model.passwords import token_hash, token_salt
from pvelab.model.quorum import table as quorum_table
from pvelab.model.roles import PVE_AUTHKEY

# (glob on the target path, mode, owner, group); first match wins. "{user}" is the lab user.
FILE_MODES = (
    ("/usr/local/sbin/*", 0o755, "root", "root"),
    ("/etc/pve/priv/*", 0o600, "root", "root"),
    ("/etc/pve/*", 0o640, "{user}", "{user}"),
    ("/root/*", 0o600, "root", "root"),
    ("*", 0o644, "root", "root"),
)
STARTUP_UNIT = "pvelab-alias.service"


def compat_config(lab: Lab, node: Node) -> dict:
    """Identity and data of the node's compat service (its /etc/pvelab/<service>.json)."""
    return node.role_def.compat_config(lab, node)


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(OVERLAYS)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )


INSTALLER_LAYER = "installer"  # overlays/installer: only on the installer ISOs
INSTALLER_UNIT = "pvelab-install.service"


def template_sources(node: Node, layers: tuple[str, ...] | None = None) -> list[tuple[str, Path]]:
    """(target path, source file) for every overlay file of ``layers`` (default: the node's)."""
    out = []
    for layer in layers or ("common", node.role):
        base = OVERLAYS / layer
        for src in sorted(p for p in base.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
            rel = src.relative_to(base).as_posix()
            out.append(("/" + rel.removesuffix(".j2"), src))
    return out


def _mode_for(target: str, user: str) -> tuple[int, str, str]:
    for pattern, mode, owner, group in FILE_MODES:
        if fnmatch.fnmatch(target, pattern):
            return mode, owner.format(user=user), group.format(user=user)
    raise AssertionError("FILE_MODES has a catch-all")


@dataclass(frozen=True)
class RenderedFile:
    path: str
    content: str
    mode: int
    owner: str
    group: str


def api_tokens(lab: Lab) -> dict:
    """The node's API tokens (its /etc/pve/priv/pvelab-tokens.json): id -> salted hash."""
    user = lab.user.name
    return {
        t.token_id(user): {"hash": token_hash(t.secret, token_salt(lab.name, t.id)), "privsep": 0}
        for t in lab.api.tokens
    }


def install_config(lab: Lab, node: Node) -> dict:
    """What the installer ISO of ``node`` reads (/etc/pvelab/install.json)."""
    return {
        "node": node.name,
        "disk": lab.install.disk.for_node(node),
        "rule_text": lab.install.disk.describe(node),
        "existing_data": lab.install.existing_data,
        "after": lab.install.after,
        "layout": bootdisk.LAYOUT,
        "root_label": bootdisk.ROOT_LABEL,
    }


NETWORK_DIR = "/etc/systemd/network"
DHCP_NETWORK = "80-pvelab-dhcp.network"  # the base image's, on the default NIC (elements/pvelab-base)


def network_files(lab: Lab, node: Node) -> list[RenderedFile]:
    """systemd-networkd files for the NICs a node's corosync links add: a static address
    per link NIC, matched by the MAC or the name the lab file gives, with no gateway (only
    the default NIC has the default route). Configuration is kept when the carrier goes
    (a cable pull), on those NICs and on the default one, as ifupdown2's static
    interfaces on a Proxmox VE host keep theirs. Nodes on the default NIC only get none."""
    extra = node.own_nic_links
    if not extra:
        return []
    out = []
    for link in extra:
        match = f"MACAddress={link.nic.mac}" if link.nic.mac else f"Name={link.nic.name}"
        text = (
            f"# pvelab: corosync link {link.number} of {lab.name} on {link.nic.describe()}.\n"
            f"[Match]\n{match}\n\n"
            f"[Network]\nAddress={link.address}\nDHCP=no\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n"
            "IgnoreCarrierLoss=yes\n\n[Link]\nRequiredForOnline=no\n"
        )
        out.append(
            RenderedFile(f"{NETWORK_DIR}/10-pvelab-link{link.number}.network", text, 0o644, "root", "root")
        )
    keep = "# pvelab: a cable pull keeps the default NIC's lease and the lab alias.\n[Network]\nIgnoreCarrierLoss=yes\n"
    out.append(
        RenderedFile(f"{NETWORK_DIR}/{DHCP_NETWORK}.d/50-pvelab-links.conf", keep, 0o644, "root", "root")
    )
    return out


def render_files(lab: Lab, node: Node, layers: tuple[str, ...] | None = None) -> list[RenderedFile]:
    """Every overlay file of one node (or of ``layers``), rendered in memory, with its mode and owner."""
    env = _environment()
    # json.dumps, not Jinja's tojson: that sorts keys, and the API bodies keep the spec's order.
    context = {
        "lab": lab,
        "node": node,
        "quorum_table": quorum_table(lab),
        "deploy_actions": actions(lab),
        "compat_config": json.dumps(compat_config(lab, node), indent=2),
        "install_config": json.dumps(install_config(lab, node), indent=2),
        "api_tokens": json.dumps(api_tokens(lab), indent=2),
        "authkey": PVE_AUTHKEY,
    }
    out = []
    for target, src in template_sources(node, layers):
        mode, owner, group = _mode_for(target, lab.user.name)
        if src.suffix == ".j2":
            text = env.get_template(src.relative_to(OVERLAYS).as_posix()).render(**context)
        else:
            text = src.read_text()
        out.append(RenderedFile(target, text, mode, owner, group))
    if layers is None:
        out += network_files(lab, node)
    return out


def node_dirs(lab: Lab, node: Node) -> list[str]:
    """Directories the node's role creates (mode 0750, owned by the lab user)."""
    return [d.format(node=node.name) for d in node.role_def.dirs]


def enabled_units(node: Node) -> list[str]:
    return [node.role_def.unit, STARTUP_UNIT]


@dataclass(frozen=True)
class Rendered:
    """One node, rendered once: its overlay (written to ``overlay``) and its installer layer."""

    overlay: Path
    files: list[RenderedFile]
    installer_files: list[RenderedFile]


def render_node(lab: Lab, node: Node, out: Path | None = None) -> Rendered:
    """Render one node and write its overlay to ``out`` (default build/<lab>/<node>/overlay), atomically."""
    out = out or lab.layout.overlay(node.name)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    files = render_files(lab, node)
    for f in files:
        dest = tmp / f.path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(f.content)
        dest.chmod(f.mode)
    for path in node_dirs(lab, node):
        (tmp / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return Rendered(out, files, render_files(lab, node, (INSTALLER_LAYER,)))


def render_lab(lab: Lab, names: list[str] | None = None) -> list[Path]:
    return [render_node(lab, node).overlay for node in lab.select(names)]
