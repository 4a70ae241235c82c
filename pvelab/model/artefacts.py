"""The artefact layout and the typed records that stages hand to each other.

One lab, one folder::

    build/<lab>/<node>/<node>.qcow2, <node>.iso, <node>-installer.iso, <node>-netboot.tar,
                       <node>.cdx.json, manifest.json, build.log, overlay/
    build/<lab>/boot-test/<media>-<firmware>/   report.json, junit.xml, consoles
    build/<lab>/rehearsal/<media>/              report.json, junit.xml, summary.txt, consoles
    build/<lab>/run/                            the running lab: state.json, overlays, consoles
    build/<lab>/releases/                       default publish destination (ReleasesDir)
    build/cache/                                shared by every lab (base images, packages)

One lab's releases (``DEST/<lab>/``, :class:`ReleasesDir`) and one release
(:class:`ReleaseLayout`)::

    DEST/<lab>/latest -> <name>, LATEST, status.json, .pvelab-publish.lock, .pvelab-stage-*/
    DEST/<lab>/<YYYYMMDD>T<HHMMSS>Z/  node artefacts, <node>.cdx.json, provenance/<node>.intoto.json,
        SHA256SUMS(.asc), manifest.json, lab.yaml, rendered/<node>/, CHANGES.md, changes.json,
        topology.svg, index.html, README.md, boot-test/<key>.report.json, rehearsal/<media>.*,
        netboot/

Build, boot test, rehearsal and publish depend on this module, not on each other.
The build manifest and the boot report are dataclasses with ``to_json``/``from_json``
and a schema version; a file that does not parse, or whose schema differs, is a
:class:`RecordError` naming the file, never a ``None`` in the next stage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pvelab.core.errors import PvelabError
from pvelab.core.paths import build_root

if TYPE_CHECKING:
    from pvelab.model.lab import Lab, Node


class ArtefactKind(StrEnum):
    """Each kind of artefact a node's build makes, in the order they are listed and published.

    A kind knows its file name in the node's folder, whether a boot test on its exact
    bytes gates its release, whether a release carries it unless ``--artefacts`` says
    otherwise, and which kinds must travel with it. A str: ``ArtefactKind.ISO == "iso"``,
    so records keep plain names."""

    QCOW2 = "qcow2"
    ISO = "iso"
    INSTALLER = "installer"
    NETBOOT = "netboot"  # pvelab.build.netboot

    @property
    def _spec(self) -> _Kind:
        return _KINDS[self]

    def file_name(self, node: str) -> str:
        return self._spec.file.format(node=node)

    def is_booted(self) -> bool:
        """A release carries it only when a boot test passed on exactly its bytes."""
        return self._spec.booted

    def is_published_by_default(self) -> bool:
        return self._spec.published

    def travels_with(self) -> tuple[ArtefactKind, ...]:
        """Kinds a release must carry beside this one (a netboot bundle fetches the ISOs)."""
        return self._spec.needs

    @classmethod
    def published_by_default(cls) -> tuple[ArtefactKind, ...]:
        return tuple(k for k in cls if k.is_published_by_default())


@dataclass(frozen=True)
class _Kind:
    file: str
    booted: bool = True
    published: bool = True
    needs: tuple[ArtefactKind, ...] = ()


_KINDS = {
    ArtefactKind.QCOW2: _Kind("{node}.qcow2"),
    ArtefactKind.ISO: _Kind("{node}.iso"),
    ArtefactKind.INSTALLER: _Kind("{node}-installer.iso"),
    ArtefactKind.NETBOOT: _Kind(
        "{node}-netboot.tar", published=False, needs=(ArtefactKind.ISO, ArtefactKind.INSTALLER)
    ),
}
MANIFEST_SCHEMA = 1
REPORT_SCHEMA = 1
REHEARSAL_SCHEMA = 1


class RecordError(PvelabError):
    pass


class MissingArtefact(PvelabError):
    pass


def built(lab: Lab, node: Node, kind: str) -> Path:
    """The built artefact of ``kind`` of ``node``; missing, one line saying how to build it."""
    path = lab.layout.artefact(node.name, kind)
    if not path.exists():
        raise MissingArtefact(
            f"{path} is missing: run `invoke build --lab {lab.path} --node {node.name}` first"
        )
    return path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_atomic(path: Path, text: str) -> None:
    """Write beside and rename: readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written file beside the good one
        raise


# The files a test run's folder holds besides its consoles (a boot test has no summary).
REPORT, JUNIT, SUMMARY = "report.json", "junit.xml", "summary.txt"


@dataclass(frozen=True)
class Layout:
    """Paths of one lab's outputs under the build root."""

    lab: str

    @property
    def root(self) -> Path:
        return build_root() / self.lab

    def node_dir(self, node: str) -> Path:
        return self.root / node

    def artefact(self, node: str, kind: str) -> Path:
        return self.node_dir(node) / ArtefactKind(kind).file_name(node)

    def manifest(self, node: str) -> Path:
        return self.node_dir(node) / "manifest.json"

    def sbom(self, node: str) -> Path:
        """CycloneDX JSON (:mod:`pvelab.build.sbom`)."""
        return self.node_dir(node) / f"{node}.cdx.json"

    def build_log(self, node: str) -> Path:
        return self.node_dir(node) / "build.log"

    def overlay(self, node: str) -> Path:
        return self.node_dir(node) / "overlay"

    @property
    def base_log(self) -> Path:
        return self.root / "base.log"

    @property
    def recipes(self) -> Path:
        return self.root / "recipes"

    def boot_test_dir(self, media: str, firmware: str) -> Path:
        return self.boot_test_dir_by_key(f"{media}-{firmware}")

    def boot_test_dir_by_key(self, key: str) -> Path:
        """A boot test's folder by its key, ``<media>-<firmware>`` (as :meth:`boot_test_reports` finds them)."""
        return self.root / "boot-test" / key

    def rehearsal_dir(self, media: str) -> Path:
        return self.root / "rehearsal" / media

    def boot_test_reports(self) -> list[Path]:
        """Every boot test's ``report.json`` on disk, in name order (``<media>-<firmware>``)."""
        return sorted((self.root / "boot-test").glob(f"*/{REPORT}"))

    def rehearsal_reports(self) -> list[Path]:
        """Every rehearsal's ``report.json`` on disk, in name order (``<media>``)."""
        return sorted((self.root / "rehearsal").glob(f"*/{REPORT}"))

    @property
    def run_dir(self) -> Path:
        """The running lab (``invoke up``): its state, overlays, consoles, leases."""
        return self.root / "run"

    @property
    def releases(self) -> Path:
        return self.root / "releases"


@dataclass(frozen=True)
class ReleaseLayout:
    """Paths inside one release folder. The names are relative to it (SHA256SUMS, the
    in-toto statements and ``invoke verify`` address files that way)."""

    root: Path

    SUMS = "SHA256SUMS"
    SUMS_SIGNATURE = "SHA256SUMS.asc"
    MANIFEST = "manifest.json"
    LAB_FILE = "lab.yaml"

    @property
    def name(self) -> str:
        return self.root.name

    def file(self, name: str) -> Path:
        """A node artefact or SBOM, by its file name."""
        return self.root / name

    @property
    def sums(self) -> Path:
        return self.root / self.SUMS

    @property
    def sums_signature(self) -> Path:
        return self.root / self.SUMS_SIGNATURE

    @property
    def manifest(self) -> Path:
        return self.root / self.MANIFEST

    @property
    def lab_file(self) -> Path:
        return self.root / self.LAB_FILE

    @property
    def rendered_dir(self) -> Path:
        return self.root / "rendered"

    def rendered(self, node: str) -> Path:
        """What the node was built from (its rendered overlay)."""
        return self.rendered_dir / node

    @property
    def changes_json(self) -> Path:
        return self.root / "changes.json"

    @property
    def changes_md(self) -> Path:
        return self.root / "CHANGES.md"

    @property
    def topology(self) -> Path:
        return self.root / "topology.svg"

    @property
    def page(self) -> Path:
        return self.root / "index.html"

    @property
    def readme(self) -> Path:
        return self.root / "README.md"

    @property
    def boot_test_dir(self) -> Path:
        return self.root / "boot-test"

    def boot_test(self, key: str, fname: str = REPORT) -> Path:
        """A boot test's report (``key`` is ``<media>-<firmware>``) as the release carries it."""
        return self.boot_test_dir / f"{key}.{fname}"

    @property
    def rehearsal_dir(self) -> Path:
        return self.root / "rehearsal"

    def rehearsal(self, media: str, fname: str = REPORT) -> Path:
        return self.rehearsal_dir / f"{media}.{fname}"

    @property
    def netboot(self) -> Path:
        """What a provisioning team serves the netboot bundles with (README: Network boot)."""
        return self.root / "netboot"

    @property
    def provenance_dir(self) -> Path:
        return self.root / "provenance"

    def provenance(self, node: str) -> Path:
        """The node's in-toto statement in its DSSE envelope (:mod:`pvelab.release.provenance`)."""
        return self.provenance_dir / f"{node}.intoto.json"


@dataclass(frozen=True)
class ReleasesDir:
    """One lab's releases destination: the releases, what ``latest`` names, the nightly's
    status, the publish lock and the folders a publish assembles a release in."""

    root: Path

    STAGE_PREFIX = ".pvelab-stage-"

    def release(self, name: str) -> ReleaseLayout:
        return ReleaseLayout(self.root / name)

    @property
    def latest_link(self) -> Path:
        return self.root / "latest"

    @property
    def latest_file(self) -> Path:
        """``LATEST``: the name ``latest`` points at, for mounts without symlinks."""
        return self.root / "LATEST"

    @property
    def status(self) -> Path:
        """``status.json``: what the last nightly did."""
        return self.root / "status.json"

    @property
    def publish_lock(self) -> Path:
        return self.root / ".pvelab-publish.lock"

    def staging(self, name: str, pid: int) -> Path:
        return self.root / f"{self.STAGE_PREFIX}{name}-{pid}"

    def stagings(self) -> list[Path]:
        """Folders a publish left half-assembled (killed before its rename)."""
        return sorted(self.root.glob(self.STAGE_PREFIX + "*"))


# --------------------------------------------------------------------------- records

T = TypeVar("T")


def _from_dict(cls: type[T], data: Any, where: str) -> T:
    """Build dataclass ``cls`` from ``data``; missing or unknown keys are a RecordError."""
    if not isinstance(data, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    required = {
        f.name
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    missing, unknown = required - data.keys(), data.keys() - names
    if missing or unknown:
        raise RecordError(
            f"{where}: {'missing ' + ', '.join(sorted(missing)) if missing else ''}"
            f"{'; ' if missing and unknown else ''}"
            f"{'unknown ' + ', '.join(sorted(unknown)) if unknown else ''}"
        )
    return cls(**data)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise RecordError(f"{path}: cannot be read ({exc.strerror})") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise RecordError(f"{path}: is not valid JSON ({exc})") from None


def _check_schema(data: Any, want: int, path: Path) -> None:
    got = data.get("schema") if isinstance(data, dict) else None
    if got != want:
        raise RecordError(
            f"{path}: schema {got!r}, this pvelab reads schema {want} "
            "(rebuild or re-run the stage that wrote it)"
        )


def _typed_map(data: dict, key: str, cls: type, path: Path) -> dict:
    """``data[key]``, a mapping of name -> record, with each record typed (when present)."""
    if isinstance(data.get(key), dict):
        data[key] = {k: _from_dict(cls, v, f"{path}: {key}.{k}") for k, v in data[key].items()}
    return data


@dataclass(frozen=True)
class ArtefactInfo:
    size: int
    sha256: str
    virtual_size: int | None = None
    volume_label: str | None = None


@dataclass(frozen=True)
class BuildManifest:
    """What ``invoke build`` made for one node (``build/<lab>/<node>/manifest.json``)."""

    lab: str
    node: str
    role: str
    alias: str
    ram_mb: int
    disk_gb: int
    artefacts: dict[str, ArtefactInfo]
    base_key: str
    elements: list[str]
    overlay_files: list[str]
    enabled_units: list[str]
    packages: dict[str, str]
    kernel: str
    tools: dict[str, str]
    git_commit: str
    built_at: str
    build_seconds: dict[str, float]
    password_found: list[str] = field(default_factory=list)  # files holding the lab's plain password
    archive: dict[str, dict] = field(default_factory=dict)  # suite -> state the base was built from
    sources: dict[str, str] = field(default_factory=dict)  # binary package -> source package
    schema: int = MANIFEST_SCHEMA

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, path: Path) -> BuildManifest:
        data = _read_json(path)
        _check_schema(data, MANIFEST_SCHEMA, path)
        data = _typed_map(dict(data), "artefacts", ArtefactInfo, path)
        return _from_dict(cls, data, str(path))


@dataclass
class AssertionResult:
    description: str
    on_vm: str
    type: str
    passed: bool
    attempts: int
    last_status: int
    last_output: str
    seconds: float


@dataclass
class TestResult:
    __test__ = False  # not a pytest class
    name: str
    passed: bool
    seconds: float
    assertions: list[AssertionResult] = field(default_factory=list)


@dataclass
class ScenarioResult:
    scenario: str
    passed: bool
    tests: list[TestResult]
    seconds: float

    @property
    def counts(self) -> tuple[int, int]:
        ok = sum(t.passed for t in self.tests)
        return ok, len(self.tests) - ok


def _scenario_result(data: Any, where: str) -> ScenarioResult:
    r = _from_dict(ScenarioResult, data, where)
    r.tests = [_from_dict(TestResult, t, f"{where}.tests") for t in r.tests]
    for t in r.tests:
        t.assertions = [_from_dict(AssertionResult, a, f"{where}.assertions") for a in t.assertions]
    return r


@dataclass(frozen=True)
class ArtefactRef:
    path: str
    sha256: str


@dataclass
class BootReport:
    """One boot test (``build/<lab>/boot-test/<media>-<firmware>/report.json``)."""

    lab: str
    lab_file: str
    media: str
    firmware: str
    accel: str
    accel_reason: str
    artefacts: dict[str, ArtefactRef]
    result: ScenarioResult
    ssh_ready_seconds: dict[str, float] = field(default_factory=dict)
    dhcp_leases: dict[str, str] = field(default_factory=dict)
    host_keys: dict[str, str] = field(default_factory=dict)
    failed_units: dict[str, str] = field(default_factory=dict)
    boot_analysis: dict[str, dict[str, str]] = field(default_factory=dict)
    secure_boot: dict[str, bool] = field(
        default_factory=dict
    )  # UEFI: what each guest's SecureBoot variable says
    secure_boot_required: bool = False
    api_fingerprints: dict[str, str] = field(default_factory=dict)  # SHA-256 of each node's API certificate
    install_seconds: dict[str, float] = field(default_factory=dict)  # --media install: power-on to power-off
    install_attempts: dict[str, int] = field(default_factory=dict)  # 2: the first attempt hung (retried once)
    guest_faults: list[dict[str, Any]] = field(default_factory=list)  # kernel panics seen (guestfault)
    lab_sha256: str = ""  # of the lab file the test ran with (a pass counts only for that lab)
    after: Any = None  # what a test's ``after`` hook returned (tests only)
    wall_seconds: float = 0.0
    schema: int = REPORT_SCHEMA

    @property
    def passed(self) -> bool:
        sb_ok = not self.secure_boot_required or (bool(self.secure_boot) and all(self.secure_boot.values()))
        return self.result.passed and sb_ok

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        ok, bad = self.result.counts
        d["summary"] = {"passed": ok, "failed": bad}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, path: Path) -> BootReport:
        data = _read_json(path)
        _check_schema(data, REPORT_SCHEMA, path)
        data = _typed_map(dict(data), "artefacts", ArtefactRef, path)
        data.pop("summary", None)
        data["result"] = _scenario_result(data.get("result"), f"{path}: result")
        return _from_dict(cls, data, str(path))


@dataclass
class NodeObservation:
    """One member in one walk step: what the model expects, what corosync said."""

    node: str
    expected: dict[str, Any]
    observed: dict[str, Any]
    passed: bool
    quorumtool: str = ""  # raw `corosync-quorumtool -s` output, last poll
    api_quorate: int | None = None  # pve-compat's /cluster/status quorate, last poll
    cfgtool: str = ""  # raw `corosync-cfgtool -s` output as the step ended
    links: dict[str, dict[str, str]] = field(default_factory=dict)  # link -> peer -> knet's state


@dataclass
class WalkStep:
    number: int
    title: str
    events: list[str]
    passed: bool
    settle_seconds: float | None  # event to the state the model expects (None: never reached)
    nodes: list[NodeObservation] = field(default_factory=list)
    membership_held: bool | None = None  # the ring id stayed as before the events (None: not asked)
    # event to the last poll where members of two of the step's partitions (the model's)
    # both said quorate (None: never seen): the 2-node window, or two writers by hand
    two_writers_seconds: float | None = None
    two_writers_expected: bool = False  # the state reached has two writers (`expected 1`)
    measurement: dict[str, Any] = field(default_factory=dict)  # a latency ladder's or a window's figures
    failure: str = ""  # why it did not pass, beyond the per-node mismatch


@dataclass
class DeployRecord:
    title: str
    on: list[str]
    seconds: float
    passed: bool
    output: str = ""


@dataclass
class RehearsalReport:
    """One rehearsal (``build/<lab>/rehearsal/<media>/report.json``)."""

    lab: str
    lab_file: str
    media: str
    firmware: str
    accel: str
    artefacts: dict[str, ArtefactRef]
    packages: dict[str, list[str]]
    deploy: list[DeployRecord] = field(default_factory=list)
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    scenario: ScenarioResult | None = None
    steps: list[WalkStep] = field(default_factory=list)
    boot_seconds: float = 0.0  # start of the run to SSH on every VM
    guest_faults: list[dict[str, Any]] = field(default_factory=list)  # kernel panics seen (guestfault)
    first_quorate_seconds: float = 0.0  # start of the run to the whole cluster quorate with its QDevice
    walk_seconds: float = 0.0
    wall_seconds: float = 0.0
    error: str = ""
    lab_sha256: str = ""  # of the lab file the rehearsal ran with
    schema: int = REHEARSAL_SCHEMA

    @property
    def passed(self) -> bool:
        return (
            not self.error
            and bool(self.steps)
            and all(s.passed for s in self.steps)
            and all(d.passed for d in self.deploy)
            and all(c.get("passed") for c in self.checks.values())
            and (self.scenario is None or self.scenario.passed)
        )

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["passed"] = self.passed
        return json.dumps(d, indent=2) + "\n"

    @classmethod
    def from_json(cls, path: Path) -> RehearsalReport:
        data = _read_json(path)
        _check_schema(data, REHEARSAL_SCHEMA, path)
        data = _typed_map(dict(data), "artefacts", ArtefactRef, path)
        data.pop("passed", None)
        data["deploy"] = [_from_dict(DeployRecord, d, f"{path}: deploy") for d in data.get("deploy", [])]
        steps = [_from_dict(WalkStep, s, f"{path}: steps") for s in data.get("steps", [])]
        for s in steps:
            s.nodes = [_from_dict(NodeObservation, n, f"{path}: steps.nodes") for n in s.nodes]
        data["steps"] = steps
        if data.get("scenario"):
            data["scenario"] = _scenario_result(data["scenario"], f"{path}: scenario")
        return _from_dict(cls, data, str(path))
