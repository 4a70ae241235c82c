"""A CycloneDX 1.6 SBOM per node (``build/<lab>/<node>/<node>.cdx.json``), written with
cyclonedx-python-lib and checked against the official schema by its validator.

Components: every installed Debian package (purl ``pkg:deb/debian/<name>@<version>``
with arch and distro, its source package as a property, its licences from the package's
machine-readable ``/usr/share/doc/<pkg>/copyright`` where it has one: SPDX ids where the
short name maps to one, the name as written otherwise), and the node's artefacts as
``file`` components with their SHA-256. Reproducible: the timestamp is the build's
SOURCE_DATE_EPOCH and the serial number is derived from the lab, node and artefacts.
"""

from __future__ import annotations

import datetime
import re
from pathlib import Path

from cyclonedx.model import HashAlgorithm, HashType, Property
from cyclonedx.model.bom import Bom, BomMetaData
from cyclonedx.model.component import Component, ComponentType
from cyclonedx.model.license import DisjunctiveLicense
from cyclonedx.output.json import JsonV1Dot6
from cyclonedx.schema import SchemaVersion
from cyclonedx.spdx import fixup_id
from cyclonedx.validation.json import JsonStrictValidator
from packageurl import PackageURL

from pvelab.core import repro
from pvelab.model.artefacts import BuildManifest

LICENSE_LINE = re.compile(r"^License:[ \t]*(\S.*?)\s*$", re.M)
# Debian's DEP-5 short names that differ from SPDX ids only by the "+" convention
_DEBIAN_SPDX = {
    "GPL-1+": "GPL-1.0-or-later",
    "GPL-2+": "GPL-2.0-or-later",
    "GPL-3+": "GPL-3.0-or-later",
    "LGPL-2.1+": "LGPL-2.1-or-later",
    "GPL-2": "GPL-2.0-only",
    "GPL-3": "GPL-3.0-only",
    "LGPL-2.1": "LGPL-2.1-only",
    "LGPL-3+": "LGPL-3.0-or-later",
    "LGPL-3": "LGPL-3.0-only",
    "LGPL-2+": "LGPL-2.0-or-later",
    "Expat": "MIT",
    "public-domain": "",
}


def licenses(root: Path, packages: dict[str, str]) -> dict[str, list[str]]:
    """package -> licence short names of its DEP-5 copyright file (empty when it has none)."""
    out: dict[str, list[str]] = {}
    for pkg in packages:
        path = root / "usr/share/doc" / pkg.split(":")[0] / "copyright"
        try:
            text = path.read_text(errors="replace")
        except OSError:
            out[pkg] = []
            continue
        if not text.startswith("Format:"):
            out[pkg] = []  # free-form copyright file: nothing machine-readable
            continue
        names: list[str] = []
        for expr in LICENSE_LINE.findall(text):
            for name in re.split(r"\s+(?:or|and|OR|AND)\s+|,\s*", expr):
                name = name.strip()
                if name and name not in names:
                    names.append(name)
        out[pkg] = names
    return out


def _license(name: str) -> DisjunctiveLicense | None:
    mapped = _DEBIAN_SPDX.get(name, name)
    if not mapped:
        return None
    spdx = fixup_id(mapped)
    return DisjunctiveLicense(id=spdx) if spdx else DisjunctiveLicense(name=name)


def node_sbom(manifest: BuildManifest, licences: dict[str, list[str]], epoch: int, release: str) -> str:
    """The SBOM of one built node as CycloneDX 1.6 JSON."""
    image = Component(
        name=f"{manifest.lab}/{manifest.node}",
        type=ComponentType.OPERATING_SYSTEM,
        version=manifest.base_key,
        description=f"pvelab {manifest.role} node image (Debian {release})",
        bom_ref=f"image:{manifest.node}",
    )
    bom = Bom(
        metadata=BomMetaData(
            component=image,
            timestamp=datetime.datetime.fromtimestamp(epoch, datetime.UTC),
            properties=[Property(name="pvelab:git_commit", value=manifest.git_commit)],
        ),
        serial_number=repro.derived_uuid(
            manifest.lab, manifest.node, *sorted(a.sha256 for a in manifest.artefacts.values())
        ),
    )
    for name, info in sorted(manifest.artefacts.items()):
        bom.components.add(
            Component(
                name=name,
                type=ComponentType.FILE,
                hashes=[HashType(alg=HashAlgorithm.SHA_256, content=info.sha256)],
                bom_ref=f"file:{name}",
            )
        )
    for pkg, version in sorted(manifest.packages.items()):
        arch = "amd64"
        base, _, qual = pkg.partition(":")
        lic = [x for x in (_license(n) for n in licences.get(pkg, [])) if x is not None]
        bom.components.add(
            Component(
                name=base,
                version=version,
                type=ComponentType.LIBRARY,
                purl=PackageURL("deb", "debian", base, version, {"arch": qual or arch, "distro": release}),
                licenses=lic,
                properties=[Property(name="pvelab:debian:source", value=manifest.sources.get(pkg, base))],
                bom_ref=f"deb:{pkg}",
            )
        )
    bom.register_dependency(image, list(bom.components))  # the image holds all of them
    return JsonV1Dot6(bom).output_as_string(indent=2) + "\n"


def validate(text: str) -> str | None:
    """None when ``text`` is valid CycloneDX 1.6 JSON per the official schema, else why not."""
    error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(text)
    return None if error is None else str(error)
