"""What a release decision reads: the bytes built, the bytes each test ran on, the bytes released.

The publish gate and the nightly both ask these questions and only here are they
answered. :func:`passed_on` is the one rule for "a test passed on exactly these bytes
with this lab file": a nightly skips a boot test or rehearsal it says yes to, and the
gate counts exactly those. Paths come from :class:`~pvelab.model.artefacts.Layout`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from pvelab.model.artefacts import (
    ArtefactKind,
    BootReport,
    BuildManifest,
    RecordError,
    RehearsalReport,
    ReleaseLayout,
    ReleasesDir,
    sha256,
)
from pvelab.model.lab import Lab
from pvelab.model.media import MEDIA

# What `invoke publish` (and the nightly) releases unless --artefacts says otherwise.
PUBLISHED_KINDS = ArtefactKind.published_by_default()
RELEASE_NAME = re.compile(r"^\d{8}T\d{6}Z$")

Report = BootReport | RehearsalReport  # the records a test run leaves

# --------------------------------------------------------------------------- built


def built_files(lab: Lab, kinds: tuple[str, ...] = PUBLISHED_KINDS) -> dict[str, str] | None:
    """file name -> sha256 of the built artefacts per their manifests (None: not all built)."""
    layout = lab.layout
    out = {}
    for node in lab.nodes:
        try:
            m = BuildManifest.from_json(layout.manifest(node.name))
        except RecordError:
            return None
        for kind in kinds:
            name = layout.artefact(node.name, kind).name
            if name not in m.artefacts:
                return None
            out[name] = m.artefacts[name].sha256
    return out


# --------------------------------------------------------------------------- tested


def boot_reports(lab: Lab) -> dict[str, BootReport]:
    """Every boot report of this lab, keyed ``<media>-<firmware>``; a damaged one is a RecordError."""
    return {p.parent.name: BootReport.from_json(p) for p in lab.layout.boot_test_reports()}


def ran_on(report: Report, files: dict[str, str]) -> bool:
    """The report's run booted exactly these bytes: ``files`` is node -> sha256 of the
    artefact kind the report's medium boots."""
    return all(
        report.artefacts.get(n) is not None and report.artefacts[n].sha256 == h for n, h in files.items()
    )


def passed_on(lab: Lab, report: Report) -> bool:
    """The test passed, with this version of the lab file, on exactly the built bytes of
    every node (a pass with another lab file, its scenario or its wiring, does not count)."""
    kind = MEDIA[report.media].artefact
    built = built_files(lab, (kind,))
    if built is None or not report.passed or report.lab_sha256 != sha256(lab.path):
        return False
    layout = lab.layout
    return ran_on(report, {n.name: built[layout.artefact(n.name, kind).name] for n in lab.nodes})


# --------------------------------------------------------------------------- released


def releases(lab: Lab, labdir: Path) -> list[Path]:
    """Releases pvelab wrote for this lab, oldest first: a folder named like a release
    whose manifest.json says so. Anything else in the destination is never touched."""
    out = []
    for p in labdir.iterdir():
        if p.is_symlink() or not p.is_dir() or not RELEASE_NAME.match(p.name):
            continue
        try:
            m = json.loads(ReleaseLayout(p).manifest.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(m, dict) and m.get("lab") == lab.name and m.get("release") == p.name:
            out.append(p)
    return sorted(out)


def latest_release(lab: Lab, labdir: Path) -> Path | None:
    """The release ``latest`` names (``LATEST`` file), else the newest one pvelab wrote."""
    if not labdir.is_dir():
        return None
    found = releases(lab, labdir)
    try:
        named = ReleasesDir(labdir).latest_file.read_text().strip()
    except OSError:
        named = ""
    return next((r for r in found if r.name == named), found[-1] if found else None)


def released_files(release: Path) -> dict[str, str]:
    """file name -> sha256 of every node artefact in a release (from its manifest)."""
    m = json.loads(ReleaseLayout(release).manifest.read_text())
    return {f["name"]: f["sha256"] for n in m["nodes"] for f in n["files"].values()}


def unchanged_since(lab: Lab, labdir: Path, kinds: tuple[str, ...] = PUBLISHED_KINDS) -> Path | None:
    """The latest release when the built artefacts are byte for byte the ones it holds."""
    latest = latest_release(lab, labdir)
    if latest is None:
        return None
    try:
        same = released_files(latest) == built_files(lab, kinds)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return latest if same else None
