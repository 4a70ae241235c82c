"""Recipe export: one OpenFactory-shaped JSON recipe per node plus the scenario JSON.

The recipes describe the same machines the image pipeline bakes (packages, user,
network, files rendered from the overlays, the startup script), so another builder or
a reviewer can read a node without running pvelab.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pvelab.build.render import enabled_units, node_dirs, render_files
from pvelab.model.lab import Lab, Node

ALIAS_SCRIPT = "/usr/local/sbin/pvelab-alias"


def node_recipe(lab: Lab, node: Node) -> dict:
    files = render_files(lab, node)
    script = next(f.content for f in files if f.path == ALIAS_SCRIPT)
    return {
        "name": node.name,
        "lab": lab.name,
        "role": node.role,
        "base": {"distro": "debian", "release": lab.release, "version": "13", "arch": node.arch},
        "resources": {"ram_mb": node.ram_mb, "disk_gb": node.disk_gb},
        "features": list(node.features),
        "packages": list(node.packages),
        "users": [
            {
                "name": lab.user.name,
                "password_hash": lab.user.crypt_hash(),
                "groups": list(lab.user.groups),
                "ssh_password_login": True,
            }
        ],
        "network": {
            "mode": "dhcp",
            "keep_default_route": True,
            "alias": str(node.alias),
            "dns_servers": list(lab.dns_servers),
            "firewall": False,
        },
        "directories": [
            {"path": d, "mode": "0750", "owner": lab.user.name, "group": lab.user.name}
            for d in node_dirs(lab, node)
        ],
        "files": [
            {
                "path": f.path,
                "mode": f"{f.mode:04o}",
                "owner": f.owner,
                "group": f.group,
                "content": f.content,
            }
            for f in files
        ],
        "services": [u for u in enabled_units(node) if u != "pvelab-alias.service"],
        "startup_scripts": [{"name": "pvelab-alias", "after": lab.startup_after, "script": script}],
        "diagram": {"x": node.diagram[0], "y": node.diagram[1]},
        "test_config": dict(node.test_config),
    }


def scenario_document(lab: Lab) -> dict:
    scenario = lab.scenario.to_dict()
    return {"lab": lab.name, "scenarios": [dict(scenario, type="group", vms=[n.name for n in lab.nodes])]}


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def export_recipes(lab: Lab, out: Path | None = None) -> list[Path]:
    out = out or lab.layout.recipes
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for node in lab.nodes:
        path = out / f"{node.name}.json"
        _write_json(path, node_recipe(lab, node))
        written.append(path)
    path = out / f"scenario-{lab.scenario.name}.json"
    _write_json(path, scenario_document(lab))
    written.append(path)
    return written
