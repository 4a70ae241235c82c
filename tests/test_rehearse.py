"""Rehearsals: real corosync on the booted lab, the deployment steps, the quorum walk.

Each lab is booted once and serves the whole walk; the report is checked afterwards.
"""

import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pvelab.build.pipeline import build
from pvelab.checks.rehearse import rehearse, table
from pvelab.core.paths import LABS
from pvelab.labctl import down, status
from pvelab.model.artefacts import BuildManifest, Layout, RehearsalReport, sha256
from pvelab.model.labfile import load_lab
from pvelab.model.quorum import walk

pytestmark = [pytest.mark.boot, pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns, taps)")]


def built(lab):
    """The lab's artefacts as they are (built by earlier tests), else built now."""
    layout = Layout(lab.name)
    if not all(
        layout.manifest(n.name).exists() and layout.artefact(n.name, "qcow2").exists() for n in lab.nodes
    ):
        build(lab)
    return layout


# The 3-node lab's walk runs on the running lab of tests/test_running_lab.py (`rehearse --running`).
@pytest.mark.parametrize("lab_file", ["proxmox-2node-qdevice.yaml"])
def test_rehearsal_walks_every_quorum_case(lab_file):
    lab = load_lab(LABS / lab_file)
    layout = built(lab)
    before = {n.name: sha256(layout.artefact(n.name, "qcow2")) for n in lab.nodes}
    # --keep: the lab stays up at the end, findable by status and taken down by down
    try:
        report = rehearse(lab, media="qcow2", accel="auto", keep_going=True, keep=True)
        assert report.passed, table(report)
        kept = status(lab)
        assert kept["up"] and kept["cluster"] and kept["faults_in_force"] == []
        assert all(n["quorum"]["quorate"] for n in kept["nodes"].values() if "quorum" in n)
    finally:
        down(lab)
    assert not status(lab)["up"] and not Path(f"/run/netns/{kept['netns']}").exists()
    # every step of the model was walked, on every running member, with the raw tool output kept
    plan = walk(lab)
    assert [s.title for s in report.steps] == [s.title for s in plan]
    for got, want in zip(report.steps, plan, strict=True):
        assert {n.node for n in got.nodes} == set(want.expect)
        assert got.settle_seconds is not None and got.settle_seconds >= 0
        for n in got.nodes:
            assert (
                "Votequorum information" in n.quorumtool
                and n.observed["total_votes"] == n.expected["total_votes"]
            )
    # the 2-node partition window: right after the cut both halves are quorate until the
    # QDevice's vote on the cut-off side expires; measured (a timing, in a sanity range)
    cut = next(s for s in report.steps if any(e.startswith("cut") for e in s.events))
    print(f"2-node partition window: two writers for up to {cut.two_writers_seconds}s after the cut")
    assert cut.two_writers_seconds is not None and 0 < cut.two_writers_seconds < 120, table(report)
    assert not cut.two_writers_expected and "two partitions quorate at once" in table(report)
    assert any("kill" in e for s in report.steps for e in s.events)
    assert any("power-off" in e for s in report.steps for e in s.events)
    # the real tools agree: links up, qnetd sees every member; the lab's scenario passed on the real cluster
    assert report.checks and all(c["passed"] for c in report.checks.values())
    assert report.scenario is not None and report.scenario.passed
    # the built artefacts are untouched, and still carry no corosync package
    for n in lab.nodes:
        assert sha256(layout.artefact(n.name, "qcow2")) == before[n.name]
        manifest = BuildManifest.from_json(layout.manifest(n.name))
        assert not [p for p in manifest.packages if p.startswith(("corosync", "libcorosync", "libknet"))]
    # reports on disk read back as typed records; JUnit has one case per step and member
    out = layout.rehearsal_dir("qcow2")
    again = RehearsalReport.from_json(out / "report.json")
    assert again.passed and json.loads((out / "report.json").read_text())["passed"] is True
    cases = ET.parse(out / "junit.xml").getroot().findall("testcase")
    assert len([c for c in cases if c.get("classname", "").startswith("step ")]) == sum(
        len(s.expect) for s in plan
    )
    assert (out / "summary.txt").read_text().count("\n") > len(plan)
