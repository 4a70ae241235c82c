"""Render the Jinja2 overlays of one node into a file tree plus an ownership manifest.

``overlays/common`` applies to every node, ``overlays/<role>`` to the nodes of that role.
Each ``*.j2`` file renders to the same path without the suffix.  Modes and owners are not
carried by the tree (it is written as the invoking user); they live in
``overlay.json`` beside it, which the image stage applies when baking the tree in.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import jinja2

from .lab import Lab, Node
from .paths import OVERLAYS, node_dir

# (glob on the target path, mode, owner, group); first match wins. "{user}" is the lab user.
FILE_MODES = (
    ("/usr/local/sbin/*", 0o755, "root", "root"),
    ("/etc/pve/*", 0o640, "{user}", "{user}"),
    ("/root/*", 0o600, "root", "root"),
    ("*", 0o644, "root", "root"),
)
# Directories the PVE role creates even though no file lands in them.
PVE_DIRS = ("/etc/pve", "/etc/pve/nodes", "/etc/pve/nodes/{node}", "/etc/pve/storage",
            "/etc/pve/qemu-server", "/etc/pve/lxc", "/etc/pve/priv")
# Units each role enables in the image (the units themselves come from the role elements).
ROLE_UNITS = {"pve-host": ("pve-compat.service",), "qdevice-witness": ("qdevice-compat.service",)}


@dataclass(frozen=True)
class Overlay:
    node: str
    tree: Path
    manifest: Path


def compat_config(lab: Lab, node: Node) -> dict:
    """Identity and data of the node's compat service (its /etc/pvelab/*.json)."""
    if node.is_pve:
        return {
            "node": node.name,
            "listen": "0.0.0.0",
            "http_port": 8006,
            "tcp_ports": [5404, 5405],
            "udp_ports": [5405],
            "nodes": [n.name for n in lab.pve_hosts],
            "cluster_status": lab.cluster_status(),
        }
    return {
        "node": node.name,
        "listen": "0.0.0.0",
        "port": lab.qdevice.port,
        "metrics_port": 9165,
        "cluster_name": lab.cluster_name,
        "algorithm": lab.qdevice.algorithm,
    }


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(OVERLAYS)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )


def template_sources(node: Node) -> list[tuple[str, Path]]:
    """(target path, template file) for every template that applies to the node."""
    out = []
    for layer in ("common", node.role):
        base = OVERLAYS / layer
        for src in sorted(base.rglob("*.j2")):
            rel = src.relative_to(base).as_posix()
            out.append(("/" + rel[:-3], src))
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


def render_files(lab: Lab, node: Node) -> list[RenderedFile]:
    """Every overlay file of one node, rendered in memory, with its mode and owner."""
    env = _environment()
    context = {"lab": lab, "node": node, "pve_compat": None, "qdevice_compat": None,
               "quorum_table": lab.quorum_table()}
    # json.dumps, not Jinja's tojson: that sorts keys, and the API bodies keep the spec's order.
    context["pve_compat" if node.is_pve else "qdevice_compat"] = json.dumps(
        compat_config(lab, node), indent=2)
    out = []
    for target, src in template_sources(node):
        template = env.get_template(src.relative_to(OVERLAYS).as_posix())
        mode, owner, group = _mode_for(target, lab.user.name)
        out.append(RenderedFile(target, template.render(**context), mode, owner, group))
    return out


def node_dirs(lab: Lab, node: Node) -> list[str]:
    """Directories the node's role creates (mode 0750, owned by the lab user)."""
    return [d.format(node=node.name) for d in PVE_DIRS] if node.is_pve else []


def enabled_units(node: Node) -> list[str]:
    return list(ROLE_UNITS[node.role]) + ["pvelab-alias.service"]


def render_node(lab: Lab, node: Node, out: Path | None = None) -> Overlay:
    """Write one node's overlay to ``out`` (default build/<node>/overlay), atomically."""
    out = out or node_dir(node.name) / "overlay"
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    entries = []
    for f in render_files(lab, node):
        dest = tmp / f.path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(f.content)
        entries.append({"path": f.path, "type": "file", "mode": f"{f.mode:04o}",
                        "owner": f.owner, "group": f.group})
    for path in node_dirs(lab, node):
        (tmp / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
        entries.append({"path": path, "type": "dir", "mode": "0750",
                        "owner": lab.user.name, "group": lab.user.name})
    manifest = {"node": node.name, "role": node.role,
                "entries": sorted(entries, key=lambda e: e["path"]),
                "enable": enabled_units(node)}
    manifest_tmp = tmp.parent / "overlay.json.tmp"
    manifest_tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    os.replace(manifest_tmp, out.parent / "overlay.json")
    return Overlay(node.name, out, out.parent / "overlay.json")


def render_lab(lab: Lab, names: list[str] | None = None) -> list[Overlay]:
    return [render_node(lab, node) for node in lab.select(names)]
