"""`invoke recipes`: OpenFactory-shaped node recipes and the scenario JSON."""

import json

from pvelab.build.recipes import export_recipes


def test_recipes_and_scenario(lab, tmp_path):
    paths = export_recipes(lab, tmp_path)
    names = sorted(p.name for p in paths)
    assert names == [
        "pbs-witness.json",
        "pve-1.json",
        "pve-2.json",
        "pve-3.json",
        "scenario-proxmox-3node-cluster-validation.json",
    ]
    r = json.loads((tmp_path / "pve-1.json").read_text())
    assert r["test_config"] == {"enabled": False, "tests": []}
    assert r["base"]["release"] == "trixie" and r["base"]["arch"] == "x86_64"
    assert r["resources"] == {"ram_mb": 4096, "disk_gb": 32}
    assert r["startup_scripts"][0]["after"] == "network-online.target"
    assert isinstance(r["startup_scripts"][0]["after"], str)
    assert len(r["startup_scripts"][0]["script"].splitlines()) <= 25
    assert 'ip addr add 10.81.0.11/24 dev "$IFACE" || true' in r["startup_scripts"][0]["script"]
    assert r["services"] == ["pve-compat.service"]
    assert {f["path"] for f in r["files"]} >= {"/etc/pve/corosync.conf", "/etc/pve/storage.cfg"}
    assert r["users"][0]["name"] == "ops" and r["users"][0]["groups"] == ["sudo"]
    w = json.loads((tmp_path / "pbs-witness.json").read_text())
    assert w["services"] == ["qdevice-compat.service"] and w["resources"]["ram_mb"] == 2048

    doc = json.loads((tmp_path / "scenario-proxmox-3node-cluster-validation.json").read_text())
    assert len(doc["scenarios"]) == 1
    sc = doc["scenarios"][0]
    assert sc["type"] == "group" and sc["tests"] == []
    assert len(sc["custom_tests"]) == 6
    kinds = {a["type"] for t in sc["custom_tests"] for a in t["assertions"]}
    assert kinds == {"port_listening", "command_output"}
    assert all(a["on_vm"] for t in sc["custom_tests"] for a in t["assertions"])
    mesh = sc["custom_tests"][5]["assertions"]
    assert mesh == [
        {
            "type": "command_output",
            "on_vm": "pve-1",
            "command": "nc -z -w 5 10.81.0.12 8006 && nc -z -w 5 10.81.0.13 8006 && echo peers-reachable",
            "expected_output": "peers-reachable",
        }
    ]
    ports = sorted((a["on_vm"], a["port"]) for a in sc["custom_tests"][0]["assertions"])
    assert ports == sorted(
        [(n, p) for n in ("pve-1", "pve-2", "pve-3") for p in (8006, 5404, 5405)] + [("pbs-witness", 5403)]
    )
