"""The state of the Debian archive a base is built from, part of the base's cache key.

A base is built from three suites: ``<release>``, ``<release>-updates`` (archive mirror)
and ``<release>-security`` (security mirror), read from the host's apt sources like the
build's own mirrors. Each suite's state is the SHA-256 its signed ``InRelease`` gives for
``main/binary-amd64/Packages.xz``: it changes exactly when a package in the suite does,
not when the security suite is merely re-signed (its ``Valid-Until`` moves weekly). So a
nightly rebuilds the base when Debian published something, and reuses it otherwise.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import asdict, dataclass

from pvelab.build.hostapt import debian_mirrors
from pvelab.core.run import StepError

INDEX = "main/binary-amd64/Packages"
TIMEOUT = 20.0


class ArchiveUnreachable(StepError):
    pass


@dataclass(frozen=True)
class SuiteState:
    suite: str
    mirror: str
    index_sha256: str  # of main/binary-amd64/Packages.xz (or Packages) per InRelease
    date: str  # InRelease Date: (when the suite was last published)
    version: str = ""  # InRelease Version: (point release), empty for -updates/-security


def parse_inrelease(text: str, suite: str, mirror: str) -> SuiteState:
    fields: dict[str, str] = {}
    sha256: dict[str, str] = {}
    section = None
    for line in text.splitlines():
        if line.startswith("-----BEGIN PGP SIGNATURE"):
            break
        if line[:1] == " " and section == "SHA256":
            words = line.split()
            if len(words) == 3:
                sha256[words[2]] = words[0]
        elif ":" in line and line[:1] != " ":
            key, value = line.split(":", 1)
            section = key
            fields[key] = value.strip()
    digest = sha256.get(INDEX + ".xz") or sha256.get(INDEX)
    if not digest:
        raise ArchiveUnreachable(f"{mirror}/dists/{suite}/InRelease lists no {INDEX}(.xz) SHA256")
    return SuiteState(suite, mirror, digest, fields.get("Date", ""), fields.get("Version", ""))


def suites(release: str) -> list[tuple[str, str]]:
    """(mirror, suite) pairs the base build reads, mirrors from the host's apt sources."""
    archive, security = debian_mirrors()
    if not archive or not security:
        raise ArchiveUnreachable(
            "the host's apt sources name no Debian archive and security mirror "
            "(needed to read the archive state)"
        )
    return [(archive, release), (archive, f"{release}-updates"), (security, f"{release}-security")]


def fetch_state(release: str, timeout: float = TIMEOUT) -> dict[str, SuiteState]:
    """Each suite's state, read from its InRelease; ArchiveUnreachable when any fails."""
    out = {}
    for mirror, suite in suites(release):
        url = f"{mirror}/dists/{suite}/InRelease"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                text = resp.read().decode("utf-8", errors="replace")
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise ArchiveUnreachable(f"{url}: {getattr(exc, 'reason', exc)}") from None
        out[suite] = parse_inrelease(text, suite, mirror)
    return out


def key_part(state: dict[str, SuiteState]) -> dict[str, str]:
    """What of the state goes into the base's cache key: the package indexes only."""
    return {suite: s.index_sha256 for suite, s in sorted(state.items())}


def to_json(state: dict[str, SuiteState]) -> dict[str, dict]:
    return {suite: asdict(s) for suite, s in sorted(state.items())}


def from_json(data: dict[str, dict]) -> dict[str, SuiteState]:
    """The state :func:`to_json` wrote (a base's ``base.json``)."""
    return {suite: SuiteState(**fields) for suite, fields in data.items()}
