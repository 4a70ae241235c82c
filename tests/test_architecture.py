"""The shape the README's "Adding a role / a medium / an artefact kind / a walk step"
describes, held true: each concept is asked of its registry (no literal names of roles,
media, firmwares, accelerators or artefact kinds outside them), the subpackages' imports
point one way, every artefact kind has the stage that makes it, and a role defined only
here validates, renders, exports, draws and appears on the release page."""

from __future__ import annotations

import ast
import json
from pathlib import Path

from pvelab.build import pipeline
from pvelab.build.recipes import node_recipe
from pvelab.build.render import render_files
from pvelab.core.paths import ROOT
from pvelab.model import roles
from pvelab.model.accel import ACCELS
from pvelab.model.artefacts import ArtefactKind
from pvelab.model.labfile import load_lab
from pvelab.model.media import FIRMWARES, MEDIA
from pvelab.release.changes import compare
from pvelab.release.diagram import checks_from, topology_svg
from pvelab.release.page import release_page

PACKAGE = ROOT / "pvelab"
# the registries: the only modules that may spell a concept's names
REGISTRIES = {"model/roles.py", "model/media.py", "model/accel.py", "model/artefacts.py"}
# the same words meaning something else, each with why
HOMONYMS = {
    ("build/disk.py", "qcow2"): "qemu-img's name of the disk format (QCOW2_FORMAT)",
    ("build/guestpkgs.py", "install"): "apt-get's verb",
    ("model/labfile.py", "install"): "the lab file's install: section",
    ("build/bootdisk.py", "install"): "the install payload's working folder",
    ("build/iso.py", "iso"): "the seed of the ISO partition's UUID (changing it changes the bytes)",
    ("build/netboot.py", "install"): "the network boot mode (its scripts are install.ipxe, install.cfg)",
    ("release/publish.py", "netboot"): "the release's folder of serving files (README: Network boot)",
    ("build/render.py", "installer"): "the overlay folder overlays/installer",
}
# the stages, bottom to top; a module may import only from its own stage or below
STAGES = ["core", "model", "build", "running", "checks", "release", ""]


def _concept_names() -> dict[str, str]:
    names = {n: "role" for n in roles.ROLES}
    names |= {n: "medium" for n in MEDIA} | {n: "firmware" for n in FIRMWARES}
    names |= {n: "accelerator" for n in ACCELS} | {k.value: "artefact kind" for k in ArtefactKind}
    return names


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
        ):
            out.add(id(body[0].value))
    return out


def test_no_literal_concept_names_outside_their_registries():
    names = _concept_names()
    found = []
    for path in _modules():
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in REGISTRIES:
            continue
        tree = ast.parse(path.read_text())
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and node.value in names
                and id(node) not in docs
                and (rel, node.value) not in HOMONYMS
            ):
                found.append(f"pvelab/{rel}:{node.lineno}: {node.value!r} ({names[node.value]})")
    tasks = ast.parse((ROOT / "tasks.py").read_text())
    found += [
        f"tasks.py:{n.lineno}: {n.value!r}"
        for n in ast.walk(tasks)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in names
    ]
    assert not found, "ask the registry instead:\n" + "\n".join(found)


def test_the_literal_check_sees_a_literal(tmp_path):
    """The check above can fail: a comparison by name is what it finds."""
    tree = ast.parse('if fw.name != "bios":\n    pass\n')
    hits = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in _concept_names()]
    assert hits == ["bios"]


# the names of report and release files: spelled in the layout only
LAYOUT_NAMES = {
    "report.json",
    "junit.xml",
    "summary.txt",
    "manifest.json",
    "lab.yaml",
    "SHA256SUMS",
    "SHA256SUMS.asc",
    "LATEST",
    "status.json",
    "boot-test",
    "rehearsal",
    "releases",
    "rendered",
    "provenance",
}
LAYOUT_HOMONYMS = {
    ("checks/boottest.py", "boot-test"): "the lock's task name and the progress label",
    ("checks/rehearse.py", "rehearsal"): "a JUnit class name",
    ("model/media.py", "boot-test"): "the invoke task's name in a command line",
    ("release/nightly.py", "rehearsal"): "the nightly's stage name in status.json",
    ("release/provenance.py", "boot-test"): "an in-toto annotation's kind",
    ("release/provenance.py", "rehearsal"): "an in-toto annotation's kind",
    ("release/publish.py", "provenance"): "the fault-injection checkpoint's name",
    ("release/verify.py", "provenance"): "the name of a verify check in its report",
}


def test_every_report_and_release_path_is_asked_of_the_layout():
    """Layout (build/<lab>/), ReleasesDir (DEST/<lab>/) and ReleaseLayout (one release)
    name every report and release file; the lab's Layout is built in one place."""
    found, homonyms = [], set()
    for path in _modules():
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == "model/artefacts.py":
            continue
        tree = ast.parse(path.read_text())
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                if (rel, node.value) in LAYOUT_HOMONYMS:
                    homonyms.add((rel, node.value))
                elif node.value in LAYOUT_NAMES:
                    found.append(f"pvelab/{rel}:{node.lineno}: {node.value!r}")
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "Layout"
                and rel != "model/lab.py"
            ):
                found.append(f"pvelab/{rel}:{node.lineno}: Layout(...) (ask lab.layout)")
    assert not found, "ask the layout instead:\n" + "\n".join(found)
    assert homonyms == set(LAYOUT_HOMONYMS), "a listed meaning is no longer there"


def _stage(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else ""


def test_imports_point_down_the_stages():
    """lab model at the bottom, then build, the running lab, the checks, the release,
    the operator's lifecycle (labctl) and tasks.py on top; type-only imports too."""
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} >= set(STAGES[:-1])
    wrong = []
    for path in _modules():
        here = _stage(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pvelab"):
                assert node.level == 0, f"{path}: relative import"
                parts = node.module.split(".")
                there = parts[1] if len(parts) > 2 else ""
                if parts[1:] and parts[1] in STAGES and len(parts) == 2:
                    there = parts[1]  # from pvelab.<stage> import module
                if STAGES.index(there) > STAGES.index(here):
                    wrong.append(
                        f"{path.relative_to(ROOT)}:{node.lineno}: {here or 'pvelab'} -> {node.module}"
                    )
    assert not wrong, "an import points up a stage:\n" + "\n".join(wrong)


def test_every_artefact_kind_has_the_stage_that_makes_it_and_a_medium_boots_each_booted_kind():
    assert list(pipeline.STAGES) == list(ArtefactKind)
    booted = {m.artefact for m in MEDIA.values()}
    assert {k for k in ArtefactKind if k.is_booted()} <= booted
    assert all(set(k.travels_with()) <= set(ArtefactKind) for k in ArtefactKind)


def test_a_role_defined_only_in_a_fixture_validates_renders_draws_and_is_released(
    fixture_role, raw_lab, write_lab, tmp_path
):
    raw_lab["nodes"].append(
        dict(raw_lab["nodes"][-1], name="backup-1", role=fixture_role.name, alias="10.81.0.30/24")
    )
    for n in raw_lab["nodes"]:
        n.pop("mac", None)
    lab = load_lab(write_lab(raw_lab))
    node = lab.node("backup-1")
    assert node.role_def is fixture_role and not node.is_member and lab.witness is not None
    files = {f.path: f for f in render_files(lab, node)}
    assert json.loads(files["/etc/pvelab/backup-compat.json"].content)["port"] == 8007
    assert "/usr/lib/systemd/system/backup-compat.service" in files
    assert "/etc/pvelab/pve-compat.json" not in files  # the other roles' layers stay theirs
    recipe = node_recipe(lab, node)
    assert recipe["role"] == fixture_role.name
    svg = topology_svg(lab)
    assert fixture_role.colour in svg and "backup-1" in svg
    manifest = {
        "lab": lab.name,
        "release": "20261205T000000Z",
        "created": "2026-12-05T00:00:00Z",
        "git_commit": "abc123",
        "archive": {},
        "nodes": [
            {"name": n.name, "role": n.role, "alias": str(n.alias), "packages": {}, "files": {}}
            for n in lab.nodes
        ],
        "boot_tests": {},
        "rehearsals": {},
    }
    rel = tmp_path / "rel"
    rel.mkdir()
    (rel / "manifest.json").write_text(json.dumps(manifest))
    page = release_page(lab, manifest, compare(None, rel), checks_from(lab, []))
    assert "backup-1" in page and fixture_role.colour in page and fixture_role.name in page
