"""Corosync links in the lab model: the default single link, the redundant lab's two
links on two NICs, and every bad link declaration refused with one line."""

import copy
import subprocess
import sys

import pytest
import yaml
from conftest import assert_refused

from pvelab.build.render import network_files, render_files
from pvelab.core.paths import DEFAULT_LAB
from pvelab.model.labfile import load_lab

REDUNDANT = DEFAULT_LAB.parent / "proxmox-3node-redundant.yaml"


@pytest.fixture
def raw_redundant():
    return copy.deepcopy(yaml.safe_load(REDUNDANT.read_text()))


def test_the_default_lab_is_one_link_on_the_alias(lab):
    assert [(x.number, str(x.subnet), x.priority) for x in lab.links] == [(0, "10.81.0.0/24", None)]
    assert not lab.is_redundant and lab.link_networks() == ()
    for n in lab.members:
        assert [(x.number, x.ip, x.nic.default) for x in n.links] == [(0, n.ip, True)]
        assert network_files(lab, n) == []
    assert lab.witness.links == ()


def test_the_redundant_lab_model():
    lab = load_lab(REDUNDANT)
    assert lab.is_redundant
    assert [(x.number, str(x.subnet), x.priority) for x in lab.links] == [
        (0, "10.81.1.0/24", 20),
        (1, "10.81.0.0/24", 10),
    ]
    assert [x.number for x in lab.link_networks()] == [0]  # link1 shares the lab network
    for i, n in enumerate(lab.members, 1):
        assert n.link(0).ip == f"10.81.1.1{i}" and n.link(0).nic.mac == f"52:54:00:81:01:0{i}"
        assert n.link(1).ip == n.ip and n.link(1).nic.default
        assert [nic.mac for nic in n.nics] == [f"52:54:00:81:00:0{i}", f"52:54:00:81:01:0{i}"]
    assert [nic.mac for nic in lab.witness.nics] == ["52:54:00:81:00:04"]


def test_only_the_default_nic_has_dhcp_and_the_default_route():
    lab = load_lab(REDUNDANT)
    files = {f.path: f.content for f in network_files(lab, lab.node("pve-2"))}
    link0 = files["/etc/systemd/network/10-pvelab-link0.network"]
    assert "MACAddress=52:54:00:81:01:02" in link0 and "Address=10.81.1.12/24" in link0
    assert "DHCP=no" in link0 and "Gateway" not in link0 and "IgnoreCarrierLoss=yes" in link0
    # sorts before the base image's DHCP file, so networkd takes it for that NIC
    assert sorted(["10-pvelab-link0.network", "80-pvelab-dhcp.network"])[0].startswith("10-")
    assert "/etc/systemd/network/80-pvelab-dhcp.network.d/50-pvelab-links.conf" in files


def test_the_default_lab_renders_today_s_corosync_conf(lab):
    conf = next(f.content for f in render_files(lab, lab.node("pve-1")) if f.path == "/etc/pve/corosync.conf")
    assert "ring1_addr" not in conf and conf.count("interface {") == 1
    assert "  interface {\n    linknumber: 0\n  }\n" in conf
    assert "knet_link_priority" not in conf


def _link_nic(d, i, **nic):
    d["nodes"][i]["links"][0]["nic"] = nic


CASES = {
    "subnets overlap": (
        lambda d: d["lab"]["links"][0].update(subnet="10.81.0.128/25"),
        "lab.links[0].subnet",
        "10.81.0.128/25",
    ),
    "two links one subnet": (
        lambda d: d["lab"]["links"][1].update(subnet="10.81.1.0/24"),
        "lab.links[1].subnet",
        "overlaps link 0",
    ),
    "link1 without link0": (
        lambda d: d["lab"]["links"].pop(0) and [n.pop("links", None) for n in d["nodes"]],
        "lab.links",
        "without a link 0",
    ),
    "address outside its link": (
        lambda d: d["nodes"][1]["links"][0].update(address="10.81.2.12"),
        "nodes[1].links[0].address",
        "10.81.2.12",
    ),
    "one nic for two links": (
        lambda d: d["nodes"][0]["links"][1].update(nic={"mac": "52:54:00:81:01:01"}, address="10.81.0.99"),
        "nodes[0].links[1]",
        "two links",
    ),
    "not a mac": (
        lambda d: _link_nic(d, 2, mac="52:54:00:81:01"),
        "nodes[2].links[0].nic.mac",
        "52:54:00:81:01",
    ),
    "link nic mac taken": (
        lambda d: _link_nic(d, 2, mac="52:54:00:81:00:01"),
        "nodes[2].links[0].nic.mac",
        "also nodes[0].mac",
    ),
    "nic by nothing": (lambda d: _link_nic(d, 0), "nodes[0].links[0].nic", "mac or by name"),
    "bad interface name": (
        lambda d: _link_nic(d, 0, name="eth 1"),
        "nodes[0].links[0].nic.name",
        "eth 1",
    ),
    "missing link": (
        lambda d: d["nodes"][1]["links"].pop(1),
        "nodes[1].links",
        "missing link 1",
    ),
    "unknown link": (
        lambda d: d["nodes"][1]["links"][1].update(number=3),
        "nodes[1].links[1].number",
        "3",
    ),
    "duplicate link address": (
        lambda d: d["nodes"][1]["links"][0].update(address="10.81.1.11"),
        "nodes[1].links[0].address",
        "also nodes[0].links[0]",
    ),
    "witness on a link": (
        lambda d: d["nodes"][3].update(links=[{"number": 0, "address": "10.81.1.20"}]),
        "nodes[3].links",
        "only cluster members",
    ),
    "bad priority": (
        lambda d: d["lab"]["links"][0].update(priority=300),
        "lab.links[0].priority",
        "300",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_links_are_refused_with_file_field_and_value(case, raw_redundant, write_lab):
    assert_refused(raw_redundant, CASES[case], write_lab)


def test_a_bad_link_stops_a_task_with_one_line_and_exit_2(raw_redundant, write_lab):
    raw_redundant["lab"]["links"][0]["subnet"] = "10.81.0.0/23"
    path = write_lab(raw_redundant)
    res = subprocess.run(
        [sys.executable, "-m", "invoke", "render", "--lab", str(path)],
        capture_output=True,
        text=True,
        cwd=DEFAULT_LAB.parent.parent,
    )
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "lab.links[0].subnet" in lines[0] and "Traceback" not in res.stderr
