"""Publishing: layout, checksums, manifest, gate, atomicity under failure and kill, retention, SVG."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest

from pvelab.build import sbom
from pvelab.core.paths import ROOT
from pvelab.model.artefacts import (
    ArtefactInfo,
    ArtefactKind,
    ArtefactRef,
    BootReport,
    BuildManifest,
    Layout,
    ScenarioResult,
    TestResult,
)
from pvelab.model.media import MEDIA
from pvelab.release.diagram import topology_svg
from pvelab.release.publish import PublishError, publish


def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def report_dir(lab, media, firmware):
    return Layout(lab.name).boot_test_dir(media, firmware)


def node_dir(lab, name):
    return Layout(lab.name).node_dir(name)


@pytest.fixture
def built(lab):
    return make_built(lab)


def make_built(lab):
    """Small stand-ins for built artefacts, their build manifests and passing boot tests."""
    shas = {}
    for n in lab.nodes:
        d = node_dir(lab, n.name)
        d.mkdir(parents=True)
        arts = {}
        for kind in ArtefactKind:
            p = Layout(lab.name).artefact(n.name, kind)
            p.write_bytes(f"{kind} of {n.name}\n".encode() * 1000)
            arts[p.name] = ArtefactInfo(size=p.stat().st_size, sha256=_sha(p))
            shas[(n.name, kind)] = _sha(p)
        manifest = BuildManifest(
            lab=lab.name,
            node=n.name,
            role=n.role,
            alias=str(n.alias),
            ram_mb=n.ram_mb,
            disk_gb=n.disk_gb,
            artefacts=arts,
            base_key="k",
            elements=["debian-minimal", "pvelab-base"],
            overlay_files=[],
            enabled_units=[],
            packages={},
            kernel="6.12.0-test",
            tools={"diskimage-builder": "3.43.0", "pycdlib": "1.22.0"},
            git_commit="abc123",
            built_at="2026-11-30T00:00:00Z",
            build_seconds={"qcow2": 1.0},
        )
        (d / "manifest.json").write_text(manifest.to_json())
        Layout(lab.name).sbom(n.name).write_text(sbom.node_sbom(manifest, {}, 0, lab.release))
    for media, firmware in (("qcow2", "bios"), ("iso", "bios"), ("iso", "uefi"), ("install", "bios")):
        write_report(lab, media, firmware, shas, passed=True)
    return shas


def write_report(lab, media, firmware, shas, passed, lab_name=None):
    out = report_dir(lab, media, firmware)
    out.mkdir(parents=True, exist_ok=True)
    kind = MEDIA[media].artefact
    result = ScenarioResult(
        lab.scenario.name, passed, [TestResult(t.name, passed, 0.1) for t in lab.scenario.custom_tests], 1.0
    )
    report = BootReport(
        lab=lab_name or lab.name,
        lab_file=str(lab.path),
        media=media,
        firmware=firmware,
        accel="tcg",
        accel_reason="requested",
        artefacts={n.name: ArtefactRef("x", shas[(n.name, kind)]) for n in lab.nodes},
        result=result,
        ssh_ready_seconds={"pve-1": 150.0},
        wall_seconds=200.0,
        lab_sha256=_sha(lab.path),
    )
    (out / "report.json").write_text(report.to_json())
    (out / "junit.xml").write_text('<?xml version="1.0"?><testsuite name="x" tests="0"/>')


def test_release_layout_checksums_manifest(lab, built, tmp_path):
    rel = publish(lab, tmp_path / "rel", now=time.mktime((2026, 11, 24, 3, 0, 0, 0, 0, 0)))
    labdir = tmp_path / "rel" / lab.name
    assert rel.path.parent == labdir and len(rel.name) == 16 and rel.name[8] == "T"
    names = sorted(p.relative_to(rel.path).as_posix() for p in rel.path.rglob("*") if p.is_file())
    for n in lab.nodes:
        assert f"{n.name}.qcow2" in names and f"{n.name}.iso" in names and f"{n.name}-installer.iso" in names
    for f in (
        "SHA256SUMS",
        "manifest.json",
        "README.md",
        "topology.svg",
        "boot-test/qcow2-bios.junit.xml",
        "boot-test/iso-uefi.report.json",
    ):
        assert f in names
    res = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=rel.path, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count(": OK") == len(names) - 1
    m = json.loads((rel.path / "manifest.json").read_text())
    assert m["lab"] == lab.name and m["release"] == rel.name and m["git_commit"] == "abc123"
    assert [n["name"] for n in m["nodes"]] == [n.name for n in lab.nodes]
    pve1 = m["nodes"][0]
    assert pve1["role"] == "pve-host" and pve1["alias"] == "10.81.0.11/24"
    assert pve1["files"]["iso"]["sha256"] == built[("pve-1", "iso")]
    assert set(pve1["files"]["iso"]["boot_tests"]) == {"iso-bios", "iso-uefi"}
    assert m["versions"]["diskimage-builder"] == "3.43.0" and m["versions"]["kernel"] == "6.12.0-test"
    assert "QEMU" in m["versions"]["qemu"]
    assert m["boot_tests"]["qcow2-bios"]["tests"]["Mesh reachability"] == "pass"
    assert m["elements"] == ["debian-minimal", "pvelab-base"]
    assert (labdir / "latest").resolve() == rel.path and (labdir / "LATEST").read_text().strip() == rel.name
    readme = (rel.path / "README.md").read_text()
    for needle in (
        "BMC virtual media",
        "UEFI",
        "USB",
        "ops",
        "pve-cluster-ops",
        "pvecm create pve-cluster",
        "pvecm add 10.81.0.11",
        "pvecm qdevice setup 10.81.0.20",
        "ha-manager add vm:200",
        "real fencing",
        "pvecm expected 1",
        "not a Proxmox installation",
    ):
        assert needle in readme, needle


def test_netboot_is_published_on_request_behind_the_same_gate(lab, built, tmp_path):
    kinds = ("netboot",)  # the ISOs the bundles fetch come along
    with pytest.raises(PublishError) as err:
        publish(lab, tmp_path / "rel", kinds=kinds)
    assert "pve-1: pve-1-netboot.tar: no boot test ran on this exact file" in str(err.value)
    assert "--media netboot`" in str(err.value)
    write_report(lab, "netboot", "uefi-sb", built, passed=True)
    rel = publish(lab, tmp_path / "rel", kinds=kinds)
    names = {p.relative_to(rel.path).as_posix() for p in rel.path.rglob("*") if p.is_file()}
    assert {f"{n.name}-netboot.tar" for n in lab.nodes} <= names
    assert {f"{n.name}{s}" for n in lab.nodes for s in (".iso", "-installer.iso")} <= names
    assert not {f"{n.name}.qcow2" for n in lab.nodes} & names
    assert {"netboot/dnsmasq.conf", "grub/grub.cfg"} <= names
    m = json.loads((rel.path / "manifest.json").read_text())
    assert m["nodes"][0]["files"]["netboot"]["boot_tests"] == ["netboot-uefi-sb"]
    readme = (rel.path / "README.md").read_text()
    assert "## Network boot" in readme and all(f"`{n.name}`: `{n.mac}`" in readme for n in lab.nodes)
    assert "dhcp-host=52:54:00:81:00:04,set:pbs-witness" in (rel.path / "netboot/dnsmasq.conf").read_text()
    from pvelab.release.verify import verify

    checked = verify(rel.path)  # the bundles are provenance subjects like the other artefacts
    assert checked.ok, checked.problems
    import base64

    envelope = json.loads((rel.path / "provenance/pve-1.intoto.json").read_text())
    statement = json.loads(base64.b64decode(envelope["payload"]))
    assert "pve-1-netboot.tar" in {s["name"] for s in statement["subject"]}, statement["subject"]
    default = publish(lab, tmp_path / "rel2")  # not asked for: no bundle, no serving files
    assert not list(default.path.glob("*-netboot.tar")) and not (default.path / "netboot").exists()
    assert "## Network boot" not in (default.path / "README.md").read_text()


def test_gate_refuses_tampered_artefact(lab, built, tmp_path):
    p = node_dir(lab, "pve-2") / "pve-2.iso"
    p.write_bytes(p.read_bytes() + b"x")
    with pytest.raises(PublishError, match=r"pve-2: pve-2\.iso sha256 .* does not match"):
        publish(lab, tmp_path / "rel")
    assert not (tmp_path / "rel" / lab.name / "latest").exists()


def test_gate_refuses_untested_and_failed(lab, built, tmp_path):
    os.remove(report_dir(lab, "iso", "bios") / "report.json")
    os.remove(report_dir(lab, "iso", "uefi") / "report.json")
    with pytest.raises(PublishError, match=r"pve-1: pve-1\.iso: no boot test ran on this exact file"):
        publish(lab, tmp_path / "rel")
    write_report(lab, "iso", "bios", built, passed=False)
    with pytest.raises(PublishError, match=r"pve-3\.iso: its boot test \(iso-bios\) did not pass"):
        publish(lab, tmp_path / "rel")


def test_gate_refuses_report_for_other_bytes(lab, built, tmp_path):
    other = dict(built)
    other[("pbs-witness", "qcow2")] = "0" * 64
    write_report(lab, "qcow2", "bios", other, passed=True)
    with pytest.raises(PublishError, match=r"pbs-witness: pbs-witness\.qcow2: no boot test"):
        publish(lab, tmp_path / "rel")


def test_gate_refuses_missing(lab, built, tmp_path):
    os.remove(node_dir(lab, "pve-3") / "pve-3.qcow2")
    with pytest.raises(PublishError, match=r"pve-3: .*pve-3\.qcow2 missing"):
        publish(lab, tmp_path / "rel")


def test_gate_refuses_report_of_another_lab(lab, built, tmp_path):
    write_report(lab, "qcow2", "bios", built, passed=True, lab_name="some-other-lab")
    with pytest.raises(PublishError, match=r"boot-test/qcow2-bios: report is of lab 'some-other-lab'"):
        publish(lab, tmp_path / "rel")


def test_gate_refuses_unreadable_records(lab, built, tmp_path):
    (report_dir(lab, "iso", "uefi") / "report.json").write_text("{not json")
    with pytest.raises(PublishError, match=r"iso-uefi/report.json: is not valid JSON"):
        publish(lab, tmp_path / "rel")
    (report_dir(lab, "iso", "uefi") / "report.json").unlink()
    manifest = node_dir(lab, "pve-1") / "manifest.json"
    data = json.loads(manifest.read_text())
    del data["artefacts"]
    manifest.write_text(json.dumps(data))
    with pytest.raises(PublishError, match=r"pve-1/manifest.json: missing artefacts"):
        publish(lab, tmp_path / "rel")


def test_default_destination_is_the_labs_build_folder(lab, built):
    rel = publish(lab)
    assert rel.path.parent == Layout(lab.name).releases


@pytest.mark.parametrize("step", ["copy", "metadata", "provenance", "rename"])
def test_injected_failure_leaves_no_partial_release(lab, built, tmp_path, monkeypatch, step):
    first = publish(lab, tmp_path / "rel")
    monkeypatch.setenv("PVELAB_PUBLISH_FAIL_AT", step)
    with pytest.raises(PublishError, match="injected"):
        publish(lab, tmp_path / "rel", force=True)
    labdir = tmp_path / "rel" / lab.name
    assert sorted(p.name for p in labdir.iterdir() if not p.name.startswith(".")) == sorted(
        [first.name, "latest", "LATEST"]
    )
    assert (labdir / "latest").resolve() == first.path
    monkeypatch.delenv("PVELAB_PUBLISH_FAIL_AT")
    time.sleep(1.1)
    second = publish(lab, tmp_path / "rel", force=True)  # re-run is safe
    assert (labdir / "latest").resolve() == second.path


@pytest.mark.parametrize("step", ["copy", "rename", "latest"])
def test_kill_minus_9_midway(lab, built, tmp_path, step):
    dest = tmp_path / "rel"
    first = publish(lab, dest)
    time.sleep(1.1)
    marker = tmp_path / "paused"
    env = dict(os.environ, PVELAB_PUBLISH_PAUSE_AT=step, PVELAB_PUBLISH_PAUSE_MARKER=str(marker))
    code = (
        "from pvelab.model.labfile import load_lab; from pvelab.release.publish import publish; "
        f"publish(load_lab({str(lab.path)!r}), {str(dest)!r}, force=True)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, "publish ended before reaching the pause"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    labdir = dest / lab.name
    visible = sorted(p.name for p in labdir.iterdir() if not p.name.startswith("."))
    if step == "latest":  # the release was complete; only the pointer had not moved yet
        assert len(visible) == 4 and (labdir / "latest").resolve() == first.path
        newest = max(p for p in labdir.iterdir() if p.name[0].isdigit())
        assert subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=newest).returncode == 0
    else:
        assert visible == sorted([first.name, "latest", "LATEST"])
        assert (labdir / "latest").resolve() == first.path
    time.sleep(1.1)
    rel = publish(lab, dest, force=True)
    assert (labdir / "latest").resolve() == rel.path
    assert not list(labdir.glob(".pvelab-stage-*"))


def test_a_pass_with_another_lab_file_does_not_count(lab, built, tmp_path):
    report = report_dir(lab, "qcow2", "bios") / "report.json"
    data = json.loads(report.read_text())
    data["lab_sha256"] = "0" * 64  # ran with an edited lab file (another scenario, say)
    report.write_text(json.dumps(data))
    with pytest.raises(PublishError, match=r"boot-test/qcow2-bios: ran with another version of"):
        publish(lab, tmp_path / "rel")


def test_identical_artefacts_publish_nothing_new(lab, built, tmp_path):
    """A second publish of the same bytes writes nothing and says which release has them;
    --force publishes anyway."""
    first = publish(lab, tmp_path / "rel")
    time.sleep(1.05)
    again = publish(lab, tmp_path / "rel")
    assert not again.new and again.path == first.path
    labdir = tmp_path / "rel" / lab.name
    assert [p.name for p in labdir.iterdir() if p.name[0].isdigit()] == [first.name]
    forced = publish(lab, tmp_path / "rel", force=True)
    assert forced.new and forced.path != first.path and (labdir / "latest").resolve() == forced.path
    out = subprocess.run(
        [sys.executable, "-m", "invoke", "publish", "--dest", str(tmp_path / "rel"), "--lab", str(lab.path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and f"identical to release {forced.path}" in out.stdout, (
        out.stdout + out.stderr
    )


def test_retention_keeps_newest(lab, built, tmp_path):
    made = []
    for _i in range(4):
        made.append(publish(lab, tmp_path / "rel", keep=2, force=True).name)
        time.sleep(1.05)
    labdir = tmp_path / "rel" / lab.name
    left = sorted(p.name for p in labdir.iterdir() if p.name[0].isdigit())
    assert left == sorted(made)[-2:]
    assert (labdir / "latest").resolve().name == made[-1]
    with pytest.raises(PublishError, match="--keep"):
        publish(lab, tmp_path / "rel", keep=0)


def test_topology_svg(lab):
    root = ET.fromstring(topology_svg(lab))
    ns = {"s": "http://www.w3.org/2000/svg"}
    nodes = root.findall(".//s:g[@class='node']", ns)
    assert [g.get("id") for g in nodes] == ["node-pve-1", "node-pve-2", "node-pve-3", "node-pbs-witness"]
    assert all(len(g.findall("s:rect", ns)) == 1 for g in nodes)
    r = nodes[3].find("s:rect", ns)
    assert (
        float(r.get("x")) + float(r.get("width")) / 2 == 350
        and float(r.get("y")) + float(r.get("height")) / 2 == 280
    )
    labels = [t.text for t in root.findall(".//s:g[@id='links']/s:text", ns)]
    assert labels.count("8006/5404/5405") == 3 and labels.count("5403") == 3
    assert len(root.findall(".//s:g[@id='links']/s:path", ns)) == len(lab.connections)


@pytest.mark.parametrize("lab_file", ["proxmox-3node-cluster.yaml", "proxmox-2node-qdevice.yaml"])
def test_every_link_clears_the_other_boxes(lab_file):
    """pve-1 to pve-3 would run under pve-2 as a straight line: it bows around it."""
    from pvelab.model.labfile import load_lab
    from pvelab.release.diagram import BOX_H, BOX_W, _bezier, route

    lab = load_lab(ROOT / "labs" / lab_file)
    for c in lab.connections:
        p0, ctrl, p2 = route(lab, c)
        for n in lab.nodes:
            if n.name in (c.source, c.target):
                continue
            for i in range(4, 37):
                x, y = _bezier(p0, ctrl, p2, i / 40)
                assert not (abs(x - n.diagram[0]) <= BOX_W / 2 and abs(y - n.diagram[1]) <= BOX_H / 2), (
                    c,
                    n.name,
                )
    straight = [
        c
        for c in lab.connections
        if route(lab, c)[1]
        != tuple(
            (a + b) / 2 for a, b in zip(lab.node(c.source).diagram, lab.node(c.target).diagram, strict=True)
        )
    ]
    assert [(c.source, c.target) for c in straight] == (
        [("pve-1", "pve-3")] if lab_file.startswith("proxmox-3node") else []
    )


def test_gpg_signature(lab, built, tmp_path, monkeypatch):
    if subprocess.run(["which", "gpg"], capture_output=True).returncode != 0:
        pytest.skip("gpg not installed")
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    monkeypatch.setenv("GNUPGHOME", str(home))
    subprocess.run(
        [
            "gpg",
            "--batch",
            "--passphrase",
            "",
            "--quick-gen-key",
            "pvelab-test@example.invalid",
            "ed25519",
            "sign",
            "1d",
        ],
        check=True,
        capture_output=True,
    )
    try:
        rel = publish(lab, tmp_path / "rel", gpg_key="pvelab-test@example.invalid")
        res = subprocess.run(
            ["gpg", "--verify", str(rel.path / "SHA256SUMS.asc"), str(rel.path / "SHA256SUMS")],
            capture_output=True,
            text=True,
        )
        assert res.returncode == 0, res.stderr
    finally:  # gpg leaves an agent running for this home: stop it
        subprocess.run(["gpgconf", "--kill", "gpg-agent"], capture_output=True)


def test_release_files_are_copies_not_links(lab, built, tmp_path):
    rel = publish(lab, tmp_path / "rel")
    src = node_dir(lab, "pve-1") / "pve-1.qcow2"
    dst = rel.path / "pve-1.qcow2"
    assert os.stat(dst).st_ino != os.stat(src).st_ino and os.stat(dst).st_nlink == 1
    src.write_bytes(b"changed in build/ after the release")  # a later build or a careless edit
    res = subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=rel.path, capture_output=True)
    assert res.returncode == 0


def test_concurrent_publish_refuses_and_spares_the_other(lab, built, tmp_path):
    import fcntl

    labdir = tmp_path / "rel" / lab.name
    labdir.mkdir(parents=True)
    other = labdir / ".pvelab-stage-20260101T000000Z-999999"  # another publish's staging folder
    other.mkdir()
    with open(labdir / ".pvelab-publish.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # that publish holds the destination
        with pytest.raises(PublishError, match=r"another publish to .* is running"):
            publish(lab, tmp_path / "rel")
        assert other.exists()
    publish(lab, tmp_path / "rel")  # once it is gone, its leftovers are ours to clean
    assert not other.exists()


def test_only_pvelab_folders_are_cleaned_or_retired(lab, built, tmp_path):
    labdir = tmp_path / "rel" / lab.name
    labdir.mkdir(parents=True)
    user_tmp = labdir / ".tmp-notes"
    user_tmp.mkdir()
    lookalike = labdir / "20200101T000000Z"  # release-shaped, but not written by pvelab
    lookalike.mkdir()
    (lookalike / "precious.txt").write_text("keep me")
    for _ in range(3):
        publish(lab, tmp_path / "rel", keep=1, force=True)
        time.sleep(1.05)
    assert user_tmp.exists() and (lookalike / "precious.txt").read_text() == "keep me"
    ours = [p for p in labdir.iterdir() if p.name[0].isdigit() and p != lookalike]
    assert len(ours) == 1 and (labdir / "latest").resolve() == ours[0]


def test_destination_that_is_a_file(lab, built, tmp_path):
    (tmp_path / "rel").mkdir()
    (tmp_path / "rel" / lab.name).write_text("not a folder")
    with pytest.raises(PublishError, match="exists and is not a folder"):
        publish(lab, tmp_path / "rel")


def test_gpg_failures_are_one_clear_line(lab, built, tmp_path, monkeypatch):
    monkeypatch.setenv("GNUPGHOME", str(tmp_path / "empty-gnupg"))
    (tmp_path / "empty-gnupg").mkdir(mode=0o700)
    if subprocess.run(["which", "gpg"], capture_output=True).returncode == 0:
        with pytest.raises(PublishError, match=r"--gpg-key nobody@example\.invalid: no such secret key"):
            publish(lab, tmp_path / "rel", gpg_key="nobody@example.invalid")
        assert not (tmp_path / "rel").exists()  # refused before anything was copied
        subprocess.run(["gpgconf", "--kill", "gpg-agent"], capture_output=True)
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    with pytest.raises(PublishError, match="gpg is not installed"):
        publish(lab, tmp_path / "rel", gpg_key="nobody@example.invalid")
    assert not (tmp_path / "rel" / lab.name / "latest").exists()


def test_gate_refuses_an_image_holding_the_plain_password(lab, built, tmp_path):
    mpath = node_dir(lab, "pbs-witness") / "manifest.json"
    manifest = BuildManifest.from_json(mpath)
    leaked = __import__("dataclasses").replace(manifest, password_found=["etc/dib-manifests/dib_environment"])
    mpath.write_text(leaked.to_json())
    with pytest.raises(
        PublishError, match=r"pbs-witness: the lab's plain password is in the image: etc/dib-manifests"
    ):
        publish(lab, tmp_path / "rel")


def test_readme_never_prints_a_non_default_password(raw_lab, write_lab, tmp_path, monkeypatch):
    from pvelab.model.labfile import load_lab

    raw_lab["lab"]["user"]["password"] = "s3cret-of-this-lab"
    other = load_lab(write_lab(raw_lab))
    monkeypatch.setenv("PVELAB_BUILD_DIR", str(tmp_path / "build2"))
    make_built(other)
    rel = publish(other, tmp_path / "rel")
    readme = (rel.path / "README.md").read_text()
    assert "s3cret-of-this-lab" not in readme and "not printed here" in readme
    assert not any("s3cret-of-this-lab" in p.read_text(errors="replace") for p in rel.path.rglob("*.json"))


def test_cli_keep_must_be_a_number(lab):
    res = subprocess.run(
        [sys.executable, "-m", "invoke", "publish", "--keep", "abc"], cwd=ROOT, capture_output=True, text=True
    )
    assert res.returncode == 2 and "--keep: 'abc': must be a whole number" in res.stderr
    assert "Traceback" not in res.stderr


def _commands(text):
    import re

    return re.findall(r"`(invoke [^`]+)`", text)


def check_invoke_command(cmd):
    """``cmd`` parses against the real task: every option exists, every medium and
    firmware is one the task accepts for that medium."""
    import shlex

    from invoke import Collection

    from pvelab.model.media import boot_combination

    sys.path.insert(0, str(ROOT))
    import tasks

    words = shlex.split(cmd)
    assert words[0] == "invoke"
    coll = Collection.from_module(tasks)
    task = coll[words[1]]
    names = {a.name.replace("_", "-") for a in task.get_arguments()}
    opts = {}
    i = 2
    while i < len(words):
        assert words[i].startswith("--"), (cmd, words[i])
        assert words[i][2:] in names, f"{cmd}: {words[i]} is not an option of `invoke {words[1]}`"
        opts[words[i][2:]] = words[i + 1]
        i += 2
    if "lab" in opts:
        assert os.path.exists(opts["lab"]), cmd
    if words[1] in ("boot-test", "rehearse"):
        boot_combination(opts.get("media", "qcow2"), opts.get("firmware", "bios"))
    return opts


def test_every_gate_message_names_a_command_that_exists(lab, built, tmp_path):
    import shutil

    shutil.rmtree(Layout(lab.name).root / "boot-test")
    with pytest.raises(PublishError) as err:
        publish(lab, tmp_path / "rel")
    cmds = set(_commands(str(err.value)))
    media = {check_invoke_command(c).get("media", "qcow2") for c in cmds}
    assert media == {"qcow2", "iso", "install"}, cmds  # the installer's names --media install
    write_report(lab, "install", "uefi-sb", built, passed=False)
    with pytest.raises(PublishError) as err:
        publish(lab, tmp_path / "rel")
    failed = [c for c in _commands(str(err.value)) if "--media install" in c]
    assert failed and all(check_invoke_command(c)["firmware"] == "uefi-sb" for c in failed), str(err.value)
    os.remove(Layout(lab.name).sbom("pve-2"))
    os.remove(Layout(lab.name).manifest("pve-3"))
    with pytest.raises(PublishError) as err:
        publish(lab, tmp_path / "rel")
    builds = [c for c in _commands(str(err.value)) if c.startswith("invoke build")]
    assert {check_invoke_command(c)["node"] for c in builds} == {"pve-2", "pve-3"}


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs: root")
def test_full_destination_keeps_the_previous_release(lab, built, tmp_path):
    """A publish that runs out of space on the destination: one line naming that file
    system, exit status 1 (DiskFull), the previous release and `latest` untouched, no
    staging folder or pointer file left."""
    from pvelab.core.errors import DiskFull

    probe = publish(lab, tmp_path / "probe")
    size = sum(p.stat().st_size for p in probe.path.rglob("*") if p.is_file())
    small = tmp_path / "small"
    small.mkdir()
    kib = size * 3 // 2 // 1024 + 64  # one release fits, two do not
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(small)], check=True)
    try:
        first = publish(lab, small, now=time.mktime((2026, 11, 24, 3, 0, 0, 0, 0, 0)))
        files = {p.relative_to(first.path): _sha(p) for p in first.path.rglob("*") if p.is_file()}
        labdir = small / lab.name
        latest = (labdir / "LATEST").read_text()
        with pytest.raises(DiskFull) as err:
            publish(lab, small, force=True)
        assert err.value.exit_code == 1
        line = str(err.value)
        assert "\n" not in line and f"{small} (" in line and "is full" in line and "publish" in line, line
        assert {p.relative_to(first.path): _sha(p) for p in first.path.rglob("*") if p.is_file()} == files
        assert (labdir / "LATEST").read_text() == latest
        assert os.readlink(labdir / "latest") == first.name
        assert sorted(p.name for p in labdir.iterdir()) == sorted(
            [first.name, "latest", "LATEST", ".pvelab-publish.lock"]
        )
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)
