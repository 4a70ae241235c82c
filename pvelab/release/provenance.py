"""Provenance per node: an in-toto Statement with a SLSA v1 provenance predicate, in a DSSE envelope.

Written by :mod:`pvelab.release.publish` into each release as ``provenance/<node>.intoto.json``,
from what the release itself holds (``manifest.json``, ``lab.yaml``, the reports), so the
receiving side can check every claim against the bytes it got (:mod:`pvelab.release.verify`):

* **subjects**: each of the node's artefacts in the release and its SBOM, by SHA-256;
* **build definition**: the lab file (name, SHA-256), the node and its role, the base
  key, DIB's elements, the kernel; resolved dependencies: pvelab's git commit, the Debian
  archive state per suite (the SHA-256 of its signed index), every installed package
  as a purl;
* **run details**: the builder and its tool versions, when the node was built, and as
  byproducts the boot-test and rehearsal reports that passed on exactly these bytes
  (each by the SHA-256 of its file in the release, with what it tested).

The statement format comes from ``in-toto-attestation`` (its protobuf Statement and
Provenance messages and their validation), the envelope from ``securesystemslib.dsse``.
With a release key (``--gpg-key``) the envelope carries a GPG signature over DSSE's
pre-authentication encoding; without one its ``signatures`` list is empty.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from in_toto_attestation.predicates.provenance.v1 import provenance_pb2
from in_toto_attestation.v1.resource_descriptor import ResourceDescriptor
from in_toto_attestation.v1.statement import Statement
from in_toto_attestation.v1.statement_pb2 import Statement as StatementPb
from securesystemslib.dsse import Envelope
from securesystemslib.signer import Signature

from pvelab.model.artefacts import ReleaseLayout, sha256
from pvelab.release import openpgp

PAYLOAD_TYPE = "application/vnd.in-toto+json"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "urn:pvelab:build:v1"  # what externalParameters/internalParameters mean: this module
BUILDER_ID = "urn:pvelab:invoke-build"


class ProvenanceError(ValueError):
    pass


def path(release: Path, node: str) -> Path:
    return ReleaseLayout(release).provenance(node)


def _rd(**kw: Any) -> Any:
    return ResourceDescriptor(**kw).pb


def _report(release: Path, report: Path, **annotations: Any) -> Any:
    """A report of the release by the digest of its copy there, with what it tested."""
    return _rd(
        name=report.relative_to(release).as_posix(),
        digest={"sha256": sha256(report)},
        media_type="application/json",
        annotations={f"pvelab.{k}": v for k, v in annotations.items()},
    )


def _byproducts(release: Path, node: dict, manifest: dict) -> list[Any]:
    """The gate's reports on this node's bytes."""
    out = []
    for key in sorted({k for f in node["files"].values() for k in f["boot_tests"]}):
        report = ReleaseLayout(release).boot_test(key)
        data = json.loads(report.read_text())
        out.append(
            _report(
                release,
                report,
                kind="boot-test",
                media=data["media"],
                firmware=data["firmware"],
                scenario=data["result"]["scenario"],
                passed=bool(data["result"]["passed"]),
            )
        )
    for media, entry in sorted(manifest.get("rehearsals", {}).items()):
        report = ReleaseLayout(release).rehearsal(media)
        out.append(_report(release, report, kind="rehearsal", media=media, passed=bool(entry["passed"])))
    return out


def statement(release: Path, manifest: dict, node_name: str) -> dict:
    """The node's in-toto Statement (a dict, as JSON has it), from the release folder."""
    node = next(n for n in manifest["nodes"] if n["name"] == node_name)
    subjects = [_rd(name=f["name"], digest={"sha256": f["sha256"]}) for f in node["files"].values()]
    sbom = ReleaseLayout(release).file(f"{node_name}.cdx.json")
    subjects.append(_rd(name=sbom.name, digest={"sha256": sha256(sbom)}))
    deps = [
        _rd(name="pvelab", uri="git+pvelab", digest={"gitCommit": manifest["git_commit"]}),
        _rd(name=ReleaseLayout.LAB_FILE, digest={"sha256": sha256(ReleaseLayout(release).lab_file)}),
    ]
    for suite, state in sorted(manifest.get("archive", {}).items()):
        deps.append(
            _rd(
                name=f"debian:{suite}",
                uri=f"{state['mirror']}/dists/{suite}/InRelease",
                digest={"sha256": state["index_sha256"]},
                annotations={"date": state.get("date", ""), "version": state.get("version", "")},
            )
        )
    for pkg, version in sorted(node["packages"].items()):
        name, _, arch = pkg.partition(":")
        deps.append(
            _rd(
                name=pkg,
                uri=f"pkg:deb/debian/{name}@{version}?arch={arch or 'amd64'}",
                annotations={"source": node.get("sources", {}).get(pkg, name)},
            )
        )
    prov = provenance_pb2.Provenance()
    bd = prov.build_definition
    bd.build_type = BUILD_TYPE
    bd.external_parameters.update(
        {"lab": manifest["lab"], "labFile": ReleaseLayout.LAB_FILE, "node": node_name, "role": node["role"]}
    )
    bd.internal_parameters.update(
        {
            "baseKey": node["base"]["key"],
            "elements": node["base"]["elements"],
            "kernel": manifest["versions"].get("kernel", ""),
        }
    )
    bd.resolved_dependencies.extend(deps)
    rd = prov.run_details
    rd.builder.id = BUILDER_ID
    rd.builder.version.update({k: str(v) for k, v in manifest["versions"].items()})
    rd.metadata.invocation_id = f"{manifest['lab']}/{manifest['release']}/{node_name}"
    if node.get("built_at"):
        rd.metadata.finished_on.FromJsonString(node["built_at"])
    rd.byproducts.extend(_byproducts(release, node, manifest))
    stmt = Statement(subjects, PREDICATE_TYPE, json_format.MessageToDict(prov))
    stmt.validate()
    return json_format.MessageToDict(stmt.pb)


def envelope(stmt: dict, gpg_key: str | None, keyid: str = "") -> dict:
    """The DSSE envelope of ``stmt``, signed by ``gpg_key`` (fingerprint ``keyid``) when one is given."""
    payload = json.dumps(stmt, indent=None, sort_keys=True, separators=(",", ":")).encode()
    env = Envelope(payload, PAYLOAD_TYPE, {})
    if gpg_key:
        keyid = keyid or openpgp.fingerprint(gpg_key)
        env.signatures[keyid] = Signature(
            keyid, openpgp.sign(gpg_key, env.pae(), armor=False, what="a provenance envelope").hex()
        )
    return env.to_dict()


def write(release: Path, manifest: dict, gpg_key: str | None) -> list[Path]:
    """``provenance/<node>.intoto.json`` for every node of the release."""
    ReleaseLayout(release).provenance_dir.mkdir(exist_ok=True)
    keyid = openpgp.fingerprint(gpg_key) if gpg_key else ""  # one lookup for every envelope
    out = []
    for node in manifest["nodes"]:
        p = path(release, node["name"])
        env = envelope(statement(release, manifest, node["name"]), gpg_key, keyid)
        p.write_text(json.dumps(env, indent=2) + "\n")
        out.append(p)
    return out


# --------------------------------------------------------------------------- reading


def read(p: Path) -> tuple[Envelope, dict]:
    """The envelope and its statement; ProvenanceError says what is malformed."""
    try:
        data = json.loads(p.read_text())
        env = Envelope.from_dict(data)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ProvenanceError(f"not a DSSE envelope ({exc})") from None
    if env.payload_type != PAYLOAD_TYPE:
        raise ProvenanceError(f"payloadType {env.payload_type!r}, not {PAYLOAD_TYPE!r}")
    try:
        stmt = json.loads(env.payload)
        pb = json_format.ParseDict(stmt, StatementPb())
        Statement.copy_from_pb(pb).validate()
    except (ValueError, json_format.ParseError) as exc:
        raise ProvenanceError(f"not an in-toto Statement v1 ({exc})") from None
    if stmt.get("predicateType") != PREDICATE_TYPE:
        raise ProvenanceError(f"predicateType {stmt.get('predicateType')!r}, not {PREDICATE_TYPE!r}")
    try:
        json_format.ParseDict(stmt["predicate"], provenance_pb2.Provenance())
    except json_format.ParseError as exc:
        raise ProvenanceError(f"not a SLSA v1 provenance predicate ({exc})") from None
    return env, stmt


def signature_bytes(sig: Signature) -> bytes:
    return bytes.fromhex(sig.signature)
