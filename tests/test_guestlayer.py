"""The rehearsal's package layer: which node gets which packages, how a guest's dpkg state
is judged, and (image test) a real layer made over a real artefact, which stays untouched."""

import json
import os
import subprocess

import pytest

from pvelab.build.guestpkgs import missing
from pvelab.model.deploy import installs

QUERY = """corosync 3.1.9-2 ii
corosync-qdevice 3.0.3-2 ii
libknet1t64 1.30-1 rc
"""


def test_members_get_corosync_and_the_witness_qnetd(lab):
    got = installs(lab)
    assert got == {
        "pve-1": [("corosync", "corosync-qdevice")],
        "pve-2": [("corosync", "corosync-qdevice")],
        "pve-3": [("corosync", "corosync-qdevice")],
        "pbs-witness": [("corosync-qnetd",)],
    }


def test_a_package_counts_only_when_installed_at_the_wanted_version():
    want = {"corosync": "3.1.9-2", "corosync-qdevice": "3.0.3-2"}
    assert missing(want, QUERY) == []
    assert missing({**want, "corosync": "3.1.9-3"}, QUERY) == ["corosync 3.1.9-3"]
    assert missing({"libknet1t64": "1.30-1"}, QUERY) == ["libknet1t64 1.30-1"]  # removed, config kept
    assert missing({"corosync-qnetd": "3.0.3-2"}, QUERY) == ["corosync-qnetd 3.0.3-2"]
    assert missing(want, "") == ["corosync 3.1.9-2", "corosync-qdevice 3.0.3-2"]


def test_media_without_an_overlay_get_no_layer(lab):
    from pvelab.build.guestlayer import layers
    from pvelab.model.media import MEDIA

    for name in ("iso", "usb", "install", "netboot"):
        assert layers(lab, MEDIA[name], {"x": None}, None) == {}  # decided before any work
    assert layers(lab, MEDIA["qcow2"], {}, None) == {}


@pytest.mark.image
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (loop devices, FUSE, chroot)")
def test_a_layer_holds_the_packages_disabled_and_leaves_the_artefact_alone(lab, tmp_path):
    """Made on the host over the witness's real qcow2: qemu-img sees the artefact as its
    backing file, the artefact's bytes are unchanged, the layer's root has the packages
    installed (dpkg's own state) with their units disabled, and a second call reuses it."""
    from pvelab.build.disk import loop_disk, mounted
    from pvelab.build.guestlayer import ROOT_PARTITION, layers, raw_view
    from pvelab.build.pipeline import build
    from pvelab.checks.rehearse import guest_packages
    from pvelab.core.run import Steps
    from pvelab.model.artefacts import Layout, sha256
    from pvelab.model.media import MEDIA

    layout = Layout(lab.name)
    if not all(layout.manifest(n.name).exists() for n in lab.nodes):
        build(lab)
    witness = lab.node("pbs-witness")
    artefact = layout.artefact(witness.name, "qcow2")
    before = sha256(artefact)
    steps = Steps("layer-test", tmp_path / "layer.log")
    packages = guest_packages(lab, steps)
    made = layers(lab, MEDIA["qcow2"], packages, steps)
    assert set(made) == {n.name for n in lab.nodes}
    path = made[witness.name]
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(path)], capture_output=True, check=True
        ).stdout
    )
    assert info["backing-filename"] == str(artefact.resolve()) and info["backing-filename-format"] == "qcow2"
    assert sha256(artefact) == before
    # look inside through a throwaway overlay of the layer (the cached layer is not written)
    peek = tmp_path / "peek.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(path), str(peek)], check=True
    )
    with (
        raw_view(peek, steps) as raw,
        loop_disk(raw, steps, partitions=ROOT_PARTITION) as dev,
        mounted(f"{dev}p{ROOT_PARTITION}", tmp_path / "root", steps, read_only=True) as root,
    ):
        status = (root / "var/lib/dpkg/status").read_text()
        wants = root / "etc/systemd/system/multi-user.target.wants"
        enabled = sorted(p.name for p in wants.iterdir())
        ca = (root / "etc/corosync/qnetd/nssdb/qnetd-cacert.crt").exists()
        policy = (root / "usr/sbin/policy-rc.d").exists()
    assert "Package: corosync-qnetd\nStatus: install ok installed" in status
    assert "corosync-qnetd.service" not in enabled and not policy
    assert ca  # the package's own postinst made qnetd's CA, as apt install does
    assert sha256(artefact) == before
    again = layers(lab, MEDIA["qcow2"], packages, steps)
    assert again == made and "package layer cached" in (tmp_path / "layer.log").read_text()
