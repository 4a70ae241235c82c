"""Lab file validation: every rejected case names the file, the field path and the value."""

import pytest

from pvelab.lab import LabError, load_lab


def test_default_lab_model(lab):
    assert [n.name for n in lab.nodes] == ["pve-1", "pve-2", "pve-3", "pbs-witness"]
    assert [n.nodeid for n in lab.pve_hosts] == [1, 2, 3]
    assert lab.witness.name == "pbs-witness" and lab.witness.ip == "10.81.0.20"
    assert lab.expected_votes == 4 and lab.quorum == 3
    assert {n.name: (n.ram_mb, n.disk_gb) for n in lab.nodes} == {
        "pve-1": (4096, 32),
        "pve-2": (4096, 32),
        "pve-3": (4096, 32),
        "pbs-witness": (2048, 16),
    }
    assert lab.node("pve-2").diagram == (350, 100)
    assert lab.startup_after == "network-online.target"
    assert all(n.test_config == {"enabled": False, "tests": []} for n in lab.nodes)
    assert lab.scenario.name == "proxmox-3node-cluster-validation"
    assert [t.name for t in lab.scenario.custom_tests] == [
        "Cluster ports listen",
        "All three nodes report quorate",
        "Per-node status",
        "corosync.conf has all three nodes",
        "All nodes reach the QDevice",
        "Mesh reachability",
    ]


def test_quorum_table_matches_spec(lab):
    rows = {r["situation"]: (r["votes"], r["quorate"]) for r in lab.quorum_table()}
    assert rows == {
        "all up": (4, True),
        "one node down": (3, True),
        "two nodes down, QDevice up": (2, False),
        "QDevice down, nodes up": (3, True),
    }


def test_cluster_status_json_order(lab):
    import json

    body = json.dumps({"data": lab.cluster_status()}, separators=(",", ":"))
    assert body == (
        '{"data":[{"type":"cluster","name":"pve-cluster","nodes":3,"quorate":1},'
        '{"type":"node","name":"pve-1","online":1,"id":"node/pve-1","nodeid":1},'
        '{"type":"node","name":"pve-2","online":1,"id":"node/pve-2","nodeid":2},'
        '{"type":"node","name":"pve-3","online":1,"id":"node/pve-3","nodeid":3}]}'
    )


def _node(data, name):
    return next(n for n in data["nodes"] if n["name"] == name)


def _add_package(data, name, pkg):
    node = _node(data, name)
    node["packages"] = node["packages"] + [pkg]  # the YAML anchor shares one list between nodes


def _assertion(data, test=0, index=0):
    return data["scenarios"][0]["custom_tests"][test]["assertions"][index]


CASES = {
    "duplicate node name": (lambda d: _node(d, "pve-2").update(name="pve-1"), "nodes[1].name", "pve-1"),
    "duplicate alias": (
        lambda d: _node(d, "pve-3").update(alias="10.81.0.12/24"),
        "nodes[2].alias",
        "10.81.0.12/24",
    ),
    "alias outside subnet": (
        lambda d: _node(d, "pve-1").update(alias="10.82.0.11/24"),
        "nodes[0].alias",
        "10.82.0.11/24",
    ),
    "alias with other prefix": (
        lambda d: _node(d, "pve-1").update(alias="10.81.0.11/16"),
        "nodes[0].alias",
        "10.81.0.11/16",
    ),
    "malformed alias CIDR": (
        lambda d: _node(d, "pve-1").update(alias="10.81.0.300/24"),
        "nodes[0].alias",
        "10.81.0.300/24",
    ),
    "alias without prefix": (
        lambda d: _node(d, "pve-1").update(alias="10.81.0.11"),
        "nodes[0].alias",
        "10.81.0.11",
    ),
    "malformed subnet": (lambda d: d["lab"].update(subnet="10.81.0.0/33"), "lab.subnet", "10.81.0.0/33"),
    "unknown role": (lambda d: _node(d, "pve-3").update(role="pve-server"), "nodes[2].role", "pve-server"),
    "one pve-host": (
        lambda d: (
            [_node(d, n).update(role="qdevice-witness") for n in ("pve-2", "pve-3")]
            and d["nodes"].__setitem__(slice(None), [_node(d, "pve-1"), _node(d, "pbs-witness")])
        ),
        "nodes",
        "['pve-1']",
    ),
    "qdevice without pve-host": (
        lambda d: d["nodes"].__setitem__(slice(None), [_node(d, "pbs-witness")]),
        "nodes[0].role",
        "qdevice-witness",
    ),
    "zero RAM": (lambda d: _node(d, "pve-1").update(ram_mb=0), "nodes[0].ram_mb", "0"),
    "negative disk": (lambda d: _node(d, "pbs-witness").update(disk_gb=-16), "nodes[3].disk_gb", "-16"),
    "RAM as text": (lambda d: _node(d, "pve-1").update(ram_mb="4G"), "nodes[0].ram_mb", "4G"),
    "after as a list": (
        lambda d: d["lab"]["startup"].update(after=["network-online.target"]),
        "lab.startup.after",
        "['network-online.target']",
    ),
    "after another target": (
        lambda d: d["lab"]["startup"].update(after="network.target"),
        "lab.startup.after",
        "network.target",
    ),
    "test_config enabled": (
        lambda d: _node(d, "pve-2").update(test_config={"enabled": True, "tests": []}),
        "nodes[1].test_config",
        "'enabled': True",
    ),
    "forbidden package": (
        lambda d: _add_package(d, "pve-1", "pve-manager"),
        "nodes[0].packages[7]",
        "pve-manager",
    ),
    "forbidden corosync": (
        lambda d: _add_package(d, "pbs-witness", "corosync"),
        "nodes[3].packages[7]",
        "corosync",
    ),
    "forbidden ceph family": (
        lambda d: _add_package(d, "pve-3", "ceph-common"),
        "nodes[2].packages[7]",
        "ceph-common",
    ),
    "assertion without on_vm": (
        lambda d: _assertion(d).pop("on_vm"),
        "custom_tests[0].assertions[0].on_vm",
        "None",
    ),
    "assertion on unknown vm": (
        lambda d: _assertion(d, 4, 1).update(on_vm="pve-9"),
        "custom_tests[4].assertions[1].on_vm",
        "pve-9",
    ),
    "assertion type vm_boots": (
        lambda d: _assertion(d, 1).update(type="vm_boots"),
        "custom_tests[1].assertions[0].type",
        "vm_boots",
    ),
    "assertion type service_running": (
        lambda d: _assertion(d, 2).update(type="service_running"),
        "custom_tests[2].assertions[0].type",
        "service_running",
    ),
    "second scenario": (
        lambda d: d["scenarios"].append(dict(d["scenarios"][0], name="again")),
        "scenarios",
        "again",
    ),
    "scenario tests not empty": (
        lambda d: d["scenarios"][0].update(tests=["x"]),
        "scenarios[0].tests",
        "['x']",
    ),
    "node name too long": (
        lambda d: _node(d, "pve-3").update(name="pve-3-with-a-long-name"),
        "nodes[2].name",
        "pve-3-with-a-long-name",
    ),
    "node name not a hostname": (lambda d: _node(d, "pve-3").update(name="PVE_3"), "nodes[2].name", "PVE_3"),
    "unknown node field": (lambda d: _node(d, "pve-1").update(ram_gb=4), "nodes[0].ram_gb", "4"),
    "connection to unknown node": (
        lambda d: d["connections"][0].update(to="pve-7"),
        "connections[0].to",
        "pve-7",
    ),
    "bad port": (lambda d: _assertion(d).update(port=70000), "custom_tests[0].assertions[0].port", "70000"),
    "second witness": (
        lambda d: d["nodes"].append(dict(_node(d, "pbs-witness"), name="w2", alias="10.81.0.21/24")),
        "nodes[4].role",
        "qdevice-witness",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rejected_with_file_field_and_value(case, raw_lab, write_lab):
    mutate, field, value = CASES[case]
    mutate(raw_lab)
    path = write_lab(raw_lab)
    with pytest.raises(LabError) as err:
        load_lab(path)
    message = str(err.value)
    assert message.startswith(f"{path}: "), message
    assert field in message, message
    assert value in message, message


def test_yaml_syntax_error_names_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("lab:\n  name: x\n  subnet: [10.81.0.0/24\n")
    with pytest.raises(LabError) as err:
        load_lab(path)
    assert str(path) in str(err.value) and "line" in str(err.value)


def test_missing_file_is_a_lab_error(tmp_path):
    with pytest.raises(LabError, match="cannot be read"):
        load_lab(tmp_path / "nope.yaml")


def test_select_unknown_node(lab):
    with pytest.raises(LabError, match="--node: 'pve-9'"):
        lab.select(["pve-9"])


def test_cli_error_has_no_traceback(raw_lab, write_lab):
    import subprocess
    import sys

    raw_lab["nodes"][0]["alias"] = "10.99.0.1/24"
    path = write_lab(raw_lab)
    res = subprocess.run(
        [sys.executable, "-m", "invoke", "render", "--lab", str(path)],
        capture_output=True,
        text=True,
        cwd=str(__import__("pvelab.paths").paths.ROOT),
    )
    assert res.returncode == 2
    assert "nodes[0].alias" in res.stderr and "10.99.0.1/24" in res.stderr
    assert "Traceback" not in res.stderr
