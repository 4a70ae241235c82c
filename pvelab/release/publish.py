"""`invoke publish`: gated, atomic releases of the built and tested artefacts.

Layout: ``DEST/<lab>/<YYYYMMDD>T<HHMMSS>Z/`` (default ``build/<lab>/releases/<timestamp>/``)
with each node's qcow2 and ISO (copies, never links into ``build/``), ``SHA256SUMS``
(+ ``SHA256SUMS.asc`` when a GPG key is configured), ``manifest.json``, the boot-test and
rehearsal reports, each node's SBOM (``<node>.cdx.json``, CycloneDX), ``lab.yaml`` and ``rendered/<node>/`` (what was built from),
``CHANGES.md`` + ``changes.json`` (since the previous release, :mod:`pvelab.release.changes`),
``topology.svg``, ``index.html`` (:mod:`pvelab.release.page`) and a ``README.md`` for the
provisioning team.
``DEST/<lab>/latest`` (a symlink, plus a ``LATEST`` file for mounts without symlinks)
names the newest complete release.

Gate: every artefact must exist, match the sha256 in its build manifest, and have
passed a boot test of this lab and its scenario run on exactly that file (matched by
sha256); a rehearsal that failed on exactly those files blocks it too. Atomicity: one
publish per destination at a time (a lock; a second one refuses); the release is
assembled in a hidden ``.pvelab-stage-*`` folder beside the releases and appears with
one rename; ``latest`` moves only afterwards; retention runs last, removes only
releases pvelab wrote (recognised by their manifest) and never the newest. A publish
killed at any point leaves the previous state intact, and re-running it is safe.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pvelab.build import netboot
from pvelab.build.iso import INSTALL_WAIT
from pvelab.checks.rehearse import step_notes
from pvelab.core.errors import PvelabError, space_guard
from pvelab.core.locks import locking
from pvelab.model.artefacts import (
    JUNIT,
    REPORT,
    SUMMARY,
    ArtefactKind,
    BootReport,
    BuildManifest,
    RecordError,
    RehearsalReport,
    ReleaseLayout,
    ReleasesDir,
    sha256,
)
from pvelab.model.lab import Lab, Node
from pvelab.model.media import FIRMWARES, MEDIA, boot_test_command, medium_for
from pvelab.model.passwords import DEFAULT_PASSWORD
from pvelab.model.quorum import table as quorum_table
from pvelab.release import changes, openpgp, provenance
from pvelab.release.diagram import checks_from, topology_svg
from pvelab.release.evidence import (
    PUBLISHED_KINDS,
    boot_reports,
    latest_release,
    ran_on,
    released_files,
    releases,
    unchanged_since,
)
from pvelab.release.page import release_page, template_env


class PublishError(PvelabError):
    pass


@dataclass(frozen=True)
class Release:
    path: Path
    name: str
    files: list[str]
    new: bool = True  # False: the artefacts were identical to this (existing) release; nothing written


def destination(lab: Lab, dest: str | Path | None) -> Path:
    """Where this lab's releases go: ``DEST/<lab>``, or ``build/<lab>/releases``."""
    return lab.layout.releases if dest is None else Path(dest).absolute() / lab.name


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


def _check_artefact(
    lab: Lab, node: str, kind: str, manifest: BuildManifest, reports: dict[str, BootReport]
) -> tuple[dict | None, str | None]:
    """(what the release needs of one artefact, None) or (None, the problem)."""
    path = lab.layout.artefact(node, kind)
    if not path.exists():
        return None, f"{node}: {path} missing"
    info = manifest.artefacts.get(path.name)
    got = sha256(path)
    if info is None or got != info.sha256:
        want = info.sha256[:12] if info else "none"
        return None, (
            f"{node}: {path.name} sha256 {got[:12]}... does not match its build "
            f"manifest ({want}...): modified after the build"
        )
    on_these_bytes = {
        k: r for k, r in reports.items() if MEDIA[r.media].artefact == kind and ran_on(r, {node: got})
    }
    passed_by = [k for k, r in on_these_bytes.items() if r.passed]
    if not passed_by and ArtefactKind(kind).is_booted():
        if on_these_bytes:
            again = "; ".join(
                f"`{boot_test_command(lab.path, MEDIA[r.media], FIRMWARES[r.firmware])}`"
                for r in on_these_bytes.values()
            )
            why = f"its boot test ({', '.join(on_these_bytes)}) did not pass (run {again} again)"
        else:
            why = (
                f"no boot test ran on this exact file (run `{boot_test_command(lab.path, medium_for(kind))}`)"
            )
        return None, f"{node}: {path.name}: {why}"
    return {
        "path": path,
        "name": path.name,
        "size": path.stat().st_size,
        "sha256": got,
        "boot_tests": passed_by,
    }, None


# Long on purpose: every check of the release, collected so the refusal names all problems at once.
def gate(lab: Lab, kinds: tuple[str, ...] = PUBLISHED_KINDS) -> dict:
    """Check every artefact of ``kinds``; return what the release needs.

    Raises PublishError naming each problem."""
    problems: list[str] = []
    try:
        reports = boot_reports(lab)
    except RecordError as exc:
        raise PublishError(f"refusing to publish: {exc}") from None
    lab_sha = sha256(lab.path)
    for key, r in reports.items():
        if r.lab != lab.name or r.result.scenario != lab.scenario.name:
            problems.append(
                f"boot-test/{key}: report is of lab {r.lab!r}, scenario "
                f"{r.result.scenario!r}, not {lab.name!r}/{lab.scenario.name!r}"
            )
        elif r.lab_sha256 and r.lab_sha256 != lab_sha:
            problems.append(
                f"boot-test/{key}: ran with another version of {lab.path} ({r.lab_file}); "
                f"run `{boot_test_command(lab.path, MEDIA[r.media], FIRMWARES[r.firmware])}` again"
            )
    nodes: dict[str, dict] = {}
    for node in lab.nodes:
        mpath = lab.layout.manifest(node.name)
        if not mpath.exists():
            problems.append(
                f"{node.name}: {mpath} missing (run `invoke build --lab {lab.path} --node {node.name}`)"
            )
            continue
        try:
            manifest = BuildManifest.from_json(mpath)
        except RecordError as exc:
            problems.append(str(exc))
            continue
        if manifest.password_found and lab.user.password:
            problems.append(
                f"{node.name}: the lab's plain password is in the image: "
                f"{', '.join(manifest.password_found[:3])} (see {mpath})"
            )
        if not lab.layout.sbom(node.name).exists():
            problems.append(
                f"{node.name}: {lab.layout.sbom(node.name)} missing (rebuild: `invoke build --lab {lab.path} --node {node.name}`)"
            )
        entry: dict = {"manifest": manifest, "files": {}}
        for kind in kinds:
            checked, problem = _check_artefact(lab, node.name, kind, manifest, reports)
            if problem:
                problems.append(problem)
            else:
                entry["files"][kind] = checked
        nodes[node.name] = entry
    if problems:
        raise PublishError("refusing to publish:\n  - " + "\n  - ".join(problems))
    rehearsals = _rehearsals_on_these_bytes(lab, nodes, problems, lab_sha)
    if problems:
        raise PublishError("refusing to publish:\n  - " + "\n  - ".join(problems))
    used = {k for e in nodes.values() for f in e["files"].values() for k in f["boot_tests"]}
    return {
        "nodes": nodes,
        "reports": {k: r for k, r in reports.items() if k in used},
        "rehearsals": rehearsals,
    }


def _rehearsals_on_these_bytes(
    lab: Lab, nodes: dict[str, dict], problems: list[str], lab_sha: str
) -> dict[str, RehearsalReport]:
    """Rehearsals run on exactly the gated files: a failed one blocks the release like a failed boot test."""
    out = {}
    for path in lab.layout.rehearsal_reports():
        try:
            r = RehearsalReport.from_json(path)
        except RecordError as exc:
            problems.append(str(exc))
            continue
        if r.lab_sha256 and r.lab_sha256 != lab_sha:
            continue  # a rehearsal of another version of the lab file says nothing about this one
        kind = MEDIA[r.media].artefact
        if not all(kind in e["files"] for e in nodes.values()) or not ran_on(
            r, {n: e["files"][kind]["sha256"] for n, e in nodes.items()}
        ):
            continue  # a rehearsal of other bytes says nothing about these
        if not r.passed:
            problems.append(
                f"rehearsal/{r.media}: the rehearsal on these exact files failed ({path}); "
                f"run `invoke rehearse --lab {lab.path} --media {r.media}` again"
            )
        out[r.media] = r
    return out


def _copy(src: Path, dst: Path) -> None:
    """An independent copy: a release never shares its bytes with build/ (no hard link),
    so nothing done there later can change a published file."""
    try:
        shutil.copyfile(src, dst)
    except OSError as exc:
        raise PublishError(f"copying {src} to {dst}: {exc.strerror}") from None


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


def _first_line(cmd: list[str]) -> str:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    return (res.stdout.splitlines() or ["unknown"])[0]


def _node_entry(node: Node, entry: dict) -> dict:
    m: BuildManifest = entry["manifest"]
    files = {
        k: {key: f[key] for key in ("name", "size", "sha256", "boot_tests")}
        for k, f in entry["files"].items()
    }
    return {
        "name": node.name,
        "role": node.role,
        "alias": str(node.alias),
        "ram_mb": node.ram_mb,
        "disk_gb": node.disk_gb,
        "files": files,
        "enabled_units": m.enabled_units,
        "build_seconds": m.build_seconds,
        "built_at": m.built_at,
        "base": {"key": m.base_key, "elements": m.elements},
        "packages": m.packages,
        "sources": m.sources,
    }


def _boot_test_entry(r: BootReport) -> dict:
    return {
        "passed": r.passed,
        "wall_seconds": r.wall_seconds,
        "ssh_ready_seconds": r.ssh_ready_seconds,
        "accel": r.accel,
        "secure_boot": r.secure_boot,
        "tests": {t.name: "pass" if t.passed else "fail" for t in r.result.tests},
    }


def links_entry(lab: Lab) -> list[dict]:
    """The lab's corosync links for the release: subnet, knet priority, each member's
    address and the NIC that carries it."""
    return [
        {
            "number": link.number,
            "subnet": str(link.subnet),
            "priority": link.priority,
            "members": {
                n.name: {
                    "address": n.link(link.number).ip,
                    "nic": n.nics[n.nic_index(link.number)].describe(),
                }
                for n in lab.members
            },
        }
        for link in lab.links
    ]


def _rehearsal_entry(r: RehearsalReport) -> dict:
    steps = [
        {
            "number": s.number,
            "title": s.title,
            "passed": s.passed,
            "settle_seconds": s.settle_seconds,
            # knet's state of each link as each member saw it (labs whose steps judge links)
            "links": {n.node: n.links for n in s.nodes if n.links},
            "notes": step_notes(s),
        }
        for s in r.steps
    ]
    return {
        "passed": r.passed,
        "first_quorate_seconds": r.first_quorate_seconds,
        "walk_seconds": r.walk_seconds,
        "steps": steps,
    }


def release_manifest(lab: Lab, name: str, checked: dict, signed: bool = False) -> dict:
    first: BuildManifest = checked["nodes"][lab.nodes[0].name]["manifest"]
    return {
        "lab": lab.name,
        "release": name,
        "signed": signed,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_commit": first.git_commit,
        "nodes": [_node_entry(n, checked["nodes"][n.name]) for n in lab.nodes],
        "links": links_entry(lab),
        "elements": first.elements,
        "versions": dict(
            first.tools, kernel=first.kernel, qemu=_first_line(["qemu-system-x86_64", "--version"])
        ),
        "boot_tests": {k: _boot_test_entry(r) for k, r in checked["reports"].items()},
        "scenario": lab.scenario.name,
        "rehearsals": {media: _rehearsal_entry(r) for media, r in checked.get("rehearsals", {}).items()},
        "archive": first.archive,
    }


def _readme(lab: Lab, manifest: dict) -> str:
    return (
        template_env(html=False)
        .get_template("release-README.md.j2")
        .render(
            lab=lab,
            manifest=manifest,
            quorum_table=quorum_table(lab),
            default_password=DEFAULT_PASSWORD,
            install_wait=INSTALL_WAIT,
        )
    )


def _point_latest(dest: ReleasesDir, name: str) -> None:
    tmp_link = _temporary(dest.latest_link)
    tmp_link.unlink(missing_ok=True)
    try:
        tmp_link.symlink_to(name)
        os.replace(tmp_link, dest.latest_link)
    except OSError:
        tmp_link.unlink(missing_ok=True)  # a mount without symlinks: LATEST below suffices
    tmp_file = _temporary(dest.latest_file)
    tmp_file.write_text(name + "\n")
    os.replace(tmp_file, dest.latest_file)


def _temporary(path: Path, pid: int | str | None = None) -> Path:
    """Where ``path`` is written before its rename (``.<name>-<pid>`` beside it)."""
    return path.with_name(f".{path.name}-{os.getpid() if pid is None else pid}")


# Long on purpose: the release transaction (validate, lock, stage, rename, point, retire) reads as one sequence.
@locking("publish")
def publish(
    lab: Lab,
    dest: str | Path | None = None,
    keep: int | None = None,
    gpg_key: str | None = None,
    now: float | None = None,
    kinds: tuple[str, ...] = PUBLISHED_KINDS,
    force: bool = False,
) -> Release:
    """Publish to ``DEST/<lab>/<timestamp>/``; without ``dest``, ``build/<lab>/releases/``.

    ``kinds`` limits the release to some artefact kinds (e.g. only the qcow2 images).
    When the gated artefacts are identical to the latest release's, nothing is written
    and that release is returned with ``new=False`` (``force``: publish anyway)."""
    known = [k.value for k in ArtefactKind]
    if not kinds or any(k not in known for k in kinds):
        raise PublishError(f"--artefacts: {','.join(kinds)!r}: choose from {', '.join(known)}")
    # what a kind needs travels with it (a netboot bundle fetches the node's ISOs)
    wanted = {ArtefactKind(k) for k in kinds}
    kinds = tuple(k for k in ArtefactKind if k in wanted or any(k in w.travels_with() for w in wanted))
    if keep is not None and keep < 1:
        raise PublishError(f"--keep: {keep}: must be at least 1 (the newest release always stays)")
    labdir = destination(lab, dest)
    if labdir.exists() and not labdir.is_dir():
        raise PublishError(f"--dest: {labdir} exists and is not a folder")
    checked = gate(lab, kinds)
    if gpg_key:
        try:
            openpgp.fingerprint(gpg_key)  # before any copying: a key that cannot sign stops here
        except openpgp.GpgError as exc:
            raise PublishError(str(exc)) from None
    same = None if force else unchanged_since(lab, labdir, kinds)
    if same is not None:
        return Release(same, same.name, sorted(released_files(same)), new=False)
    try:
        labdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PublishError(f"--dest: cannot create {labdir}: {exc.strerror}") from None
    dest_dir = ReleasesDir(labdir)
    with _destination_lock(dest_dir), space_guard(f"publish to {labdir}", labdir):
        for stale in dest_dir.stagings():
            shutil.rmtree(stale, ignore_errors=True)  # our own, from a publish that was killed
        name = _release_name(dest_dir, now)
        stage = dest_dir.staging(name, os.getpid())
        stage.mkdir()
        try:
            files = _stage_release(lab, stage, name, checked, latest_release(lab, labdir), bool(gpg_key))
            _provenance(stage, gpg_key)
            _checksums(stage, checked, gpg_key)
            _fsync_tree(stage)
            _checkpoint("rename")
            os.rename(stage, dest_dir.release(name).root)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        _checkpoint("latest")
        try:
            _point_latest(dest_dir, name)
        except BaseException:
            for link in (dest_dir.latest_link, dest_dir.latest_file):
                for tmp in labdir.glob(_temporary(link, pid="*").name):
                    tmp.unlink(missing_ok=True)
            raise
        if keep:
            for old in releases(lab, labdir)[:-keep]:
                if old.name != name:
                    shutil.rmtree(old)
    return Release(dest_dir.release(name).root, name, files)


@contextlib.contextmanager
def _destination_lock(dest: ReleasesDir) -> Iterator[None]:
    """One publish per destination at a time; a second one refuses at once."""
    labdir = dest.root
    with open(dest.publish_lock, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PublishError(
                f"another publish to {labdir} is running; try again when it has finished"
            ) from None
        yield


def _release_name(dest: ReleasesDir, now: float | None) -> str:
    name = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    while dest.release(name).root.exists():  # two publishes in one second
        time.sleep(1)
        name = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return name


def _stage_release(
    lab: Lab, stage: Path, name: str, checked: dict, previous: Path | None, signed: bool = False
) -> list[str]:
    """Artefacts, reports, manifest, the lab file and rendered files, the changes since
    ``previous``, topology and README into the staging folder."""
    out = ReleaseLayout(stage)
    files = []
    for node in lab.nodes:
        for f in checked["nodes"][node.name]["files"].values():
            _copy(f["path"], out.file(f["name"]))
            files.append(f["name"])
            _checkpoint("copy")
    layout = lab.layout
    for node in lab.nodes:
        _copy(layout.sbom(node.name), out.file(layout.sbom(node.name).name))
    out.boot_test_dir.mkdir()
    for key in checked["reports"]:
        for fname in (REPORT, JUNIT):
            shutil.copyfile(layout.boot_test_dir_by_key(key) / fname, out.boot_test(key, fname))
    for media in checked.get("rehearsals", {}):
        out.rehearsal_dir.mkdir(exist_ok=True)
        for fname in (REPORT, JUNIT, SUMMARY):
            src = layout.rehearsal_dir(media) / fname
            if src.exists():
                shutil.copyfile(src, out.rehearsal(media, fname))
    if any(ArtefactKind.NETBOOT in e["files"] for e in checked["nodes"].values()):
        # what a provisioning team serves the bundles with (README: "Network boot")
        out.netboot.mkdir()
        (out.netboot / "dnsmasq.conf").write_text(netboot.dnsmasq_example(lab))
        (stage / netboot.GRUB_PREFIX).mkdir()
        (stage / netboot.GRUB_PREFIX / "grub.cfg").write_text(
            netboot.grub_dispatch(lab, {n.name: netboot.Mode.LIVE for n in lab.nodes})
        )
    manifest = release_manifest(lab, name, checked, signed)
    out.manifest.write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.copyfile(lab.path, out.lab_file)
    for node in lab.nodes:
        if layout.overlay(node.name).is_dir():
            shutil.copytree(layout.overlay(node.name), out.rendered(node.name), symlinks=True)
    record = changes.compare(previous, stage)
    out.changes_json.write_text(json.dumps(record, indent=2) + "\n")
    out.changes_md.write_text(changes.markdown(record))
    results = [r.result for r in checked["reports"].values()]
    rehearsals = list(checked.get("rehearsals", {}).values())
    checks = checks_from(lab, results, all(r.passed for r in rehearsals) if rehearsals else None)
    out.topology.write_text(topology_svg(lab, checks))
    out.page.write_text(release_page(lab, manifest, record, checks))
    out.readme.write_text(_readme(lab, manifest))
    _checkpoint("metadata")
    return files


def _checksums(stage: Path, checked: dict, gpg_key: str | None) -> None:
    """SHA256SUMS (one pass that also proves each copy is what was gated), signed on request."""
    out = ReleaseLayout(stage)
    digests = {p.relative_to(stage).as_posix(): sha256(p) for p in sorted(stage.rglob("*")) if p.is_file()}
    for entry in checked["nodes"].values():
        for f in entry["files"].values():
            if digests[f["name"]] != f["sha256"]:
                raise PublishError(f"{f['name']}: copy in {stage} does not match its checksum")
    out.sums.write_text("".join(f"{d}  {rel}\n" for rel, d in digests.items()))
    if not gpg_key:
        return
    try:
        out.sums_signature.write_bytes(
            openpgp.sign(gpg_key, out.sums.read_bytes(), armor=True, what=out.SUMS)
        )
    except openpgp.GpgError as exc:
        raise PublishError(str(exc)) from None


def _provenance(stage: Path, gpg_key: str | None) -> None:
    """``provenance/<node>.intoto.json`` from the staged release (signed with the release key)."""
    manifest = json.loads(ReleaseLayout(stage).manifest.read_text())
    try:
        provenance.write(stage, manifest, gpg_key)
    except openpgp.GpgError as exc:
        raise PublishError(str(exc)) from None
    _checkpoint("provenance")
