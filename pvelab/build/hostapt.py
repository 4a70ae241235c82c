"""Debian mirrors from the build host's apt configuration.

pvelab never names a mirror host itself: the archive and security mirrors for DIB
are read from the host's apt sources (one-line ``.list`` and deb822 ``.sources``).
When the host has no Debian sources, DIB's own defaults apply.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Source:
    uri: str
    suites: tuple[str, ...]


def _parse_list(text: str) -> list[Source]:
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        words = line.split()[1:]
        if words and words[0].startswith("["):  # options: [arch=amd64 signed-by=...]
            while words and not words[0].endswith("]"):
                words.pop(0)
            words = words[1:]
        if len(words) >= 2:
            out.append(Source(words[0].rstrip("/"), (words[1],)))
    return out


def _parse_deb822(text: str) -> list[Source]:
    out = []
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = None
        for raw in stanza.splitlines():
            if raw.lstrip().startswith("#"):
                continue
            if raw[:1] in (" ", "\t") and key:
                fields[key] += " " + raw.strip()
            elif ":" in raw:
                key, value = raw.split(":", 1)
                key = key.strip().lower()
                fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        suites = tuple(fields.get("suites", "").split())
        for uri in fields.get("uris", "").split():
            out.append(Source(uri.rstrip("/"), suites))
    return out


def host_sources(root: Path = Path("/")) -> list[Source]:
    etc = root / "etc/apt"
    files = [etc / "sources.list"]
    d = etc / "sources.list.d"
    if d.is_dir():
        files += sorted(d.glob("*.list")) + sorted(d.glob("*.sources"))
    out: list[Source] = []
    for f in files:
        try:
            text = f.read_text()
        except OSError:
            continue
        out += _parse_deb822(text) if f.suffix == ".sources" else _parse_list(text)
    return out


_KNOWN_SUITES = (
    "bookworm",
    "trixie",
    "forky",
    "sid",
    "bullseye",
    "buster",
    "stable",
    "testing",
    "unstable",
    "oldstable",
)


def debian_mirrors(root: Path = Path("/")) -> tuple[str | None, str | None]:
    """(archive mirror, security mirror) of the host's Debian sources, or None each."""
    archive = security = None
    for src in host_sources(root):
        for suite in src.suites:
            base = suite.split("-", 1)[0].split("/", 1)[0]
            if base not in _KNOWN_SUITES:
                continue
            if suite.endswith("-security") or "/updates" in suite:
                security = security or src.uri
            elif "-" not in suite:
                archive = archive or src.uri
    return archive, security


def dib_mirror_env(root: Path = Path("/")) -> dict[str, str]:
    """DIB_DISTRIBUTION_MIRROR / DIB_DEBIAN_SECURITY_MIRROR unless the caller set them."""
    archive, security = debian_mirrors(root)
    env = {}
    if archive and not os.environ.get("DIB_DISTRIBUTION_MIRROR"):
        env["DIB_DISTRIBUTION_MIRROR"] = archive
    if security and not os.environ.get("DIB_DEBIAN_SECURITY_MIRROR"):
        env["DIB_DEBIAN_SECURITY_MIRROR"] = security
    return env
