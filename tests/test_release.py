"""The nightly end to end on the real lab, after the boot tests and rehearsals of this
session (ordered last, see conftest): the artefacts are rebuilt bit for bit, so every
boot test and the rehearsal already passed on exactly these bytes and are not run again;
the first nightly publishes, the second publishes nothing. The release page of the real
release renders in Chromium with every link and port green."""

import json
import os
import shutil
import subprocess

import pytest

from pvelab.release.evidence import released_files
from pvelab.release.nightly import BOOT_TESTS, nightly
from pvelab.release.verify import verify

pytestmark = [
    pytest.mark.boot,
    pytest.mark.last,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (builds, boots)"),
]


def test_nightly_publishes_once_then_nothing_new(lab, tmp_path):
    dest = tmp_path / "releases"
    first = nightly(lab, dest, keep=3, accel="auto", gpg_key=None)
    assert first is not None and first.new
    status = json.loads((dest / lab.name / "status.json").read_text())
    assert status["result"] == "published" and status["release"] == first.name
    print("nightly skipped (passed on these bytes):", status["skipped"])
    release = first.path
    for name in ("index.html", "CHANGES.md", "changes.json", "lab.yaml", "topology.svg", "SHA256SUMS"):
        assert (release / name).is_file(), name
    for n in lab.nodes:
        assert (release / f"{n.name}.cdx.json").is_file()
        assert (release / "rendered" / n.name / "etc/hostname").read_text().strip() == n.name
    assert subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=release).returncode == 0
    manifest = json.loads((release / "manifest.json").read_text())
    assert set(manifest["boot_tests"]) == {f"{m}-{f}" for m, f in BOOT_TESTS}
    assert manifest["archive"] and all(n["packages"] for n in manifest["nodes"])
    checked = verify(release)  # the receiving side's check, on the real artefacts
    print(checked.summary())
    assert checked.ok, checked.problems
    assert checked.statements == checked.sboms == len(lab.nodes)
    assert checked.reports == len(BOOT_TESTS) + len(manifest["rehearsals"])

    again = nightly(lab, dest, keep=3, accel="auto", gpg_key=None)
    assert again is not None and not again.new and again.path == release
    assert json.loads((dest / lab.name / "status.json").read_text())["result"] == "unchanged"
    assert [p.name for p in (dest / lab.name).iterdir() if p.name[0].isdigit()] == [first.name]
    assert released_files(release)

    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium not installed: run scripts/setup")
    page = (release / "index.html").read_text()
    assert 'class="link fail"' not in page and 'class="link unchecked"' not in page
    assert page.count('class="link pass"') == len(lab.connections)
    assert 'class="port fail"' not in page and 'class="port pass"' in page
    shot = tmp_path / "release.png"
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1200,1600",
            f"--screenshot={shot}",
            (release / "index.html").as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    from PIL import Image

    pixels = list(Image.open(shot).convert("RGB").get_flattened_data())
    green = sum(
        1 for p in pixels if abs(p[0] - 0x2E) < 20 and abs(p[1] - 0x7D) < 20 and abs(p[2] - 0x32) < 20
    )
    assert green > 3000, green
    keep = os.environ.get("PVELAB_KEEP_RELEASE_SHOT")
    if keep:
        shutil.copyfile(shot, keep)
