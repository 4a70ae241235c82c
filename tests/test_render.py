"""Rendered overlays: exactly the spec's files and values, and derived from the lab file."""

import json
import re

from pvelab.build.render import node_dirs, render_files, render_lab, render_node
from pvelab.model.labfile import load_lab

STORAGE_CFG = "zfspool: rpool-data\n\tpool rpool/data\n\tcontent images,rootdir\n\tsparse 1\n"
COMMON = {
    "/etc/hostname",
    "/etc/hosts",
    "/etc/resolv.conf",
    "/usr/local/sbin/pvelab-alias",
    "/etc/systemd/system/pvelab-alias.service",
}


def files_of(lab, name):
    return {f.path: f for f in render_files(lab, lab.node(name))}


def test_each_tree_has_exactly_the_spec_files(lab, tmp_path):
    for node, tree in zip(lab.nodes, render_lab(lab), strict=True):
        found = {"/" + p.relative_to(tree).as_posix() for p in tree.rglob("*") if p.is_file()}
        if node.name == "pbs-witness":
            assert found == COMMON | {
                "/etc/pvelab/qdevice-compat.json",
                "/root/qdevice-runbook.md",
                "/usr/lib/pvelab/qdevice_compat.py",
                "/usr/lib/systemd/system/qdevice-compat.service",
            }
        else:
            assert found == COMMON | {
                "/etc/pve/corosync.conf",
                "/etc/pve/storage.cfg",
                "/etc/pve/priv/pvelab-tokens.json",  # hashes only (tests/test_api.py)
                "/etc/pvelab/pve-compat.json",
                "/usr/lib/pvelab/pve_compat.py",
                "/usr/lib/pvelab/pve_api.py",
                "/usr/lib/pvelab/pve-ssl",  # makes the node's certificate at first boot
                "/usr/lib/systemd/system/pve-compat.service",
                "/usr/lib/systemd/system/pve-ssl.service",
            }
            dirs = node_dirs(lab, node)
            for d in (
                f"/etc/pve/nodes/{node.name}",
                "/etc/pve/storage",
                "/etc/pve/qemu-server",
                "/etc/pve/lxc",
                "/etc/pve/priv",
            ):
                assert d in dirs
                assert (tree / d.lstrip("/")).is_dir()


def test_storage_cfg_byte_exact(lab):
    assert files_of(lab, "pve-2")["/etc/pve/storage.cfg"].content == STORAGE_CFG


def _sections(conf):
    """Tiny parser of corosync's brace syntax: returns nested dict/list structure."""
    root, stack = {}, []
    cur = root
    for line in conf.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.endswith("{"):
            name = line[:-1].strip()
            new = {}
            cur.setdefault(name, []).append(new)
            stack.append(cur)
            cur = new
        elif line == "}":
            cur = stack.pop()
        else:
            key, value = (x.strip() for x in line.split(":", 1))
            assert key not in cur, f"duplicate key {key}"
            cur[key] = value
    assert not stack, "unbalanced braces"
    return root


def test_corosync_conf_values(lab):
    conf = files_of(lab, "pve-1")["/etc/pve/corosync.conf"].content
    assert all(re.match(r"^\s*(#.*|[a-z_0-9]+: \S.*|[a-z_0-9]+ \{|\}|)$", l) for l in conf.splitlines())
    s = _sections(conf)
    totem = s["totem"][0]
    assert totem["version"] == "2" and totem["cluster_name"] == "pve-cluster"
    assert totem["transport"] == "knet" and totem["interface"] == [{"linknumber": "0"}]
    q = s["quorum"][0]
    assert q["provider"] == "corosync_votequorum" and q["expected_votes"] == "4"
    dev = q["device"][0]
    assert (dev["model"], dev["votes"]) == ("net", "1")
    assert dev["net"] == [{"tls": "on", "host": "10.81.0.20", "algorithm": "ffsplit"}]
    nodes = [(n["name"], n["nodeid"], n["ring0_addr"]) for n in s["nodelist"][0]["node"]]
    assert nodes == [("pve-1", "1", "10.81.0.11"), ("pve-2", "2", "10.81.0.12"), ("pve-3", "3", "10.81.0.13")]
    # every PVE node carries the same cluster file
    assert conf == files_of(lab, "pve-3")["/etc/pve/corosync.conf"].content


def test_identity_hosts_resolv_alias(lab):
    f = files_of(lab, "pve-2")
    assert f["/etc/hostname"].content == "pve-2\n"
    hosts = f["/etc/hosts"].content
    for name, ip in (
        ("pve-1", "10.81.0.11"),
        ("pve-2", "10.81.0.12"),
        ("pve-3", "10.81.0.13"),
        ("pbs-witness", "10.81.0.20"),
    ):
        assert re.search(rf"^{re.escape(ip)}\s+{name}$", hosts, re.M)
    assert f["/etc/resolv.conf"].content.splitlines()[1:] == ["nameserver 1.1.1.1", "nameserver 8.8.8.8"]
    script = f["/usr/local/sbin/pvelab-alias"].content
    assert len(script.splitlines()) <= 25
    assert "IFACE=$(ip route show default | awk '{print $5; exit}')" in script
    assert 'ip link set "$IFACE" up || true' in script
    assert 'ip addr add 10.81.0.12/24 dev "$IFACE" || true' in script
    assert f["/usr/local/sbin/pvelab-alias"].mode == 0o755
    unit = f["/etc/systemd/system/pvelab-alias.service"].content
    assert "After=network-online.target\n" in unit and "Wants=network-online.target\n" in unit


def test_compat_identity(lab):
    cfg = json.loads(files_of(lab, "pve-3")["/etc/pvelab/pve-compat.json"].content)
    assert cfg["node"] == "pve-3" and cfg["http_port"] == 8006 and cfg["tcp_ports"] == [5404, 5405]
    assert cfg["cluster_status"][0] == {"type": "cluster", "name": "pve-cluster", "nodes": 3, "quorate": 1}
    w = json.loads(files_of(lab, "pbs-witness")["/etc/pvelab/qdevice-compat.json"].content)
    assert (w["port"], w["metrics_port"]) == (5403, 9165)


def test_runbook(lab):
    book = files_of(lab, "pbs-witness")["/root/qdevice-runbook.md"].content
    for needle in (
        "apt install corosync-qnetd",
        "pvecm qdevice setup 10.81.0.20",
        "TLS",
        "`lms`",
        "N-1",
        "ffsplit",
        "expected_votes: 4",
        "pvecm expected 1",
        "pvecm add 10.81.0.11",
        "ha-manager add vm:200 --group ha-default",
    ):
        assert needle in book, needle


def test_render_is_atomic_and_replaces(lab, tmp_path):
    out = tmp_path / "pve-1" / "overlay"
    render_node(lab, lab.node("pve-1"), out)
    (out / "stale").write_text("old")
    render_node(lab, lab.node("pve-1"), out)
    assert not (out / "stale").exists()
    assert not (tmp_path / "pve-1" / "overlay.tmp").exists()


def _five_node(raw):
    pve = [n for n in raw["nodes"] if n["role"] == "pve-host"]
    extra = []
    for i in (4, 5):
        n = dict(pve[0], name=f"pve-{i}", alias=f"10.81.0.{10 + i}/24")
        extra.append(n)
    raw["nodes"] = pve + extra + [n for n in raw["nodes"] if n["role"] != "pve-host"]
    return raw


def test_five_node_variant(raw_lab, write_lab):
    lab = load_lab(write_lab(_five_node(raw_lab)))
    assert lab.expected_votes == 6 and lab.quorum == 4
    s = _sections(files_of(lab, "pve-5")["/etc/pve/corosync.conf"].content)
    nodes = [(n["name"], n["nodeid"], n["ring0_addr"]) for n in s["nodelist"][0]["node"]]
    assert nodes == [(f"pve-{i}", str(i), f"10.81.0.{10 + i}") for i in range(1, 6)]
    assert s["quorum"][0]["expected_votes"] == "6"
    hosts = files_of(lab, "pbs-witness")["/etc/hosts"].content
    assert "10.81.0.15\tpve-5" in hosts
    status = json.loads(files_of(lab, "pve-4")["/etc/pvelab/pve-compat.json"].content)["cluster_status"]
    assert status[0]["nodes"] == 5 and [s["nodeid"] for s in status[1:]] == [1, 2, 3, 4, 5]


def test_two_node_plus_qdevice_variant(raw_lab, write_lab):
    raw_lab["nodes"] = [n for n in raw_lab["nodes"] if n["name"] != "pve-3"]
    raw_lab["connections"] = [c for c in raw_lab["connections"] if "pve-3" not in (c["from"], c["to"])]
    for t in raw_lab["scenarios"][0]["custom_tests"]:
        t["assertions"] = [a for a in t["assertions"] if a["on_vm"] != "pve-3"]
    lab = load_lab(write_lab(raw_lab))
    assert lab.expected_votes == 3
    s = _sections(files_of(lab, "pve-1")["/etc/pve/corosync.conf"].content)
    assert s["quorum"][0]["expected_votes"] == "3" and "device" in s["quorum"][0]
    assert len(s["nodelist"][0]["node"]) == 2
