"""`invoke publish`: gated, atomic releases of the built and boot-tested artefacts.

Layout: ``DEST/<lab>/<YYYYMMDD>T<HHMMSS>Z/`` with each node's qcow2 and ISO,
``SHA256SUMS`` (+ ``SHA256SUMS.asc`` when a GPG key is configured), ``manifest.json``,
the boot-test reports, ``topology.svg`` and a ``README.md`` for the provisioning team.
``DEST/<lab>/latest`` (a symlink, plus a ``LATEST`` file for mounts without symlinks)
names the newest complete release.

Gate: every artefact must exist, match the sha256 in its build manifest, and have
passed a boot test run on exactly that file (matched by sha256). Atomicity: the
release is assembled in a hidden ``.tmp-*`` directory beside the releases and
appears with one rename; ``latest`` moves only afterwards; retention runs last and
never removes the newest release. A publish killed at any point leaves the previous
state intact, and re-running it is safe (stale ``.tmp-*`` directories are removed).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import jinja2

from .boottest import report_dir
from .build import sha256
from .lab import Lab
from .paths import ROOT, build_root, node_dir
from .topology import topology_svg

DEFAULT_DEST = "build/releases"
REPORT_KINDS = (("qcow2", "bios"), ("iso", "bios"), ("iso", "uefi"))


class PublishError(RuntimeError):
    pass


@dataclass(frozen=True)
class Release:
    path: Path
    name: str
    files: list[str]


def _checkpoint(step: str) -> None:
    """Fault injection for tests: PVELAB_PUBLISH_FAIL_AT=<step> fails there,
    PVELAB_PUBLISH_PAUSE_AT=<step> sleeps there (so a test can kill -9 the process)."""
    if os.environ.get("PVELAB_PUBLISH_FAIL_AT") == step:
        raise PublishError(f"injected failure at step {step!r}")
    if os.environ.get("PVELAB_PUBLISH_PAUSE_AT") == step:
        marker = os.environ.get("PVELAB_PUBLISH_PAUSE_MARKER")
        if marker:
            Path(marker).write_text(step)
        time.sleep(3600)


def _load_reports() -> dict[str, dict]:
    reports = {}
    for media, firmware in REPORT_KINDS:
        path = report_dir(media, firmware) / "report.json"
        if path.exists():
            reports[f"{media}-{firmware}"] = json.loads(path.read_text())
    return reports


def gate(lab: Lab) -> dict:
    """Check every artefact; return what the release needs. Raise PublishError naming each problem."""
    problems: list[str] = []
    reports = _load_reports()
    nodes = {}
    for node in lab.nodes:
        ndir = node_dir(node.name)
        mpath = ndir / "manifest.json"
        if not mpath.exists():
            problems.append(f"{node.name}: {mpath} missing (not built)")
            continue
        manifest = json.loads(mpath.read_text())
        entry = {"manifest": manifest, "files": {}}
        for kind in ("qcow2", "iso"):
            fname = f"{node.name}.{kind}"
            path = ndir / fname
            if not path.exists():
                problems.append(f"{node.name}: {path} missing")
                continue
            want = manifest["artefacts"].get(fname, {}).get("sha256")
            got = sha256(path)
            if got != want:
                problems.append(f"{node.name}: {fname} sha256 {got[:12]}... does not match its build "
                                f"manifest ({str(want)[:12]}...): modified after the build")
                continue
            passed_by = [k for k, r in reports.items() if k.startswith(kind + "-") and r.get("passed")
                         and r["context"]["artefacts"].get(node.name, {}).get("sha256") == got]
            if not passed_by:
                tried = [k for k, r in reports.items() if k.startswith(kind + "-")
                         and r["context"]["artefacts"].get(node.name, {}).get("sha256") == got]
                why = (f"its boot test ({', '.join(tried)}) did not pass" if tried else
                       f"no boot test ran on this exact file (run `invoke boot-test"
                       f"{' --media iso' if kind == 'iso' else ''}`)")
                problems.append(f"{node.name}: {fname}: {why}")
                continue
            entry["files"][kind] = {"path": path, "name": fname, "size": path.stat().st_size,
                                    "sha256": got, "boot_tests": passed_by}
        nodes[node.name] = entry
    if problems:
        raise PublishError("refusing to publish:\n  - " + "\n  - ".join(problems))
    used = {k for e in nodes.values() for f in e["files"].values() for k in f["boot_tests"]}
    return {"nodes": nodes, "reports": {k: r for k, r in reports.items() if k in used}}


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # same file system: instant, and later builds replace, never modify, src
    except OSError:
        shutil.copyfile(src, dst)


def _fsync_tree(path: Path) -> None:
    for p in [*path.rglob("*"), path]:
        if p.is_symlink():
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


def release_manifest(lab: Lab, name: str, checked: dict) -> dict:
    nodes = []
    first = None
    for node in lab.nodes:
        e = checked["nodes"][node.name]
        m = e["manifest"]
        first = first or m
        nodes.append({
            "name": node.name, "role": node.role, "alias": str(node.alias),
            "ram_mb": node.ram_mb, "disk_gb": node.disk_gb,
            "files": {k: {"name": f["name"], "size": f["size"], "sha256": f["sha256"],
                          "boot_tests": f["boot_tests"]} for k, f in e["files"].items()},
            "enabled_units": m.get("enabled_units", []),
            "build_seconds": m.get("build_seconds", {}),
            "base": m.get("base", {}),
        })
    reports = checked["reports"]
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True)
    return {
        "lab": lab.name,
        "release": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_commit": first.get("git_commit"),
        "nodes": nodes,
        "elements": first.get("base", {}).get("elements", []),
        "versions": dict(first.get("tools", {}), kernel=first.get("kernel"),
                         qemu=(qemu.stdout.splitlines() or ["unknown"])[0]),
        "boot_tests": {k: {"passed": r["passed"], "wall_seconds": r["context"].get("wall_seconds"),
                           "ssh_ready_seconds": r["context"].get("ssh_ready_seconds"),
                           "accel": r["context"].get("accel"),
                           "tests": {t["name"]: "pass" if t["passed"] else "fail" for t in r["tests"]}}
                       for k, r in reports.items()},
        "scenario": lab.scenario.name,
    }


def _readme(lab: Lab, manifest: dict) -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(ROOT / "pvelab" / "templates")),
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True)
    return env.get_template("release-README.md.j2").render(lab=lab, manifest=manifest)


def _releases(labdir: Path) -> list[Path]:
    return sorted(p for p in labdir.iterdir()
                  if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")
                  and len(p.name) == 16 and p.name[8] == "T" and p.name.endswith("Z"))


def _point_latest(labdir: Path, name: str) -> None:
    tmp_link = labdir / f".latest-{os.getpid()}"
    tmp_link.unlink(missing_ok=True)
    try:
        tmp_link.symlink_to(name)
        os.replace(tmp_link, labdir / "latest")
    except OSError:
        tmp_link.unlink(missing_ok=True)  # a mount without symlinks: LATEST below suffices
    tmp_file = labdir / f".LATEST-{os.getpid()}"
    tmp_file.write_text(name + "\n")
    os.replace(tmp_file, labdir / "LATEST")


def publish(lab: Lab, dest: str | Path = DEFAULT_DEST, keep: int | None = None,
            gpg_key: str | None = None, now: float | None = None) -> Release:
    if keep is not None and keep < 1:
        raise PublishError(f"--keep: {keep}: must be at least 1 (the newest release always stays)")
    checked = gate(lab)
    dest = Path(dest)
    if not dest.is_absolute():
        dest = ROOT / dest
    labdir = dest / lab.name
    labdir.mkdir(parents=True, exist_ok=True)
    for stale in labdir.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)  # a previous publish that was killed

    name = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    while (labdir / name).exists():  # two publishes in one second
        time.sleep(1)
        name = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    stage = labdir / f".tmp-{name}-{os.getpid()}"
    stage.mkdir()
    try:
        files = []
        for node in lab.nodes:
            for f in checked["nodes"][node.name]["files"].values():
                _link_or_copy(f["path"], stage / f["name"])
                files.append(f["name"])
                _checkpoint("copy")
        reports_dir = stage / "boot-test"
        reports_dir.mkdir()
        for key in checked["reports"]:
            media, firmware = key.split("-")
            src = report_dir(media, firmware)
            for fname in ("report.json", "junit.xml"):
                shutil.copyfile(src / fname, reports_dir / f"{key}.{fname}")
        manifest = release_manifest(lab, name, checked)
        (stage / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        (stage / "topology.svg").write_text(topology_svg(lab))
        (stage / "README.md").write_text(_readme(lab, manifest))
        _checkpoint("metadata")
        # one pass over the staged files: SHA256SUMS, and proof the copies are what was gated
        digests = {p.relative_to(stage).as_posix(): sha256(p)
                   for p in sorted(stage.rglob("*")) if p.is_file()}
        for node in lab.nodes:
            for f in checked["nodes"][node.name]["files"].values():
                if digests[f["name"]] != f["sha256"]:
                    raise PublishError(f"{f['name']}: copy in {stage} does not match its checksum")
        (stage / "SHA256SUMS").write_text("".join(f"{d}  {rel}\n" for rel, d in digests.items()))
        if gpg_key:
            subprocess.run(["gpg", "--batch", "--yes", "--local-user", gpg_key, "--armor",
                            "--detach-sign", "--output", str(stage / "SHA256SUMS.asc"),
                            str(stage / "SHA256SUMS")], check=True, capture_output=True)
        _fsync_tree(stage)
        _checkpoint("rename")
        os.rename(stage, labdir / name)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _checkpoint("latest")
    _point_latest(labdir, name)
    if keep:
        releases = _releases(labdir)
        for old in releases[:-keep]:
            if old.name != name:
                shutil.rmtree(old)
    return Release(labdir / name, name, files)
