"""Debian packages for booted guests, fetched on the host and carried in.

A VM never reaches a network. What a rehearsal installs on its throwaway overlays
(Debian trixie's corosync packages) is resolved by the host's apt against the *image's*
own package state (its ``/var/lib/dpkg/status`` and archive keyring, read from the base
squashfs), downloaded from the mirrors the host's apt sources name, and cached under
``build/cache/guest-packages/<base key>/<set>/``: the exact ``.deb`` files that the
guest then installs with ``dpkg -i``.  The built images never contain them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import cache as memo
from pathlib import Path

from pvelab.build import cache
from pvelab.build.hostapt import debian_mirrors
from pvelab.core.errors import PvelabError
from pvelab.core.paths import cache_dir
from pvelab.core.run import Steps

KEYRINGS = "usr/share/keyrings"
KEYRING = f"{KEYRINGS}/debian-archive-keyring.gpg"  # a link to .pgp in trixie: the folder is read
STATUS = "var/lib/dpkg/status"


class PackageError(PvelabError):
    pass


@dataclass(frozen=True)
class PackageSet:
    name: str  # cache folder name, e.g. the role
    packages: tuple[str, ...]  # what was asked for
    debs: tuple[Path, ...]  # what apt resolved: every .deb to install, dependencies included


def _sources(release: str, keyring: Path) -> str:
    archive, security = debian_mirrors()
    if not archive:
        raise PackageError(
            "no Debian archive mirror in the host's apt sources "
            "(/etc/apt/sources.list, /etc/apt/sources.list.d/): cannot fetch guest packages"
        )
    opts = f"[arch=amd64 signed-by={keyring}]"
    lines = [f"deb {opts} {archive} {release} main", f"deb {opts} {archive} {release}-updates main"]
    if security:
        lines.append(f"deb {opts} {security} {release}-security main")
    return "\n".join(lines) + "\n"


def _apt_options(work: Path, image_root: Path, archives: Path) -> list[str]:
    empty = work / "empty"
    for d in (empty, work / "lists" / "partial", archives / "partial", work / "cache"):
        d.mkdir(parents=True, exist_ok=True)
    opts = {
        "Dir::State": work,
        "Dir::State::Lists": work / "lists",
        "Dir::State::status": image_root / STATUS,
        "Dir::Cache": work / "cache",
        "Dir::Cache::archives": archives,
        "Dir::Etc::SourceList": work / "sources.list",
        "Dir::Etc::SourceParts": empty,
        "Dir::Etc::Preferences": empty / "none",
        "Dir::Etc::PreferencesParts": empty,
        "Dir::Etc::TrustedParts": empty,
        "Dir::Log": work,
        "APT::Architecture": "amd64",
        "APT::Architectures": "amd64",
        "APT::Install-Recommends": "false",
        "Acquire::Languages": "none",
        "Debug::NoLocking": "true",
    }
    return [arg for k, v in opts.items() for arg in ("-o", f"{k}={v}")]


def image_root_files(squashfs: Path, dest: Path) -> Path:
    """The few files of the image that apt needs, read out of its squashfs."""
    res = subprocess.run(
        ["unsquashfs", "-no-progress", "-f", "-d", str(dest), str(squashfs), STATUS, KEYRINGS],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0 or not (dest / STATUS).exists() or not (dest / KEYRING).exists():
        raise PackageError(f"{squashfs}: cannot read {STATUS} and {KEYRING}: {res.stderr.strip()[-300:]}")
    return dest


def fetch(
    name: str, packages: tuple[str, ...], squashfs: Path, base_key: str, release: str, steps: Steps
) -> PackageSet:
    """The .deb files that install ``packages`` on an image of base ``base_key`` (cached)."""
    final = cache_dir() / "guest-packages" / base_key / name
    index = final / "index.json"
    if index.exists():
        data = json.loads(index.read_text())
        found = cache.damage(final, ["index.json", *data["debs"]])
        if found:
            aside = cache.move_aside(final)
            steps.say(f"cache: guest packages {name}: {cache.describe(final, found)}: moved aside to {aside}")
        elif tuple(data["packages"]) == packages:
            steps.say(f"guest packages {name}: cached ({len(data['debs'])} .deb files)")
            return PackageSet(name, packages, tuple(final / d for d in data["debs"]))
    with tempfile.TemporaryDirectory(prefix="pvelab-apt-") as tmp:
        work = Path(tmp)
        root = image_root_files(squashfs, work / "root")
        (work / "sources.list").write_text(_sources(release, (root / KEYRING).resolve()))
        staging = final.with_name(f".{name}.{os.getpid()}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        opts = _apt_options(work, root, staging)
        env = {"DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}
        with steps.stage(f"guest packages {name}: resolve against the image, download"):
            steps.run(["apt-get", "-q", *opts, "update"], env=env)
            steps.run(["apt-get", "-q", "-y", *opts, "install", "--download-only", *packages], env=env)
        debs = sorted(p.name for p in staging.glob("*.deb"))
        if not debs:
            raise PackageError(f"apt resolved nothing to download for {' '.join(packages)}")
        (staging / "index.json").write_text(json.dumps({"packages": list(packages), "debs": debs}, indent=2))
        shutil.rmtree(staging / "partial", ignore_errors=True)
        cache.seal(staging, [staging / "index.json", *(staging / d for d in debs)])
        shutil.rmtree(final, ignore_errors=True)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, final)
    steps.say(f"guest packages {name}: {len(debs)} .deb files in {final}")
    return PackageSet(name, packages, tuple(final / d for d in debs))


@memo
def identities(debs: tuple[Path, ...]) -> dict[str, str]:
    """``{package: version}`` of ``.deb`` files, as their control fields say."""
    out = {}
    for deb in debs:
        res = subprocess.run(
            ["dpkg-deb", "-f", str(deb), "Package", "Version"], capture_output=True, text=True
        )
        fields = dict(line.split(": ", 1) for line in res.stdout.splitlines() if ": " in line)
        if res.returncode != 0 or not {"Package", "Version"} <= set(fields):
            raise PackageError(f"{deb}: not a readable .deb ({res.stderr.strip()[-200:]})")
        out[fields["Package"]] = fields["Version"]
    return out


def missing(want: dict[str, str], dpkg_query: str) -> list[str]:
    """Which of ``want`` (package: version) a guest's ``dpkg-query -W -f '${Package}
    ${Version} ${db:Status-Abbrev}\\n'`` output does not show installed at that version."""
    have = {}
    for line in dpkg_query.splitlines():
        parts = line.split()
        if len(parts) >= 3:
            have[parts[0]] = (parts[1], parts[2])
    return [f"{p} {v}" for p, v in sorted(want.items()) if have.get(p) != (v, "ii")]
