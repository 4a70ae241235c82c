"""`invoke verify RELEASE_DIR [--key FILE]`: check a release on the receiving side, offline.

Needs nothing but the release folder (and, for signatures, the release's public key,
got out of band): no lab file, no ``build/``, no network. Checks, each problem named
``FILE: check: what is wrong``:

* ``SHA256SUMS``: every file listed is there with that SHA-256, and every file of the
  release is listed;
* signatures (with ``--key``): ``SHA256SUMS.asc`` and each provenance envelope's DSSE
  signature are good signatures by a key of that file;
* provenance (``provenance/<node>.intoto.json``, :mod:`pvelab.release.provenance`): a DSSE
  envelope holding an in-toto Statement v1 with a SLSA v1 predicate; each subject is a
  file of the release with that SHA-256 and each of the node's artefacts is a subject;
  the lab file it names is ``lab.yaml``; each report it names as a byproduct is that file;
* SBOMs (``<node>.cdx.json``): each file component's SHA-256 matches the file of that
  name in the release, and each of the node's artefacts is a component;
* the gate: each artefact's boot tests (``manifest.json``) are reports in the release
  that passed and name exactly these bytes; each rehearsal in the manifest passed on
  exactly these bytes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from pvelab.core.errors import PvelabError
from pvelab.model.artefacts import ReleaseLayout, sha256
from pvelab.model.media import MEDIA
from pvelab.release import openpgp, provenance

SUMS = ReleaseLayout.SUMS
SUMS_SIG = ReleaseLayout.SUMS_SIGNATURE
SUM_LINE = re.compile(r"^([0-9a-f]{64})  (\S.*)$")


class VerifyInputError(PvelabError):
    """The release folder or the key file cannot be used at all (exit 2)."""


@dataclass
class Verification:
    release: Path
    problems: list[str] = field(default_factory=list)
    files: int = 0
    signatures: int = 0  # good signatures checked
    unchecked_signatures: int = 0  # signatures present, no --key to check them with
    statements: int = 0
    sboms: int = 0
    reports: int = 0
    _digests: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def fail(self, file: str, check: str, problem: str) -> None:
        self.problems.append(f"{file}: {check}: {problem}")

    def digest(self, rel: str) -> str | None:
        """The SHA-256 of a release file, hashed once (None: no such file)."""
        if rel not in self._digests:
            p = self.release / rel
            if not p.is_file() or ".." in Path(rel).parts:
                return None
            self._digests[rel] = sha256(p)
        return self._digests[rel]

    def summary(self) -> str:
        if self.unchecked_signatures:
            sigs = f"{self.unchecked_signatures} signatures NOT checked (no --key)"
        elif self.signatures:
            sigs = f"{self.signatures} good signatures"
        else:
            sigs = "unsigned"
        return (
            f"{self.release}: {'verified' if self.ok else 'FAILED'}: {self.files} files match {SUMS}; {sigs}; "
            f"{self.statements} provenance statements, {self.sboms} SBOMs and {self.reports} test reports "
            f"name these bytes" + ("" if self.ok else f"; {len(self.problems)} problems")
        )


def _sums(v: Verification) -> None:
    sums = v.release / SUMS
    if not sums.is_file():
        v.fail(SUMS, "present", "missing")
        return
    listed = set()
    for n, line in enumerate(sums.read_text(errors="replace").splitlines(), 1):
        m = SUM_LINE.match(line)
        if not m or ".." in Path(m.group(2)).parts or m.group(2).startswith("/"):
            v.fail(SUMS, "format", f"line {n} is not '<sha256>  <file>': {line[:80]!r}")
            continue
        want, rel = m.groups()
        listed.add(rel)
        got = v.digest(rel)
        if got is None:
            v.fail(rel, SUMS, "listed but missing")
        elif got != want:
            v.fail(rel, SUMS, f"sha256 {got[:16]}... is not the listed {want[:16]}...")
        else:
            v.files += 1
    for p in sorted(v.release.rglob("*")):
        rel = p.relative_to(v.release).as_posix()
        if p.is_file() and not p.is_symlink() and rel not in listed and rel not in (SUMS, SUMS_SIG):
            v.fail(rel, SUMS, "not listed (added after the release was made)")


def _sums_signature(v: Verification, ring: openpgp.Keyring | None) -> None:
    sig = v.release / SUMS_SIG
    if ring is None:
        v.unchecked_signatures += sig.is_file()
        return
    if not sig.is_file():
        v.fail(SUMS_SIG, "signature", "missing (the release is unsigned, and --key was given)")
    elif (v.release / SUMS).is_file() and ring.verify(sig.read_bytes(), (v.release / SUMS).read_bytes()):
        v.signatures += 1
    else:
        v.fail(SUMS_SIG, "signature", "not a good signature of SHA256SUMS by a key of --key")


def _statement(v: Verification, node: dict, ring: openpgp.Keyring | None) -> None:
    name = node["name"]
    p = provenance.path(v.release, name)
    rel = p.relative_to(v.release).as_posix()
    if not p.is_file():
        v.fail(rel, "provenance", f"missing for node {name}")
        return
    try:
        env, stmt = provenance.read(p)
    except provenance.ProvenanceError as exc:
        v.fail(rel, "provenance", str(exc))
        return
    if ring is None:
        v.unchecked_signatures += len(env.signatures)
    elif not env.signatures:
        v.fail(rel, "signature", "the envelope is unsigned, and --key was given")
    else:
        good = [s for s in env.signatures.values() if ring.verify(provenance.signature_bytes(s), env.pae())]
        if good:
            v.signatures += 1
        else:
            v.fail(rel, "signature", "no good DSSE signature by a key of --key")
    before = len(v.problems)
    subjects = {s.get("name", ""): s.get("digest", {}).get("sha256", "") for s in stmt["subject"]}
    for sname, want in subjects.items():
        got = v.digest(sname)
        if got is None:
            v.fail(rel, "provenance subject", f"{sname} is not in the release")
        elif got != want:
            v.fail(sname, "provenance subject", f"sha256 {got[:16]}... is not the {want[:16]}... {rel} names")
    for f in node["files"].values():
        if f["name"] not in subjects:
            v.fail(rel, "provenance subject", f"{f['name']} of node {name} is not a subject")
    pred = stmt["predicate"]
    deps = {d.get("name"): d for d in pred["buildDefinition"].get("resolvedDependencies", [])}
    lab = deps.get(ReleaseLayout.LAB_FILE, {}).get("digest", {}).get("sha256")
    if lab != v.digest(ReleaseLayout.LAB_FILE):
        v.fail(ReleaseLayout.LAB_FILE, "provenance input", f"is not the lab file {rel} was built from")
    for b in pred.get("runDetails", {}).get("byproducts", []):
        bname, want = b.get("name", ""), b.get("digest", {}).get("sha256")
        if v.digest(bname) != want:
            v.fail(
                bname, "provenance byproduct", f"is not the report {rel} names (sha256 {str(want)[:16]}...)"
            )
    v.statements += len(v.problems) == before


def _sbom(v: Verification, node: dict) -> None:
    rel = f"{node['name']}.cdx.json"
    try:
        bom = json.loads((v.release / rel).read_text())
        files = {
            c["name"]: next((h["content"] for h in c.get("hashes", []) if h.get("alg") == "SHA-256"), None)
            for c in bom["components"]
            if c.get("type") == "file"
        }
    except (OSError, ValueError, KeyError, TypeError) as exc:
        v.fail(rel, "SBOM", f"not a readable CycloneDX JSON SBOM ({exc})")
        return
    before = len(v.problems)
    for fname, want in files.items():
        got = v.digest(fname)
        if got is not None and got != want:
            v.fail(fname, "SBOM", f"sha256 {got[:16]}... is not the {str(want)[:16]}... {rel} lists")
    for f in node["files"].values():
        if f["name"] not in files:
            v.fail(rel, "SBOM", f"{f['name']} is not one of its components")
    v.sboms += len(v.problems) == before


def _report(v: Verification, rel: str, node: str, artefact: str) -> bool:
    """Whether the report ``rel`` passed and names exactly ``artefact``'s bytes for ``node``."""
    try:
        data = json.loads((v.release / rel).read_text())
        passed = data["result"]["passed"] if "result" in data else data["passed"]
        named = data["artefacts"][node]["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        v.fail(rel, "gate", f"missing or unreadable (it is named for {artefact})")
        return False
    if not passed:
        v.fail(rel, "gate", "did not pass")
    elif named != v.digest(artefact):
        v.fail(artefact, "gate", f"is not the file {rel} tested (it tested sha256 {str(named)[:16]}...)")
    else:
        return True
    return False


def _gate(v: Verification, manifest: dict) -> None:
    checked = set()
    for node in manifest["nodes"]:
        for f in node["files"].values():
            for key in f["boot_tests"]:
                rel = f"boot-test/{key}.report.json"
                if _report(v, rel, node["name"], f["name"]):
                    checked.add(rel)
    for media in manifest.get("rehearsals", {}):
        rel = f"rehearsal/{media}.report.json"
        kind = MEDIA[media].artefact if media in MEDIA else media
        for node in manifest["nodes"]:
            f = node["files"].get(kind)
            if f is not None and _report(v, rel, node["name"], f["name"]):
                checked.add(rel)
    v.reports = len(checked)


def verify(release: Path, key: Path | None = None) -> Verification:
    """Every check above; a Verification listing what failed (empty: the release is good)."""
    release = Path(release)
    if not release.is_dir():
        raise VerifyInputError(f"{release}: not a folder (give a release folder, e.g. DEST/<lab>/latest)")
    if key is not None and not Path(key).is_file():
        raise VerifyInputError(f"--key {key}: no such file")
    try:
        manifest = json.loads(ReleaseLayout(release).manifest.read_text())
        nodes = manifest["nodes"]
        for node in nodes:
            node["name"], node["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise VerifyInputError(f"{release}/manifest.json: not a pvelab release manifest ({exc})") from None
    v = Verification(release)
    _sums(v)

    def rest(ring: openpgp.Keyring | None) -> None:
        _sums_signature(v, ring)
        for node in nodes:
            _statement(v, node, ring)
            _sbom(v, node)
        _gate(v, manifest)

    if key is None:
        rest(None)
    else:
        try:
            with openpgp.keyring(Path(key)) as ring:
                rest(ring)
        except openpgp.GpgError as exc:
            raise VerifyInputError(str(exc)) from None
    return v
