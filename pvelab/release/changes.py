"""What changed since the previous release: ``changes.json`` and ``CHANGES.md``.

Compared, release folder against release folder (both written by :mod:`pvelab.release.publish`):

* packages per node (``manifest.json``): added, removed, upgraded/downgraded with both
  versions; an upgrade whose new version is in the ``-security`` suite's package index
  (fetched from the mirror the base was built from) is marked as a security update;
* the Debian archive state the bases were built from (suite dates);
* rendered files per node (``rendered/<node>/...``: corosync.conf, storage.cfg, units),
  with unified diffs;
* the lab file (``lab.yaml``), as a unified diff;
* the git commits between the two builds (``git log old..new`` in this checkout).
"""

from __future__ import annotations

import difflib
import json
import lzma
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from pvelab.core.paths import ROOT
from pvelab.model.artefacts import ReleaseLayout

SCHEMA = 1
MAX_DIFF_LINES = 200


def _packages(manifest: dict) -> dict[str, dict[str, str]]:
    return {n["name"]: n.get("packages", {}) for n in manifest.get("nodes", [])}


def security_index(archive: dict[str, dict], timeout: float = 30.0) -> dict[str, set[str]] | None:
    """package -> versions in the security suite the base used; None when unreachable."""
    suite = next((s for s in archive.values() if s.get("suite", "").endswith("-security")), None)
    if suite is None:
        return None
    url = f"{suite['mirror']}/dists/{suite['suite']}/main/binary-amd64/Packages.xz"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            text = lzma.decompress(resp.read()).decode("utf-8", errors="replace")
    except (urllib.error.URLError, OSError, lzma.LZMAError, ValueError):
        return None
    out: dict[str, set[str]] = {}
    name = None
    for line in text.splitlines():
        if line.startswith("Package: "):
            name = line[9:].strip()
        elif line.startswith("Version: ") and name:
            out.setdefault(name, set()).add(line[9:].strip())
    return out


def package_changes(old: dict[str, dict[str, str]], new: dict[str, dict[str, str]], security) -> list[dict]:
    """One entry per (package, old version, new version), with the nodes it applies to."""
    grouped: dict[tuple[str, str | None, str | None], list[str]] = {}
    for node in sorted(set(old) | set(new)):
        before, after = old.get(node, {}), new.get(node, {})
        for pkg in sorted(set(before) | set(after)):
            if before.get(pkg) != after.get(pkg):
                grouped.setdefault((pkg, before.get(pkg), after.get(pkg)), []).append(node)
    out = []
    for (pkg, was, now), nodes in sorted(grouped.items(), key=lambda kv: kv[0][0]):
        kind = "added" if was is None else "removed" if now is None else "changed"
        if kind == "changed":
            res = subprocess.run(
                ["dpkg", "--compare-versions", str(now), "gt", str(was)], capture_output=True
            )
            kind = "upgraded" if res.returncode == 0 else "downgraded"
        sec = None if security is None or now is None else now in security.get(pkg, set())
        out.append({"package": pkg, "change": kind, "old": was, "new": now, "nodes": nodes, "security": sec})
    return out


def _tree(d: Path) -> dict[str, str]:
    if not d.is_dir():
        return {}
    return {
        "/" + p.relative_to(d).as_posix(): p.read_text(errors="replace")
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


def _diff(old: str, new: str, name: str) -> str:
    lines = list(
        difflib.unified_diff(old.splitlines(True), new.splitlines(True), f"a{name}", f"b{name}", n=2)
    )
    if len(lines) > MAX_DIFF_LINES:
        lines = [*lines[:MAX_DIFF_LINES], f"... ({len(lines) - MAX_DIFF_LINES} more lines)\n"]
    return "".join(lines)


def file_changes(old_release: Path, new_release: Path) -> list[dict]:
    out = []
    old, new = ReleaseLayout(old_release), ReleaseLayout(new_release)
    nodes = sorted({p.name for r in (old, new) for p in r.rendered_dir.glob("*")})
    for node in nodes:
        before, after = _tree(old.rendered(node)), _tree(new.rendered(node))
        for path in sorted(set(before) | set(after)):
            if before.get(path) == after.get(path):
                continue
            kind = "added" if path not in before else "removed" if path not in after else "changed"
            out.append(
                {
                    "node": node,
                    "path": path,
                    "change": kind,
                    "diff": _diff(before.get(path, ""), after.get(path, ""), path),
                }
            )
    return out


def commits(old: str, new: str) -> list[str] | None:
    """``git log --oneline old..new`` here; None when either commit is unknown."""
    old, new = old.removesuffix("-dirty"), new.removesuffix("-dirty")
    res = subprocess.run(
        ["git", "-C", str(ROOT), "log", "--format=%h %s", f"{old}..{new}"], capture_output=True, text=True
    )
    return res.stdout.splitlines() if res.returncode == 0 else None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


# Long on purpose: one record with a section per kind of change.
def compare(old_release: Path | None, new_release: Path, fetch_security: bool = True) -> dict:
    """changes.json for ``new_release`` (a folder holding manifest.json, lab.yaml, rendered/)."""
    new = json.loads(ReleaseLayout(new_release).manifest.read_text())
    record: dict = {
        "schema": SCHEMA,
        "release": new["release"],
        "previous": None,
        "nodes": [n["name"] for n in new.get("nodes", [])],
    }
    if old_release is None:
        record["first_release"] = True
        return record
    old = json.loads(ReleaseLayout(old_release).manifest.read_text())
    record["previous"] = old["release"]
    security = security_index(new.get("archive", {})) if fetch_security else None
    record["packages"] = package_changes(_packages(old), _packages(new), security)
    record["security_index"] = "checked" if security is not None else "unavailable"
    record["archive"] = {
        suite: {"old": old.get("archive", {}).get(suite, {}).get("date"), "new": state.get("date")}
        for suite, state in sorted(new.get("archive", {}).items())
        if old.get("archive", {}).get(suite, {}).get("index_sha256") != state.get("index_sha256")
    }
    record["rendered_files"] = file_changes(old_release, new_release)
    lab_old, lab_new = _read(ReleaseLayout(old_release).lab_file), _read(ReleaseLayout(new_release).lab_file)
    record["lab_file"] = _diff(lab_old, lab_new, "/lab.yaml") if lab_old != lab_new else ""
    record["commits"] = commits(old.get("git_commit", ""), new.get("git_commit", ""))
    record["artefacts"] = {
        f["name"]: "changed" if f["sha256"] != prev.get(f["name"]) else "same"
        for prev in [{f["name"]: f["sha256"] for n in old["nodes"] for f in n["files"].values()}]
        for n in new["nodes"]
        for f in n["files"].values()
    }
    return record


def _version(v: str | None) -> str:
    return v if v is not None else "-"


# Long on purpose: the Markdown page, section by section, as an operator reads it.
def markdown(c: dict) -> str:
    lines = [f"# Changes in {c['release']}", ""]
    if c.get("first_release"):
        return "\n".join([*lines, "First release of this lab: nothing to compare with.", ""])
    lines += [f"Since release {c['previous']}.", ""]
    changed = [n for n, s in c["artefacts"].items() if s == "changed"]
    lines += [f"Artefacts changed: {', '.join(changed) if changed else 'none'}.", ""]
    lines += ["## Debian archive", ""]
    lines += [f"- {s}: {v['old'] or '-'} -> {v['new'] or '-'}" for s, v in c["archive"].items()] or [
        "- unchanged"
    ]
    lines += ["", "## Packages", ""]
    if not c["packages"]:
        lines.append("- no package changed")
    for p in c["packages"]:
        sec = " **(security)**" if p["security"] else ""
        where = "all nodes" if sorted(p["nodes"]) == sorted(c["nodes"]) else ", ".join(p["nodes"])
        lines.append(
            f"- {p['change']}: `{p['package']}` {_version(p['old'])} -> {_version(p['new'])}{sec} ({where})"
        )
    if c["security_index"] == "unavailable":
        lines.append("- (the security suite's index could not be read: security updates are not marked)")
    lines += ["", "## Rendered files", ""]
    if not c["rendered_files"]:
        lines.append("- none changed")
    for f in c["rendered_files"]:
        lines.append(f"- {f['node']}: `{f['path']}` {f['change']}")
        if f["diff"]:
            lines += ["", "```diff", f["diff"].rstrip("\n"), "```", ""]
    lines += ["", "## Lab file", ""]
    lines += ["```diff", c["lab_file"].rstrip("\n"), "```"] if c["lab_file"] else ["- unchanged"]
    lines += ["", "## Commits", ""]
    if c["commits"] is None:
        lines.append("- (one of the two builds' commits is not in this checkout)")
    else:
        lines += [f"- {line}" for line in c["commits"]] or ["- none"]
    return "\n".join(lines) + "\n"
