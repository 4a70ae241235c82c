"""The nightly's decisions, on stand-in artefacts (the stages themselves are tested for
real in test_boot, test_install, test_rehearse; the end-to-end nightly in test_release):
skip what already passed on these bytes, publish nothing when nothing changed, and fail
loudly and harmlessly: status.json, the --on-failure hook, the previous release kept."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
from test_publish import _sha, make_built

from pvelab.core.paths import ROOT
from pvelab.model.artefacts import ArtefactInfo, BuildManifest, Layout
from pvelab.release import nightly as nightly_mod
from pvelab.release.nightly import NightlyFailed, nightly
from pvelab.release.publish import PublishError


class Stages(list):
    """The stages the nightly ran, in order; ``fail_boot`` makes every boot test fail."""

    fail_boot = False


@pytest.fixture
def stages(monkeypatch):
    """Record the stages the nightly runs; the build is a no-op over stand-in artefacts."""
    ran = Stages()
    monkeypatch.setattr(nightly_mod, "build", lambda lab, **kw: ran.append("build"))

    def boot_test(lab, media, firmware, accel):
        ran.append(f"boot-test {media}/{firmware}")
        return SimpleNamespace(passed=not ran.fail_boot)

    def rehearse(lab, media, accel):
        ran.append(f"rehearsal {media}")
        return SimpleNamespace(passed=True)

    monkeypatch.setattr(nightly_mod, "boot_test", boot_test)
    monkeypatch.setattr(nightly_mod, "rehearse", rehearse)
    return ran


def test_boot_tests_passed_on_these_bytes_are_not_rerun_and_unchanged_publishes_nothing(
    lab, stages, tmp_path
):
    make_built(lab)  # passing reports on exactly these bytes for qcow2/bios, iso/bios, install/bios
    rel = nightly(lab, tmp_path / "rel", None, "tcg", None)
    assert rel is not None and rel.new
    assert stages == ["build", "boot-test iso/uefi-sb", "boot-test install/uefi-sb", "rehearsal qcow2"]
    status = json.loads((tmp_path / "rel" / lab.name / "status.json").read_text())
    assert status["result"] == "published" and status["release"] == rel.name == status["latest"]
    assert "boot-test qcow2/bios" in status["skipped"]
    stages.clear()
    again = nightly(lab, tmp_path / "rel", None, "tcg", None)
    assert again is not None and not again.new and again.path == rel.path
    assert stages == ["build"]  # identical artefacts: no test, no publish
    status = json.loads((tmp_path / "rel" / lab.name / "status.json").read_text())
    assert status["result"] == "unchanged" and status["release"] == rel.name


def test_passes_with_another_lab_file_are_run_again(lab, stages, tmp_path):
    make_built(lab)
    for key in ("qcow2-bios", "iso-bios", "install-bios"):
        report = Layout(lab.name).root / "boot-test" / key / "report.json"
        report.write_text(report.read_text().replace(_sha(lab.path), "0" * 64))
    with pytest.raises(PublishError, match="ran with another version of"):
        nightly(lab, tmp_path / "rel", None, "tcg", None)  # the stand-in boot tests write no report
    assert stages[:4] == ["build", "boot-test qcow2/bios", "boot-test iso/bios", "boot-test iso/uefi-sb"]


def test_failed_nightly_is_loud_and_harmless(lab, stages, tmp_path):
    make_built(lab)
    first = nightly(lab, tmp_path / "rel", None, "tcg", None)
    # new bytes for pve-1's qcow2: its boot tests must run again, and one fails
    layout = Layout(lab.name)
    q = layout.artefact("pve-1", "qcow2")
    q.write_bytes(b"changed\n" * 100)
    m = BuildManifest.from_json(layout.manifest("pve-1"))
    m.artefacts[q.name] = ArtefactInfo(q.stat().st_size, _sha(q))
    layout.manifest("pve-1").write_text(m.to_json())
    stages.clear()
    stages.fail_boot = True
    hook_out = tmp_path / "hook.out"
    hook = f'cp "$PVELAB_STATUS" {hook_out}; echo "$PVELAB_FAILED_STAGE" >> {hook_out}'
    with pytest.raises(NightlyFailed, match="boot test qcow2/bios FAILED"):
        nightly(lab, tmp_path / "rel", None, "tcg", None, on_failure=hook)
    assert stages == ["build", "boot-test qcow2/bios"]
    labdir = tmp_path / "rel" / lab.name
    status = json.loads((labdir / "status.json").read_text())
    assert status["result"] == "failed" and status["stage"] == "boot-test qcow2/bios"
    assert status["logs"] == [str(layout.boot_test_dir("qcow2", "bios"))]
    assert status["latest"] == first.name and (labdir / "latest").resolve() == first.path
    assert [p.name for p in labdir.iterdir() if p.name[0].isdigit()] == [first.name]
    assert json.loads(hook_out.read_text().rsplit("}", 1)[0] + "}")["result"] == "failed"  # the hook saw it
    assert hook_out.read_text().endswith("boot-test qcow2/bios\n")


def test_nightly_cli_documents_the_hook():
    out = subprocess.run(
        [sys.executable, "-m", "invoke", "nightly", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert "--on-failure" in out.stdout and "--force" in out.stdout
