"""Lab file validation: every rejected case names the file, the field path and the value."""

import pytest
from conftest import assert_refused

from pvelab.model.lab import LabError
from pvelab.model.labfile import load_lab


def test_default_lab_model(lab):
    assert [n.name for n in lab.nodes] == ["pve-1", "pve-2", "pve-3", "pbs-witness"]
    assert [n.nodeid for n in lab.members] == [1, 2, 3]
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
    from pvelab.model.quorum import table

    rows = {r["situation"]: (r["naive_votes"], r["quorate"]) for r in table(lab)}
    assert rows == {
        "all up": (4, True),
        "one node down": (3, True),
        "two nodes down, QDevice up": (2, False),
        "QDevice down, nodes up": (3, True),
    }
    # what corosync really counts (seen in `invoke rehearse`): ffsplit withholds the QDevice's
    # vote from a minority partition, so a lone survivor of three holds one vote, not two
    assert {r["situation"]: r["votes"] for r in table(lab)}["two nodes down, QDevice up"] == 1


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
    "name with trailing newline": (
        lambda d: _node(d, "pve-2").update(name="pve-2\n"),
        "nodes[1].name",
        "pve-2\\n",
    ),
    "lab name with trailing newline": (lambda d: d["lab"].update(name="lab\n"), "lab.name", "lab\\n"),
    "storage id injects a stanza": (
        lambda d: d["lab"]["storage"][0].update(id="x\ndir: evil"),
        "lab.storage[0].id",
        "x\\ndir: evil",
    ),
    "storage property injects a line": (
        lambda d: d["lab"]["storage"][0]["properties"].update(pool="rpool/data\n\tshared 1"),
        "lab.storage[0].properties.pool",
        "rpool/data",
    ),
    "storage id not an id": (
        lambda d: d["lab"]["storage"][0].update(id="Rpool Data"),
        "lab.storage[0].id",
        "Rpool Data",
    ),
    "storage property name": (
        lambda d: d["lab"]["storage"][0]["properties"].update({"bad key": 1}),
        "lab.storage[0].properties",
        "bad key",
    ),
    "qdevice outvotes the members": (
        lambda d: d["lab"]["qdevice"].update(votes=99),
        "lab.qdevice.votes",
        "99",
    ),
    "lms votes reach the members'": (
        lambda d: d["lab"]["qdevice"].update(algorithm="lms", votes=3),
        "lab.qdevice.votes",
        "3",
    ),
    "group not a name": (
        lambda d: d["lab"]["user"].update(groups=["sudo\nroot"]),
        "lab.user.groups[0]",
        "sudo",
    ),
    "no sudo among the groups": (
        lambda d: d["lab"]["user"].update(groups=[]),
        "lab.user.groups",
        "must include sudo",
    ),
    "other groups, no sudo": (
        lambda d: d["lab"]["user"].update(groups=["adm", "users"]),
        "lab.user.groups",
        "['adm', 'users']",
    ),
    "group with a space": (
        lambda d: d["lab"]["user"].update(groups=["wheel admins"]),
        "lab.user.groups[0]",
        "wheel",
    ),
    "password and hash": (
        lambda d: d["lab"]["user"].update(password_hash="$6$abc$" + "x" * 86),
        "lab.user",
        "password_hash",
    ),
    "hash not a crypt hash": (
        lambda d: d["lab"]["user"].pop("password") and d["lab"]["user"].update(password_hash="md5:1234"),
        "lab.user.password_hash",
        "md5:1234",
    ),
    "mac not a mac": (
        lambda d: d["nodes"][0].update(mac="52:54:00:81:00"),
        "nodes[0].mac",
        "52:54:00:81:00",
    ),
    "multicast mac": (
        lambda d: d["nodes"][1].update(mac="01:00:5e:00:00:01"),
        "nodes[1].mac",
        "unicast",
    ),
    "duplicate mac": (
        lambda d: [n.update(mac="52:54:00:aa:bb:cc") for n in d["nodes"][:2]],
        "nodes[1].mac",
        "also nodes[0]",
    ),
    "second witness": (
        lambda d: d["nodes"].append(dict(_node(d, "pbs-witness"), name="w2", alias="10.81.0.21/24")),
        "nodes[4].role",
        "qdevice-witness",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rejected_with_file_field_and_value(case, raw_lab, write_lab):
    assert_refused(raw_lab, CASES[case], write_lab)


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
        cwd=str(__import__("pvelab.core.paths").core.paths.ROOT),
    )
    assert res.returncode == 2
    assert "nodes[0].alias" in res.stderr and "10.99.0.1/24" in res.stderr
    assert "Traceback" not in res.stderr


def test_password_hash_instead_of_password(raw_lab, write_lab, monkeypatch):
    h = "$6$abcdefgh$" + "A" * 86
    del raw_lab["lab"]["user"]["password"]
    raw_lab["lab"]["user"]["password_hash"] = h
    lab = load_lab(write_lab(raw_lab))
    assert lab.user.crypt_hash() == h and lab.user.password is None
    monkeypatch.delenv("PVELAB_PASSWORD", raising=False)
    from pvelab.core.errors import PvelabError

    with pytest.raises(PvelabError, match="PVELAB_PASSWORD"):
        lab.user.login_password  # noqa: B018 - the property raises
    monkeypatch.setenv("PVELAB_PASSWORD", "secret")
    assert lab.user.login_password == "secret"


def test_plain_password_is_hashed_salted_and_stable(lab):
    import subprocess

    h = lab.user.crypt_hash()
    assert h.startswith("$6$") and "pve-cluster-ops" not in h and h == lab.user.crypt_hash()
    salt = h.split("$")[2]
    again = subprocess.run(
        ["openssl", "passwd", "-6", "-salt", salt, "pve-cluster-ops"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert again == h  # a real SHA-512 crypt of the lab password, as /etc/shadow checks it


@pytest.mark.parametrize(
    "name, content, problem",
    [
        ("utf16", "utf-16", "is UTF-16 text"),
        ("latin1", "latin-1", "is not UTF-8 text"),
        ("duplicate", "dup", "duplicate key 'release'"),
        ("deep", "deep", "nested deeper than"),
        ("bomb", "bomb", "alias uses"),
    ],
)
def test_hostile_files_are_one_short_error(name, content, problem, tmp_path):
    from pvelab.core.paths import DEFAULT_LAB

    text = DEFAULT_LAB.read_text().replace("# Lab:", "# Läb:")
    path = tmp_path / f"{name}.yaml"
    if content in ("utf-16", "latin-1"):
        path.write_bytes(text.encode(content))
    elif content == "dup":
        path.write_text(text.replace("  release: trixie\n", "  release: trixie\n  release: trixie\n"))
    elif content == "deep":
        path.write_text("a: " + "[" * 10000 + "]" * 10000 + "\n")
    else:  # a billion laughs: 9 levels of 9 aliases each
        lines = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
        lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 30)]
        path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LabError) as err:
        load_lab(path)
    message = str(err.value)
    assert problem in message and str(path) in message
    assert "\n" not in message and len(message) < 300, message


def test_fuzzed_lab_files_load_or_fail_cleanly(tmp_path):
    """Random mutations of the real lab file: each ends in a model or a LabError, never a traceback."""
    import random

    from pvelab.core.paths import DEFAULT_LAB

    rng = random.Random(20261130)
    original = DEFAULT_LAB.read_text()
    junk = [
        "\x00",
        "\n",
        "\t",
        ": ",
        "- ",
        "*",
        "&a ",
        "[",
        "]",
        "{",
        "}",
        "'",
        '"',
        "\\",
        "99999999999",
        "-1",
        "~",
        "!!binary ",
        "!!python/object ",
        "<<: ",
        "\u00e9",
        "\udcff",
        " #",
        "%",
        "@",
        "`",
        "?",
    ]
    outcomes = {"model": 0, "error": 0}
    for i in range(400):
        text = list(original)
        for _ in range(rng.randint(1, 6)):
            op, at = rng.random(), rng.randrange(len(text))
            if op < 0.4:
                text[at:at] = list(rng.choice(junk))
            elif op < 0.7:
                del text[at : at + rng.randint(1, 40)]
            else:
                text[at] = chr(rng.randrange(0x20, 0x7F))
        path = tmp_path / f"fuzz-{i}.yaml"
        path.write_bytes("".join(text).encode("utf-8", "surrogatepass"))
        try:
            load_lab(path)
            outcomes["model"] += 1
        except LabError as exc:
            assert "\n" not in str(exc) and len(str(exc)) < 600, str(exc)
            outcomes["error"] += 1
    assert outcomes["error"] > 100 and sum(outcomes.values()) == 400
