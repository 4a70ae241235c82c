"""The rendered corosync.conf is accepted by the real corosync parser (`corosync -t`).

corosync needs one nodelist address to be local and reads /etc/corosync/authkey when
secauth is on. Each check runs in private network and mount namespaces (`unshare`):
the node's address goes on that namespace's loopback and a throwaway authkey on a
tmpfs over /etc/corosync, so the host's interfaces and files are never touched.
"""

import os
import shutil
import subprocess

import pytest

from pvelab.build.render import render_files
from pvelab.core.paths import DEFAULT_LAB
from pvelab.model.labfile import load_lab

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for unshare")

CHECK = r"""
set -e
mount -t tmpfs tmpfs /etc/corosync
dd if=/dev/urandom of=/etc/corosync/authkey bs=256 count=1 2>/dev/null
chmod 400 /etc/corosync/authkey
ip link set lo up
for a in $1; do ip addr add "$a/32" dev lo; done
exec corosync -t -c "$2"
"""


def corosync_t(conf_text, local_ip, tmp_path):
    """``local_ip``: the address (or space-separated addresses) the host owns."""
    if shutil.which("corosync") is None:
        pytest.fail("corosync is not installed: run scripts/setup")
    conf = tmp_path / "corosync.conf"
    conf.write_text(conf_text)
    script = tmp_path / "check.sh"
    script.write_text(CHECK)
    return subprocess.run(
        ["unshare", "--net", "--mount", "--propagation", "private", "sh", str(script), local_ip, str(conf)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def conf_of(lab, node="pve-1"):
    return next(f.content for f in render_files(lab, lab.node(node)) if f.path == "/etc/pve/corosync.conf")


@pytest.mark.parametrize("node", ["pve-1", "pve-2", "pve-3"])
def test_real_parser_accepts_rendered_conf(lab, node, tmp_path):
    res = corosync_t(conf_of(lab, node), lab.node(node).ip, tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr


def test_real_parser_rejects_duplicate_nodeid(lab, tmp_path):
    broken = conf_of(lab).replace("nodeid: 2", "nodeid: 1")
    res = corosync_t(broken, "10.81.0.11", tmp_path)
    assert res.returncode != 0
    assert "appears twice" in res.stdout + res.stderr


def test_real_parser_rejects_unbalanced_braces(lab, tmp_path):
    broken = conf_of(lab).replace("  interface {\n", "  interface {\n  {\n", 1)
    res = corosync_t(broken, "10.81.0.11", tmp_path)
    assert res.returncode != 0


def test_real_parser_needs_a_local_address(lab, tmp_path):
    # The same file on a host that owns none of the ring addresses is refused: this is
    # why the check puts the node's address on the namespace's loopback.
    res = corosync_t(conf_of(lab), "10.81.0.99", tmp_path)
    assert res.returncode != 0


def test_real_parser_accepts_five_node_variant(raw_lab, write_lab, tmp_path):
    pve = [n for n in raw_lab["nodes"] if n["role"] == "pve-host"]
    raw_lab["nodes"] += [dict(pve[0], name=f"pve-{i}", alias=f"10.81.0.{10 + i}/24") for i in (4, 5)]
    lab = load_lab(write_lab(raw_lab))
    res = corosync_t(conf_of(lab, "pve-5"), "10.81.0.15", tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr


REDUNDANT_LAB = DEFAULT_LAB.parent / "proxmox-3node-redundant.yaml"


@pytest.mark.parametrize("node", ["pve-1", "pve-2", "pve-3"])
def test_real_parser_accepts_the_redundant_links(node, tmp_path):
    lab = load_lab(REDUNDANT_LAB)
    conf = conf_of(lab, node)
    assert conf.count("ring0_addr: 10.81.1.") == 3 and conf.count("ring1_addr: 10.81.0.") == 3
    assert conf.count("interface {") == 2 and "knet_link_priority: 20" in conf
    own = " ".join(link.ip for link in lab.node(node).links)
    res = corosync_t(conf, own, tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr


def test_real_parser_rejects_a_node_missing_its_second_link(tmp_path):
    # corosync wants every node on every link: a ring1_addr gone from one node is refused
    lab = load_lab(REDUNDANT_LAB)
    broken = conf_of(lab).replace("    ring1_addr: 10.81.0.13\n", "")
    res = corosync_t(broken, "10.81.1.11 10.81.0.11", tmp_path)
    assert res.returncode != 0, res.stdout + res.stderr
